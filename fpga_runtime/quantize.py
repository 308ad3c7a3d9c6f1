"""Number formats of the narrow precision modes, in numpy (export) and torch (reference runs).

int8: symmetric, zero point 0, values in [-127, 127] (not -128, so that negation is exact), round half
to even like OpenCL's ``rint``. bfp8: block floating point as in Brainwave: a block of ``BFP_BLOCK``
consecutive values shares one power-of-two exponent and each value keeps an 8-bit signed mantissa.
"""

from __future__ import annotations

import numpy as np
import torch

PRECISIONS = ("fp32", "fp16", "int8", "bfp8")
BFP_BLOCK = 16
INT8_MAX = 127


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``w`` [Cout, ...] per output channel; returns (int8 weights, float32 scales [Cout])."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    # An all-zero channel keeps scale 1 so that dequantisation never divides by zero.
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0)
    q = np.clip(np.rint(flat / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(w.shape), scale.astype(np.float32)


def bfp8_encode(w: np.ndarray, block: int = BFP_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``w`` [Cout, K...] in blocks of ``block`` along the flattened K axis.

    Returns int8 mantissas [Cout, K] and int8 step exponents [Cout, ceil(K/block)]: a value is
    ``mantissa * 2**exponent``.
    """
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    cout, k = flat.shape
    nblocks = -(-k // block)
    padded = np.zeros((cout, nblocks * block))
    padded[:, :k] = flat
    blocks = padded.reshape(cout, nblocks, block)
    amax = np.abs(blocks).max(axis=2)
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = f * 2**e with 0.5 <= f < 1
    step_exp = (e - 7).astype(np.int64)
    mant = np.clip(np.rint(blocks / np.ldexp(1.0, step_exp)[..., None]), -INT8_MAX, INT8_MAX)
    return mant.reshape(cout, -1)[:, :k].astype(np.int8), step_exp.astype(np.int8)


def bfp8_decode(mant: np.ndarray, exp: np.ndarray, block: int = BFP_BLOCK) -> np.ndarray:
    """Inverse of :func:`bfp8_encode`: float32 [Cout, K]."""
    steps = np.repeat(np.ldexp(1.0, exp.astype(np.int64)), block, axis=1)[:, : mant.shape[1]]
    return (mant.astype(np.float64) * steps).astype(np.float32)


def int8_round_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-tensor int8 rounding of activations (integer values, as float)."""
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX)


def bfp8_round_channels(x: torch.Tensor, block: int = BFP_BLOCK) -> torch.Tensor:
    """Round NCHW activations to bfp8 with blocks of ``block`` channels per pixel (as the kernel)."""
    n, c, h, w = x.shape
    nblocks = -(-c // block)
    padded = torch.zeros(n, nblocks * block, h, w, dtype=x.dtype)
    padded[:, :c] = x
    blocks = padded.view(n, nblocks, block, h, w)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    _, e = torch.frexp(torch.where(amax > 0, amax, torch.ones_like(amax)))
    step = torch.ldexp(torch.ones_like(amax), e - 7)
    rounded = torch.clamp(torch.round(blocks / step), -INT8_MAX, INT8_MAX) * step
    rounded = torch.where(amax > 0, rounded, torch.zeros_like(rounded))
    return rounded.view(n, nblocks * block, h, w)[:, :c]

"""Tolerances of numerical tests, derived from float32 rounding rather than measured on one CPU.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3): every float32 operation
returns the exact result times (1 + d) with |d| <= u = 2**-24, the unit roundoff (for round to
nearest; ``np.finfo(np.float32).eps`` = 2**-23 is the spacing of floats at 1.0, i.e. 2u). Then

- a sum of n + 1 terms, or a dot product of n terms, is within gamma(n) * sum |terms| of the exact
  value, where gamma(n) = n u / (1 - n u). This holds for *every* order of evaluation (a summation
  tree of depth d only needs gamma(d), and d <= n) and with or without fused multiply-adds, so it
  covers whatever blocking, vectorisation or thread split a library picks on a given CPU (oneDNN
  on AVX2 and AVX-512 differ in exactly that); it does not cover algorithms that transform the
  operands (Winograd, FFT), which neither torch's CPU convolutions nor our kernels use;
- a convolution is a dot product per output element, so its error is at most
  gamma(K) * (|w| conv |x|) elementwise, K = Cin * kh * kw, which the helpers below evaluate in
  float64 with the actual operands (float64 rounding, 2**-53, is 2**-29 times smaller: negligible).

Two float32 computations of the same quantity along different paths differ by at most the sum of
their two bounds. Deep networks use a first-order propagation of each layer's bound to the outputs
through the network's own (float64) gradients: :func:`resnet_logit_bound`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS32 = 2.0**-24  # unit roundoff u of float32 (half of np.finfo(np.float32).eps)


def gamma(n: int | float, u: float = EPS32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of a sum of n + 1 terms in any order."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded for u = {u}")
    return n * u / (1 - n * u)


def _f64(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a.detach().double() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, dtype=np.float64))


def conv_bound(
    x: np.ndarray | torch.Tensor,
    w: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    extra_terms: int = 0,
    factor: float = 1.0,
) -> torch.Tensor:
    """Elementwise bound (float64, NCHW) on the float32 rounding error of ``conv2d(x, w, b)``.

    ``x`` NCHW and ``w`` OIHW; ``extra_terms`` counts further additions into the same accumulator
    (bias, residual); ``factor`` is the caller's safety margin, justified where it is used.
    """
    w64 = _f64(w)
    k = w64.shape[1] * w64.shape[2] * w64.shape[3]
    mag = F.conv2d(_f64(x).abs(), w64.abs(), None, stride, padding)
    if b is not None:
        mag = mag + _f64(b).abs()[None, :, None, None]
    return factor * gamma(k + extra_terms + (b is not None)) * mag


def dot_bound(
    x: np.ndarray | torch.Tensor,
    w: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor | None = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """Elementwise bound (float64 [N, J]) on the float32 rounding error of ``x @ w.T + b``."""
    w64 = _f64(w)
    mag = _f64(x).abs() @ w64.abs().T
    if b is not None:
        mag = mag + _f64(b).abs()
    return factor * gamma(w64.shape[1] + (b is not None)) * mag


def sum_bound(terms: int, magnitude: float | np.ndarray | torch.Tensor, factor: float = 1.0) -> float | np.ndarray:
    """Bound on the rounding error of a float32 sum of ``terms`` values whose |values| sum to ``magnitude``."""
    return factor * gamma(max(terms - 1, 0)) * magnitude


def softmax_bound(logits: np.ndarray | torch.Tensor, logit_bound: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bound on |p - p'| for p = softmax(z) when |z - z'| <= ``logit_bound``, plus float32 rounding.

    First order: dp_i = p_i (dz_i - sum_j p_j dz_j), so |dp_i| <= p_i (b_i + sum_j p_j b_j). The
    float32 softmax itself (z - max: u|z_i - z_max| on the logit; exp: 2u, the libraries' exp is
    within 1 ulp; the sum and the division: u each, and the final rounding u) adds p_i (u |z_i - z_max| + 5u).
    """
    z = _f64(logits)
    b = _f64(logit_bound)
    p = torch.softmax(z, dim=1)
    spread = (z - z.max(dim=1, keepdim=True).values).abs()
    return (p * (b + EPS32 * spread + (p * b).sum(dim=1, keepdim=True) + 5 * EPS32)).numpy()


def _units(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """(name, conv, batch-norm) pairs of a torchvision ResNet, in the order torchvision names them."""
    mods = dict(model.named_modules())
    units = []
    for name, mod in mods.items():
        if not isinstance(mod, nn.Conv2d):
            continue
        prefix, _, leaf = name.rpartition(".")
        bn_name = f"{prefix}.1" if leaf == "0" else f"{prefix + '.' if prefix else ''}bn{leaf.removeprefix('conv')}"
        bn = mods.get(bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"{name} is not followed by a batch-norm named {bn_name}")
        units.append((name, mod, bn))
    return units


def resnet_logit_bound(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Bound (float64 [N, classes]) on the rounding error of the logits of one float32 forward pass.

    For a torchvision ResNet in eval mode, computed either as torch does it (conv, then batch-norm
    as ``c * s + t`` with s = gamma / sqrt(var + eps), t = beta - mean * s, then residual add and
    ReLU) or as the OpenCL engine does it (one conv with the batch-norm folded into float32
    weights and bias, with the residual added in the same accumulator). Per conv unit, with K =
    Cin * kh * kw, both paths are within

        B = gamma(K + 8) * (|W s| conv |x| + |beta| + |mean s| + |residual|)

    of the exact value of the unit on its own float32 input: the conv's gamma(K) on |W s| |x|
    (= |W| |x| |s|), plus at most 8 more roundings on these magnitudes: computing s (3: add,
    sqrt, divide), t (2), c * s + t (2), the residual add (1); the engine's fold rounds W s and the
    bias once each and adds bias and residual into the accumulator, which is fewer. Global
    average pooling (a sum of HW terms and a division) is within gamma(HW) mean|x|, the head within
    gamma(C + 1) (|W| |x| + |b|); ReLU and max-pooling are exact (and 1-Lipschitz).

    These local errors reach the logits through the network's derivatives: to first order, logit j
    moves by sum_l sum_i (d logit_j / d v_l,i) e_l,i where |e_l,i| <= B_l,i, so it moves by at most
    sum_l sum_i |d logit_j / d v_l,i| B_l,i. This sum is evaluated here in float64 with autograd
    (one backward pass per class; the images of a batch do not interact in eval mode). It is an
    upper bound on the rounding error up to second-order terms (products of two rounding errors,
    u**2 relative), and ReLUs whose input lies within the bound of zero (where the derivative is
    taken on the exact side); callers keep a factor 2 for those.

    ``forward(model, x)`` runs the network (default: ``model(x)``), e.g. for taggers that expand a
    1-channel image.
    """
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    units = _units(net)
    conv_in: dict[str, torch.Tensor] = {}
    bn_out: dict[str, torch.Tensor] = {}
    block_in: dict[str, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}
    hooks = []
    names = {id(m): n for n, m in net.named_modules()}

    def keep_input(store: dict[str, torch.Tensor]) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            store[names[id(mod)]] = inputs[0].detach()

        return hook

    def keep_output(mod: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        out.retain_grad()
        bn_out[names[id(mod)]] = out
        return out.clone()  # the block adds the residual and applies ReLU in place: on the clone

    for _, conv, bn in units:
        hooks.append(conv.register_forward_pre_hook(keep_input(conv_in)))
        hooks.append(bn.register_forward_hook(keep_output))
    blocks = [(n, m) for n, m in net.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    for _, block in blocks:
        hooks.append(block.register_forward_pre_hook(keep_input(block_in)))

    def keep_pool(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        taps["pool_in"] = inputs[0].detach()
        out.retain_grad()
        taps["pool_out"] = out

    hooks.append(net.avgpool.register_forward_hook(keep_pool))
    hooks.append(net.fc.register_forward_pre_hook(lambda _m, inputs: taps.__setitem__("fc_in", inputs[0].detach())))
    x = _f64(images).requires_grad_(True)  # so that the graph reaches every activation
    try:
        logits = forward(net, x) if forward is not None else net(x)
    finally:
        for h in hooks:
            h.remove()

    # Local bounds B per unit, on the batch-norm output (the residual enters the same value).
    local: dict[str, torch.Tensor] = {}
    last_of_block = {}
    for bname, block in blocks:
        last = max(n for n, _ in block.named_children() if n.startswith("bn"))
        identity = bn_out[f"{bname}.downsample.1"] if block.downsample is not None else block_in[bname]
        last_of_block[f"{bname}.{last}"] = identity.detach().abs()
    for name, conv, bn in units:
        bn_name = names[id(bn)]
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        mag = F.conv2d(
            conv_in[name].abs(), (conv.weight * s[:, None, None, None]).abs(), None, conv.stride, conv.padding
        )
        if conv.bias is not None:
            mag = mag + (conv.bias * s).abs()[None, :, None, None]
        mag = mag + (bn.bias.abs() + (bn.running_mean * s).abs())[None, :, None, None]
        if bn_name in last_of_block:
            mag = mag + last_of_block[bn_name]
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        local[bn_name] = gamma(k + 12) * mag
    pool_in = taps["pool_in"]
    hw = pool_in.shape[2] * pool_in.shape[3]
    pool_local = gamma(hw) * pool_in.abs().mean(dim=(2, 3), keepdim=True)
    head = dot_bound(taps["fc_in"], net.fc.weight, net.fc.bias)

    out = np.zeros(tuple(logits.shape))
    for j in range(logits.shape[1]):
        for t in [*bn_out.values(), taps["pool_out"]]:
            t.grad = None
        logits[:, j].sum().backward(retain_graph=j + 1 < logits.shape[1])
        total = head[:, j].clone()
        for bn_name, bound in local.items():
            g = bn_out[bn_name].grad
            if g is not None:
                total += (g.abs() * bound).sum(dim=(1, 2, 3))
        g = taps["pool_out"].grad
        if g is not None:
            total += (g.abs() * pool_local).sum(dim=(1, 2, 3))
        out[:, j] = total.numpy()
    return out

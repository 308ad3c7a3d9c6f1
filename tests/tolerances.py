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
LAMBDA = 6.0  # probabilistic bounds hold with probability >= 1 - 2 exp(-LAMBDA**2 / 2) = 1 - 3e-8 each


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
    lam: float = LAMBDA,
) -> np.ndarray:
    """Probabilistic bound (float64 [N, classes]) on the rounding error of the logits of one float32
    forward pass of a torchvision ResNet in eval mode, by either path: torch's (conv, then batch-norm
    as c * s + t with s = gamma / sqrt(var + eps) and t = beta - mean * s, then the residual add)
    or the OpenCL engine's (one conv with the batch-norm folded into float32 weights and bias, the
    residual added into the same accumulator).

    Rounding events. A conv unit with K = Cin * kh * kw computes each output with at most K + 12
    roundings, each an error d * (a partial result) with |d| <= u and |partial result| <= M =
    |W s| conv |x| + |beta| + |mean s| + |residual|: the conv's K on magnitudes up to |W| |x| |s|
    = |W s| |x|, then at most 12 more on these magnitudes (s: add, sqrt, divide, scale: 4; t: 2,
    plus the 4 of s carried by mean * s; c * s + t: 2; residual: 1). The engine has fewer: its fold
    rounds W s and the bias once each and adds bias and residual in the accumulator. Global average
    pooling is HW roundings on mean|x|, the head C + 1 on |W| |x| + |b|; ReLU and max-pooling are
    exact. (This is the worst-case analysis behind gamma(K + 12) * M per element.)

    Propagation. To first order logit j moves by sum over all rounding events e of g_e * d_e * m_e,
    where g_e is d logit_j / d (the value the event perturbs), computed here in float64 by autograd
    (one backward pass per class; the images of a batch do not interact in eval mode), and |m_e| <= M.
    The worst case, sum |g_e| u M_e, is sound but hopeless for a 53-layer network: it assumes that
    millions of roundings all push the same way, and is 10**5 times the observed error (about 0.2
    of the logits here). Instead, the probabilistic model of Higham & Mary (SIAM J. Sci. Comput.
    41, 2019): the d_e are independent with mean zero. Then Hoeffding's inequality gives

        |logit error| <= lam * u * sqrt(sum_e (g_e M_e)**2)

    with probability at least 1 - 2 exp(-lam**2 / 2) per logit: 3e-8 for the default lam = 6.
    Second-order terms (u**2 relative) and ReLUs whose input lies within rounding of zero are
    left out; callers keep a factor 2 for them. The bound, like the worst case, does not depend on
    the order in which a CPU sums (the count of roundings and their magnitudes do not change).

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

    def keep_pool(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        taps["pool_in"] = inputs[0].detach()
        out.retain_grad()
        taps["pool_out"] = out

    for _, conv, bn in units:
        hooks.append(conv.register_forward_pre_hook(keep_input(conv_in)))
        hooks.append(bn.register_forward_hook(keep_output))
    blocks = [(n, m) for n, m in net.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    for _, block in blocks:
        hooks.append(block.register_forward_pre_hook(keep_input(block_in)))
    hooks.append(net.avgpool.register_forward_hook(keep_pool))
    hooks.append(net.fc.register_forward_pre_hook(lambda _m, inputs: taps.__setitem__("fc_in", inputs[0].detach())))
    x = _f64(images).requires_grad_(True)  # so that the graph reaches every activation
    try:
        logits = forward(net, x) if forward is not None else net(x)
    finally:
        for h in hooks:
            h.remove()

    # Per unit: (number of roundings per output element, their magnitude M), on the batch-norm
    # output (the residual add perturbs the same value, with the same derivative).
    residual = {}
    for bname, block in blocks:
        last = max(n for n, _ in block.named_children() if n.startswith("bn"))
        identity = bn_out[f"{bname}.downsample.1"] if block.downsample is not None else block_in[bname]
        residual[f"{bname}.{last}"] = identity.detach().abs()
    events: dict[str, tuple[int, torch.Tensor]] = {}
    for name, conv, bn in units:
        bn_name = names[id(bn)]
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        mag = F.conv2d(
            conv_in[name].abs(), (conv.weight * s[:, None, None, None]).abs(), None, conv.stride, conv.padding
        )
        if conv.bias is not None:
            mag = mag + (conv.bias * s).abs()[None, :, None, None]
        mag = mag + (bn.bias.abs() + (bn.running_mean * s).abs())[None, :, None, None]
        if bn_name in residual:
            mag = mag + residual[bn_name]
        events[bn_name] = (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 12, mag)
    pool_in = taps["pool_in"]
    pool_events = (pool_in.shape[2] * pool_in.shape[3], pool_in.abs().mean(dim=(2, 3), keepdim=True))
    head_mag = taps["fc_in"].abs() @ net.fc.weight.abs().T + net.fc.bias.abs()
    head_events = net.fc.in_features + 1

    out = np.zeros(tuple(logits.shape))
    for j in range(logits.shape[1]):
        for t in [*bn_out.values(), taps["pool_out"]]:
            t.grad = None
        logits[:, j].sum().backward(retain_graph=j + 1 < logits.shape[1])
        total = head_events * head_mag[:, j] ** 2
        for bn_name, (count, mag) in events.items():
            g = bn_out[bn_name].grad
            if g is not None:
                total = total + count * ((g * mag) ** 2).sum(dim=(1, 2, 3))
        count, mag = pool_events
        g = taps["pool_out"].grad
        if g is not None:
            total = total + count * ((g * mag) ** 2).sum(dim=(1, 2, 3))
        out[:, j] = (lam * EPS32 * total.sqrt()).numpy()
    return out

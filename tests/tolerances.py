"""Tolerances of numerical tests, derived from float32 rounding rather than measured on one CPU.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3): every float32 operation
returns the exact result times (1 + d) with |d| <= u = 2**-24, the unit roundoff (round to
nearest; ``np.finfo(np.float32).eps`` = 2**-23 is the spacing of floats at 1.0, i.e. 2u). Then

- a sum of n + 1 terms, or a dot product of n terms, is within gamma(n) * sum |terms| of the exact
  value, gamma(n) = n u / (1 - n u). This holds for *every* order of evaluation (a summation tree
  of depth d needs only gamma(d), and d <= n) and with or without fused multiply-adds, so it covers
  whatever blocking, vectorisation or thread split a library picks on a given CPU: oneDNN's float32
  kernels differ between AVX2 and AVX-512 in exactly that, and the CI failure that led to these
  bounds was such a difference. It does not cover algorithms that transform the operands (Winograd,
  FFT), which neither torch's CPU convolutions nor our OpenCL kernels use;
- a convolution is a dot product per output element, so its error is at most
  gamma(K) * (|w| conv |x|) elementwise, K = Cin * kh * kw. The helpers evaluate these magnitudes
  in float64 with the actual operands (float64 rounding, 2**-53, is 2**-29 times finer: negligible).

Two float32 computations of one quantity along different paths differ by at most the sum of their
bounds. For a whole network the worst case is hopeless (it assumes that millions of roundings all
push the same way); :func:`resnet_logit_bound` uses the probabilistic model instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS32 = 2.0**-24  # unit roundoff u of float32 (half of np.finfo(np.float32).eps)
EPS64 = 2.0**-53  # unit roundoff of float64
LAMBDA = 6.0  # probabilistic bounds hold with probability >= 1 - 2 exp(-LAMBDA**2 / 2) = 1 - 3e-8 each
# Roundings of a conv + batch-norm unit besides the conv's K (see conv_bn_bound).
CONV_BN_EXTRA = 12

Array = np.ndarray | torch.Tensor


def gamma(n: float | np.ndarray) -> float | np.ndarray:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of a sum of n + 1 terms in any order."""
    if np.any(np.asarray(n) * EPS32 >= 1):
        raise ValueError(f"gamma({n}) is unbounded for float32")
    return n * EPS32 / (1 - n * EPS32)


def gamma64(n: float | np.ndarray) -> float | np.ndarray:
    """gamma_n for float64 arithmetic."""
    return n * EPS64 / (1 - n * EPS64)


def f64(a: Array) -> torch.Tensor:
    """``a`` as a float64 tensor (exact: every float32 is a float64)."""
    return a.detach().double() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, dtype=np.float64))


def conv_bound(
    x: Array,
    w: Array,
    b: Array | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    residual: Array | None = None,
) -> torch.Tensor:
    """Elementwise bound (float64 NCHW) on the float32 rounding error of ``conv2d(x, w, b) (+ residual)``.

    ``x`` NCHW, ``w`` OIHW. K products and additions, plus one addition each for the bias and the
    residual, all on magnitudes up to |w| conv |x| + |b| + |residual|.
    """
    w64 = f64(w)
    k = w64.shape[1] * w64.shape[2] * w64.shape[3]
    mag = F.conv2d(f64(x).abs(), w64.abs(), None, stride, padding)
    if b is not None:
        mag = mag + f64(b).abs()[None, :, None, None]
        k += 1
    if residual is not None:
        mag = mag + f64(residual).abs()
        k += 1
    return gamma(k) * mag


def dot_bound(x: Array, w: Array, b: Array | None = None) -> torch.Tensor:
    """Elementwise bound (float64 [N, J]) on the float32 rounding error of ``x @ w.T + b``."""
    w64 = f64(w)
    mag = f64(x).abs() @ w64.abs().T
    k = w64.shape[1]
    if b is not None:
        mag = mag + f64(b).abs()
        k += 1
    return gamma(k) * mag


def softmax_bound(logits: Array, logit_bound: Array, paths: int = 1) -> np.ndarray:
    """Bound on |p - p'| for p = softmax(z) and a float32 p' computed from z' with |z - z'| <= ``logit_bound``.

    First order: dp_i = p_i (dz_i - sum_j p_j dz_j), so |dp_i| <= p_i (b_i + sum_j p_j b_j). Each of
    ``paths`` float32 softmaxes adds p_i (u |z_i - z_max| + 5u): the subtraction of the maximum
    (u on the logit), exp (libraries' exp is within 1 ulp = 2u), the sum and the division (u each).
    """
    z = f64(logits)
    b = f64(logit_bound)
    p = torch.softmax(z, dim=1)
    spread = (z - z.max(dim=1, keepdim=True).values).abs()
    own = paths * EPS32 * (spread + 5)
    return (p * (b + own + (p * b).sum(dim=1, keepdim=True))).numpy()


def _fold_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


def conv_bn_magnitude(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Array, residual: Array | None = None) -> torch.Tensor:
    """M = |W s| conv |x| + |b s| + |beta| + |mean s| (+ |residual|) of ``bn(conv(x))`` in eval mode
    (float64 NCHW), where s = gamma / sqrt(var + eps): what every rounding of the unit is relative to."""
    s = _fold_scale(bn).double()
    w = (conv.weight.detach().double() * s[:, None, None, None]).abs()
    mag = F.conv2d(f64(x).abs(), w, None, conv.stride, conv.padding)
    shift = bn.bias.detach().double().abs() + (bn.running_mean.double() * s).abs()
    if conv.bias is not None:
        shift = shift + (conv.bias.detach().double() * s).abs()
    mag = mag + shift[None, :, None, None]
    if residual is not None:
        mag = mag + f64(residual).abs()
    return mag


def conv_bn_roundings(conv: nn.Conv2d) -> int:
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + CONV_BN_EXTRA


def conv_bn_bound(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Array, residual: Array | None = None) -> torch.Tensor:
    """Worst-case elementwise bound (float64 NCHW) on the float32 rounding error of a conv + batch-norm
    unit (+ residual; ReLU is exact and 1-Lipschitz) on the float32 input ``x``, by either path.

    torch computes conv, then batch-norm as c * s + t with s = gamma / sqrt(var + eps) and
    t = beta - mean * s, then the residual add; the OpenCL engine one conv with the batch-norm folded
    into float32 weights W s and bias, the residual added into the same accumulator. With
    K = Cin * kh * kw, either takes at most K + 12 roundings per output, each relative to at most
    M (:func:`conv_bn_magnitude`): the conv's K on |W| |x| |s| = |W s| |x|, then torch's s (add,
    sqrt, divide, scale: 4), t (2, and the 4 of s carried by mean * s), c * s + t (2) and the
    residual add (1); the engine's fold rounds W s and the bias once each and adds bias and residual
    in its accumulator, fewer. So the error is at most gamma(K + 12) * M.
    """
    return gamma(conv_bn_roundings(conv)) * conv_bn_magnitude(conv, bn, x, residual)


def _units(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, batch-norm) pairs of a torchvision ResNet: convN + bnN, downsample.0 + downsample.1."""
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
        units.append((mod, bn))
    return units


def resnet_logit_bound(
    model: nn.Module,
    images: Array,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    lam: float = LAMBDA,
    input_error: Array | None = None,
    paths: int = 1,
) -> np.ndarray:
    """Probabilistic bound (float64 [N, classes]) on the rounding error of the logits of one float32
    forward pass of a torchvision ResNet in eval mode, by torch or by the OpenCL engine; with
    ``paths`` = 2, on the difference of two such passes (other batches, other kernels, other CPUs):
    the sum of their bounds.

    Rounding events: per output element of a conv + batch-norm unit, K + 12 roundings relative to
    at most M (:func:`conv_bn_bound`); global average pooling, HW roundings relative to mean|x| (the
    sum and the division); the head, C + 1 relative to |W| |x| + |b|. ReLU and max-pooling are exact.

    Propagation: to first order logit j moves by sum_e g_e d_e m_e over all rounding events e,
    |d_e| <= u, |m_e| <= M_e, where g_e is d logit_j / d (the value event e perturbs), computed here
    in float64 by autograd (one backward pass per class; the images of a batch do not interact in
    eval mode). The worst case, sum_e |g_e| u M_e, is sound but useless for 53 layers: about 0.2 of
    the logits for the test network, 10**5 times the error observed. Instead, the probabilistic model
    of Higham & Mary (SIAM J. Sci. Comput. 41, 2019): the d_e are independent with mean zero. Then
    Hoeffding's inequality bounds the error by

        lam * u * sqrt(sum_e (g_e M_e)**2)

    with probability at least 1 - 2 exp(-lam**2 / 2) per logit, 3e-8 for the default lam = 6. The
    count of roundings and their magnitudes, hence the bound, do not depend on the order in which a
    CPU sums. Left out: second-order terms (u**2 relative) and ReLUs whose input lies within rounding
    of zero (there the derivative of the exact side is used).

    ``input_error``, an elementwise worst-case bound on how far the images themselves may be off
    (e.g. rendered in another batch, with other rounding), adds sum |d logit_j / d x| * input_error,
    also worst case: one layer deep, that is not pessimistic.

    ``forward(model, x)`` runs the network (default ``model(x)``), e.g. for taggers that expand a
    1-channel image.
    """
    return _resnet_bound(model, images, forward, lam, input_error, paths)[1]


def _resnet_bound(
    model: nn.Module,
    images: Array,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None,
    lam: float,
    input_error: Array | None,
    paths: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 logits, their bound): see :func:`resnet_logit_bound`."""
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    names = {id(m): n for n, m in net.named_modules()}
    conv_in: dict[str, torch.Tensor] = {}
    bn_out: dict[str, torch.Tensor] = {}
    block_in: dict[str, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}

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

    units = _units(net)
    blocks = [(n, m) for n, m in net.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    hooks = [conv.register_forward_pre_hook(keep_input(conv_in)) for conv, _ in units]
    hooks += [bn.register_forward_hook(keep_output) for _, bn in units]
    hooks += [block.register_forward_pre_hook(keep_input(block_in)) for _, block in blocks]
    hooks.append(net.avgpool.register_forward_hook(keep_pool))
    hooks.append(net.fc.register_forward_pre_hook(lambda _m, inputs: taps.__setitem__("fc_in", inputs[0].detach())))
    x = f64(images).requires_grad_(True)  # so that the graph reaches every activation
    try:
        logits = forward(net, x) if forward is not None else net(x)
    finally:
        for h in hooks:
            h.remove()

    # Per unit, on the batch-norm output (the residual add perturbs the same value, with the same
    # derivative): (roundings per output element, their magnitude M).
    residual = {}
    for bname, block in blocks:
        last = max(n for n, _ in block.named_children() if n.startswith("bn"))
        identity = bn_out[f"{bname}.downsample.1"] if block.downsample is not None else block_in[bname]
        residual[f"{bname}.{last}"] = identity.detach()
    events = []
    for conv, bn in units:
        bn_name = names[id(bn)]
        mag = conv_bn_magnitude(conv, bn, conv_in[names[id(conv)]], residual.get(bn_name))
        events.append((bn_out[bn_name], conv_bn_roundings(conv), mag))
    pool_in = taps["pool_in"]
    events.append((taps["pool_out"], pool_in.shape[2] * pool_in.shape[3], pool_in.abs().mean(dim=(2, 3), keepdim=True)))
    head_mag = taps["fc_in"].abs() @ net.fc.weight.abs().T + net.fc.bias.abs()

    out = np.zeros(tuple(logits.shape))
    for j in range(logits.shape[1]):
        for value, _, _ in events:
            value.grad = None
        x.grad = None
        logits[:, j].sum().backward(retain_graph=j + 1 < logits.shape[1])
        total = (net.fc.in_features + 1) * head_mag[:, j] ** 2
        for value, count, mag in events:
            if value.grad is not None:
                total = total + count * ((value.grad * mag) ** 2).sum(dim=(1, 2, 3))
        bound = paths * lam * EPS32 * total.sqrt()
        if input_error is not None and x.grad is not None:
            bound = bound + (x.grad.abs() * f64(input_error)).flatten(1).sum(dim=1)
        out[:, j] = bound.numpy()
    return logits.detach().numpy(), out


def tagger_probability_bound(model: nn.Module, images: Array, constituents: np.ndarray | None = None) -> np.ndarray:
    """Bound (float64 [N, 2]) on |p - p'| between two float32 evaluations of a tagger's probabilities
    (torch or the OpenCL engine, any batching, any process) on ``images`` [N, 1 or 3, S, S].

    The logits differ by at most the sum of both passes' :func:`resnet_logit_bound`; with
    ``constituents`` (the jets the images were rendered from), each side may have rendered them
    itself in other batches, so the images may differ by 2 * :func:`render_error` of each pixel.
    Then :func:`softmax_bound` for the two float32 softmaxes.
    """
    from torchvision.models.resnet import ResNet

    x = f64(images)
    input_error = None
    if constituents is not None:
        counts = (np.asarray(constituents)[..., 0] != 0).sum(axis=1)
        input_error = 2 * torch.from_numpy(np.asarray(render_error(counts), dtype=np.float64))[:, None, None, None] * x
    # 3-channel images (as CMSSW sends them) skip the tagger's 1-channel expansion, as serving does
    forward = (lambda net, t: ResNet.forward(net, t)) if x.shape[1] == 3 else None
    logits, bound = _resnet_bound(model, x, forward, LAMBDA, input_error, paths=2)
    return softmax_bound(logits, bound, paths=2)


def render_error(constituents: int | np.ndarray, spread: float | np.ndarray = 1.0) -> float | np.ndarray:
    """Relative float32 rounding bound of every pixel of a jet image (toptagger.images), against exact
    arithmetic on the float64 (pT, eta, phi) the jet was made from; ``constituents`` per jet.

    A pixel is sum_i w_i / D over the constituents in it, w_i = hypot(px_i, py_i): u from rounding
    px, py to float32 and 2u (1 ulp) for hypot. D is either a float32 sum of the same w_i
    (normalize: 3u each, gamma(m - 1) for the sum) or pT_jet = |sum of the m momenta|, whose
    components carry gamma(m) of sum |p_i| <= sqrt(2) * spread * pT_jet (spread = sum pT_i / pT_jet),
    plus 2u for the norm. Then u for the division and gamma(m - 1) for adding into the pixel. In
    all, at most gamma(m * (1 + sqrt(2) * spread) + 9), for any summation order.
    """
    return gamma(np.ceil(np.asarray(constituents) * (1 + np.sqrt(2) * np.maximum(spread, 1.0))) + 9)


def image_sum_error(constituents: int | np.ndarray) -> float | np.ndarray:
    """Bound on |sum of the pixels - 1| of a normalised jet image (the pixel sum taken in float64).

    The w_i cancel exactly (numerator and denominator share them); what is left is the float32 sum
    of the m weights, gamma(m - 1), one division per weight, u, and the adds into pixels,
    gamma(m - 1): at most gamma(2m).
    """
    return gamma(2 * np.asarray(constituents))

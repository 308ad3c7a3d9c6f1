"""Jet images from constituent four-vectors: one implementation for training, evaluation and serving.

``jet_images`` turns float32 ``[N, M, 4]`` constituents (E, px, py, pz; zero rows are padding,
M = 200 in the reference files) into float32 ``[N, 1, S, S]`` images. Rows are eta, columns are
phi, as in the CMSSW ``JetImageProducer`` of Duarte et al. (2019); each pixel holds the pT
fraction of the constituents that fall in it.

Preprocessing steps, each switchable, all vectorised over the batch:

1. eta, phi, pT of every constituent; the jet axis is the summed four-vector; phi is wrapped
   to [-pi, pi) relative to the axis, so jets straddling phi = +-pi are not torn apart;
2. centring on the jet axis (``"axis"``, the paper), the pT-weighted centroid (``"centroid"``) or
   the hardest constituent (``"leading"``);
3. rotation so that the pT-weighted principal axis points along eta (image rows, "vertical");
4. flips so that the pT-hottest quadrant is always eta > 0, phi > 0;
5. pixelation over a square of half-width ``half_width``: pixel = sum pT / pT_jet, where pT_jet is
   the jet's (vector) pT as in CMSSW, or, with ``normalize``, the scalar pT sum inside the window,
   so that every non-empty image sums to 1.

With ``center="axis"``, no rotation, no flip, no normalisation, half-width 1.0 and 224 pixels
(:data:`PAPER_IMAGE_SIZE`) the output is the paper's CMSSW image (which then copies it into 3
channels; see :func:`three_channels`). These are the defaults, except the size: that defaults to
the project's :data:`~toptagger.constants.IMAGE_SIZE` (small enough to train on CPUs).

Written once against torch: numpy input is wrapped without copying and the result returned as
numpy; torch input stays on its device (a GPU batch never goes through the host).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from toptagger.constants import IMAGE_SIZE
from toptagger.errors import ConfigError, DataError

Center = Literal["axis", "centroid", "leading"]
CENTERS: tuple[str, ...] = ("axis", "centroid", "leading")
# The paper's image size (CMSSW's JetImageProducer): what full-scale runs choose, not a default.
PAPER_IMAGE_SIZE = 224
# Constituent slots per internal block of jets: keeps the [B, M] temporaries inside the CPU
# caches. Blocking is over whole batches of jets, so there is still no Python loop per jet or
# per particle.
BLOCK_ELEMENTS = 96 * 1024
GPU_BLOCK_ELEMENTS = 64 * 1024 * 200
# Largest |E|, |px|, |py|, |pz| accepted: squares (and sums of 200 of them) stay finite in float32.
MAX_MOMENTUM_GEV = 1e15

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class ImageConfig:
    """Every choice that shapes an image; saved beside a model so serving renders the same images."""

    # metadata["help"] is what ``python -m toptagger.training --help`` shows (toptagger.training.config).
    image_size: int = field(
        default=IMAGE_SIZE, metadata={"help": f"image size in pixels (the paper: {PAPER_IMAGE_SIZE})"}
    )
    half_width: float = field(default=1.0, metadata={"help": "half-width of the image in eta and phi"})
    center: str = field(
        default="axis",
        metadata={"help": "centre on the jet axis, pT centroid or leading constituent", "choices": CENTERS},
    )
    rotate: bool = field(default=False, metadata={"help": "rotate the principal axis onto eta"})
    flip: bool = field(default=False, metadata={"help": "flip the hottest quadrant to eta > 0, phi > 0"})
    normalize: bool = field(default=False, metadata={"help": "divide by the pT sum in the window (else pT_jet)"})

    def __post_init__(self) -> None:
        _check_options(self.image_size, self.half_width, self.center)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown image option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def render(self, constituents: ArrayT) -> ArrayT:
        return jet_images(constituents, **self.to_dict())


def _check_options(image_size: object, half_width: object, center: object) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ConfigError(f"image_size must be a whole number of pixels >= 1, got {image_size!r}")
    if (
        isinstance(half_width, bool)
        or not isinstance(half_width, int | float | np.floating)
        or not math.isfinite(half_width)
        or half_width <= 0
    ):
        raise ConfigError(f"half_width must be a finite number > 0 (in eta/phi units), got {half_width!r}")
    if center not in CENTERS:
        raise ConfigError(f"center must be one of {CENTERS}, got {center!r}")


def _name_bad_jets(tensor: torch.Tensor) -> None:
    """Raise the DataError that names the jets holding non-finite or overflowing values."""
    finite = torch.isfinite(tensor).all(dim=2).all(dim=1)
    bad = torch.nonzero(~finite).flatten()
    if bad.numel():
        raise DataError(
            f"constituents hold NaN or infinite values in {bad.numel()} jet(s), first at index {int(bad[0])}"
        )
    huge = torch.nonzero((tensor.abs() > MAX_MOMENTUM_GEV).any(dim=2).any(dim=1)).flatten()
    raise DataError(
        f"constituents hold momenta beyond {MAX_MOMENTUM_GEV:.0e} GeV in {huge.numel()} jet(s), first at index "
        f"{int(huge[0])}; their squares overflow float32 (the LHC's collisions carry 1.4e4 GeV)"
    )


def check_constituents(constituents: object) -> torch.Tensor:
    """The input as a float32 torch tensor (no copy for numpy), or a DataError naming the problem."""
    if isinstance(constituents, np.ndarray):
        if constituents.dtype != np.float32:
            raise DataError(f"constituents must be float32, got {constituents.dtype}")
        if not constituents.flags.writeable:
            # torch.from_numpy warns on read-only buffers (e.g. decoded request bodies); a copy
            # of the compact input is cheap next to the image.
            constituents = constituents.copy()
        tensor = torch.from_numpy(constituents)
    elif isinstance(constituents, torch.Tensor):
        if constituents.dtype != torch.float32:
            raise DataError(f"constituents must be float32, got {constituents.dtype}")
        tensor = constituents
    else:
        raise DataError(f"constituents must be a numpy array or torch tensor, got {type(constituents).__name__}")
    if tensor.ndim != 3 or tensor.shape[2] != 4:
        raise DataError(
            f"constituents must have shape [N, M, 4] (E, px, py, pz per constituent), got {list(tensor.shape)}"
        )
    # One pass finds NaN, inf and momenta whose squares would overflow float32 (pT, masses and
    # moments square them); only a failing batch pays for the search that names the culprits.
    if tensor.numel():
        low, high = torch.aminmax(tensor)
        if not (float(low) >= -MAX_MOMENTUM_GEV and float(high) <= MAX_MOMENTUM_GEV):
            _name_bad_jets(tensor)
    return tensor


def jet_images(
    constituents: ArrayT,
    image_size: int = IMAGE_SIZE,
    half_width: float = 1.0,
    center: str = "axis",
    rotate: bool = False,
    flip: bool = False,
    normalize: bool = False,
) -> ArrayT:
    """Render float32 ``[N, M, 4]`` constituents as float32 ``[N, 1, S, S]`` jet images.

    numpy in, numpy out; a torch tensor in gives a tensor on the same device. The defaults are the
    paper's CMSSW producer (+-1 around the jet axis, pT / pT_jet, no rotation or flip) at the
    project's :data:`~toptagger.constants.IMAGE_SIZE`; the paper's size is :data:`PAPER_IMAGE_SIZE`.
    Raises :class:`DataError` for a wrong shape, dtype or non-finite values and
    :class:`ConfigError` for impossible options.
    """
    options = ImageConfig(image_size, half_width, center, rotate, flip, normalize)  # checks the options
    tensor = check_constituents(constituents)
    size = int(image_size)
    n = tensor.shape[0]
    out = torch.zeros((n, 1, size, size), dtype=torch.float32, device=tensor.device)
    if n:
        with torch.no_grad():
            _render(tensor, out.view(n, -1), options)
    return out.numpy() if isinstance(constituents, np.ndarray) else out  # type: ignore[return-value]


def _render(p4: torch.Tensor, out: torch.Tensor, options: ImageConfig) -> None:
    """Render all jets into ``out`` (``[N, S*S]``, zeroed) in blocks of similar length.

    Jets fill about a third of the reference format's 200 slots, with a long tail. Blocks of
    jets sorted by their number of used slots, each trimmed to its longest jet, keep the dense
    [B, M] layout (per-jet sums are row sums, no gathers) while doing little arithmetic on
    padding. Blocks cover many jets at once: there is no Python loop per jet or per particle.
    """
    n, slots = p4.shape[:2]
    if slots == 0:
        return
    # Last real slot + 1, wherever padding sits (the reference format marks it by E = 0). Float
    # arithmetic throughout: boolean masks and torch.where are several times slower on CPU.
    position = torch.arange(1, slots + 1, device=p4.device, dtype=torch.float32)
    used = p4[..., 0].abs().sign_().mul_(position).amax(dim=1).int()
    order = torch.argsort(used, stable=True)
    used_sorted = used[order].cpu().numpy()
    budget = BLOCK_ELEMENTS if p4.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    # int32 pixel indices halve the index traffic; int64 only where the output is that large.
    index_dtype = torch.int32 if out.numel() < 2**31 else torch.int64
    start = int(np.searchsorted(used_sorted, 0, side="right"))  # empty jets: their images stay zero
    flat = out.view(-1)
    while start < n:
        stop = _block_end(used_sorted, start, budget)
        width = int(used_sorted[stop - 1])
        jets = order[start:stop]
        # One gather of whole rows, then contiguous components: far cheaper than three strided
        # gathers, and the arithmetic below runs on contiguous arrays.
        rows = p4[:, :width].index_select(0, jets)
        px, py, pz = (rows[..., i].contiguous() for i in (1, 2, 3))
        pixels, weights = _pixelate(px, py, pz, options, index_dtype)
        pixels += (jets.to(index_dtype) * int(options.image_size) ** 2)[:, None]
        flat.index_add_(0, pixels.view(-1), weights.view(-1))
        start = stop


def _block_end(used_sorted: np.ndarray, start: int, budget: int) -> int:
    """End of the block from ``start``: as many jets as fit ``budget`` slots at the block's width.

    Lengths are sorted, so short jets go in large blocks and the long tail in small ones; either
    way a block does about ``budget`` slots of arithmetic, mostly on real constituents.
    """
    cost = np.arange(1, len(used_sorted) - start + 1) * used_sorted[start:]
    return start + max(1, int(np.searchsorted(cost, budget, side="right")))


def _eta(pz: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """asinh(pz / pT) as log((|pz| + p) / pT) with the sign of pz.

    torch's CPU asinh is not vectorised (about 15x slower than log here), and this form is exact
    in the tails. pT is floored so that a beam-collinear constituent gets a large finite eta;
    padding (all zero) gets eta = 0.
    """
    pt = pt.clamp_min(_TINY_PT)
    return torch.copysign(_norm(pt, pz).add_(pz.abs()).div_(pt).log_(), pz)


def _norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(a^2 + b^2), a third cheaper than torch.hypot on CPU where the sum is rarely exactly
    zero (sqrt(0) takes a slow path); momenta in GeV are nowhere near float32 overflow squared."""
    return torch.addcmul(a * a, b, b).sqrt_()


# Smallest pT used as a divisor: rows with pT = 0 get finite coordinates (and zero weight). Its
# square must stay a normal float32 (> 1.2e-38): denormal arithmetic is ~100x slower on x86.
_TINY_PT = 1e-15


def _pixelate(
    px: torch.Tensor, py: torch.Tensor, pz: torch.Tensor, options: ImageConfig, index_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel index (within each image) and weight of every constituent of a block ([B, M] each).

    Padding has pT = 0, so it carries zero weight through every sum and into the image. Centring,
    rotation and pixel scaling are one affine map per jet, applied in a single pass: the centre
    and the second moments come from raw sums over the axis-relative coordinates, and the map is
    built on the small [B, 1] per-jet tensors: far fewer full-size passes over [B, M].
    """
    size, half_width, center = int(options.image_size), float(options.half_width), options.center
    rotate, flip, normalize = options.rotate, options.flip, options.normalize
    # hypot, not _norm: padding is exactly zero here, and sqrt(0) takes a slow path on CPU.
    w = torch.hypot(px, py)

    # Jet axis from the summed four-vector, as CMSSW's jet.eta()/jet.phi().
    jet_px, jet_py = px.sum(dim=1, keepdim=True), py.sum(dim=1, keepdim=True)
    jet_pt = _norm(jet_px, jet_py)
    jet_eta = _eta(pz.sum(dim=1, keepdim=True), jet_pt)
    jet_phi = torch.atan2(jet_py, jet_px)
    cos_j, sin_j = torch.cos(jet_phi), torch.sin(jet_phi)
    x = _eta(pz, w).sub_(jet_eta)
    # phi relative to the axis as the angle of the momentum rotated by -phi_jet: lands in
    # [-pi, pi] directly, so jets straddling phi = +-pi need no special case.
    y = torch.atan2(torch.addcmul(py * cos_j, px, -sin_j), torch.addcmul(px * cos_j, py, sin_j))

    if center == "leading":
        # Subtracting the leading constituent's own coordinates puts it exactly on (0, 0), which
        # the quadrant flip relies on; an affine offset would leave it a rounding error away.
        lead = w.argmax(dim=1, keepdim=True)
        x = x - x.gather(1, lead)
        y = y - y.gather(1, lead)
    zero = torch.zeros_like(jet_pt)
    cx, cy = zero, zero
    if center == "centroid" or rotate:
        wx, wy = w * x, w * y
        total = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        sum_x, sum_y = wx.sum(dim=1, keepdim=True), wy.sum(dim=1, keepdim=True)
        if center == "centroid":
            cx, cy = sum_x / total, sum_y / total

    # Rows of the map (x, y) -> (u, v) in pixel units about the centre: u = a*x + b*y + c.
    scale = size / (2 * half_width)
    if rotate:
        # Major axis of the pT-weighted second moments about the centre, from raw sums; a jet
        # without spread gives atan2(0, 0) = 0, i.e. no rotation, never NaN.
        sxx = (wx * x).sum(dim=1, keepdim=True) - 2 * cx * sum_x + cx * cx * total
        syy = (wy * y).sum(dim=1, keepdim=True) - 2 * cy * sum_y + cy * cy * total
        sxy = (wx * y).sum(dim=1, keepdim=True) - cx * sum_y - cy * sum_x + cx * cy * total
        theta = 0.5 * torch.atan2(2 * sxy, sxx - syy)
        cos_t, sin_t = torch.cos(theta) * scale, torch.sin(theta) * scale
        # (x * a).addcmul_(...).add_(c): a [B, 1] first operand of addcmul broadcasts slowly.
        u = (x * cos_t).addcmul_(y, sin_t).add_(-(cos_t * cx + sin_t * cy))
        v = (y * cos_t).addcmul_(x, -sin_t).add_(sin_t * cx - cos_t * cy)
    elif center == "centroid":
        u, v = (x - cx) * scale, (y - cy) * scale
    else:
        u, v = x * scale, y * scale

    # Inclusive window as in CMSSW, |u|, |v| <= size / 2 pixels, as a float 0/1 factor:
    # clamp(sign(size / 2 - max(|u|, |v|)) + 1, 0, 1) avoids boolean tensors, which cost several
    # times a float operation on CPU.
    inside = torch.maximum(u.abs(), v.abs()).neg_().add_(size / 2).sign_().add_(1).clamp_(0, 1)
    w = w * inside
    sign_u = sign_v = None
    if flip:
        # Quadrant sums from signed sums: with A = sum w*sign(u), B = sum w*sign(v) and
        # C = sum w*sign(u)*sign(v), quadrant (su, sv) holds (W + su*A + sv*B + su*sv*C) / 4. A
        # constituent exactly on an axis counts half on each side of it, so the leading one after
        # "leading" centring, at exactly (0, 0), weighs the same in all four and decides nothing.
        su, sv = torch.sign(u), torch.sign(v)
        wu = w * su
        a = wu.sum(dim=1, keepdim=True)
        b = (w * sv).sum(dim=1, keepdim=True)
        c = (wu * sv).sum(dim=1, keepdim=True)
        # Candidates in the order (-,-), (-,+), (+,-), (+,+); argmax keeps the first of ties.
        hottest = torch.cat([c - a - b, b - a - c, a - b - c, a + b + c], dim=1).argmax(dim=1, keepdim=True)
        sign_u = torch.where(hottest >= 2, 1.0, -1.0)
        sign_v = torch.where(hottest % 2 == 1, 1.0, -1.0)
    denom = w.sum(dim=1, keepdim=True) if normalize else jet_pt
    w = w / denom.clamp_min(torch.finfo(w.dtype).tiny)
    # Boundaries are inclusive as in CMSSW; the clamp puts +half_width into the last pixel
    # (CMSSW would index one past the end there). The integer conversion truncates.
    offset = size / 2
    if sign_u is None:
        row, col = u.add_(offset), v.add_(offset)
    else:
        row, col = u.mul_(sign_u).add_(offset), v.mul_(sign_v).add_(offset)
    row = row.clamp_(0, size - 1).to(index_dtype)
    col = col.clamp_(0, size - 1).to(index_dtype)
    return row.mul_(size).add_(col), w


def three_channels(images: ArrayT) -> ArrayT:
    """``[N, 1, S, S]`` -> ``[N, 3, S, S]`` as a view (no copy), as ImageNet models expect."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise DataError(f"expected images of shape [N, 1, S, S], got {list(images.shape)}")
    if isinstance(images, np.ndarray):
        return np.broadcast_to(images, (images.shape[0], 3, *images.shape[2:]))
    return images.expand(-1, 3, -1, -1)

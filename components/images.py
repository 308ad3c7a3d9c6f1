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

With ``center="axis"``, no rotation, no flip, no normalisation, half-width 1.0 and 224 pixels the
output is the paper's CMSSW image (which then copies it into 3 channels; see
:func:`three_channels`). These are the defaults.

Written once against torch: numpy input is wrapped without copying and the result returned as
numpy; torch input stays on its device (a GPU batch never goes through the host).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar, overload

import numpy as np
import torch

from components.errors import ConfigError, DataError

Center = Literal["axis", "centroid", "leading"]
CENTERS: tuple[str, ...] = ("axis", "centroid", "leading")
PAPER_IMAGE_SIZE = 224
# Jets per internal block: keeps the [block, M] temporaries inside the CPU caches. Blocking is
# over whole batches of jets, so there is still no Python loop per jet or per particle.
BLOCK = 1024
GPU_BLOCK = 65536

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class ImageConfig:
    """Every choice that shapes an image; saved beside a model so serving renders the same images."""

    image_size: int = PAPER_IMAGE_SIZE
    half_width: float = 1.0
    center: str = "axis"
    rotate: bool = False
    flip: bool = False
    normalize: bool = False

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


def _check_constituents(constituents: object) -> torch.Tensor:
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
    # A NaN or inf anywhere makes the sum non-finite; one reduction is far cheaper than isfinite
    # on every element, and only a failing batch pays for the search that names the culprits.
    if tensor.numel() and not bool(torch.isfinite(tensor.sum())):
        finite = torch.isfinite(tensor).all(dim=2).all(dim=1)
        bad = torch.nonzero(~finite).flatten()
        if bad.numel() == 0:  # only the float32 sum overflowed; every value is finite
            return tensor
        raise DataError(
            f"constituents hold NaN or infinite values in {bad.numel()} jet(s), first at index {int(bad[0])}"
        )
    return tensor


@overload
def jet_images(
    constituents: np.ndarray,
    image_size: int = ...,
    half_width: float = ...,
    center: str = ...,
    rotate: bool = ...,
    flip: bool = ...,
    normalize: bool = ...,
) -> np.ndarray: ...
@overload
def jet_images(
    constituents: torch.Tensor,
    image_size: int = ...,
    half_width: float = ...,
    center: str = ...,
    rotate: bool = ...,
    flip: bool = ...,
    normalize: bool = ...,
) -> torch.Tensor: ...
def jet_images(
    constituents: np.ndarray | torch.Tensor,
    image_size: int = PAPER_IMAGE_SIZE,
    half_width: float = 1.0,
    center: str = "axis",
    rotate: bool = False,
    flip: bool = False,
    normalize: bool = False,
) -> np.ndarray | torch.Tensor:
    """Render float32 ``[N, M, 4]`` constituents as float32 ``[N, 1, S, S]`` jet images.

    numpy in, numpy out; a torch tensor in gives a tensor on the same device. The defaults are the
    paper's CMSSW producer (224 pixels, +-1 around the jet axis, pT / pT_jet, no rotation or flip).
    Raises :class:`DataError` for a wrong shape, dtype or non-finite values and
    :class:`ConfigError` for impossible options.
    """
    _check_options(image_size, half_width, center)
    tensor = _check_constituents(constituents)
    size = int(image_size)
    n = tensor.shape[0]
    out = torch.zeros((n, 1, size, size), dtype=torch.float32, device=tensor.device)
    if n and tensor.shape[1]:
        with torch.no_grad():
            _render(tensor, out.view(-1), size, float(half_width), center, rotate, flip, normalize)
    return out.numpy() if isinstance(constituents, np.ndarray) else out


def _render(
    p4: torch.Tensor,
    out: torch.Tensor,
    size: int,
    half_width: float,
    center: str,
    rotate: bool,
    flip: bool,
    normalize: bool,
) -> None:
    """Render all jets into ``out`` (the zeroed images, flattened) in blocks of similar length.

    Jets fill about a third of the reference format's 200 slots, with a long tail. Blocks of
    jets sorted by their number of used slots, each trimmed to its longest jet, keep the dense
    [B, M] layout (per-jet sums are row sums, no gathers) while doing little arithmetic on
    padding. Blocks cover many jets at once: there is no Python loop per jet or per particle.
    """
    n, slots = p4.shape[:2]
    real = p4[..., 0] != 0  # the reference format marks padding by E = 0
    position = torch.arange(1, slots + 1, device=p4.device, dtype=torch.int32)
    used = torch.where(real, position, 0).amax(dim=1)  # last real slot + 1, wherever padding sits
    order = torch.argsort(used, stable=True)
    used_sorted = used[order].tolist()
    block = BLOCK if p4.device.type == "cpu" else GPU_BLOCK
    for start in range(0, n, block):
        stop = min(start + block, n)
        width = used_sorted[stop - 1]
        if width == 0:
            continue  # empty jets: their images stay zero
        jets = order[start:stop]
        # One gather of whole rows, then contiguous components: far cheaper than three strided
        # gathers, and the arithmetic below runs on contiguous arrays.
        rows = p4[:, :width].index_select(0, jets)
        px, py, pz = (rows[..., i].contiguous() for i in (1, 2, 3))
        pixels, weights = _pixelate(px, py, pz, size, half_width, center, rotate, flip, normalize)
        out.index_add_(0, (pixels + jets[:, None] * (size * size)).view(-1), weights.view(-1))


def _eta(pz: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """asinh(pz / pT) as log((|pz| + p) / pT) with the sign of pz.

    torch's CPU asinh is not vectorised (about 15x slower than log here), and this form is exact
    in the tails. pT is floored so that a beam-collinear constituent gets a large finite eta;
    padding (all zero) gets eta = 0.
    """
    pt = pt.clamp_min(_TINY_PT)
    return torch.copysign(torch.log((pz.abs() + torch.hypot(pt, pz)) / pt), pz)


# Smallest pT used as a divisor: rows with pT = 0 get finite coordinates (and zero weight).
_TINY_PT = 1e-20


def _pixelate(
    px: torch.Tensor,
    py: torch.Tensor,
    pz: torch.Tensor,
    size: int,
    half_width: float,
    center: str,
    rotate: bool,
    flip: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel index (within each image) and weight of every constituent of a block ([B, M] each).

    Padding has pT = 0, so it carries zero weight through every sum and into the image.
    """
    w = torch.hypot(px, py)

    # Jet axis from the summed four-vector, as CMSSW's jet.eta()/jet.phi().
    jet_px, jet_py = px.sum(dim=1, keepdim=True), py.sum(dim=1, keepdim=True)
    jet_pt = torch.hypot(jet_px, jet_py)
    jet_eta = _eta(pz.sum(dim=1, keepdim=True), jet_pt)
    jet_phi = torch.atan2(jet_py, jet_px)
    cos_j, sin_j = torch.cos(jet_phi), torch.sin(jet_phi)
    x = _eta(pz, w) - jet_eta
    # phi relative to the axis as the angle of the momentum rotated by -phi_jet: lands in
    # [-pi, pi] directly, so jets straddling phi = +-pi need no special case.
    y = torch.atan2(py * cos_j - px * sin_j, px * cos_j + py * sin_j)

    if center == "centroid":
        total = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        x = x - (w * x).sum(dim=1, keepdim=True) / total
        y = y - (w * y).sum(dim=1, keepdim=True) / total
    elif center == "leading":
        # Subtracting the leading constituent's own coordinates puts it exactly on (0, 0),
        # which the quadrant flip relies on.
        lead = w.argmax(dim=1, keepdim=True)
        x = x - x.gather(1, lead)
        y = y - y.gather(1, lead)

    if rotate:
        # Major axis of the pT-weighted second moments about the centre; a jet without spread
        # gives atan2(0, 0) = 0, i.e. no rotation, never NaN.
        wx, wy = w * x, w * y
        sxx = (wx * x).sum(dim=1, keepdim=True)
        syy = (wy * y).sum(dim=1, keepdim=True)
        sxy = (wx * y).sum(dim=1, keepdim=True)
        theta = 0.5 * torch.atan2(2 * sxy, sxx - syy)
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        x, y = torch.addcmul(x * cos_t, y, sin_t), torch.addcmul(y * cos_t, x, -sin_t)

    # Multiplying by a boolean mask is several times faster than masked_fill on CPU here.
    w = w * (torch.maximum(x.abs(), y.abs()) <= half_width)
    pixel = 2 * half_width / size
    scale_x = torch.full_like(jet_pt, 1 / pixel)
    scale_y = scale_x
    if flip:
        # After "leading" centring the leading constituent sits exactly on (0, 0); it belongs to
        # no quadrant, or the choice would depend on the sign of zero. Elsewhere exact zeros
        # have measure zero and the extra pass is skipped.
        heat = w * ((x != 0) & (y != 0)) if center == "leading" else w
        upper_y = y >= 0
        upper_x = heat * (x >= 0)
        both = (upper_x * upper_y).sum(dim=1)
        only_x = upper_x.sum(dim=1) - both
        only_y = (heat * upper_y).sum(dim=1) - both
        neither = heat.sum(dim=1) - both - only_x - only_y
        hottest = torch.stack([neither, only_y, only_x, both], dim=1).argmax(dim=1, keepdim=True)
        scale_x = torch.where(hottest >= 2, scale_x, -scale_x)
        scale_y = torch.where(hottest % 2 == 1, scale_y, -scale_y)
    denom = w.sum(dim=1, keepdim=True) if normalize else jet_pt
    w = w / denom.clamp_min(torch.finfo(w.dtype).tiny)
    # Boundaries are inclusive as in CMSSW; the clamp puts +half_width into the last pixel
    # (CMSSW would index one past the end there).
    # Pixel indices stay in float32 (exact below 2**24) until one conversion at the end.
    offset = half_width / pixel
    row = (x * scale_x).add_(offset).clamp_(0, size - 1).trunc_()
    col = (y * scale_y).add_(offset).clamp_(0, size - 1).trunc_()
    return row.mul_(size).add_(col).long(), w


def three_channels(images: ArrayT) -> ArrayT:
    """``[N, 1, S, S]`` -> ``[N, 3, S, S]`` as a view (no copy), as ImageNet models expect."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise DataError(f"expected images of shape [N, 1, S, S], got {list(images.shape)}")
    if isinstance(images, np.ndarray):
        return np.broadcast_to(images, (images.shape[0], 3, *images.shape[2:]))
    return images.expand(-1, 3, -1, -1)

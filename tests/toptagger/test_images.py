"""Jet images: invariants on hand-made jets, the paper's CMSSW image on generated jets, bad input."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from tests.tolerances import gamma, image_sum_error, render_error
from toptagger.constants import IMAGE_SIZE
from toptagger.errors import ConfigError, DataError
from toptagger.images import MAX_MOMENTUM_GEV, PAPER_IMAGE_SIZE, ImageConfig, jet_images, three_channels
from toptagger.jets.dataset import JetBatch
from toptagger.jets.kinematics import eta as eta_of
from toptagger.jets.kinematics import jet_four_momentum
from toptagger.jets.kinematics import phi as phi_of
from toptagger.jets.kinematics import pt as pt_of

PREPROCESSED = {"center": "centroid", "rotate": True, "flip": True, "normalize": True}


def make_jets(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, slots: int = 200) -> np.ndarray:
    """Massless constituents from (pT, eta, phi) rows ([N, K] each), zero-padded to ``slots``."""
    pt, eta, phi = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (pt, eta, phi))
    out = np.zeros((pt.shape[0], slots, 4), np.float32)
    k = pt.shape[1]
    out[:, :k, 0] = pt * np.cosh(eta)
    out[:, :k, 1] = pt * np.cos(phi)
    out[:, :k, 2] = pt * np.sin(phi)
    out[:, :k, 3] = pt * np.sinh(eta)
    return out


def random_jet(rng: np.random.Generator, k: int = 40, spread: float = 0.25) -> tuple[np.ndarray, ...]:
    """Offsets in (eta, phi) and pTs of a jet-like cloud with a distinct principal axis."""
    dx = rng.normal(0, spread, k) * 1.8
    dy = rng.normal(0, spread, k) * 0.6
    pt = rng.exponential(20.0, k) + 1.0
    return pt, dx, dy


def test_single_constituent_lights_the_central_pixel() -> None:
    for size in (32, 33):
        image = jet_images(make_jets([[500.0]], [[0.4]], [[2.0]]), image_size=size)
        assert image.shape == (1, 1, size, size)
        assert image.dtype == np.float32
        centre = size // 2
        # w / pT_jet of one constituent: hypot (1 ulp, 2u) over sqrt(px^2 + py^2) (2u), divided (u)
        assert image[0, 0, centre, centre] == pytest.approx(1.0, rel=gamma(5), abs=0)
        assert np.count_nonzero(image) == 1


@pytest.mark.parametrize(
    "options", [PREPROCESSED, {"center": "leading", "rotate": True, "flip": True, "normalize": True}]
)
def test_rotating_a_jet_in_eta_phi_leaves_its_rotated_image_unchanged(options: dict) -> None:
    rng = np.random.default_rng(3)
    jets, rotated = [], []
    for _ in range(20):
        pt, dx, dy = random_jet(rng)
        alpha = rng.uniform(0, 2 * math.pi)
        eta0, phi0 = rng.uniform(-1.5, 1.5), rng.uniform(-math.pi, math.pi)
        rx = dx * math.cos(alpha) - dy * math.sin(alpha)
        ry = dx * math.sin(alpha) + dy * math.cos(alpha)
        jets.append((pt, eta0 + dx, phi0 + dy))
        # rotate about another point too: centring must remove any overall shift
        rotated.append((pt, eta0 + 0.1 + rx, phi0 - 0.2 + ry))
    images = jet_images(make_jets(*map(np.array, zip(*jets, strict=True))), image_size=32, **options)
    turned = jet_images(make_jets(*map(np.array, zip(*rotated, strict=True))), image_size=32, **options)
    assert images.sum() > 0
    # the same pixels, each within the rounding of two renders of 40 constituents
    tolerance = 2 * render_error(40) * np.maximum(images, turned)
    assert np.all(np.abs(turned - images) <= tolerance)
    # and the rotation really did something: without it the images differ
    plain = {**options, "rotate": False}
    unrotated = jet_images(make_jets(*map(np.array, zip(*rotated, strict=True))), image_size=32, **plain)
    assert not np.all(np.abs(unrotated - images) <= 2 * render_error(40) * np.maximum(images, unrotated))


def test_principal_axis_is_vertical_and_hottest_quadrant_fixed(small_jets: JetBatch) -> None:
    images = jet_images(small_jets.constituents, image_size=40, **PREPROCESSED)[:, 0].astype(np.float64)
    grid = np.arange(40) - 19.5
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    var_rows = (images * rows**2).sum(axis=(1, 2))
    var_cols = (images * cols**2).sum(axis=(1, 2))
    assert np.mean(var_rows >= var_cols) > 0.95  # pixelation can tip near-round jets
    quadrants = np.stack(
        [images[:, :20, :20].sum((1, 2)), images[:, :20, 20:].sum((1, 2)),
         images[:, 20:, :20].sum((1, 2)), images[:, 20:, 20:].sum((1, 2))], axis=1,
    )  # fmt: skip
    assert np.mean(quadrants.argmax(axis=1) == 3) > 0.9


def test_phi_wraps_around_pi() -> None:
    pt = [[300.0, 200.0, 100.0]]
    eta = [[0.3, 0.5, 0.1]]
    straddling = [[math.pi - 0.1, -math.pi + 0.15, math.pi - 0.3]]
    at_zero = [[-0.1, 0.15, -0.3]]
    for options in ({}, PREPROCESSED):
        a = jet_images(make_jets(pt, eta, straddling), image_size=40, **options)
        b = jet_images(make_jets(pt, eta, at_zero), image_size=40, **options)
        assert a.sum() > 0.5
        # two renders of 3 constituents within 0.4 rad of each other (sum pT / pT_jet < 1.03)
        assert np.all(np.abs(a - b) <= 2 * render_error(3, 1.03) * np.maximum(a, b))


def test_normalised_images_sum_to_one(small_jets: JetBatch) -> None:
    images = jet_images(small_jets.constituents, image_size=32, **PREPROCESSED)
    constituents = (small_jets.constituents[..., 0] != 0).sum(axis=1)
    assert np.all(np.abs(images.sum(axis=(1, 2, 3), dtype=np.float64) - 1.0) <= image_sum_error(constituents))


def test_empty_padding_and_out_of_window_jets_give_zeros_not_nan() -> None:
    empty = np.zeros((1, 200, 4), np.float32)
    # two clumps at delta-phi = +-2 around their common axis: nothing falls inside +-1
    outside = make_jets([[100.0, 100.0]], [[0.0, 0.0]], [[2.0, -2.0]])
    normal = make_jets([[100.0, 50.0]], [[0.0, 0.1]], [[1.0, 1.1]])
    batch = np.concatenate([empty, outside, normal])
    for options in ({}, PREPROCESSED):
        images = jet_images(batch, image_size=16, **options)
        assert np.isfinite(images).all()
        assert images[0].sum() == 0 and images[1].sum() == 0
        assert images[2].sum() > 0
    # centred on its leading constituent, that clump is inside and the other is not
    images = jet_images(batch, image_size=16, center="leading", rotate=True, flip=True, normalize=True)
    assert np.isfinite(images).all()
    assert images[0].sum() == 0
    assert np.all(np.abs(images[1:].sum(axis=(1, 2, 3), dtype=np.float64) - 1.0) <= image_sum_error(2))
    assert np.count_nonzero(images[1]) == 1
    assert jet_images(np.zeros((0, 200, 4), np.float32), image_size=8).shape == (0, 1, 8, 8)


def test_every_image_size_default_is_the_one_constant() -> None:
    from pipelines.top_tagging import top_tagging
    from toptagger.model import TaggerConfig
    from toptagger.training.config import TrainConfig

    assert ImageConfig().image_size == IMAGE_SIZE
    assert inspect.signature(jet_images).parameters["image_size"].default == IMAGE_SIZE
    assert TaggerConfig().image.image_size == IMAGE_SIZE
    assert TrainConfig().image.image_size == IMAGE_SIZE
    assert top_tagging.component_spec.inputs["image_size"].default == IMAGE_SIZE
    assert jet_images(np.zeros((1, 200, 4), np.float32)).shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_defaults_at_the_paper_size_reproduce_the_cmssw_producer(small_jets: JetBatch) -> None:
    """Against a literal per-constituent transcription of JetImageProducer.cc (float64)."""
    jets = small_jets.constituents[:60]
    images = jet_images(jets, image_size=PAPER_IMAGE_SIZE)
    assert images.shape == (60, 1, 224, 224)
    axis = jet_four_momentum(jets)
    width = 2.0 / 224
    mismatched = 0
    for n in range(len(jets)):
        ref = np.zeros((224, 224))
        jet_pt, jet_eta, jet_phi = pt_of(axis[n]), eta_of(axis[n]), phi_of(axis[n])
        for p in jets[n].astype(np.float64):
            if p[0] == 0:
                continue
            dphi = phi_of(p) - jet_phi
            dphi = dphi - 2 * math.pi if dphi > math.pi else dphi + 2 * math.pi if dphi < -math.pi else dphi
            deta = eta_of(p) - jet_eta
            if abs(deta) > 1 or abs(dphi) > 1:
                continue
            ref[min(int((deta + 1) / width), 223), min(int((dphi + 1) / width), 223)] += pt_of(p) / jet_pt
        # float32 vs float64 may move a constituent sitting on a pixel edge; allow a rare one
        real = jets[n][jets[n][:, 0] != 0].astype(np.float64)
        spread = pt_of(real).sum() / jet_pt
        mismatched += not np.all(np.abs(images[n, 0] - ref) <= render_error(len(real), spread) * ref)
    assert mismatched <= 1


def test_torch_path_matches_numpy_and_stays_a_tensor(small_jets: JetBatch) -> None:
    jets = small_jets.constituents[:50]
    from_numpy = jet_images(jets, image_size=24, **PREPROCESSED)
    from_torch = jet_images(torch.from_numpy(jets), image_size=24, **PREPROCESSED)
    assert isinstance(from_torch, torch.Tensor) and from_torch.device.type == "cpu"
    np.testing.assert_array_equal(from_torch.numpy(), from_numpy)
    # trimmed constituent lists and read-only arrays give the same images
    width = int(np.flatnonzero((jets[..., 0] != 0).any(axis=0))[-1]) + 1
    assert width < 200
    trimmed = np.ascontiguousarray(jets[:, :width])
    trimmed.flags.writeable = False
    np.testing.assert_array_equal(jet_images(trimmed, image_size=24, **PREPROCESSED), from_numpy)


def test_image_config_round_trip_and_render(small_jets: JetBatch) -> None:
    config = ImageConfig(image_size=20, center="leading", rotate=True, flip=False, normalize=True)
    assert ImageConfig.from_dict(config.to_dict()) == config
    np.testing.assert_array_equal(
        config.render(small_jets.constituents[:5]),
        jet_images(small_jets.constituents[:5], image_size=20, center="leading", rotate=True, normalize=True),
    )
    with pytest.raises(ConfigError, match="unknown image option"):
        ImageConfig.from_dict({"image_size": 20, "colour": "red"})


def test_three_channels_is_a_view() -> None:
    images = jet_images(make_jets([[100.0]], [[0.0]], [[0.0]]), image_size=8)
    rgb = three_channels(images)
    assert rgb.shape == (1, 3, 8, 8)
    assert np.shares_memory(rgb, images) and rgb.strides[1] == 0
    tensor = torch.from_numpy(images)
    rgb_t = three_channels(tensor)
    assert rgb_t.data_ptr() == tensor.data_ptr() and rgb_t.stride(1) == 0
    with pytest.raises(DataError, match=r"\[N, 1, S, S\]"):
        three_channels(rgb)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 200), np.float32), r"shape \[N, M, 4\]"),
        (np.zeros((2, 200, 3), np.float32), r"shape \[N, M, 4\]"),
        (np.zeros((2, 200, 4), np.float64), "float32"),
        (np.zeros((2, 200, 4), np.int32), "float32"),
        ([[[0.0] * 4]], "numpy array or torch tensor"),
    ],
)
def test_bad_arrays_are_named(array: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        jet_images(array, image_size=8)  # type: ignore[call-overload]


def test_nan_names_the_jet() -> None:
    jets = make_jets([[100.0]] * 5, [[0.0]] * 5, [[0.0]] * 5)
    jets[3, 0, 2] = np.nan
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 jet.*index 3"):
        jet_images(jets, image_size=8)
    jets[3, 0, 2] = np.inf
    with pytest.raises(DataError, match="index 3"):
        jet_images(torch.from_numpy(jets), image_size=8)


def test_momenta_whose_squares_overflow_are_named_not_rendered_into_garbage() -> None:
    jets = make_jets([[100.0]] * 4, [[0.0]] * 4, [[0.0]] * 4)
    jets[2, 0, 1] = 3e18  # finite, but pT^2 is not: the pixel index would be NaN
    with pytest.raises(DataError, match=r"momenta beyond 1e\+15 GeV in 1 jet\(s\), first at index 2"):
        jet_images(jets, image_size=8)
    jets[2, 0, 1] = MAX_MOMENTUM_GEV
    assert np.isfinite(jet_images(jets, image_size=8)).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -3}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"half_width": 0.0}, "half_width"),
        ({"half_width": float("nan")}, "half_width"),
        ({"center": "middle"}, "center must be one of"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        jet_images(np.zeros((1, 200, 4), np.float32), **options)

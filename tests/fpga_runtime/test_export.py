"""Export: batch-norm folding, the layer plan of resnet50, the narrow formats and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import resnet50

from fpga_runtime import quantize
from fpga_runtime.export import export_model, fold_bn
from fpga_runtime.package import load_package
from fpga_runtime.synthetic import randomize_bn
from tests.tolerances import EPS32
from toptagger.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_fold_bn_matches_conv_then_bn(model50: torch.nn.Module) -> None:
    conv, bn = model50.layer2[0].conv2, model50.layer2[0].bn2
    x = torch.randn(2, conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(0)).double()
    w, b = fold_bn(conv, bn)
    w64 = torch.from_numpy(w).double().permute(0, 3, 1, 2)
    b64 = torch.from_numpy(b).double()

    def conv_then_bn(eps: float) -> torch.Tensor:
        """The reference: conv then batch-norm in float64 from the unfolded (float32) parameters."""
        y = F.conv2d(x, conv.weight.detach().double(), None, conv.stride, conv.padding)
        mean, var, gamma, beta = (t.detach().double() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
        return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=eps)

    ref = conv_then_bn(bn.eps)
    got = F.conv2d(x, w64, b64, conv.stride, conv.padding)
    # fold_bn computes in float64 and rounds each folded weight and bias to float32 once: a relative
    # error of at most u per value, so |got - exact| <= u (|w| conv |x| + |b|) elementwise. Factor 2:
    # the float64 arithmetic of both sides (fold, conv with K = 1152 terms, batch-norm) adds at most
    # about (K + 10) * 2**-53 relative, i.e. 2**-29 * 1162 < 0.01 u; 2 is a comfortable cover for it.
    bound = 2 * EPS32 * (F.conv2d(x.abs(), w64.abs(), None, conv.stride, conv.padding) + b64.abs()[None, :, None, None])
    assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())
    # ... and the bound is tight enough to see a real mistake, e.g. an eps left out of the fold.
    wrong = conv_then_bn(0.0)
    assert not bool(((got - wrong).abs() <= bound).all())
    assert float(bn.running_mean.abs().max()) > 0.1  # the statistics really are non-trivial


def test_resnet50_plan(pkg50: Path) -> None:
    pkg = load_package(pkg50)
    convs = [layer for layer in pkg.layers if layer["op"] == "conv"]
    assert len(convs) == 53
    assert sum(c["kernel"] == [1, 1] for c in convs) == 36
    assert [layer["op"] for layer in pkg.layers[-2:]] == ["global_avgpool", "linear"]
    block = {c["name"]: c for c in convs if c["name"].startswith("layer2.0.")}
    assert block["layer2.0.conv2"]["stride"] == 2 and block["layer2.0.conv2"]["padding"] == 1
    assert block["layer2.0.downsample.0"]["stride"] == 2 and not block["layer2.0.downsample.0"]["relu"]
    assert block["layer2.0.conv3"]["residual"] == block["layer2.0.downsample.0"]["output"]
    assert block["layer2.0.conv3"]["relu"] and block["layer2.0.conv1"]["residual"] is None
    assert pkg.input_shape() == (3, 32, 32)
    sizes = {p: pkg.plan["precisions"][p]["bytes"] for p in pkg.precisions}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"] and sizes["bfp8"] < sizes["fp16"]
    scales = pkg.plan["precisions"]["int8"]["activation_scales"]
    assert set(scales) == {c["input"] for c in convs} and all(s > 0 for s in scales.values())


def test_int8_per_channel_roundtrip() -> None:
    w = np.random.default_rng(0).normal(size=(8, 3, 3, 16)).astype(np.float32) * np.arange(1, 9)[:, None, None, None]
    q, s = quantize.int8_per_channel(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    # In float64, q * s is exact (8 + 24 bits) and so, to 2**-53, is the difference. The quantiser
    # rounds w / scale to the nearest integer with scale = amax / 127 in float64, then stores s =
    # float32(scale) = scale (1 + d), |d| <= u: |q s - w| <= scale / 2 + 127 scale u <= s (1/2 + 128 u).
    err = np.abs(q.astype(np.float64) * s.astype(np.float64)[:, None, None, None] - w).max(axis=(1, 2, 3))
    assert np.all(err <= s * (0.5 + 128 * EPS32))


def test_bfp8_roundtrip_and_shared_exponent() -> None:
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(4, 40)) * np.logspace(-3, 1, 40)).astype(np.float32)
    mant, exp = quantize.bfp8_encode(w)
    assert mant.shape == (4, 40) and exp.shape == (4, 3)  # 40 values -> blocks of 16, 16, 8
    back = quantize.bfp8_decode(mant, exp)
    step = np.repeat(np.ldexp(1.0, exp.astype(int)), 16, axis=1)[:, :40]
    # Exact, no rounding slack: w / step and mantissa * step scale by powers of two, so the only
    # error is rint's half step (float32 holds mantissa * step exactly, and float64 the difference).
    assert np.all(np.abs(back.astype(np.float64) - w) <= step / 2)
    assert np.abs(mant).max() <= 127 and np.abs(mant).max(axis=1).min() >= 64  # blocks use their top bit
    # Activations: the same rule per block of 16 channels of a pixel. Pixel p of an NCHW [1, 32, 4, 1]
    # tensor holds row p of w[:, :32] along its channels.
    rows = w[:, :32]
    x = torch.from_numpy(rows.T.copy()).double().reshape(1, 32, 4, 1)
    got = quantize.bfp8_round_channels(x).numpy().reshape(32, 4).T
    assert np.array_equal(got, quantize.bfp8_decode(*quantize.bfp8_encode(rows)))


def test_int8_export_needs_calibration(tmp_path: Path) -> None:
    torch.manual_seed(0)  # resnet50() initialises its weights from the global RNG
    with pytest.raises(ConfigError, match="calibration"):
        export_model(randomize_bn(resnet50(num_classes=2)), tmp_path / "p", ["int8"])


def test_export_refuses_to_overwrite(pkg50: Path, model50: torch.nn.Module) -> None:
    from fpga_runtime.errors import PackageError

    with pytest.raises(PackageError, match="already holds a package"):
        export_model(model50, pkg50, ["fp32"])


def test_export_cli_from_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)  # resnet50() and Conv2d initialise their weights from the global RNG
    model = resnet50(num_classes=2)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # the 1-channel jet-image tagger
    randomize_bn(model)
    save_file(model.state_dict(), str(tmp_path / "tagger.safetensors"))
    np.savez(tmp_path / "calib.npz", images=np.random.default_rng(0).random((4, 1, 40, 40), dtype=np.float32))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpga_runtime.export",
            "--model",
            str(tmp_path / "tagger.safetensors"),
            "--out",
            str(tmp_path / "pkg"),
            "--precision",
            "fp32",
            "bfp8",
            "int8",
            "--calibration",
            str(tmp_path / "calib.npz"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "pkg" / "plan.json").read_text())
    assert plan["input"] == {"layout": "NCHW", "dtype": "float32", "channels": 1, "height": 40, "width": 40}
    assert set(plan["precisions"]) == {"fp32", "bfp8", "int8"}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpga_runtime.export",
            "--model",
            str(tmp_path / "missing.pt"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: model file")


@pytest.mark.parametrize("module", ["export", "devices", "probe"])
def test_cli_help(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"fpga_runtime.{module}", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_auc_and_rejection() -> None:
    from benchmarks.opencl_accuracy import auc, background_rejection

    labels = np.array([0, 0, 1, 1, 0, 1])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7]), labels) == 1.0
    assert auc(np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]), labels) == 0.0
    assert auc(np.full(6, 0.5), labels) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    s, b = rng.normal(1, 1, 20000), rng.normal(0, 1, 20000)
    scores, lab = np.concatenate([s, b]), np.concatenate([np.ones(20000), np.zeros(20000)])
    assert abs(auc(scores, lab) - 0.7602) < 0.01  # Phi(1/sqrt(2))
    assert abs(background_rejection(scores, lab) - 1 / 0.0637) < 1.0  # eps_B = 1 - Phi(1 + 0.5244)

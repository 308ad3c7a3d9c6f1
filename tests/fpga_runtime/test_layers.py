"""Layer-by-layer agreement of the OpenCL kernels with torch (float64), one plan per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpga_runtime.engine import Engine
from fpga_runtime.package import PLAN_FORMAT, PLAN_VERSION, load_package, write_package
from tests.tolerances import conv_bound, dot_bound, gamma, softmax_bound


def make_package(
    path: Path, channels: int, size: int, layers: list[dict[str, Any]], tensors: dict[str, np.ndarray]
) -> Path:
    plan = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "input": {"layout": "NCHW", "dtype": "float32", "channels": channels, "height": size, "width": size},
        "output": layers[-1]["output"],
        "layers": layers,
        "precisions": {"fp32": {}},
    }
    return write_package(path, plan, {"fp32": tensors})


def conv_layer(
    name: str,
    src: str,
    out: str,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    pad: int,
    relu: bool,
    residual: str | None,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    layer = {
        "name": name,
        "op": "conv",
        "input": src,
        "output": out,
        "cin": cin,
        "cout": cout,
        "kernel": [k, k],
        "stride": stride,
        "padding": pad,
        "relu": relu,
        "residual": residual,
    }
    w = (rng.normal(size=(cout, k, k, cin)) / np.sqrt(k * k * cin)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    return layer, {f"{name}.weight": w, f"{name}.bias": b}


def torch_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> torch.Tensor:
    return F.conv2d(
        torch.from_numpy(x).double(),
        torch.from_numpy(w).double().permute(0, 3, 1, 2),
        torch.from_numpy(b).double(),
        stride,
        pad,
    )


def within(got: np.ndarray, ref: torch.Tensor, bound: torch.Tensor) -> bool:
    """|got - ref| <= bound elementwise (float64)."""
    return bool(((torch.from_numpy(np.asarray(got, dtype=np.float64)) - ref).abs() <= bound).all())


def oihw(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(w).permute(0, 3, 1, 2)


# (cin, cout, kernel, stride, padding, image size): every conv shape of resnet50, plus sizes whose
# pixel count is not a multiple of the row block, 1-channel stems, and an unpadded 3x3.
CONVS = [
    (64, 64, 1, 1, 0, 9),
    (64, 128, 1, 2, 0, 10),
    (32, 32, 3, 1, 1, 7),
    (32, 64, 3, 2, 1, 9),
    (16, 16, 3, 1, 0, 8),
    (3, 64, 7, 2, 3, 19),
    (1, 64, 7, 2, 3, 16),
]


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "pad", "size"), CONVS)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_matches_torch(
    tmp_path: Path, cin: int, cout: int, k: int, stride: int, pad: int, size: int, relu: bool
) -> None:
    rng = np.random.default_rng(cin * 100 + k)
    layer, tensors = conv_layer("c", "input", "t1", cin, cout, k, stride, pad, relu, None, rng)
    engine = Engine.from_package(make_package(tmp_path, cin, size, [layer], tensors), probe=False)
    x = rng.normal(size=(3, cin, size, size)).astype(np.float32)
    ref = torch_conv(x, tensors["c.weight"], tensors["c.bias"], stride, pad)
    if relu:
        ref = torch.relu(ref)
    got = engine.intermediates(x)["t1"]
    assert got.shape == tuple(ref.shape)
    # One float32 dot product of K = cin * k * k terms plus the bias per output (ReLU is exact).
    bound = conv_bound(x, oihw(tensors["c.weight"]), tensors["c.bias"], stride, pad)
    assert within(got, ref, bound)


def test_residual_epilogue(tmp_path: Path) -> None:
    """conv -> conv with the first output added before the ReLU (a residual block's tail)."""
    rng = np.random.default_rng(5)
    l1, t1 = conv_layer("a", "input", "t1", 16, 32, 1, 1, 0, True, None, rng)
    l2, t2 = conv_layer("b", "t1", "t2", 32, 32, 3, 1, 1, True, "t1", rng)
    engine = Engine.from_package(make_package(tmp_path, 16, 6, [l1, l2], {**t1, **t2}), probe=False)
    x = rng.normal(size=(2, 16, 6, 6)).astype(np.float32)
    got = engine.intermediates(x)
    a = torch.relu(torch_conv(x, t1["a.weight"], t1["a.bias"], 1, 0))
    assert within(got["t1"], a, conv_bound(x, oihw(t1["a.weight"]), t1["a.bias"]))
    # Each layer on its own float32 input: the second conv reads the engine's t1, as input and as
    # the residual added into its accumulator (K terms, the bias and the residual).
    t1_out = torch.from_numpy(got["t1"]).double()
    ref = torch.relu(
        F.conv2d(t1_out, oihw(t2["b.weight"]).double(), torch.from_numpy(t2["b.bias"]).double(), 1, 1) + t1_out
    )
    assert within(got["t2"], ref, conv_bound(t1_out, oihw(t2["b.weight"]), t2["b.bias"], 1, 1, residual=t1_out))


def test_pooling_and_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    layers = [
        {"name": "maxpool", "op": "maxpool", "input": "input", "output": "t1", "kernel": 3, "stride": 2, "padding": 1},
        {"name": "avgpool", "op": "global_avgpool", "input": "t1", "output": "t2"},
        {"name": "fc", "op": "linear", "input": "t2", "output": "t3", "in_features": 32, "out_features": 2},
    ]
    tensors = {
        "fc.weight": rng.normal(size=(2, 32)).astype(np.float32),
        "fc.bias": rng.normal(size=2).astype(np.float32),
    }
    engine = Engine.from_package(make_package(tmp_path, 32, 11, layers, tensors), probe=False)
    assert load_package(tmp_path).layers[0]["op"] == "maxpool"
    x = rng.normal(size=(3, 32, 11, 11)).astype(np.float32)
    got = engine.intermediates(x)
    mp = F.max_pool2d(torch.from_numpy(x).double(), 3, 2, 1)
    assert np.array_equal(got["t1"], mp.float().numpy())  # max-pool is exact
    avg = mp.mean(dim=(2, 3))
    # A float32 sum of HW = 36 values and a division: gamma(36) relative to mean |x|.
    avg_bound = gamma(mp.shape[2] * mp.shape[3]) * mp.abs().mean(dim=(2, 3))
    assert within(got["t2"], avg, avg_bound)
    w, b = torch.from_numpy(tensors["fc.weight"]).double(), torch.from_numpy(tensors["fc.bias"]).double()
    logits = avg @ w.T + b
    # The head's own dot product (C = 32 terms and the bias) on the engine's average, plus the
    # average's error carried through |W|.
    logit_bound = dot_bound(got["t2"], w, b) + avg_bound @ w.abs().T
    assert within(engine.logits(x), logits, logit_bound)
    probs = engine.predict(x)
    # The engine's softmax runs in float64 and rounds each probability to float32 once (u relative);
    # softmax_bound covers that with the float32 softmax it assumes.
    bound = softmax_bound(logits, logit_bound)
    assert np.all(np.abs(probs - torch.softmax(logits, dim=1).numpy()) <= bound)

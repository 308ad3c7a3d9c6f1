"""The whole resnet50 through the engine, in every precision, plus the binary-load path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fpga_runtime.engine import Engine
from fpga_runtime.errors import BinaryMismatchError
from fpga_runtime.reference import run_reference
from tests.fpga_runtime.conftest import jet_images, random_images
from tests.tolerances import EPS32, conv_bn_bound, resnet_logit_bound


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("images", [random_images(6, seed=3), jet_images(6, seed=4)], ids=["random", "jets"])
def test_fp32_matches_torch(engine50: Callable[[str], Engine], model50: torch.nn.Module, images: np.ndarray) -> None:
    with torch.no_grad():
        exact = copy.deepcopy(model50).double()(torch.from_numpy(images).double()).numpy()
    got = engine50("fp32").logits(images).astype(np.float64)
    # Against torch in float64: the engine's float32 rounding through all 53 layers, propagated by
    # the network's gradients (tests/tolerances.py; a probabilistic bound, about 4e-4 of the largest
    # logit here, where the observed error is about 2e-6 of it).
    assert np.all(np.abs(got - exact) <= resnet_logit_bound(model50, images))


def test_residual_blocks_layer_by_layer(engine50: Callable[[str], Engine], model50: torch.nn.Module) -> None:
    """Every conv layer of the engine (the bottleneck blocks' outputs: the conv3 tensor with the
    residual fused) against torch's layer, run in float64 on the engine's own float32 input.

    Inputs are wired from torch's structure (the previous block's output, the block's downsample),
    not from the plan, so a mis-wired plan fails here; each layer then carries only its own rounding,
    a worst-case bound that needs no propagation through the layers before it.
    """
    engine = engine50("fp32")
    got = {name: torch.from_numpy(t).double() for name, t in engine.intermediates(jet_images(2, seed=7)).items()}
    out = {layer["name"]: got[layer["output"]] for layer in engine.package.layers}
    net = copy.deepcopy(model50).double().eval()
    checks = [("conv1", net.conv1, net.bn1, got["input"], None)]
    with torch.no_grad():
        assert torch.equal(out["maxpool"], net.maxpool(out["conv1"]))  # max-pooling is exact
    previous = out["maxpool"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(net, stage)):
            name = f"{stage}.{i}"
            identity = previous
            if block.downsample is not None:
                checks.append((f"{name}.downsample.0", block.downsample[0], block.downsample[1], previous, None))
                identity = out[f"{name}.downsample.0"]
            checks += [
                (f"{name}.conv1", block.conv1, block.bn1, previous, None),
                (f"{name}.conv2", block.conv2, block.bn2, out[f"{name}.conv1"], None),
                (f"{name}.conv3", block.conv3, block.bn3, out[f"{name}.conv2"], identity),
            ]
            previous = out[f"{name}.conv3"]
    assert len(checks) == 53
    relu = {layer["name"]: layer["relu"] for layer in engine.package.layers if layer["op"] == "conv"}
    for name, conv, bn, x, residual in checks:
        with torch.no_grad():
            ref = bn(conv(x)) + (residual if residual is not None else 0)
        ref = torch.relu(ref) if relu[name] else ref
        assert relu[name] == (not name.endswith("downsample.0"))
        bound = conv_bn_bound(conv, bn, x, residual)
        assert bool(((out[name] - ref).abs() <= bound).all()), name


@pytest.mark.parametrize("precision", ["int8", "bfp8", "fp16"])
def test_narrow_precision_matches_its_emulation(
    engine50: Callable[[str], Engine], model50: torch.nn.Module, precision: str
) -> None:
    """The kernels compute what the format defines (reference emulation), and stay near fp32."""
    engine = engine50(precision)
    x = np.concatenate([jet_images(3, seed=8), random_images(3, seed=9)])
    got = engine.logits(x)
    emulated = run_reference(engine.package.plan, engine.package.weights(precision), precision, x)
    # Only rounding-boundary flips of single activations separate the two.
    assert rel_err(got, emulated) <= {"fp16": 5e-3, "int8": 2e-2, "bfp8": 2e-2}[precision]
    fp32 = torch_logits(model50, x)
    assert rel_err(got, fp32) <= 0.25
    assert np.array_equal(np.argmax(got, axis=1), np.argmax(fp32, axis=1))


def test_batches_split_and_reuse(engine50: Callable[[str], Engine]) -> None:
    engine = engine50("fp32")
    x = jet_images(11, seed=12)
    whole = engine.logits(x)  # 8 + 3 with max_batch_size=8
    singles = np.concatenate([engine.logits(x[i : i + 1]) for i in range(len(x))])
    # Not merely close: every output element is one work-item's sequential reduction over the same
    # K terms in the same order whatever the batch size, so the rounding, and the result, are identical.
    assert np.array_equal(whole, singles)
    assert np.array_equal(engine.logits(x), whole)  # buffers reused, result unchanged
    probs = engine.predict(x)
    assert probs.shape == (11, 2) and probs.dtype == np.float32
    # A float64 softmax rounded to float32 once per probability (u relative, so at most u in the
    # sum, taken in float64); doubled to cover the float64 softmax's own 2**-53-scale rounding.
    assert np.all(np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0) <= 2 * EPS32)
    assert engine.classes == ["qcd", "top"]
    assert engine.input_shape == (3, 32, 32)


def test_profile_table(engine50: Callable[[str], Engine]) -> None:
    rows = engine50("int8").profile(jet_images(2, seed=13))
    convs = [r for r in rows if r.kind == "conv"]
    assert len(convs) == 53 and sum(r.layer.endswith(("conv1", "conv3", "downsample.0")) for r in convs) == 53 - 16
    assert all(r.seconds > 0 for r in rows)
    assert all(r.gflops > 0 for r in convs)
    assert [r.layer for r in rows][-3:] == ["layer4.2.conv3", "avgpool", "fc"]


def test_binary_load_path(pkg50: Path, engine50: Callable[[str], Engine], tmp_path: Path) -> None:
    """Build on PoCL, save program.binaries, load them back the way an FPGA device would."""
    source = engine50("fp32")
    path = source.save_binary(tmp_path / "bin")
    assert path.stat().st_size > 0
    loaded = Engine.from_package(pkg50, precision="fp32", probe=False, use_binary=True, binary_dir=tmp_path / "bin")
    assert loaded.from_binary
    x = jet_images(3, seed=14)
    assert np.array_equal(loaded.logits(x), source.logits(x))


def test_binary_load_is_probed_in_a_child(pkg50: Path, engine50: Callable[[str], Engine], tmp_path: Path) -> None:
    engine50("int8").save_binary(tmp_path)
    engine = Engine.from_package(pkg50, precision="int8", probe=True, use_binary=True, binary_dir=tmp_path)
    assert engine.predict(jet_images(1)).shape == (1, 2)


def test_binary_for_another_device(pkg50: Path, engine50: Callable[[str], Engine], tmp_path: Path) -> None:
    path = engine50("fp32").save_binary(tmp_path)
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["device"] = "xilinx_u250_gen3x16_xdma_shell_4_1"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BinaryMismatchError, match=r"built for .*xilinx_u250"):
        Engine.from_package(pkg50, precision="fp32", probe=False, use_binary=True, binary_dir=tmp_path)


def test_binary_missing_for_this_device(pkg50: Path, engine50: Callable[[str], Engine], tmp_path: Path) -> None:
    path = engine50("fp32").save_binary(tmp_path)
    path.rename(tmp_path / "alveo-u250--fp32.bin")
    path.with_suffix(".json").rename(tmp_path / "alveo-u250--fp32.json")
    with pytest.raises(BinaryMismatchError, match=r"no fp32 kernel binary for device .*alveo-u250"):
        Engine.from_package(pkg50, precision="fp32", probe=False, use_binary=True, binary_dir=tmp_path)


def test_truncated_binary_is_refused_before_the_driver_sees_it(
    pkg50: Path, engine50: Callable[[str], Engine], tmp_path: Path
) -> None:
    # PoCL segfaults on a truncated binary; the manifest hash must stop it first.
    path = engine50("fp32").save_binary(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BinaryMismatchError, match="sha256"):
        Engine.from_package(pkg50, precision="fp32", probe=False, use_binary=True, binary_dir=tmp_path)

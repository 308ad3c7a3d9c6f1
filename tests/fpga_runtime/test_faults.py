"""Bad packages, bad input and driver faults end in typed errors that say what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fpga_runtime import devices, probe, program
from fpga_runtime.engine import Engine
from fpga_runtime.errors import (
    InputError,
    KernelBuildError,
    KernelProbeError,
    PackageError,
    PrecisionError,
    UnsupportedLayerError,
)
from fpga_runtime.export import export_model
from fpga_runtime.package import load_package
from fpga_runtime.synthetic import randomize_bn
from tests.fpga_runtime.conftest import jet_images
from toptagger.errors import TaggerError


@pytest.fixture
def pkg_copy(pkg50: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg50, dst)
    return dst


def test_plan_and_weights_disagree_on_a_shape(pkg_copy: Path) -> None:
    plan = json.loads((pkg_copy / "plan.json").read_text())
    layer = next(x for x in plan["layers"] if x["name"] == "layer2.0.conv2")
    layer["kernel"] = [1, 1]
    (pkg_copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PackageError, match=r"layer2\.0\.conv2\.weight.*float32\[128, 3, 3, 128\].*\[128, 1, 1, 128\]"):
        Engine.from_package(pkg_copy, probe=False)


def test_weights_from_another_export(pkg_copy: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)  # ResNet() initialises its weights from the global RNG
    other = export_model(
        randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2), seed=3),
        tmp_path / "other",
        ["fp32"],
        image_size=32,
    )
    shutil.copy(other / "weights-fp32.safetensors", pkg_copy / "weights-fp32.safetensors")
    with pytest.raises(PackageError, match="sha256"):
        Engine.from_package(pkg_copy, probe=False)


def test_precision_missing_from_package(tmp_path: Path) -> None:
    torch.manual_seed(0)  # ResNet() initialises its weights from the global RNG
    pkg = export_model(
        randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2)), tmp_path / "p", ["fp32"], image_size=32
    )
    with pytest.raises(PrecisionError, match="without precision 'bfp8'"):
        Engine.from_package(pkg, precision="bfp8", probe=False)


def test_unsupported_layer_at_export(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the modules below initialise their weights from the global RNG
    with pytest.raises(UnsupportedLayerError, match="torchvision ResNets"):
        export_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), tmp_path / "a")
    grouped = ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=32)
    with pytest.raises(UnsupportedLayerError, match=r"layer1\.0\.conv2: groups=2"):
        export_model(grouped, tmp_path / "b")
    odd = ResNet(BasicBlock, [1, 1, 1, 1])
    odd.maxpool = torch.nn.AvgPool2d(2)
    with pytest.raises(UnsupportedLayerError, match="maxpool is AvgPool2d"):
        export_model(odd, tmp_path / "c")


def test_unsupported_layer_in_plan(pkg_copy: Path) -> None:
    plan = json.loads((pkg_copy / "plan.json").read_text())
    plan["layers"][1]["op"] = "lrn"
    (pkg_copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UnsupportedLayerError, match="layer 1 \\(maxpool\\) has op 'lrn'"):
        load_package(pkg_copy)


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"plan\.json is missing"):
        Engine.from_package(tmp_path, probe=False)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        Engine.from_package(tmp_path, probe=False)


def test_fp16_needs_cl_khr_fp16(pkg50: Path) -> None:
    info, _ = devices.select_device()
    if info.fp16:
        pytest.skip(f"{info.label()} reports cl_khr_fp16, so fp16 is allowed there")
    with pytest.raises(PrecisionError, match="fp16 needs cl_khr_fp16"):
        Engine.from_package(pkg50, precision="fp16", probe=False)


def test_kernel_build_failure_shows_the_log() -> None:
    _, device = devices.select_device()
    ctx = program.shared_context(device)
    # VW=5 asks for float5, which OpenCL C does not have: a real compiler error.
    with pytest.raises(KernelBuildError, match=r"(?s)OpenCL build failed.*-DVW=5.*float5"):
        program.build_from_source(ctx, device, "-DPREC_FP32 -DMR=4 -DVW=5")


def test_kernel_crash_is_caught_by_the_probe(tmp_path: Path) -> None:
    src = tmp_path / "crash.cl"
    src.write_text(
        "__kernel void k(__global float* x) {\n"
        "  __global float* bad = (__global float*)0x10;  /* unmapped page */\n"
        "  bad[get_global_id(0) * 4096] = x[0];\n}\n"
    )
    with pytest.raises(KernelProbeError, match=r"died with SIG(SEGV|BUS|ABRT)"):
        probe.probe_source(src, "k")
    ok = tmp_path / "ok.cl"
    ok.write_text("__kernel void k(__global float* x) { x[get_global_id(0)] = 1.0f; }\n")
    assert probe.probe_source(ok, "k")["ok"]


def test_probe_reports_build_errors_with_their_type(tmp_path: Path) -> None:
    src = tmp_path / "broken.cl"
    src.write_text("__kernel void k(__global float* x) { x[0] = undefined_thing; }\n")
    with pytest.raises(KernelBuildError, match="undefined_thing"):
        probe.probe_source(src, "k")


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 1, 32, 32), np.float32), r"shape \[N, 3, 32, 32\], got \[2, 1, 32, 32\]"),
        (np.zeros((3, 32, 32), np.float32), "shape"),
        (np.zeros((2, 3, 32, 32), np.int64), "floating point"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN"),
        ([[1.0]], "numpy array"),
    ],
)
def test_bad_input(engine50: Callable[[str], Engine], images: object, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        engine50("fp32").predict(images)
    assert isinstance(info.value, TaggerError)


def test_engine_probe_passes_on_good_kernels(pkg50: Path) -> None:
    engine = Engine.from_package(pkg50, precision="bfp8", probe=True)
    assert engine.predict(jet_images(2)).shape == (2, 2)

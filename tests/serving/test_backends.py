"""``python -m serving --backend opencl``: the OpenCL engine (PoCL here) behind the same predictor."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch

from serving.backends import OPENCL_PACKAGE, TorchBackend
from serving.client import TaggerClient
from serving.triton.protos import extensions_pb2
from tests.predictor import IMAGE_SIZE, start_server, stop_server
from tests.tolerances import tagger_probability_bound
from toptagger.jets.dataset import JetBatch
from toptagger.model import load_model


@pytest.fixture(scope="module")
def opencl_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test tagger plus its fp32 OpenCL package, laid out as a registered model version."""
    from fpga_runtime import export_model

    folder = tmp_path_factory.mktemp("opencl-model") / "tagger"
    shutil.copytree(model_dir, folder)
    torch.manual_seed(0)  # load_model builds the network (random initialisation) before loading the weights
    export_model(load_model(folder), folder / OPENCL_PACKAGE, ["fp32"], image_size=IMAGE_SIZE)
    return folder


def test_opencl_backend_serves_what_torch_computes(
    opencl_model_dir: Path, tmp_path: Path, small_jets: JetBatch
) -> None:
    torch.manual_seed(0)  # load_model builds the network (random initialisation) before loading the weights
    reference = TorchBackend(opencl_model_dir, threads=1)
    jets = small_jets.constituents[:5]
    images = reference.render(jets)
    expected = reference.predict(images)
    # two float32 evaluations (the OpenCL kernels in the server, torch here), each rendering the jets
    tolerance = tagger_probability_bound(reference.model, images, jets)
    server = start_server(opencl_model_dir, "--backend", "opencl")
    try:
        model = httpx.get(f"{server.url}/v2/models/top-tagger").json()
        assert model["inputs"][0]["shape"] == [-1, 3, IMAGE_SIZE, IMAGE_SIZE]

        async def ask() -> np.ndarray:
            async with TaggerClient(server.grpc_url) as client:
                return await client.infer(constituents=jets)

        assert np.all(np.abs(asyncio.run(ask()) - expected) <= tolerance)
        assert "opencl" in server.log_text()
    finally:
        stop_server(server)


def not_ready_reason(model_dir: Path, *args: str) -> str:
    """Start the server, check that it is up but not ready (503), return the readiness reason."""
    server = start_server(model_dir, *args, wait_ready=False)
    try:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503, ready.text
        return ready.json()["reason"]
    finally:
        stop_server(server)


def test_no_opencl_device_means_not_ready_unless_a_fallback_is_given(
    opencl_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOPTAGGER_OPENCL_DEVICE", "no-such-fpga-board")
    assert "no-such-fpga-board" in not_ready_reason(opencl_model_dir, "--backend", "opencl")

    server = start_server(opencl_model_dir, "--backend", "opencl", "--fallback", "torch")
    try:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert "falling back to torch" in server.log_text()
        # Triton's ModelConfig names the backend that serves, not the one asked for
        with grpc.insecure_channel(server.grpc_url.removeprefix("grpc://")) as channel:
            model_config = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelConfig",
                request_serializer=extensions_pb2.ModelConfigRequest.SerializeToString,
                response_deserializer=extensions_pb2.ModelConfigResponse.FromString,
            )
            assert (
                model_config(extensions_pb2.ModelConfigRequest(name="top-tagger"), timeout=10).config.backend == "torch"
            )
    finally:
        stop_server(server)
    assert os.environ["TOPTAGGER_OPENCL_DEVICE"] == "no-such-fpga-board"


def test_required_accelerator_missing_means_not_ready(opencl_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FPGA overlay's setting: on a node without a visible FPGA, do not serve from PoCL's CPU."""
    monkeypatch.setenv("TOPTAGGER_OPENCL_DEVICE_TYPE", "ACCELERATOR")
    reason = not_ready_reason(opencl_model_dir, "--backend", "opencl")
    assert "no OpenCL ACCELERATOR device" in reason
    assert "(CPU)" in reason, "the reason lists what the node does have"


def test_model_without_opencl_package_is_not_ready_with_the_reason(model_dir: Path, tmp_path: Path) -> None:
    assert "no OpenCL package" in not_ready_reason(model_dir, "--backend", "opencl")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_runtimes_serve_what_torch_computes(backend: str, onnx_model_dir: Path, small_jets: JetBatch) -> None:
    torch.manual_seed(0)  # TorchBackend builds the network (random initialisation) before loading the weights
    reference = TorchBackend(onnx_model_dir, threads=1)
    jets = small_jets.constituents[:5]
    expected = reference.predict(reference.render(jets))
    # two float32 evaluations (the runtime in the server, torch here), each rendering the jets
    tolerance = tagger_probability_bound(reference.model, reference.render(jets), jets)
    server = start_server(onnx_model_dir, "--backend", backend)
    try:

        async def ask() -> np.ndarray:
            async with TaggerClient(server.grpc_url) as client:
                return await client.infer(constituents=jets)

        assert np.all(np.abs(asyncio.run(ask()) - expected) <= tolerance)
        config = httpx.get(f"{server.url}/v2/models/top-tagger/config").json()
        assert config["backend"] == backend
    finally:
        stop_server(server)


def test_a_model_without_its_onnx_graph_is_not_ready_with_the_reason(model_dir: Path) -> None:
    reason = not_ready_reason(model_dir, "--backend", "onnxruntime")
    assert "no model.onnx" in reason and "python -m toptagger.onnx_export" in reason


def test_torch_backend_in_bfloat16_computes_in_bfloat16(model_dir: Path, small_jets: JetBatch) -> None:
    """The GPU pool's half-precision path, run on the CPU (bf16) so that it cannot rot.

    No tolerance is claimed: the float32 bound analysis (tests/tolerances.py), scaled to
    bfloat16's unit roundoff (2^-8), bounds nothing useful for a 50-layer network. What is checked:
    the network really runs in bfloat16 (its parameters, and answers that are not float32's), and
    the answers are probabilities taken in float32.
    """
    torch.manual_seed(0)  # TorchBackend builds the network (random initialisation) before loading the weights
    reference = TorchBackend(model_dir, threads=1)
    torch.manual_seed(0)
    half = TorchBackend(model_dir, threads=1, precision="bf16")
    assert half.dtype == torch.bfloat16 and "(bf16)" in half.description
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    images = reference.render(small_jets.constituents[:16])
    expected, served = reference.predict(images), half.predict(images)
    assert served.dtype == np.float32 and served.shape == expected.shape
    assert np.all(np.isfinite(served)) and np.all((served >= 0) & (served <= 1))
    assert np.allclose(served.sum(axis=1), 1.0, rtol=0, atol=4 * np.finfo(np.float32).eps)
    assert not np.array_equal(served, expected), "bfloat16 answers equal to float32's: not computed in bfloat16"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_graph_backends_refuse_half_precision_by_name(backend: str, onnx_model_dir: Path) -> None:
    from serving.backends import load_backend
    from toptagger.errors import ConfigError

    with pytest.raises(ConfigError, match=f"the {backend} backend runs fp32, .* not 'fp16' .fp16 is torch's"):
        load_backend(str(onnx_model_dir), backend, precision="fp16")

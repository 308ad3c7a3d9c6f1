"""The predictor's image copies only what the predictor runs, and the predictor imports nothing else.

The modules a predictor imports (start-up, a model loaded on each CPU backend, the OpenCL engine) are
read off a real process; each must lie in a path that serving/Dockerfile (and Dockerfile.fpga)
copies, and none may be generator, training, registry, deploy, pipeline or benchmark code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("toptagger", "serving", "fpga_runtime", "components", "pipelines", "benchmarks")
FORBIDDEN = (
    "toptagger.jets.generator",
    "toptagger.training",
    "toptagger.deploy",
    "toptagger.registry",
    "components",
    "pipelines",
    "benchmarks",
)

PROBE = """
import json, sys, tempfile
import torch
torch.manual_seed(0)
from toptagger.model import TaggerConfig, build_model, save_model
folder = save_model(build_model(TaggerConfig()).eval(), tempfile.mkdtemp() + "/tagger")
import serving.__main__, serving.server
from serving.predictor import TopTagger
from toptagger.onnx_export import export_onnx
from toptagger.model import load_model
export_onnx(load_model(folder), folder)
for backend in ("torch", "onnxruntime", "openvino"):
    model = TopTagger(str(folder), backend=backend)
    assert model.load(), model.not_ready_reason
import fpga_runtime.engine, fpga_runtime.devices  # what the opencl backend imports
print(json.dumps(sorted({m.__file__ for name, m in sys.modules.items()
                         if name.split(".")[0] in PROJECT and getattr(m, "__file__", None)})))
""".replace("PROJECT", repr(PROJECT))


def copied_paths(dockerfile: Path) -> list[str]:
    """Sources of the COPY lines that copy project code into /app."""
    text = dockerfile.read_text().replace("\\\n", " ")
    sources: list[str] = []
    for line in text.splitlines():
        if re.match(r"^\s*COPY\s", line) and "requirements.txt" not in line:
            parts = line.split()[1:]
            sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


@pytest.fixture(scope="module")
def imported_files() -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [str(Path(f).resolve().relative_to(REPO)) for f in json.loads(result.stdout.strip().splitlines()[-1])]


def test_the_predictor_imports_no_generator_training_registry_or_deploy_code(imported_files: list[str]) -> None:
    modules = {f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in imported_files}
    assert "serving.predictor" in modules and "toptagger.images" in modules  # the probe really ran
    offending = sorted(m for m in modules if m.startswith(FORBIDDEN))
    assert not offending, f"the predictor imports {offending}"


@pytest.mark.parametrize("dockerfile", ["serving/Dockerfile", "serving/Dockerfile.fpga"])
def test_the_image_copies_every_module_the_predictor_imports(dockerfile: str, imported_files: list[str]) -> None:
    sources = copied_paths(REPO / dockerfile)
    assert "serving" in sources and "fpga_runtime" in sources
    missing = [f for f in imported_files if not any(f == s or f.startswith(s + "/") for s in sources)]
    assert not missing, f"{dockerfile} does not copy {missing}"
    copied_library = [s for s in sources if s.startswith("toptagger")]
    assert "toptagger" not in copied_library, "the predictor image must not copy the whole library"

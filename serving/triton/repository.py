"""A Triton model repository that serves the tagger: for sites that run Triton already.

    python -m serving.triton.repository --model-uri models:/top-tagger@champion --backend openvino --out repo/
    tritonserver --model-repository=repo/

The repository holds ``top-tagger/config.pbtxt`` (the served tensors of
:mod:`toptagger.signature`, Triton's dynamic batcher, and the checksum agent's MD5 of every model
file: :mod:`serving.triton.checksum`, what SONIC compares with the server's ``ModelConfig``) and
``top-tagger/1/`` with the Python-backend
model (:mod:`serving.triton.model`) and a copy of the model folder, so that it is self-contained
and can be synced to the object store Triton reads. Triton's Python needs this project importable:
installed in its image, or named with ``--python-path`` (a local checkout; the tests and the
benchmark use that).

This is also the peer the conformance suite and ``benchmarks.serving`` compare our server with.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.backends import BACKENDS
from serving.triton.checksum import agents_pbtxt, model_checksums
from serving.triton.model import MODEL_FOLDER
from toptagger.cli import positive_int
from toptagger.constants import MODEL_NAME, MODEL_VERSION
from toptagger.errors import ConfigError
from toptagger.model import read_config
from toptagger.model_uri import fetch_model_dir
from toptagger.signature import Signature

MODEL_FILE = "model.py"


def model_config(
    signature: Signature,
    backend: str,
    max_batch_size: int,
    max_queue_delay_us: int,
    python_path: str = "",
    checksums: dict[str, str] | None = None,
    precision: str | None = None,
) -> str:
    """``config.pbtxt``: both inputs optional (a request sends one of them), CPU instance, batching,
    and the checksum agent's digests of the model files (Triton checks them before loading).

    ``precision``: the backend's ``precision`` (``int8``: the version's quantized graph; ``bf16``:
    OpenVINO's hint), refused by the backend at load unless the version admits it; None leaves the
    backend's own default (``auto`` for the auto backend, fp32 for the others)."""
    inputs = ",\n".join(
        f'  {{ name: "{spec.name}" data_type: TYPE_FP32 dims: {list(spec.dims)} optional: true }}'
        for spec in signature.inputs
    )
    outputs = ",\n".join(
        f'  {{ name: "{spec.name}" data_type: TYPE_FP32 dims: {list(spec.dims)} }}' for spec in signature.outputs
    )
    parameters = {"backend": backend, "python_path": python_path}
    if precision is not None:
        parameters["precision"] = precision
    params = "\n".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in parameters.items()
    )
    return (
        f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        # One instance: the backend already uses every core of the limit (serving.backends.cpu_limit).
        f"instance_group [ {{ kind: KIND_CPU count: 1 }} ]\n{params}\n{agents_pbtxt(checksums or {})}"
    )


def write_repository(
    model_uri: str,
    out: str | Path,
    backend: str = "openvino",
    max_batch_size: int = 16,
    max_queue_delay_us: int = 2000,
    python_path: str = "",
    precision: str | None = None,
) -> Path:
    """Write the repository into ``out`` (replacing the tagger's folder there); returns ``out``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if max_batch_size < 1 or max_queue_delay_us < 0:
        raise ConfigError("max_batch_size must be >= 1 and max_queue_delay_us >= 0")
    source = fetch_model_dir(model_uri)
    tagger = read_config(source)
    out = Path(out)
    model_root = out / MODEL_NAME
    staging = out / f".{MODEL_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    version = staging / MODEL_VERSION
    version.mkdir(parents=True)
    shutil.copytree(source, version / MODEL_FOLDER)
    shutil.copyfile(Path(__file__).with_name("model.py"), version / MODEL_FILE)
    checksums = model_checksums(version / MODEL_FOLDER)  # of the copy: what Triton will read
    signature = Signature.of(tagger)
    config = model_config(signature, backend, max_batch_size, max_queue_delay_us, python_path, checksums, precision)
    (staging / "config.pbtxt").write_text(config)
    # Renamed into place whole: a Triton polling the repository never sees half a model.
    shutil.rmtree(model_root, ignore_errors=True)
    staging.rename(model_root)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.triton.repository",
        description="Write a Triton model repository that serves the tagger with Triton's Python backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-uri", required=True, help="model folder, s3://bucket/prefix or models:/ URI")
    parser.add_argument("--out", required=True, type=Path, help="the repository folder (created)")
    parser.add_argument("--backend", default="openvino", choices=list(BACKENDS), help="runtime inside Triton")
    parser.add_argument("--max-batch-size", type=positive_int, default=16, help="Triton's max_batch_size")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher's queue delay")
    parser.add_argument("--python-path", default="", help="folder(s) to put on the model's sys.path (a checkout)")
    parser.add_argument("--precision", help="the backend's --precision (int8, bf16: where the version admits it)")
    args = parser.parse_args(argv)
    out = write_repository(
        args.model_uri,
        args.out,
        args.backend,
        args.max_batch_size,
        args.max_queue_delay_us,
        args.python_path,
        args.precision,
    )
    print(f"wrote {out / MODEL_NAME}: tritonserver --model-repository={out}")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    sys.exit(run_cli(main))

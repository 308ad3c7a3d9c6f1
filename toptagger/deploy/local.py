"""What a local predictor serves (the pipeline's ``--deploy local``, ``make demo``): what the cpu overlay serves.

``manifests/overlays/cpu`` serves ``BACKEND=auto PRECISION=auto FALLBACK=torch``: the fastest of
OpenVINO and ONNX Runtime at each precision the version carries and its evaluate step admitted,
measured on the node at load (:mod:`serving.precision`). A local deploy does the same where the
version carries the exported graph (``model.onnx``); a version registered before the export
existed is served by torch in float32, and the message says so and how to add the graph.

``--backend``/``--precision`` (or the predictor's own ``BACKEND``/``PRECISION`` environment
variables) override it.

    python -m toptagger.deploy.local MODEL_URI        # prints the predictor's flags, says why on stderr
    python -m toptagger.deploy.local --env MODEL_URI  # export BACKEND=... PRECISION=... FALLBACK=... (make demo)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The cpu overlay's predictor environment (manifests/overlays/cpu/runtime.yaml; a test holds the two equal).
CPU_OVERLAY = {"BACKEND": "auto", "PRECISION": "auto", "FALLBACK": "torch"}
# The backends that serve the exported graphs: the ones whose precision may be auto.
GRAPH_BACKENDS = ("auto", "openvino", "onnxruntime")


@dataclass(frozen=True)
class LocalServing:
    """The predictor's backend, precision and fallback for one version, and why."""

    backend: str
    precision: str
    fallback: str | None
    reason: str

    def env(self) -> dict[str, str]:
        """The same as the predictor's environment variables (a flag on its command line wins over them)."""
        return {"BACKEND": self.backend, "PRECISION": self.precision, "FALLBACK": self.fallback or ""}

    def args(self) -> list[str]:
        """The flags of ``python -m serving`` (they win over its environment)."""
        fallback = ["--fallback", self.fallback] if self.fallback else []
        return ["--backend", self.backend, "--precision", self.precision, *fallback]


def local_serving(
    model_dir: Path,
    backend: str | None = None,
    precision: str | None = None,
    env: Mapping[str, str] | None = None,
) -> LocalServing:
    """What to serve ``model_dir`` with: the flags given, else ``BACKEND``/``PRECISION``, else the cpu overlay's."""
    from toptagger.onnx_export import ONNX_FILE
    from toptagger.precision.files import ADMISSION_FILE, carried, read_admission

    env = os.environ if env is None else env
    backend = backend or env.get("BACKEND") or None
    precision = precision or env.get("PRECISION") or None
    if backend or precision:
        backend = backend or CPU_OVERLAY["BACKEND"]
        # Unnamed, a graph backend picks its fastest admitted precision; torch and OpenCL run fp32.
        precision = precision or ("auto" if backend in GRAPH_BACKENDS else "fp32")
        return LocalServing(backend, precision, env.get("FALLBACK") or None, "as asked for")
    if not (model_dir / ONNX_FILE).is_file():
        reason = (
            f"this version carries no {ONNX_FILE} (registered before the ONNX export), so not what the cpu "
            f"overlay serves (BACKEND=auto PRECISION=auto): torch in float32 instead; "
            f"python -m toptagger.onnx_export {model_dir} adds the graph"
        )
        return LocalServing("torch", "fp32", None, reason)
    admission = read_admission(model_dir)
    admitted = ", ".join(admission["admitted"]) or "none" if admission else f"none (no {ADMISSION_FILE})"
    reason = (
        f"as the cpu overlay: the fastest of the graphs carried ({', '.join(carried(model_dir))}; "
        f"admitted by the evaluate step: {admitted}), measured at load; torch if none loads"
    )
    return LocalServing(CPU_OVERLAY["BACKEND"], CPU_OVERLAY["PRECISION"], CPU_OVERLAY["FALLBACK"], reason)


def main(argv: Sequence[str] | None = None) -> int:
    from toptagger.model_uri import fetch_model_dir, resolve

    parser = argparse.ArgumentParser(
        prog="python -m toptagger.deploy.local",
        description="Print the predictor flags a local deploy of MODEL_URI uses (the reason goes to stderr).",
    )
    parser.add_argument("model_uri", help="model folder, s3:// or models:/ URI")
    parser.add_argument("--backend", help="serve with this backend instead (default: BACKEND, else the cpu overlay's)")
    parser.add_argument("--precision", help="serve at this precision instead (default: PRECISION, else auto)")
    parser.add_argument("--env", action="store_true", help="print a shell export line instead of flags")
    args = parser.parse_args(argv)
    serving = local_serving(fetch_model_dir(resolve(args.model_uri)), args.backend, args.precision)
    print(f"serving with {' '.join(serving.args())}: {serving.reason}", file=sys.stderr)
    if args.env:  # for eval in a shell: the values are backend and precision names, nothing to quote
        print("export " + " ".join(f"{name}={value}" for name, value in serving.env().items()))
    else:
        print(" ".join(serving.args()))
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    sys.exit(run_cli(main))

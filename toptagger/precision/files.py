"""Where the quantized graphs and the admission record live in a model folder (no heavy imports).

model/model.onnx                      fp32 graph (OpenVINO fp32 and bf16, ONNX Runtime fp32)
model/quantized/openvino_int8.xml     int8 OpenVINO IR made by NNCF (+ openvino_int8.bin)
model/quantized/onnx_int8.onnx        int8 ONNX graph, QDQ, per-channel weights
model/quantized/quantization.json     how they were made (subset sizes, seconds, NNCF's outcome)
model/precision.json                  the evaluate step's numbers and the gate's admission
                                      (added by the register step to the registered version)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toptagger.errors import DataError

QUANTIZED_DIR = "quantized"
OPENVINO_INT8 = "openvino_int8.xml"
ONNX_INT8 = "onnx_int8.onnx"
QUANTIZATION_FILE = "quantization.json"
ADMISSION_FILE = "precision.json"

RUNTIMES = ("openvino", "onnxruntime")
# What each runtime can run from the exported graphs (ONNX Runtime's CPU provider has no bf16 kernels).
PRECISIONS = {"openvino": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8")}


def key(runtime: str, precision: str) -> str:
    """``openvino/int8``: how a runtime and precision are named in files, tags and metrics."""
    return f"{runtime}/{precision}"


def graph_path(model_dir: Path, runtime: str, precision: str, quantized: Path | None = None) -> Path:
    """The file ``runtime`` loads for ``precision`` (fp32 and bf16 share the fp32 ONNX graph).

    ``quantized``: the folder of the int8 graphs, when not (yet) ``model_dir/quantized``.
    """
    from toptagger.onnx_export import ONNX_FILE

    if precision == "int8":
        folder = quantized or model_dir / QUANTIZED_DIR
        return folder / (OPENVINO_INT8 if runtime == "openvino" else ONNX_INT8)
    return model_dir / ONNX_FILE


def carried(model_dir: Path) -> list[str]:
    """The ``runtime/precision`` pairs whose graph the folder holds."""
    return [
        key(runtime, precision)
        for runtime in RUNTIMES
        for precision in PRECISIONS[runtime]
        if graph_path(model_dir, runtime, precision).is_file()
    ]


def read_admission(model_dir: Path) -> dict[str, Any] | None:
    """The folder's admission record, or None for a version registered without one."""
    path = model_dir / ADMISSION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("precisions"), dict):
            raise ValueError("no 'precisions' object")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not an admission record written by the evaluate step ({exc})") from None
    return record


def write_admission(path: Path, record: dict[str, Any]) -> None:
    """Write an admission record through a temporary file, then rename it into place."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)

"""The folder a version is registered from: the train step's model folder, its int8 graphs, its admission.

The train, quantize and evaluate steps each write their own artifact; the registered version
(and so the predictor that serves it) needs them in one folder. Files are hard-linked where the
file system allows (no second copy of the weights) and copied where it does not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from toptagger.precision.files import ADMISSION_FILE, QUANTIZED_DIR, read_admission


def _link_or_copy(src: str, dst: str) -> Any:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(src, dst)
    return dst


def version_folder(model_dir: Path, quantized: Path | None, evaluation: Path | None, dest: Path) -> Path:
    """``dest`` = ``model_dir`` + ``quantized/`` (if given) + ``precision.json`` (if ``evaluation`` has it)."""
    shutil.copytree(model_dir, dest, copy_function=_link_or_copy)
    if quantized is not None and quantized.is_dir():
        shutil.copytree(quantized, dest / QUANTIZED_DIR, copy_function=_link_or_copy, dirs_exist_ok=True)
    if evaluation is not None and read_admission(evaluation) is not None:
        shutil.copy2(evaluation / ADMISSION_FILE, dest / ADMISSION_FILE)
    return dest


def version_tags(evaluation: Path | None) -> dict[str, str]:
    """The gate's decision and numbers as registry tags (``precision.admitted``, ``precision.openvino.int8.auc``)."""
    record = read_admission(evaluation) if evaluation is not None else None
    if record is None:
        return {}
    tags = {
        "precision.admitted": ",".join(record["admitted"]),
        "precision.max_auc_loss": repr(float(record["max_auc_loss"])),
        "precision.measured_on": str(record.get("measured_on", "")),
    }
    for key, numbers in record["precisions"].items():
        prefix = f"precision.{key.replace('/', '.')}"
        tags[f"{prefix}.admitted"] = str(bool(numbers.get("admitted"))).lower()
        tags[f"{prefix}.reason"] = str(numbers.get("reason", ""))
        for name in (
            "auc",
            "auc_error",
            "auc_loss",
            "rejection_0.3",
            "rejection_0.3_error",
            "max_probability_difference",
        ):
            if numbers.get(name) is not None:
                tags[f"{prefix}.{name}"] = f"{float(numbers[name]):.6g}"
    return tags

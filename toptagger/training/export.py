"""What a training run hands on: the serving export of its best model.

:func:`export` turns a run folder (the trainer's ``model/`` and ``training.json``) into the folder
that serving and the registry read:

    model/model.safetensors, model/tagger.json   the tagger, loaded without pickle
    model/model.onnx                              the ONNX graph (``--backend onnxruntime`` / ``openvino``)
    model/opencl/plan.json, weights-fp32...      the fpga_runtime package (``--backend opencl``)
    state_dict.pt                                 the torch state_dict (tensors only)
    training.json                                 per-epoch history and the training config

:func:`export_to` writes it, with ``summary.json`` beside it, to a local path or ``s3://`` so that
a reader never sees half of it: what a TrainJob's rank 0 leaves for the pipeline's launcher.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toptagger import storage
from toptagger.errors import StorageError
from toptagger.training.files import (
    HISTORY_FILE,
    MODEL_DIR,
    OPENCL_DIR,
    OPENCL_PRECISIONS,
    STATE_DICT_FILE,
    SUMMARY_FILE,
)


def export(folder: Path, out: Path, image_size: int) -> None:
    """Copy the best model out of the run folder, with its state_dict, ONNX graph and OpenCL package."""
    import torch

    from fpga_runtime.export import export_model
    from toptagger.model import load_model
    from toptagger.onnx_export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    if (out / MODEL_DIR).exists():
        shutil.rmtree(out / MODEL_DIR)
    shutil.copytree(folder / MODEL_DIR, out / MODEL_DIR)
    shutil.copyfile(folder / HISTORY_FILE, out / HISTORY_FILE)
    tagger = load_model(out / MODEL_DIR)
    torch.save(tagger.state_dict(), out / STATE_DICT_FILE)
    export_model(tagger, out / MODEL_DIR / OPENCL_DIR, OPENCL_PRECISIONS, image_size=image_size, overwrite=True)
    export_onnx(tagger, out / MODEL_DIR)  # for the onnxruntime and openvino backends


def export_to(uri: str, folder: Path, summary: dict[str, Any], image_size: int) -> None:
    """Write :func:`export`'s folder and ``summary.json`` to ``uri`` (a local path or s3://).

    Locally the folder is built beside ``uri`` and renamed into place. On S3, where a prefix
    cannot be renamed, ``summary.json`` is uploaded last: a reader that finds it finds the rest.
    """
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="toptagger-export-") as tmp:
            export(folder, Path(tmp) / "export", image_size)
            storage.upload_dir(Path(tmp) / "export", uri)
            (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            storage.upload(Path(tmp) / SUMMARY_FILE, f"{uri.rstrip('/')}/{SUMMARY_FILE}")
        return
    final = Path(uri)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part"))
    try:
        export(folder, staging, image_size)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        storage.replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_export_target(uri: str) -> None:
    """Fail before training when ``--export-to`` cannot be written."""
    if storage.is_s3(uri):
        storage.check_writable(f"{uri.rstrip('/')}/{SUMMARY_FILE}")
    elif not Path(uri).parent.is_dir():
        raise StorageError(f"--export-to {uri}: the folder {Path(uri).parent} does not exist")
    elif Path(uri).exists() and not Path(uri).is_dir():
        raise StorageError(f"--export-to {uri}: is a file; give a folder")

"""The int8 graphs, made at training time from ``model.onnx`` and a few hundred training jets.

- OpenVINO: NNCF's ``quantize_with_accuracy_control``. It quantizes everything, then puts the
  layers that cost most AUC on the validation jets back into float until the loss is within
  ``max_auc_loss`` (NNCF ranks and reverts the layers itself; no layer search of ours).
- ONNX Runtime: ``quantize_static``, QDQ, uint8 activations and per-channel int8 weights, min-max
  calibrated on the same jets. ONNX Runtime has no accuracy-aware mode: the evaluate step's gate
  decides whether that graph is admitted.

Calibration jets come from the training split and validation jets from the validation split
(never the test jets the gate is measured on). Both graphs are protobuf/IR (no pickle), written
into a staging folder that is renamed to ``quantized/`` only when both are complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toptagger.errors import ConfigError, DataError
from toptagger.precision.files import ONNX_INT8, OPENVINO_INT8, QUANTIZATION_FILE
from toptagger.precision.gate import check_max_auc_loss
from toptagger.precision.graphs import model_images
from toptagger.storage import replace_dir

log = logging.getLogger(__name__)
VALIDATION_BATCH = 64


@dataclass(frozen=True)
class QuantizeOptions:
    """How much work quantization may do: on 2 cores, time grows with each of these.

    ``max_iterations`` caps how many layer groups NNCF puts back into float; ``ranking_jets``
    how many validation jets rank them (NNCF scores each group once on that subset).
    """

    max_auc_loss: float = 0.001
    calibration_jets: int = 300
    validation_jets: int = 500
    ranking_jets: int = 300
    max_iterations: int = 20

    def __post_init__(self) -> None:
        check_max_auc_loss(self.max_auc_loss)
        for name in ("calibration_jets", "validation_jets", "ranking_jets", "max_iterations"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"quantization: {name} must be >= 1, got {getattr(self, name)}")


def quantize(
    model_dir: Path,
    out: Path,
    calibration: np.ndarray,
    validation: np.ndarray,
    validation_labels: np.ndarray,
    options: QuantizeOptions = QuantizeOptions(),
) -> dict[str, Any]:
    """Write the folder ``out`` (both int8 graphs and ``quantization.json``); returns that record.

    ``out`` is where serving looks for them, ``model_dir/quantized``, or a pipeline artifact that
    the register step puts there.

    ``calibration``: constituents of training jets; ``validation``: constituents and labels of
    validation jets. Each is cut to its option's size.
    """
    from toptagger.model import read_config
    from toptagger.onnx_export import ONNX_FILE

    source = model_dir / ONNX_FILE
    if not source.is_file():
        raise ConfigError(f"{model_dir}: no {ONNX_FILE} to quantize (the export writes it)")
    labels = np.asarray(validation_labels)[: options.validation_jets]
    if len(np.unique(labels)) < 2:
        raise DataError("quantization: the validation jets hold one class only; AUC needs both")
    config = read_config(model_dir)

    def images(constituents: np.ndarray) -> np.ndarray:
        return model_images(config.in_channels, config.image.render(np.ascontiguousarray(constituents)))

    calibration_images = images(calibration[: options.calibration_jets])
    validation_images = images(validation[: options.validation_jets])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        start = time.perf_counter()
        record: dict[str, Any] = {"options": asdict(options), "calibration_jets": len(calibration_images)}
        record["validation_jets"] = len(validation_images)
        record["openvino"] = _openvino_int8(
            source, staging / OPENVINO_INT8, calibration_images, validation_images, labels, options
        )
        record["openvino"]["seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        _onnx_int8(source, staging / ONNX_INT8, calibration_images)
        record["onnxruntime"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "format": "QDQ, u8 activations, per-channel s8 weights",
        }
        (staging / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _auc(labels: np.ndarray, logits: np.ndarray) -> float:
    from toptagger.evaluation.metrics import auc, roc_curve

    return float(auc(*roc_curve(labels, logits[:, 1] - logits[:, 0])[:2]))


def _openvino_int8(
    source: Path,
    target: Path,
    calibration: np.ndarray,
    validation: np.ndarray,
    labels: np.ndarray,
    options: QuantizeOptions,
) -> dict[str, Any]:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    model = ov.Core().read_model(str(source))
    # One jet per calibration item (NNCF's statistics expect batch 1); validation items are
    # (image, label) pairs that validate() batches itself: AUC is a metric of the whole set.
    calibration_set = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    validation_set = nncf.Dataset(list(zip(validation, labels, strict=True)), lambda item: item[0][None])

    def validate(compiled: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, None]:
        pairs = list(items)
        x = np.stack([image for image, _ in pairs])
        y = np.array([label for _, label in pairs])
        logits = np.concatenate(
            [np.asarray(compiled(x[s : s + VALIDATION_BATCH])[0]) for s in range(0, len(x), VALIDATION_BATCH)]
        )
        # A ranking subset with one class has no AUC: it neither helps nor hurts the ranking.
        return (_auc(y, logits) if len(np.unique(y)) == 2 else 0.5), None

    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=options.max_iterations,
        ranking_subset_size=min(options.ranking_jets, len(validation)),
        num_ranking_workers=1,  # the pod's cores go to OpenVINO's own threads
    )
    quantized = nncf.quantize_with_accuracy_control(
        model,
        calibration_set,
        validation_set,
        validate,
        max_drop=options.max_auc_loss,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
        advanced_accuracy_restorer_parameters=restorer,
    )
    ov.save_model(quantized, str(target))  # .xml + .bin beside it, in the staging folder
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    float_auc = _auc(
        labels, np.asarray(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(validation)[0])
    )
    int8_auc = _auc(labels, np.asarray(compiled(validation)[0]))
    return {"validation_auc_fp32": float_auc, "validation_auc_int8": int8_auc, "max_drop": options.max_auc_loss}


class _Reader:
    """ONNX Runtime's calibration reader: one batch of calibration images at a time."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        from toptagger.onnx_export import INPUT

        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{INPUT: images[s : s + batch]} for s in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _onnx_int8(source: Path, target: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(calibration)
    # ONNX Runtime's recommended first step: shapes inferred and the graph optimised, so that
    # convolutions carry their folded biases as initializers when they are quantized.
    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(
        str(prepared),
        str(target),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # u8 activations x s8 weights is the pair ONNX Runtime's x86 kernels run on VNNI/AMX: on
        # a Sapphire Rapids, 40x40, batch 16, 1820 img/s against 490 for s8 x s8 (no faster than fp32).
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()

"""The quantize step: the int8 graphs of the trained model, made from its training split.

``quantize`` is the Kubeflow component; :func:`quantize_step` the plain function it runs, over
:mod:`toptagger.precision.quantize`. It runs after the train step (or the TrainJob launcher),
so both paths get the same graphs. Its output is the folder of the int8 graphs alone (the model
folder stays the train step's); the evaluate step scores them and the register step puts them
into the registered version as ``quantized/``.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from typing import Any

from kfp.dsl import Dataset, Input, Model, Output


def quantize(
    model: Input[Model],
    fit_jets: Input[Dataset],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_auc_loss: float,
    calibration_jets: int,
    validation_jets: int,
    quantized: Output[Model],
):
    """int8 OpenVINO IR (NNCF accuracy control, max_drop = max_auc_loss) and int8 ONNX QDQ graph."""
    from components.step import step

    with step("quantize"):
        from components.quantize import quantize_step

        quantize_step(
            model,
            fit_jets,
            quantized,
            seed,
            val_fraction,
            test_fraction,
            max_auc_loss,
            calibration_jets,
            validation_jets,
        )


def quantize_step(
    model: Any,
    fit_jets: Any,
    quantized: Any,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_auc_loss: float,
    calibration_jets: int = 300,
    validation_jets: int = 500,
) -> dict[str, Any]:
    """Quantize ``model``'s graph, calibrated on training jets and validated on validation jets of ``fit_jets``.

    The split is the train step's own (:meth:`TrainConfig.from_pipeline` of the same fractions
    and seed), so no calibration or validation jet is a test jet, and none is a jet that the
    validation of training did not see either.
    """
    from pathlib import Path

    from components.step import log
    from toptagger.constants import IMAGE_SIZE
    from toptagger.jets.compact import load_jets
    from toptagger.precision.gate import check_max_auc_loss
    from toptagger.precision.quantize import QuantizeOptions
    from toptagger.precision.quantize import quantize as make_graphs
    from toptagger.training.config import TrainConfig
    from toptagger.training.data import split_indices
    from toptagger.training.files import MODEL_DIR

    options = QuantizeOptions(
        max_auc_loss=check_max_auc_loss(max_auc_loss),
        calibration_jets=calibration_jets,
        validation_jets=validation_jets,
    )
    config = TrainConfig.from_pipeline(
        image_size=IMAGE_SIZE, epochs=1, batch_size=1, learning_rate=1e-3, seed=seed, base_model_uri="",
        val_fraction=val_fraction, test_fraction=test_fraction, max_steps_per_epoch=0, patience=1,
    )  # fmt: skip
    jets = load_jets(fit_jets.path)
    train_rows, val_rows, _ = split_indices(len(jets.labels), config.seed, config.val_fraction, config.test_fraction)
    record = make_graphs(
        Path(model.path) / MODEL_DIR,
        Path(quantized.path),
        jets.constituents[train_rows],
        jets.constituents[val_rows],
        jets.labels[val_rows],
        options,
    )
    quantized.metadata.update(
        {
            "format": "OpenVINO IR int8 (NNCF accuracy control) + ONNX QDQ int8",
            "calibration_jets": record["calibration_jets"],
            "validation_jets": record["validation_jets"],
            "max_auc_loss": options.max_auc_loss,
        }
    )
    ov = record["openvino"]
    log.info(
        "int8 graphs: OpenVINO validation AUC %.4f (fp32 %.4f) in %.0f s, ONNX QDQ in %.0f s",
        ov["validation_auc_int8"],
        ov["validation_auc_fp32"],
        ov["seconds"],
        record["onnxruntime"]["seconds"],
    )
    return record

"""The evaluate step: the tagger and the jet-mass window on the held-out test jets.

``evaluate`` is the Kubeflow component; :func:`evaluate_step` the plain function it runs; and
``python -m components.evaluate`` evaluates a saved model on a file (``main``). Outputs: scalar
``Metrics``, the ROC as ``ClassificationMetrics`` (the KFP UI draws it), the evaluation folder
(``metrics.json``, ``roc.png``, ``scores.png``) and an HTML report.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

ROC_POINTS = 200  # the UI draws a few hundred points well; a full ROC has one per test jet
ONNX_CHECK_FILE = "onnx_check.json"  # the ONNX export against torch on the test jets


def evaluate(
    model: Input[Model],
    quantized: Input[Model],
    test_jets: Input[Dataset],
    n_bootstrap: int,
    seed: int,
    max_auc_loss: float,
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    report: Output[HTML],
):
    """AUC and 1/eps_B of the tagger and of the jet-mass window on the test jets; ROC and report."""
    from components.step import step

    with step("evaluate"):
        from components.evaluate import evaluate_step

        evaluate_step(model, test_jets, metrics, roc, evaluation, report, n_bootstrap, seed, quantized, max_auc_loss)


def evaluate_step(
    model: Any,
    test_jets: Any,
    metrics: Any,
    roc: Any,
    evaluation: Any,
    report: Any,
    n_bootstrap: int,
    seed: int,
    quantized: Any = None,
    max_auc_loss: float = 0.001,
) -> dict[str, Any]:
    """Evaluate the ``model`` folder on ``test_jets``; fill the four outputs.

    With the exported graph, every precision the runtimes can serve (``quantized``: the quantize
    step's int8 graphs) is scored too and gated by ``max_auc_loss``: ``precision.json``.
    """
    from components.step import log
    from toptagger.evaluation.evaluate import evaluate_scores, flatten, mass_window_score, network_scores
    from toptagger.evaluation.report import format_metric, write_report
    from toptagger.jets.compact import load_jets
    from toptagger.model import load_model
    from toptagger.onnx_export import ONNX_FILE, compare, top_probabilities
    from toptagger.training.files import MODEL_DIR

    jets = load_jets(test_jets.path)
    tagger = load_model(Path(model.path) / MODEL_DIR)
    out = Path(evaluation.path)
    # The logits are kept for the ROC artifact instead of scoring twice.
    logit, probability = network_scores(tagger, jets.constituents)
    baseline = mass_window_score(jets.constituents)
    result = evaluate_scores(jets.labels, logit, probability, baseline, out, n_bootstrap=n_bootstrap, seed=seed)
    flat = flatten(result)
    for key, value in flat.items():
        metrics.log_metric(key, value)
    evaluation.metadata.update(flat)
    log_roc(roc, jets.labels, logit)
    graph = Path(model.path) / MODEL_DIR / ONNX_FILE
    if graph.is_file():  # the export the faster runtimes serve must agree with torch on these jets
        check = compare(top_probabilities(graph, tagger, jets.constituents), probability, jets.labels)
        (out / ONNX_CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n")
        for key, value in check.items():
            metrics.log_metric(key, value)
        evaluation.metadata.update(check)
    admission = None
    if graph.is_file():
        admission = score_and_gate(model, quantized, jets, probability, result, n_bootstrap, seed, max_auc_loss, out)
        for name, value in precision_metrics(admission).items():
            metrics.log_metric(name, value)
        evaluation.metadata["precision_admitted"] = ",".join(admission["admitted"])
    write_report(Path(report.path), result, out, admission)
    net, base = result["network"], result["mass_window"]
    log.info(
        "test AUC %s (mass window %s), 1/eps_B at eps_S=0.3: %s (mass window %s)",
        *(format_metric(block[key]["value"]) for key in ("auc", "rejection_0.3") for block in (net, base)),
    )
    return result


def score_and_gate(
    model: Any,
    quantized: Any,
    jets: Any,
    probability: Any,
    result: dict[str, Any],
    n_bootstrap: int,
    seed: int,
    max_auc_loss: float,
    out: Path,
) -> dict[str, Any]:
    """Score every precision on the test jets, decide which are admitted, write ``precision.json``."""
    from components.step import log
    from toptagger.precision import cpu, gate
    from toptagger.precision.files import ADMISSION_FILE, write_admission
    from toptagger.precision.scoring import WORKING_POINT, score_precisions
    from toptagger.training.files import MODEL_DIR

    loss = gate.check_max_auc_loss(max_auc_loss)
    measured = score_precisions(
        Path(model.path) / MODEL_DIR,
        jets.constituents,
        jets.labels,
        probability,
        n_bootstrap,
        seed,
        Path(quantized.path) if quantized is not None else None,
    )
    net = result["network"]
    reference = {
        "auc": net["auc"]["value"],
        "auc_error": net["auc"]["error"],
        WORKING_POINT: net[WORKING_POINT]["value"],
        f"{WORKING_POINT}_error": net[WORKING_POINT]["error"],
    }
    admission = gate.admission_record(reference, measured, loss, cpu.describe())
    write_admission(out / ADMISSION_FILE, admission)
    log.info("precisions admitted (max_auc_loss %g): %s", loss, ", ".join(admission["admitted"]) or "none")
    return admission


def precision_metrics(admission: dict[str, Any]) -> dict[str, float]:
    """``precision/<runtime>/<precision>/<metric>`` for every measured number, ``admitted`` as 0/1."""
    flat: dict[str, float] = {}
    for key, numbers in admission["precisions"].items():
        for name, value in numbers.items():
            if isinstance(value, int | float):  # bool too: admitted as 0/1
                flat[f"precision/{key}/{name}"] = float(value)
    return flat


def log_roc(roc: Any, labels: Any, scores: Any) -> None:
    """The network's ROC, thinned to about ROC_POINTS points, as KFP ClassificationMetrics."""
    import numpy as np

    from toptagger.evaluation.metrics import roc_curve
    from toptagger.signature import CLASSES

    fpr, tpr, thresholds = roc_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).round().astype(int))
    # The first threshold is +inf (nothing selected), which JSON cannot hold.
    finite = np.where(np.isfinite(thresholds), thresholds, np.nanmax(thresholds[np.isfinite(thresholds)]) + 1)
    roc.log_roc_curve(fpr[keep].tolist(), tpr[keep].tolist(), finite[keep].tolist())
    predicted = (scores > 0).astype(int)  # logit 0 = probability 0.5
    matrix = [[int(np.sum((labels == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]
    roc.log_confusion_matrix(list(CLASSES), matrix)


# --------------------------------------------------------------------------------------------
# python -m components.evaluate


def build_parser() -> argparse.ArgumentParser:
    from toptagger.cli import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate",
        description="Evaluate a saved tagger on a test sample, beside the jet-mass-window baseline.",
    )
    parser.add_argument("--model", required=True, help="saved model: folder, s3:// prefix or models:/name@alias")
    parser.add_argument("--data", required=True, help="test jets in the reference layout (path or s3://)")
    parser.add_argument("--out", required=True, type=Path, help="folder for metrics.json, roc.png, scores.png")
    parser.add_argument(
        "--split",
        choices=("all", "test"),
        default="all",
        help="'all' jets of --data (a separate test file), or the seeded 'test' split made by training",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val/test split (with --split test)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicas for the uncertainties")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from toptagger.errors import ConfigError
    from toptagger.evaluation.evaluate import METRICS_FILE, ROC_FILE, SCORES_FILE, evaluate_model
    from toptagger.evaluation.metrics import SIGNAL_EFFICIENCIES
    from toptagger.evaluation.report import format_entry
    from toptagger.jets.dataset import read_jets
    from toptagger.model import load_model

    args = build_parser().parse_args(argv)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    jets = read_jets(args.data)
    if args.split == "test":
        from toptagger.training.data import split_indices

        jets = jets[split_indices(len(jets), args.split_seed, args.val_fraction, args.test_fraction)[2]]
    model = load_model(args.model)
    result = evaluate_model(model, jets, args.out, args.bootstrap, args.seed, args.batch_size, args.device)
    net, base = result["network"], result["mass_window"]
    for name in ("auc", *(f"rejection_{eff}" for eff in SIGNAL_EFFICIENCIES)):
        print(f"{name:16s} network {format_entry(net[name])}   mass window {format_entry(base[name])}")
    print(f"accuracy         network {format_entry(net['accuracy'])}")
    print(f"wrote {args.out / METRICS_FILE}, {args.out / ROC_FILE}, {args.out / SCORES_FILE}")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))

"""How evaluation numbers are shown to people: one formatter, and the HTML report of the evaluate step."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from toptagger.evaluation.evaluate import METRICS_FILE, ROC_FILE, SCORES_FILE
from toptagger.evaluation.metrics import SIGNAL_EFFICIENCIES

# A rejection with no background jet left above the working point is infinite; JSON holds it as
# null (Metric.to_dict), and people read this.
NO_BACKGROUND = "∞ (no background left)"


def format_metric(value: float | None, error: float | None = None, digits: int = 4) -> str:
    """``0.9735 ± 0.0021``; ``value`` None (an infinite rejection) reads as :data:`NO_BACKGROUND`."""
    if value is None:
        return NO_BACKGROUND
    text = f"{value:.{digits}g}"
    return f"{text} ± {error:.2g}" if error is not None else text


def format_entry(metric: dict[str, Any], digits: int = 4) -> str:
    """:func:`format_metric` of a ``metrics.json`` entry (``{"value": ..., "error": ...}``)."""
    return format_metric(metric.get("value"), metric.get("error"), digits)


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def precision_table(admission: dict[str, Any]) -> str:
    """The precisions' table of the report: numbers on the test jets and the gate's decision."""
    ref = admission["reference"]
    rows = [("torch/fp32 (reference)", ref, "—", "—")]
    rows += [
        (key, d, "—" if d.get("max_probability_difference") is None else f"{d['max_probability_difference']:.2e}",
         ("admitted" if d["admitted"] else "refused") + f": {d['reason']}")
        for key, d in admission["precisions"].items()
    ]  # fmt: skip

    def cells(d: dict[str, Any]) -> str:
        if d.get("auc") is None:  # not measured (its reason is in the gate column)
            return "<td>—</td><td>—</td>"
        rejection = format_metric(d.get("rejection_0.3"), d.get("rejection_0.3_error"))
        return f"<td>{format_metric(d['auc'], d.get('auc_error'))}</td><td>{rejection}</td>"

    body = "".join(
        f"<tr><td>{html.escape(name)}</td>{cells(d)}<td>{dp}</td><td>{html.escape(decision)}</td></tr>"
        for name, d, dp, decision in rows
    )
    return (
        f"<h3>Precisions (gate: AUC loss ≤ {admission['max_auc_loss']:g} against torch fp32; "
        f"measured on {html.escape(admission['measured_on'])})</h3>"
        "<table border='1' cellpadding='4'><tr><th>runtime/precision</th><th>AUC</th><th>1/εB at εS = 0.3</th>"
        f"<th>largest |Δp| vs torch fp32</th><th>gate</th></tr>{body}</table>"
    )


def write_report(path: Path, result: dict[str, Any], folder: Path, admission: dict[str, Any] | None = None) -> None:
    """A self-contained HTML page (images inlined): the KFP UI shows it as the step's visualization.

    ``admission``: the precisions' numbers and the gate's decision (``precision.json``), as one table.
    """
    net, base = result["network"], result["mass_window"]
    rows = [("AUC", "auc"), *((f"1/εB at εS = {e}", f"rejection_{e}") for e in SIGNAL_EFFICIENCIES)]
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{format_entry(net[key])}</td><td>{format_entry(base[key])}</td></tr>"
        for label, key in rows
    )
    body += f"<tr><td>accuracy</td><td>{format_entry(net['accuracy'])}</td><td></td></tr>"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>top-tagger evaluation</title></head><body>"
        f"<h2>Test set: {result['n_top']} top + {result['n_qcd']} QCD jets</h2>"
        "<table border='1' cellpadding='4'><tr><th></th><th>ResNet-50</th><th>mass window</th></tr>"
        f"{body}</table><p>± = standard deviation over {result['bootstrap_replicas']} bootstrap replicas.</p>"
        f"{precision_table(admission) if admission else ''}"
        f"<img alt='ROC' src='data:image/png;base64,{_png(folder / ROC_FILE)}'>"
        f"<img alt='scores' src='data:image/png;base64,{_png(folder / SCORES_FILE)}'>"
        f"<p>Full numbers: {METRICS_FILE} in the evaluation artifact.</p></body></html>\n"
    )

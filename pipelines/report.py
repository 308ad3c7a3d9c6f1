"""What ``python -m pipelines.run`` prints: task output without KFP's JSON dumps, and the summary table."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from toptagger.evaluation.report import format_metric


class ExecutorDumpFilter(io.TextIOBase):
    """Passes task output through, minus KFP's multi-line executor input JSON dumps (``--verbose`` keeps them)."""

    def __init__(self, target: TextIO) -> None:
        self.target, self.buffer_, self.skipping = target, "", False

    def write(self, text: str) -> int:
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if "Got executor_input:" in line:
                self.skipping = True
                continue
            if self.skipping and line.strip().startswith(("{", "}", '"', "[", "]")) and "[KFP Executor" not in line:
                continue
            self.skipping = False
            self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _beside(ev: dict[str, Any], metric: str, digits: int = 4) -> str:
    """The network's test ``metric`` beside the mass window's, each with its bootstrap error."""
    network = format_metric(ev.get(f"test_{metric}"), ev.get(f"test_{metric}_error"), digits)
    window = format_metric(ev.get(f"mass_window_{metric}"), ev.get(f"mass_window_{metric}_error"), digits)
    return f"network {network}   mass window {window}"


def _precisions(ev: dict[str, Any]) -> str:
    """The evaluate step's gate from its metrics (``precision/<runtime>/<precision>/admitted``, ``.../auc_loss``)."""
    keys = [k.removeprefix("precision/").removesuffix("/admitted") for k in ev if k.endswith("/admitted")]
    if not keys:
        return "not gated (no exported graph)"
    admitted = [k for k in keys if ev[f"precision/{k}/admitted"]]
    refused = [
        f"{k} (ΔAUC {-ev[f'precision/{k}/auc_loss']:+.4f})"
        if f"precision/{k}/auc_loss" in ev
        else f"{k} (not measured)"
        for k in keys
        if k not in admitted
    ]
    return f"admitted: {', '.join(admitted) or 'none'}; refused: {', '.join(refused) or 'none'}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    ev, tr, data = summary["evaluation"], summary["training"], summary["data"]
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in summary["steps"].items())
    overhead = f"{summary['overhead_seconds']:.0f} s ({100 * summary['overhead_fraction']:.1f}%)"
    return [
        (
            "dataset",
            f"{data['n_jets']} jets ({data['n_fit']} train + validation, {data['n_test']} test); {data['source']}",
        ),
        (
            "training",
            f"{int(tr.get('epochs_run', 0))} epochs on {int(tr.get('train_jets', 0))} jets, "
            f"best validation AUC {format_metric(tr.get('best_val_auc'))}",
        ),
        ("test AUC", _beside(ev, "auc")),
        ("1/εB at εS = 0.3", _beside(ev, "rejection_0.3", digits=3)),
        ("precisions", _precisions(ev)),
        ("registered", f"{summary['model_name']} version {summary['version']}, aliases: {summary['aliases'] or '-'}"),
        ("promotion", f"{summary['decision']}: {summary['reason']}"),
        ("MLflow run", f"{summary['run_id']} in experiment {summary['experiment']} ({summary['tracking_uri']})"),
        ("model files", summary["model_uri"]),
        ("task outputs", summary["pipeline_root"]),
        ("served at", summary["url"] or "not served (--deploy none)"),
        (
            "time",
            f"{summary['seconds']:.0f} s in all; steps {summary['steps_seconds']:.0f} s ({steps}); "
            f"cached: {', '.join(summary['cached']) or 'none'}; pipeline overhead {overhead}",
        ),
    ]


def print_table(rows: list[tuple[str, str]], out: TextIO = sys.stdout) -> None:
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    print(rule, file=out)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)
    print(rule, file=out)

"""The gate: which precisions a version admits, from their measured cost on the test jets.

A precision is admitted when its test AUC is at most ``max_auc_loss`` below torch fp32's on the
same jets. Its numbers (AUC, 1/eps_B at eps_S = 0.3 and their bootstrap errors, the largest
|delta p| against torch) are recorded beside the decision, and a precision that could not be
measured here (bf16 on a CPU without bf16 units) is not admitted, with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from toptagger.errors import ConfigError

DEFAULT_MAX_AUC_LOSS = 0.001


def check_max_auc_loss(value: Any) -> float:
    """``value`` as a float in [0, 1); a ConfigError that says what is wrong otherwise."""
    try:
        loss = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"max_auc_loss must be a number (an AUC difference, e.g. 0.001), got {value!r}") from None
    if not math.isfinite(loss) or not 0.0 <= loss < 1.0:
        raise ConfigError(f"max_auc_loss must be in [0, 1) (an AUC difference, e.g. 0.001), got {value!r}")
    return loss


def decide(reference_auc: float, measured: Mapping[str, Mapping[str, Any]], max_auc_loss: float) -> dict[str, Any]:
    """``{key: {admitted, reason, **numbers}}`` for each ``runtime/precision`` in ``measured``.

    ``measured[key]`` holds at least ``auc`` (None: not measured, with ``reason``).
    """
    max_auc_loss = check_max_auc_loss(max_auc_loss)
    out: dict[str, Any] = {}
    for key, numbers in measured.items():
        value = numbers.get("auc")
        if value is None:
            out[key] = {**numbers, "admitted": False, "reason": numbers.get("reason") or "not measured"}
            continue
        loss = reference_auc - float(value)
        admitted = loss <= max_auc_loss
        relation = "<=" if admitted else ">"
        reason = f"AUC loss {loss:+.4f} vs torch fp32 {relation} max_auc_loss {max_auc_loss:g}"
        out[key] = {**numbers, "auc_loss": loss, "admitted": admitted, "reason": reason}
    return out


def admitted(decisions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The admitted ``runtime/precision`` keys, in the record's order."""
    return [key for key, d in decisions.items() if d.get("admitted")]


def admission_record(
    reference: Mapping[str, Any], measured: Mapping[str, Mapping[str, Any]], max_auc_loss: float, cpu: str
) -> dict[str, Any]:
    """What the evaluate step writes (``precision.json``) and the registered version carries.

    ``reference``: torch fp32's numbers on the same jets (``auc`` at least); ``cpu``: where the
    precisions were measured (bf16 is measured only on a CPU with bf16 units).
    """
    decisions = decide(float(reference["auc"]), measured, max_auc_loss)
    return {
        "max_auc_loss": check_max_auc_loss(max_auc_loss),
        "reference": {"runtime": "torch", "precision": "fp32", **reference},
        "measured_on": cpu,
        "precisions": decisions,
        "admitted": admitted(decisions),
    }

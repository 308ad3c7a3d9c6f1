"""Real KFP artifact objects on a tmp folder, as the component functions get them from KFP."""

from __future__ import annotations

from pathlib import Path

from kfp import dsl


def artifact(kind: type[dsl.Artifact], path: Path) -> dsl.Artifact:
    return kind(uri=str(path))

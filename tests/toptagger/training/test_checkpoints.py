"""Checkpoint folders that outlive a task: mirrored to S3 and fetched back by a retry."""

from __future__ import annotations

from pathlib import Path

from toptagger.training.checkpoints import CheckpointFolder


def test_checkpoints_are_mirrored_to_s3_and_fetched_back(s3_env: str, tmp_path: Path) -> None:
    root = f"{s3_env}/checkpoints"
    with CheckpointFolder(root, "run/1") as folder:
        (folder / "model").mkdir()
        (folder / "model" / "tagger.json").write_text("{}")
        (folder / "checkpoint.pt").write_bytes(b"epoch 0")
    # A retry in a fresh pod: another local folder, filled from S3.
    retry = CheckpointFolder(root, "run/1")
    with retry as folder:
        assert (folder / "checkpoint.pt").read_bytes() == b"epoch 0"
        assert (folder / "model" / "tagger.json").read_text() == "{}"
    retry.clear()
    with CheckpointFolder(root, "run/1") as folder:
        assert not (folder / "checkpoint.pt").exists()

"""Checkpoint folders that outlive a task: mirrored to S3 and fetched back by a retry."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_the_checkpoint_is_uploaded_last_and_temporary_files_not_at_all(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt killed mid-upload must not leave a checkpoint on S3 without the model it points to."""
    from toptagger import storage

    uploaded: list[str] = []
    real_upload = storage.upload

    def recording(src: Path, uri: str) -> None:
        uploaded.append(uri.rsplit("/run-2/", 1)[1])
        real_upload(src, uri)

    monkeypatch.setattr(storage, "upload", recording)
    with CheckpointFolder(f"{s3_env}/checkpoints", "run-2") as folder:
        (folder / "model").mkdir()
        (folder / "model" / "model.safetensors").write_bytes(b"weights")
        (folder / "training.json").write_text("{}")
        (folder / ".checkpoint.pt.tmp.part").write_bytes(b"half written")
        (folder / "checkpoint.pt").write_bytes(b"epoch 3")
    assert uploaded == ["model/model.safetensors", "training.json", "checkpoint.pt"]
    # a rank that only reads: fetches, uploads nothing, and leaves no local copy behind
    uploaded.clear()
    reader = CheckpointFolder(f"{s3_env}/checkpoints", "run-2", mirror=False)
    with reader as folder:
        assert (folder / "checkpoint.pt").read_bytes() == b"epoch 3"
        (folder / "checkpoint.pt").write_bytes(b"not mine to upload")
    assert uploaded == [] and not reader.local.exists()

"""A checkpoint folder that outlives the training task, so that a retried task resumes.

It is keyed by the pipeline run (or a key the user gives to resume a local run), and lives under
a root that is a local folder (``.state/checkpoints`` when run locally) or an ``s3://`` prefix on
a cluster, where a retried task starts in a fresh pod: the folder is then mirrored to S3 after
every epoch by a small watcher thread, and fetched back before training starts.

Under DDP every rank enters the folder (each fetches its own copy to resume from), but only
rank 0 writes, so only rank 0 mirrors (``mirror=True``) and clears it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from toptagger import storage
from toptagger.errors import ConfigError
from toptagger.training.files import CHECKPOINT_FILE

log = logging.getLogger(__name__)

ROOT_ENV = "TOPTAGGER_CHECKPOINT_ROOT"
# How often the watcher looks for a new checkpoint to mirror (seconds).
POLL_ENV = "TOPTAGGER_CHECKPOINT_POLL_S"
POLL_S = 5.0


def default_root() -> str:
    return os.environ.get(ROOT_ENV) or str(Path(tempfile.gettempdir()) / "top-tagger-checkpoints")


class CheckpointFolder:
    """``with CheckpointFolder(root, key) as folder:`` gives a local folder; ``clear()`` deletes it.

    ``mirror=False`` (the ranks that do not write): fetch an S3 checkpoint, upload nothing, and
    remove the local copy on leaving.
    """

    def __init__(self, root: str, key: str, mirror: bool = True) -> None:
        if not key:
            raise ConfigError("a checkpoint key (the pipeline run id) is needed")
        self.root = (root or default_root()).rstrip("/")
        self.key = re.sub(r"[^A-Za-z0-9._-]", "_", key)
        self.remote = f"{self.root}/{self.key}" if storage.is_s3(self.root) else None
        self.mirror = mirror
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._uploaded_mtime = 0.0
        if self.remote:
            self.local = Path(tempfile.mkdtemp(prefix="top-tagger-checkpoint-"))
        else:
            self.local = Path(self.root) / self.key

    def __enter__(self) -> Path:
        if self.remote:
            if storage.exists(f"{self.remote}/{CHECKPOINT_FILE}"):
                storage.download_dir(self.remote, self.local)
                log.info("fetched the checkpoint of an earlier attempt from %s", self.remote)
            self._uploaded_mtime = self._mtime()
            if self.mirror:
                self._watcher = threading.Thread(target=self._watch, name="checkpoint-sync", daemon=True)
                self._watcher.start()
        else:
            self.local.mkdir(parents=True, exist_ok=True)
        return self.local

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join()
            self._sync()  # the last epoch, whatever the watcher saw
        elif self.remote:
            shutil.rmtree(self.local, ignore_errors=True)  # a read-only copy

    def _mtime(self) -> float:
        path = self.local / CHECKPOINT_FILE
        return path.stat().st_mtime if path.exists() else 0.0

    def _sync(self) -> None:
        mtime = self._mtime()
        if self.remote and mtime > self._uploaded_mtime:
            # The trainer writes model/ before the checkpoint (and renames both into place), so a
            # new checkpoint means that the folder is consistent. On S3 the checkpoint goes up
            # last, for the same reason: an attempt killed during the upload leaves the previous
            # checkpoint beside files that are at least as new, never a checkpoint without them.
            # Temporary files (".name.part") are not mirrored.
            files = sorted(p for p in self.local.rglob("*") if p.is_file() and not p.name.startswith("."))
            checkpoint = self.local / CHECKPOINT_FILE
            for path in [p for p in files if p != checkpoint] + [checkpoint]:
                storage.upload(path, f"{self.remote}/{path.relative_to(self.local).as_posix()}")
            self._uploaded_mtime = mtime

    def _watch(self) -> None:
        poll = float(os.environ.get(POLL_ENV) or POLL_S)
        while not self._stop.wait(poll):
            try:
                self._sync()
            except Exception as exc:  # keep training; the next poll or the final sync tries again
                log.warning("checkpoint upload to %s failed (%s); will retry", self.remote, exc)

    def clear(self) -> None:
        """Delete the checkpoint once the step's outputs are written (it is 3x the model's size)."""
        shutil.rmtree(self.local, ignore_errors=True)
        if self.remote:
            loc = storage.S3Location.parse(self.remote + "/")
            client = storage.s3_client()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=loc.bucket, Key=obj["Key"])

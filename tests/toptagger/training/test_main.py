"""``python -m toptagger.training``: its flags and errors, a run folder, and under torchrun with real gloo ranks.

The data-parallel runs use the real launcher (torchrun on loopback) and kill real workers; the
one-job mode is what a Kubeflow TrainJob runs (--checkpoint-root/--run-key/--export-to).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl

from components.train import record_outputs
from toptagger.cli import run_cli
from toptagger.jets.compact import save_jets
from toptagger.jets.dataset import JetBatch
from toptagger.model import load_model
from toptagger.training.__main__ import main
from toptagger.training.config import TrainConfig, to_arguments
from toptagger.training.files import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR, STATE_DICT_FILE, SUMMARY_FILE

REPO = Path(__file__).resolve().parents[3]


def test_help_and_errors(jets_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out
    status = run_cli(main, ["--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "run")])
    assert status == 2
    assert "missing.h5" in capsys.readouterr().err
    status = run_cli(main, ["--data", str(jets_file), "--out", str(tmp_path / "run"), "--half-width", "-1"])
    assert status == 2
    assert "half_width" in capsys.readouterr().err


@pytest.mark.slow
def test_trains_into_a_run_folder_and_writes_the_model(jets_file: Path, tmp_path: Path) -> None:
    args = ["--data", str(jets_file), "--out", str(tmp_path / "run"), "--image-size", "32", "--epochs", "1"]
    args += ["--max-steps-per-epoch", "2", "--batch-size", "8", "--no-progress", "--in-channels", "1"]
    assert run_cli(main, args) == 0
    summary = json.loads((tmp_path / "run" / HISTORY_FILE).read_text())
    assert summary["config"]["image"]["image_size"] == 32 and summary["config"]["in_channels"] == 1
    assert load_model(tmp_path / "run" / MODEL_DIR).config.in_channels == 1


def _env(**extra: str) -> dict[str, str]:
    """The environment of a child run, read when it starts (fixtures may have set S3 variables)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    """The real launcher: torchrun on loopback (--standalone picks a free rendezvous port)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*run, "-m", "toptagger.training", *args]


def _kill_when_saved(process: subprocess.Popen, checkpoint: Path, rank: int | None) -> None:
    """SIGKILL ``rank`` (a worker of torchrun; None: the process itself) once ``checkpoint`` exists."""
    if rank is not None:
        _kill_rank_when(process, checkpoint.exists, rank)
        return
    while not checkpoint.exists():
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        time.sleep(0.02)
    process.kill()


def _kill_rank_when(torchrun: subprocess.Popen, saved: Callable[[], bool], rank: int) -> None:
    """SIGKILL the worker of ``torchrun`` whose environment says RANK=``rank`` once ``saved()``.

    The workers are stopped (SIGSTOP) while ``saved()`` is asked, so that the run cannot finish
    between the answer and the kill; on a fast machine the last epochs and the export took less
    time than one poll, and the kill found no worker.
    """
    import psutil

    while True:
        assert torchrun.poll() is None, torchrun.stdout.read().decode() if torchrun.stdout else ""
        workers: dict[str, psutil.Process] = {}
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "RANK" in child.environ():
                    workers[child.environ()["RANK"]] = child
        for worker in workers.values():
            with contextlib.suppress(psutil.Error):
                worker.send_signal(signal.SIGSTOP)
        try:
            if str(rank) in workers and saved():
                workers[str(rank)].send_signal(signal.SIGKILL)
                return
        finally:
            for worker in workers.values():
                with contextlib.suppress(psutil.Error):
                    worker.send_signal(signal.SIGCONT)
        time.sleep(0.2)


def _finished(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    return out.decode()


def test_the_two_modes_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = ["--checkpoint-root", str(tmp_path), "--run-key", "k", "--export-to", str(tmp_path / "export")]
    cases = {
        ("--out", str(tmp_path / "run"), *job): "not both",
        ("--checkpoint-root", str(tmp_path), "--run-key", "k"): "all three",
        (*job, "--resume"): "--resume goes with --out",
        ("--checkpoint-root", str(tmp_path), "--run-key", "k", "--export-to", str(tmp_path / "no" / "x")): "does not",
    }
    for args, message in cases.items():
        status = run_cli(main, ["--data", "jets.h5", *args])
        assert status == 2 and message in capsys.readouterr().err, args


@pytest.mark.slow
def test_two_ranks_killed_after_a_checkpoint_resume_on_one(
    tiny_file: Path, train_config: TrainConfig, tmp_path: Path
) -> None:
    """torchrun, 2 gloo ranks, --out: a rank is SIGKILLed; --resume continues on 1 rank from the last epoch."""
    out = tmp_path / "run"
    args = ["--data", str(tiny_file), "--out", str(out), "--no-progress", *to_arguments(train_config)]
    first = subprocess.Popen(_torchrun(2, args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _kill_when_saved(first, out / CHECKPOINT_FILE, rank=1)
    log = _finished(first)
    assert first.returncode != 0, log  # torchrun stops the other rank and fails
    assert "world size 2" in log
    saved = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] < train_config.epochs - 1, "the run finished before the kill"
    # One writer: the checkpoint and one model folder, nothing of another rank's
    assert {p.name for p in out.iterdir()} == {CHECKPOINT_FILE, MODEL_DIR}
    # Another world size: the same checkpoint, continued by one process without torchrun.
    retry = subprocess.run(
        [sys.executable, "-m", "toptagger.training", *args, "--resume"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert f"after epoch {saved['epoch']}" in retry.stderr and "world size 1" in retry.stderr
    summary = json.loads((out / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in summary["history"]] == list(range(train_config.epochs))
    assert summary["history"][: saved["epoch"] + 1] == saved["history"]  # not rerun


@pytest.mark.slow
def test_job_mode_resumes_a_killed_attempt_under_two_ranks_and_exports(
    tiny_jets: JetBatch, train_config: TrainConfig, tmp_path: Path
) -> None:
    """--checkpoint-root/--run-key/--export-to: attempt 1 (1 process) is killed, attempt 2 (torchrun, 2 ranks)
    resumes it by itself, rank 0 writes the export and summary.json, and the checkpoint is deleted."""
    fit = tmp_path / "fit.npz"
    save_jets(fit, tiny_jets[np.arange(100)])  # the preprocess step's compact file
    root, export = tmp_path / "checkpoints", tmp_path / "export"
    checkpoint = root / "trainjob-1" / CHECKPOINT_FILE
    args = ["--data", str(fit), "--checkpoint-root", str(root), "--run-key", "trainjob-1", "--export-to", str(export)]
    args += ["--no-progress", *to_arguments(train_config)]
    first = subprocess.Popen(
        [sys.executable, "-m", "toptagger.training", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _kill_when_saved(first, checkpoint, rank=None)
    _finished(first)
    assert first.returncode == -9
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] < train_config.epochs - 1 and not export.exists()
    retry = subprocess.run(_torchrun(2, args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "world size 2" in retry.stderr and f"after epoch {saved['epoch']}" in retry.stderr
    # exactly what export() writes, plus the summary
    for name in ("model/model.safetensors", "model/tagger.json", "model/model.onnx", "model/opencl/plan.json"):
        assert (export / name).is_file(), name
    assert {p.name for p in export.iterdir()} == {MODEL_DIR, STATE_DICT_FILE, HISTORY_FILE, SUMMARY_FILE}
    summary = json.loads((export / SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["resumed"] is True and summary["training_seconds"] > 0
    assert [h["epoch"] for h in summary["history"]] == list(range(train_config.epochs))
    assert summary["history"][: saved["epoch"] + 1] == saved["history"]
    assert not checkpoint.parent.exists()  # cleared once the export was written
    assert not list(tmp_path.glob(".export*"))  # no staging folder left behind
    # What the TrainJob launcher does with it: the same record as the pipeline's train step.
    model, metrics = dsl.Model(uri=str(export)), dsl.Metrics(uri=str(tmp_path / "metrics"))
    record_outputs(summary, model, metrics, train_config, summary["training_seconds"], summary["resumed"])
    assert model.metadata["best_val_auc"] == summary["best_val_auc"] and model.metadata["in_channels"] == 1
    assert metrics.metadata["world_size"] == 2 and metrics.metadata["resumed"] == 1.0
    assert metrics.metadata["epochs_run"] == train_config.epochs


@pytest.mark.slow
def test_job_mode_on_s3_two_ranks_killed_then_one_rank_resumes(
    tiny_jets: JetBatch, train_config: TrainConfig, s3_env: str, tmp_path: Path
) -> None:
    """The TrainJob's storage: jets, checkpoints and export on S3. Rank 0 mirrors the checkpoint,
    a killed 2-rank attempt is resumed by 1 process from S3, and the export lands on S3."""
    from toptagger import storage

    local = tmp_path / "fit.npz"
    save_jets(local, tiny_jets[np.arange(100)])
    data, root, export = f"{s3_env}/jobs/fit.npz", f"{s3_env}/checkpoints", f"{s3_env}/exports/job-7"
    storage.upload(local, data)
    args = ["--data", data, "--checkpoint-root", root, "--run-key", "job-7", "--export-to", export]
    args += ["--no-progress", *to_arguments(train_config)]
    # the cache of S3 objects, and a quick mirror of the checkpoint (every 0.2 s, not 5 s)
    env = _env(TOPTAGGER_CACHE=str(tmp_path / "cache"), TOPTAGGER_CHECKPOINT_POLL_S="0.2")
    first = subprocess.Popen(_torchrun(2, args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # once mirrored by rank 0's watcher
        _kill_rank_when(first, lambda: storage.exists(f"{root}/job-7/{CHECKPOINT_FILE}"), rank=1)
    finally:
        log = _finished(first)
    assert first.returncode != 0 and "world size 2" in log, log
    storage.download(f"{root}/job-7/{CHECKPOINT_FILE}", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert saved["epoch"] < train_config.epochs - 1, "the run finished before the kill"
    retry = subprocess.run(
        [sys.executable, "-m", "toptagger.training", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "fetched the checkpoint of an earlier attempt" in retry.stderr
    assert f"after epoch {saved['epoch']}" in retry.stderr and "world size 1" in retry.stderr
    storage.download(f"{export}/{SUMMARY_FILE}", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed"] is True and summary["world_size"] == 1
    assert summary["history"][: saved["epoch"] + 1] == saved["history"]
    for name in ("model/model.safetensors", "model/model.onnx", "model/opencl/plan.json", STATE_DICT_FILE):
        assert storage.exists(f"{export}/{name}"), name
    assert not storage.exists(f"{root}/job-7/{CHECKPOINT_FILE}")  # cleared after the export

"""The data steps' fan-out through kfp.local: sharded generation merges to the unsharded file.

Real parts only: Kubeflow's SubprocessRunner runs ``plan_shards``, one ``generate_shard`` task
per shard (``dsl.ParallelFor``) and the data task that merges them (``dsl.Collected``), wired by
the pipeline's own :func:`pipelines.top_tagging.dataset_task`; the jets are Pythia8's. The sample
is ``tiny_jets``' (60 + 60, seed 5: four seeded blocks), so four shards hold one block each.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kfp import dsl, local

from pipelines.top_tagging import COMPONENTS_IMAGE, dataset_task, make_components
from toptagger.jets.dataset import KEY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_data_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A pipeline of the data steps only, run by kfp.local; returns (dataset artifact, run folder)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the tasks are subprocesses that import this repository
    monkeypatch.delenv("TOPTAGGER_STEP_EVENTS", raising=False)
    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=False)  # fmt: skip
    c = make_components(COMPONENTS_IMAGE, local=True)

    @dsl.pipeline(name="data-steps")
    def data_steps(dataset_uri: str, n_shards: int) -> dsl.Dataset:
        return dataset_task(c, dataset_uri, n_shards, n_signal=60, n_background=60, seed=5, workers=1).outputs[
            "dataset"
        ]

    def run(dataset_uri: str, n_shards: int) -> tuple[Any, Path]:
        dataset = data_steps(dataset_uri=dataset_uri, n_shards=n_shards).output
        return dataset, Path(dataset.path).parents[1]

    return run


def shard_metadata(run_folder: Path) -> list[dict[str, Any]]:
    outputs = sorted(run_folder.glob("for-loop-*-iteration-*/generate-shard/executor_output.json"))
    return [json.loads(p.read_text())["artifacts"]["jets"]["artifacts"][0]["metadata"] for p in outputs]


@pytest.mark.slow
def test_four_shards_in_kfp_local_merge_to_the_unsharded_file(run_data_steps: Any, tiny_file: Path) -> None:
    dataset, folder = run_data_steps("", 4)
    shards = sorted(shard_metadata(folder), key=lambda m: m["shard"])
    assert [(m["shard"], m["n_shards"], m["blocks"]) for m in shards] == [(i, 4, 1) for i in range(4)]
    assert sum(m["n_jets"] for m in shards) == 120
    assert dataset.metadata["n_shards"] == 4 and dataset.metadata["n_jets"] == 120
    # tiny_file is generate_jets(60, 60, seed=5) written in one piece. The files differ only in
    # HDF5's object modification time, so the comparison is of the stored table: every column,
    # value, dtype and row order.
    merged, unsharded = pd.read_hdf(dataset.path, KEY), pd.read_hdf(tiny_file, KEY)
    pd.testing.assert_frame_equal(merged, unsharded, check_exact=True)


@pytest.mark.slow
def test_a_given_dataset_is_copied_and_nothing_is_generated(run_data_steps: Any, tiny_file: Path) -> None:
    dataset, folder = run_data_steps(str(tiny_file), 3)  # n_shards is moot with a dataset
    assert shard_metadata(folder) == [{"shard": 0, "n_shards": 3, "blocks": 0, "n_jets": 0}]
    assert Path(dataset.path).read_bytes() == tiny_file.read_bytes()
    assert dataset.metadata["source"] == str(tiny_file)

"""The data steps: jets in the reference layout, copied from ``dataset_uri`` or generated in shards.

Generation fans out (``dsl.ParallelFor`` in :mod:`pipelines.top_tagging`):

- ``plan_shards`` lists the shards: ``0 .. n_shards-1``, or the single shard ``0`` when a dataset
  URI is given (a loop needs one item, and that shard generates nothing);
- ``generate_shard`` generates every ``n_shards``-th seeded block of the sample
  (:func:`toptagger.jets.generator.shard_blocks`) into an ``.npz`` shard;
- ``data`` copies ``dataset_uri``, or merges the shards into one reference-format HDF5 file.

A block's jets depend on its own seed only, so the merged file is the one an unsharded
generation writes, whatever ``n_shards`` is. Each component is a typed KFP signature whose body
runs on its own (so it imports what it calls); :func:`shard_plan`, :func:`generate_shard_step`
and :func:`fetch_dataset` are the plain functions they run, testable with any object that has
``.path`` and ``.metadata``. ``python -m components.generate`` is the command-line generation.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from collections.abc import Sequence
from pathlib import Path
from typing import Any, List  # noqa: UP035 (KFP reads typing.List)

from kfp.dsl import Dataset, Input, Output


def plan_shards(dataset_uri: str, n_shards: int) -> List[int]:  # noqa: UP006 (KFP reads typing.List)
    """The generation shards to run: 0..n_shards-1, or one no-op shard when dataset_uri is given."""
    from components.step import step

    with step("plan"):
        from components.data import shard_plan

        return shard_plan(dataset_uri, n_shards)


def generate_shard(
    dataset_uri: str,
    shard: int,
    n_shards: int,
    n_signal: int,
    n_background: int,
    seed: int,
    workers: int,
    jets: Output[Dataset],
):
    """Pythia8 + FastJet jets of one shard's seeded blocks (nothing when dataset_uri is given)."""
    from components.step import step

    with step(f"generate-{shard}"):  # one name per shard: pipelines.run sums the steps by name
        from components.data import generate_shard_step

        generate_shard_step(jets, dataset_uri, shard, n_shards, n_signal, n_background, seed, workers)


def data(
    dataset_uri: str,
    n_signal: int,
    n_background: int,
    seed: int,
    shards: Input[List[Dataset]],  # noqa: UP006 (KFP reads typing.List)
    dataset: Output[Dataset],
):
    """Jets in the reference layout: a copy of dataset_uri, or the generated shards merged into one file."""
    from components.step import step

    with step("data"):
        from components.data import fetch_dataset

        fetch_dataset(dataset, dataset_uri, n_signal, n_background, seed, shards=shards)


def shard_plan(dataset_uri: str, n_shards: int) -> list[int]:
    """The shard numbers of a run; a given dataset needs no generation, but a loop needs one item."""
    from toptagger.errors import ConfigError

    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}")
    return [0] if dataset_uri else list(range(n_shards))


def generate_shard_step(
    jets: Any,
    dataset_uri: str,
    shard: int,
    n_shards: int,
    n_signal: int,
    n_background: int,
    seed: int,
    workers: int = 0,
) -> dict[str, Any]:
    """Write shard ``shard`` of ``n_shards`` of the sample to ``jets``; an empty shard if ``dataset_uri``."""
    from components.step import log
    from toptagger.errors import ConfigError
    from toptagger.jets.generator import generate_blocks, plan_jets, save_shard, shard_blocks

    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0: all cores), got {workers}")
    out = Path(jets.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if dataset_uri:
        blocks: list = []  # the data step copies the dataset: nothing to generate
        log.info("dataset_uri is given: shard %d generates nothing", shard)
    else:
        blocks = shard_blocks(plan_jets(n_signal, n_background, seed), shard, n_shards)
    save_shard(out, blocks, generate_blocks(blocks, workers=workers or None))
    info = {"shard": shard, "n_shards": n_shards, "blocks": len(blocks), "n_jets": sum(b.n_jets for b in blocks)}
    jets.metadata.update(info)
    log.info("shard %d of %d: %d blocks, %d jets", shard, n_shards, info["blocks"], info["n_jets"])
    return info


def fetch_dataset(
    dataset: Any,
    dataset_uri: str,
    n_signal: int,
    n_background: int,
    seed: int,
    workers: int = 0,
    shards: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Fill ``dataset`` (reference-format HDF5) from ``dataset_uri``, else from generated jets.

    Generated jets come from ``shards`` (artifacts written by :func:`generate_shard_step`) when
    given, else are generated here on ``workers`` processes: the same file either way.
    """
    import shutil

    from components.step import log
    from toptagger import storage
    from toptagger.errors import ConfigError, DataError, StorageError
    from toptagger.jets.dataset import count_jets, write_jets

    out = Path(dataset.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if dataset_uri:
        if storage.is_s3(dataset_uri):
            storage.download(dataset_uri, out)
        else:
            source = Path(dataset_uri.removeprefix("file://"))
            if not source.is_file():
                raise StorageError(f"{dataset_uri}: no such dataset file")
            shutil.copyfile(source, out)
        try:
            n_jets = count_jets(out)
        except DataError as exc:  # name the URI the user gave, not our copy
            raise DataError(str(exc).replace(str(out), dataset_uri)) from None
        info: dict[str, Any] = {"source": dataset_uri, "n_jets": n_jets}
    else:
        from toptagger.jets.generator import generate_jets, merge_shards, plan_jets

        if shards is None:
            if workers < 0:
                raise ConfigError(f"workers must be >= 0 (0: all cores), got {workers}")
            jets = generate_jets(n_signal, n_background, seed=seed, workers=workers or None)
        else:
            jets = merge_shards(plan_jets(n_signal, n_background, seed), [shard.path for shard in shards], seed)
        write_jets(out, jets)
        info = {
            "source": "generated (Pythia8 + FastJet)",
            "n_jets": len(jets),
            "n_signal": n_signal,
            "n_background": n_background,
            "generator_seed": seed,
            "n_shards": 1 if shards is None else len(shards),
        }
    dataset.metadata.update(info)
    log.info("dataset: %s, %d jets", info["source"], info["n_jets"])
    return info

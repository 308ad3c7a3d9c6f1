"""The data step: jets in the reference layout, copied from ``dataset_uri`` or generated.

``data`` is the Kubeflow component (typed KFP signature; its body runs on its own, so it imports
what it calls); :func:`fetch_dataset` is the plain function it runs, testable with any object
that has ``.path`` and ``.metadata``. ``python -m components.generate`` is the command-line form
of the generation.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Output


def data(dataset_uri: str, n_signal: int, n_background: int, seed: int, workers: int, dataset: Output[Dataset]):
    """Jets in the reference layout: a copy of dataset_uri, or Pythia8 + FastJet jets when it is empty."""
    from components.step import step

    with step("data"):
        from components.data import fetch_dataset

        fetch_dataset(dataset, dataset_uri, n_signal, n_background, seed, workers)


def fetch_dataset(
    dataset: Any, dataset_uri: str, n_signal: int, n_background: int, seed: int, workers: int = 0
) -> dict[str, Any]:
    """Fill ``dataset`` (reference-format HDF5) from ``dataset_uri``, or generate jets when it is empty."""
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
        from toptagger.jets.generator import generate_jets

        if workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: all cores), got {workers}")
        jets = generate_jets(n_signal, n_background, seed=seed, workers=workers or None)
        write_jets(out, jets)
        info = {
            "source": "generated (Pythia8 + FastJet)",
            "n_jets": len(jets),
            "n_signal": n_signal,
            "n_background": n_background,
            "generator_seed": seed,
        }
    dataset.metadata.update(info)
    log.info("dataset: %s, %d jets", info["source"], info["n_jets"])
    return info

"""The data and preprocess steps: get jets (generate, or copy a reference file), then split them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from components import storage
from components.errors import ConfigError, DataError, StorageError
from components.jetdata import count_jets, read_jets, write_jets
from pipelines.steps.common import jets_hash, log, save_jets


def fetch(
    dataset: Any, dataset_uri: str, n_signal: int, n_background: int, seed: int, workers: int = 0
) -> dict[str, Any]:
    """Fill ``dataset`` (reference-format HDF5) from ``dataset_uri``, or generate jets when it is empty."""
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
        from components.generate import generate_jets

        if workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: all cores), got {workers}")
        jets = generate_jets(n_signal, n_background, seed=seed, workers=workers or None)
        write_jets(out, jets)
        info = {"source": "generated (Pythia8 + FastJet)", "n_jets": len(jets), "n_signal": n_signal,
                "n_background": n_background, "generator_seed": seed}  # fmt: skip
    dataset.metadata.update(info)
    log.info("dataset: %s, %d jets", info["source"], info["n_jets"])
    return info


def preprocess(
    dataset: Any, fit_jets: Any, test_jets: Any, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, Any]:
    """Split into fit (train + validation) and held-out test jets; store both as compact ``.npz``.

    The split is :func:`components.train.split_indices`; the test jets never reach the training step.
    """
    from components.train import split_indices

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1): the promotion gate needs test jets, got {test_fraction}")
    jets = read_jets(dataset.path)
    train_idx, val_idx, test_idx = split_indices(len(jets), seed, val_fraction, test_fraction)
    test = jets[test_idx]
    if len(np.unique(test.labels)) < 2:
        raise DataError(f"the test split ({len(test)} jets) needs both top and QCD jets; use more jets")
    fit = jets[np.sort(np.concatenate([train_idx, val_idx]))]
    save_jets(fit_jets.path, fit)
    save_jets(test_jets.path, test)
    common = {"dataset_sha256": jets_hash(jets), "source": dataset.metadata.get("source", ""), "split_seed": seed}
    for artifact, part, name in ((fit_jets, fit, "fit"), (test_jets, test, "test")):
        artifact.metadata.update(common | {"split": name, "n_jets": len(part), "n_top": int(part.labels.sum())})
    summary = {"n_jets": len(jets), "n_fit": len(fit), "n_test": len(test), **common}
    log.info("split %d jets: %d for training and validation, %d held out for testing", len(jets), len(fit), len(test))
    return summary

"""The preprocess step: a seeded split into fit (train + validation) and held-out test jets.

``preprocess`` is the Kubeflow component; :func:`split_dataset` the plain function it runs. Both
parts are stored compact (:mod:`toptagger.jets.compact`); the test jets never reach training.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from typing import Any

from kfp.dsl import Dataset, Input, Output


def preprocess(
    dataset: Input[Dataset],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    fit_jets: Output[Dataset],
    test_jets: Output[Dataset],
):
    """Seeded split into fit (train + validation) and held-out test jets, stored as compact constituents."""
    from components.step import step

    with step("preprocess"):
        from components.preprocess import split_dataset

        split_dataset(dataset, fit_jets, test_jets, seed, val_fraction, test_fraction)


def split_dataset(
    dataset: Any, fit_jets: Any, test_jets: Any, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, Any]:
    """Split into fit (train + validation) and held-out test jets; store both as compact ``.npz``.

    The split is :func:`toptagger.training.data.split_indices`, the one training uses too.
    """
    import numpy as np

    from components.step import log
    from toptagger.errors import ConfigError, DataError
    from toptagger.jets.compact import jets_hash, save_jets
    from toptagger.jets.dataset import read_jets
    from toptagger.training.data import split_indices

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

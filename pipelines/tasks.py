"""The pipeline's components: typed KFP signatures whose bodies hand over to :mod:`pipelines.steps`.

The functions are plain here and become components in :func:`build`, because one decorator
argument must differ between the two places they run:

- on a cluster they are containerized Python components (``target_image`` = the components image
  built from ``components/Dockerfile``; its ``kfp_config.ini`` maps each function to this file);
- locally, ``kfp.local.SubprocessRunner`` runs lightweight components only (it refuses
  containerized ones), in this venv, with the repository on ``PYTHONPATH``.

Everything else (signatures, bodies, the pipeline that wires them) is one definition. No
``from __future__ import annotations`` here: KFP reads the annotations as objects, and in the
lightweight form each function's source runs on its own under ``from kfp.dsl import *``.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def data(dataset_uri: str, n_signal: int, n_background: int, seed: int, workers: int, dataset: Output[Dataset]):
    """Jets in the reference layout: a copy of dataset_uri, or Pythia8 + FastJet jets when it is empty."""
    from pipelines.steps import run_step

    run_step("data", "pipelines.steps.data:fetch", dataset=dataset, dataset_uri=dataset_uri, n_signal=n_signal,
             n_background=n_background, seed=seed, workers=workers)  # fmt: skip


def preprocess(
    dataset: Input[Dataset],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    fit_jets: Output[Dataset],
    test_jets: Output[Dataset],
):
    """Seeded split into fit (train + validation) and held-out test jets, stored as compact constituents."""
    from pipelines.steps import run_step

    run_step("preprocess", "pipelines.steps.data:preprocess", dataset=dataset, fit_jets=fit_jets, test_jets=test_jets,
             seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)  # fmt: skip


def train(
    fit_jets: Input[Dataset],
    image_size: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    base_model_uri: str,
    val_fraction: float,
    test_fraction: float,
    max_steps_per_epoch: int,
    patience: int,
    checkpoint_root: str,
    run_key: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train (or fine-tune from base_model_uri) the ResNet-50 tagger; resumes its checkpoint on retry."""
    from pipelines.steps import run_step

    run_step("train", "pipelines.steps.train:run", fit_jets=fit_jets, model=model, metrics=metrics,
             checkpoint_root=checkpoint_root, run_key=run_key or pipeline_run_id, image_size=image_size, epochs=epochs,
             batch_size=batch_size, learning_rate=learning_rate, seed=seed, base_model_uri=base_model_uri,
             val_fraction=val_fraction, test_fraction=test_fraction, max_steps_per_epoch=max_steps_per_epoch,
             patience=patience)  # fmt: skip


def evaluate(
    model: Input[Model],
    test_jets: Input[Dataset],
    n_bootstrap: int,
    seed: int,
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    report: Output[HTML],
):
    """AUC and 1/eps_B of the tagger and of the jet-mass window on the test jets; ROC and report."""
    from pipelines.steps import run_step

    run_step("evaluate", "pipelines.steps.evaluate:run", model=model, test_jets=test_jets, metrics=metrics, roc=roc,
             evaluation=evaluation, report=report, n_bootstrap=n_bootstrap, seed=seed)  # fmt: skip


def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    fit_jets: Input[Dataset],
    test_jets: Input[Dataset],
    experiment: str,
    model_name: str,
    run_key: str,
    pipeline_run_id: str,
) -> NamedTuple(
    "Registration",
    [("run_id", str), ("version", str), ("aliases", str), ("decision", str), ("reason", str), ("model_uri", str)],
):
    """Log the run to MLflow, register a version (alias challenger), promote it to champion if it is as good."""
    from pipelines.steps import run_step

    r = run_step("register", "pipelines.steps.register:run", model=model, evaluation=evaluation,
                 fit_jets=fit_jets, test_jets=test_jets, experiment=experiment, model_name=model_name,
                 pipeline_run_id=run_key or pipeline_run_id)  # fmt: skip
    return (r["run_id"], r["version"], ",".join(r["aliases"]), r["decision"], r["reason"], r["model_uri"])


def deploy(
    target: str, model_name: str, overlay: str, namespace: str, http_port: int, grpc_port: int, version: str
) -> NamedTuple("Deployment", [("url", str), ("details", str)]):
    """Serve the champion: none, a local predictor process, or the InferenceService of an overlay."""
    import json

    from pipelines.steps import run_step

    d = run_step("deploy", "pipelines.steps.deploy:run", target=target, model_name=model_name, overlay=overlay,
                 namespace=namespace, http_port=http_port, grpc_port=grpc_port, version=version)  # fmt: skip
    return (d["url"], json.dumps(d))


STEPS = (data, preprocess, train, evaluate, register, deploy)


def build(image: str, local: bool) -> dict[str, PythonComponent]:
    """The components, containerized on ``image`` for a cluster, or lightweight for ``kfp.local``."""
    options = {"base_image": image, "install_kfp_package": False}  # the image and the venv both have kfp
    if not local:
        options["target_image"] = image
    return {step.__name__: dsl.component(step, **options) for step in STEPS}

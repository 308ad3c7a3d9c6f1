"""The train step as a Kubeflow Trainer TrainJob: a launcher that creates the job, follows it, takes its model.

``trainjob`` is the Kubeflow component that ``python -m pipelines.compile --trainjob`` puts in
place of ``train``; :func:`trainjob_step` is the plain function it runs. It takes the same
training parameters (those of ``TrainConfig.from_pipeline``) and gives the evaluate step the same
``Output[Model]`` folder, metadata and metrics as the single-pod train step:

1. the preprocess step's fit jets are staged on S3 under the checkpoint root (unless already
   there), where every node of the job reads them;
2. the TrainJob of :func:`toptagger.deploy.trainjob.render.render` (the trainer's command:
   ``torchrun -m toptagger.training``) is created, or found again on a retry, and followed until
   it ends (:func:`toptagger.deploy.trainjob.run.run_trainjob`: its conditions, pods and log lines
   go to this task's log in the KFP UI; a failure ends the task with the TrainJob's own reason);
   it is then deleted or kept as compiled (``keep``);
3. rank 0's export (``--export-to``: model/, state_dict.pt, training.json, and summary.json) is
   downloaded into the model folder, and :func:`components.train.record_outputs` fills its metadata
   and metrics exactly as the train step does.

The node selector, toleration, GPU resource, size and namespace are fixed when compiling.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as objects.
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def trainjob(
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
    image: str,
    nodes: int,
    gpus_per_node: int,
    gpu_resource: str,
    gpu_node_selector: str,
    gpu_toleration: str,
    namespace: str,
    keep: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train as a Kubeflow TrainJob (nodes x gpus_per_node, torch-distributed) and take its model."""
    parameters = dict(locals())  # first: only the component's parameters
    import signal

    from components.step import step

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a terminated run: run_trainjob deletes its TrainJob (unless keep=always)

    signal.signal(signal.SIGTERM, stop)

    with step("train"):
        from components.trainjob import trainjob_step
        from toptagger.deploy.gpu_pool import GpuPool
        from toptagger.deploy.trainjob.render import TrainJobShape
        from toptagger.training.config import PIPELINE_PARAMETERS, TrainConfig

        config = TrainConfig.from_pipeline(**{name: parameters[name] for name in PIPELINE_PARAMETERS})
        pool = GpuPool.parse(gpu_resource, None, gpu_node_selector, gpu_toleration)
        shape = TrainJobShape(nodes, gpus_per_node, pool, namespace, keep)
        trainjob_step(fit_jets, model, metrics, config, checkpoint_root, run_key or pipeline_run_id, shape, image)


def trainjob_step(
    fit_jets: Any,
    model: Any,
    metrics: Any,
    config: Any,
    checkpoint_root: str,
    run_key: str,
    shape: Any,
    image: str,
    client: Any = None,
    poll_s: float = 10,
) -> dict[str, Any]:
    """Run the TrainJob of ``run_key`` and fill ``model``/``metrics`` from its export; returns its summary.

    ``client`` is a ``kubernetes`` ApiClient (default: in-cluster, else the kubeconfig).
    """
    import json
    import shutil

    from components.step import log
    from components.train import record_outputs
    from toptagger import storage
    from toptagger.deploy.trainjob.render import render, staging
    from toptagger.deploy.trainjob.run import api_client, run_trainjob
    from toptagger.errors import DataError
    from toptagger.training.config import to_arguments
    from toptagger.training.files import SUMMARY_FILE

    root = checkpoint_root
    where = staging(root, run_key)  # refuses a root that is not s3://
    data_uri = getattr(fit_jets, "uri", "")
    if not storage.is_s3(data_uri):
        storage.upload(fit_jets.path, where.data)
        data_uri = where.data
        log.info("staged the fit jets for the TrainJob at %s", data_uri)
    arguments = to_arguments(config)
    manifest = render(shape, image, run_key=run_key, checkpoint_root=root, config_args=arguments, data_uri=data_uri)
    run_trainjob(manifest, client or api_client(), keep=shape.keep, poll_s=poll_s)

    out = Path(model.path)
    if out.exists():
        shutil.rmtree(out)
    storage.download_dir(where.export, out)
    summary_file = out / SUMMARY_FILE
    if not summary_file.is_file():
        raise DataError(f"{where.export}: the TrainJob completed but wrote no {SUMMARY_FILE}")
    summary = json.loads(summary_file.read_text())
    summary_file.unlink()  # the model folder holds what the train step's holds
    record_outputs(summary, model, metrics, config, summary["training_seconds"], summary["resumed"])
    log.info(
        "TrainJob done, world size %s: best validation AUC %.4f in %.0f s%s",
        summary.get("world_size", "?"),
        summary["best_val_auc"],
        summary["training_seconds"],
        " (resumed)" if summary["resumed"] else "",
    )
    return summary

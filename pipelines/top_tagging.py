"""The top-tagging pipeline: data -> preprocess -> train -> evaluate -> register -> deploy.

``top_tagging`` (built at import, for clusters) is what ``python -m pipelines.compile`` writes to
``manifests/pipelines/top_tagging.yaml``; ``python -m pipelines.run`` builds the same graph with
lightweight components for ``kfp.local``. The components are the typed functions of
``components/`` (one module per step); :func:`make_components` turns them into KFP components,
with the one decorator argument that differs between the two places they run:

- on a cluster they are containerized Python components (``target_image`` = the components image
  built from ``components/Dockerfile``; its ``kfp_config.ini`` maps each function to its file);
- locally, ``kfp.local.SubprocessRunner`` runs lightweight components only (it refuses
  containerized ones), in this venv, with the repository on ``PYTHONPATH``.

Cluster-only settings (ignored by ``kfp.local``, which ``pipelines.run`` says when it starts):
- the train task asks for one GPU on the GPU node pool: accelerator type and limit, a node
  selector and a toleration for the pool's taint;
- S3 and MLflow credentials come from Kubernetes Secrets as environment variables.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.
import os
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Metrics
from kfp.dsl.python_component import PythonComponent

from components import data, deploy, evaluate, preprocess, quantize, register, train
from components import trainjob as launcher  # the name trainjob is build_pipeline's TrainJobShape
from toptagger.constants import EXPERIMENT, GRPC_PORT, HTTP_PORT, IMAGE_SIZE, MODEL_NAME
from toptagger.deploy.cluster import (  # the Secrets (created once per namespace) and the training pods' size
    MLFLOW_KEYS,
    MLFLOW_OPTIONAL_KEYS,
    MLFLOW_SECRET,
    S3_KEYS,
    S3_OPTIONAL_KEYS,
    S3_SECRET,
    TRAIN_CPU,
    TRAIN_MEMORY,
)
from toptagger.deploy.gpu_pool import GpuPool
from toptagger.deploy.trainjob.render import TrainJobShape, pool_flags

# The component functions, in pipeline order (pipelines.compile maps each to its file in kfp_config.ini).
STEPS = (
    data.plan_shards,
    data.generate_shard,
    data.data,
    preprocess.preprocess,
    train.train,
    launcher.trainjob,
    quantize.quantize,
    evaluate.evaluate,
    register.register,
    deploy.deploy,
)

# What `make images` builds and pushes (manifests/images.mk: $(REGISTRY)/components:$(TAG)).
COMPONENTS_IMAGE = os.environ.get("TOPTAGGER_COMPONENTS_IMAGE", "registry.example.com/top-tagger/components:0.1.0")


class Outputs(NamedTuple):
    """What a run returns (kfp.local hands these to pipelines.run for its summary)."""

    fit_jets: Dataset
    test_jets: Dataset
    training: Metrics
    evaluation: Metrics
    run_id: str
    version: str
    aliases: str
    decision: str
    reason: str
    model_uri: str
    url: str
    deployment: str


def _with_secrets(task: dsl.PipelineTask, s3: bool = True, mlflow: bool = False) -> dsl.PipelineTask:
    if s3:
        kubernetes.use_secret_as_env(task, S3_SECRET, S3_KEYS)
        kubernetes.use_secret_as_env(task, S3_SECRET, S3_OPTIONAL_KEYS, optional=True)
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_KEYS)
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_OPTIONAL_KEYS, optional=True)
    return task


def _on_gpu_pool(task: dsl.PipelineTask, pool: GpuPool) -> dsl.PipelineTask:
    task.set_accelerator_type(pool.resource).set_accelerator_limit(pool.count)
    task.set_cpu_request(TRAIN_CPU).set_memory_request(TRAIN_MEMORY)
    if pool.node_selector:
        kubernetes.add_node_selector(task, *pool.node_selector)
    if pool.toleration:
        kubernetes.add_toleration(task, **pool.toleration.as_kfp())
    return task


NVIDIA_POOL = GpuPool()


class Components(NamedTuple):
    """The steps as KFP components, for one place to run."""

    plan_shards: PythonComponent
    generate_shard: PythonComponent
    data: PythonComponent
    preprocess: PythonComponent
    train: PythonComponent
    trainjob: PythonComponent
    quantize: PythonComponent
    evaluate: PythonComponent
    register: PythonComponent
    deploy: PythonComponent


def make_components(image: str, local: bool) -> Components:
    """The components, containerized on ``image`` for a cluster, or lightweight for ``kfp.local``."""
    options = {"base_image": image, "install_kfp_package": False}  # the image and the venv both have kfp
    if not local:
        options["target_image"] = image
    return Components(*(dsl.component(step, **options) for step in STEPS))


def dataset_task(
    c: Components, dataset_uri: str, n_shards: int, n_signal: int, n_background: int, seed: int, workers: int
) -> dsl.PipelineTask:
    """The data steps: the shards' generation fanned out with ``dsl.ParallelFor``, then one data task.

    Without a dataset URI, each of ``n_shards`` tasks generates its share of the seeded blocks and
    the data task merges them; with one, a single shard task generates nothing and the data task
    copies the file. Returns the data task (its ``dataset`` output is the reference-format file).
    """
    plan = c.plan_shards(dataset_uri=dataset_uri, n_shards=n_shards)
    with dsl.ParallelFor(plan.output) as shard:
        shard_task = c.generate_shard(
            dataset_uri=dataset_uri,
            shard=shard,
            n_shards=n_shards,
            n_signal=n_signal,
            n_background=n_background,
            seed=seed,
            workers=workers,
        )
    data_task = c.data(
        dataset_uri=dataset_uri,
        n_signal=n_signal,
        n_background=n_background,
        seed=seed,
        shards=dsl.Collected(shard_task.outputs["jets"]),
    )
    return _with_secrets(data_task)


def build_pipeline(
    image: str = COMPONENTS_IMAGE,
    local: bool = False,
    gpu_pool: GpuPool = NVIDIA_POOL,
    trainjob: TrainJobShape | None = None,
) -> dsl.graph_component.GraphComponent:
    """The pipeline on ``image``; ``local=True`` gives the lightweight form that kfp.local runs.

    ``gpu_pool`` is where the train task runs on a cluster (kfp.local ignores it). ``trainjob``
    makes the train task a launcher of a Kubeflow Trainer TrainJob of that shape on
    ``trainjob.pool`` (``components/trainjob.py``); the launcher itself needs no GPU.
    """
    c = make_components(image, local)

    @dsl.pipeline(name="top-tagging", description="Top-quark jet tagger: data, training, MLflow registry, serving.")
    def top_tagging(
        dataset_uri: str = "",
        n_signal: int = 3000,
        n_background: int = 3000,
        n_shards: int = 1,
        generator_workers: int = 0,
        image_size: int = IMAGE_SIZE,
        epochs: int = 5,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        seed: int = 1,
        base_model_uri: str = "",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        max_steps_per_epoch: int = 0,
        patience: int = 3,
        n_bootstrap: int = 200,
        max_auc_loss: float = 0.001,
        calibration_jets: int = 300,
        quantize_validation_jets: int = 500,
        checkpoint_root: str = "",
        run_key: str = "",
        mlflow_experiment: str = EXPERIMENT,
        model_name: str = MODEL_NAME,
        deploy_target: str = "none",
        deploy_overlay: str = "cpu",
        deploy_namespace: str = "",
        http_port: int = HTTP_PORT,
        grpc_port: int = GRPC_PORT,
    ) -> Outputs:
        """Train the ResNet-50 top tagger, register it in MLflow and serve the champion.

        Args:
            dataset_uri: Jets in the Top Quark Tagging Reference Dataset layout (local path or
                s3://bucket/key.h5). Empty: generate n_signal + n_background jets with Pythia8 + FastJet.
            n_signal: Top jets to generate (only when dataset_uri is empty).
            n_background: QCD jets to generate (only when dataset_uri is empty).
            n_shards: Generation tasks that share the jets' seeded blocks (only when dataset_uri is empty);
                the same seed gives the same jets whatever the number.
            generator_workers: Processes for the generator in each generation task; 0 uses every core.
            image_size: Jet image size in pixels (the paper: 224; 40 is fast on CPUs).
            epochs: Maximum training epochs (early stopping on validation AUC may stop sooner).
            batch_size: Training batch size.
            learning_rate: AdamW learning rate (cosine schedule).
            seed: Seeds the generator, the train/validation/test split, initialisation and batch order.
            base_model_uri: Weights to fine-tune from (file, s3:// or models:/name@alias; an ImageNet
                ResNet-50 state_dict works). Empty: train from scratch.
            val_fraction: Share of all jets used for validation (early stopping, best epoch).
            test_fraction: Share of all jets held out for the test metrics and the promotion gate.
            max_steps_per_epoch: Cap on batches per epoch for quick runs; 0 means whole epochs.
            patience: Early stopping after this many epochs without a better validation AUC.
            n_bootstrap: Bootstrap replicas for the test metrics' uncertainties.
            max_auc_loss: The precision gate: a reduced precision (int8, bf16) is admitted for serving only
                if its test AUC is at most this much below torch fp32's; also NNCF's max_drop for the int8 IR.
            calibration_jets: Training jets that calibrate the int8 graphs.
            quantize_validation_jets: Validation jets on which NNCF's accuracy control measures the int8 AUC
                (its time on 2 cores grows with this).
            checkpoint_root: Folder or s3:// prefix that keeps training checkpoints across task retries.
                Empty: the pod's temp folder (use s3:// on a cluster).
            run_key: Names the checkpoint and the MLflow run. Empty: this pipeline run's id. Give an
                earlier key to resume that run's training.
            mlflow_experiment: MLflow experiment that receives one run per pipeline run.
            model_name: Registered model name; new versions get the alias challenger, the better ones champion.
            deploy_target: none, local (predictor process on this machine) or cluster (KServe InferenceService).
            deploy_overlay: Kustomize overlay for deploy_target=cluster: cpu, gpu or fpga.
            deploy_namespace: Namespace for the InferenceService; empty: the overlay's.
            http_port: HTTP port of the local predictor (deploy_target=local).
            grpc_port: gRPC port of the local predictor (deploy_target=local).
        """
        data_task = dataset_task(c, dataset_uri, n_shards, n_signal, n_background, seed, generator_workers)
        preprocess_task = c.preprocess(
            dataset=data_task.outputs["dataset"], seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
        training = {  # the train step's inputs, the same in both forms
            "fit_jets": preprocess_task.outputs["fit_jets"],
            "image_size": image_size,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "base_model_uri": base_model_uri,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "max_steps_per_epoch": max_steps_per_epoch,
            "patience": patience,
            "checkpoint_root": checkpoint_root,
            "run_key": run_key,
            "pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        }
        if trainjob is None:
            train_task = _with_secrets(_on_gpu_pool(c.train(**training), gpu_pool), mlflow=True)
        else:  # the TrainJob's pods get the Secrets themselves (secretKeyRef); the launcher needs S3
            shape = {"nodes": trainjob.nodes, "gpus_per_node": trainjob.gpus_per_node, "keep": trainjob.keep}
            shape |= {"namespace": trainjob.namespace, "image": image, **pool_flags(trainjob.pool)}
            train_task = _with_secrets(c.trainjob(**training, **shape))
        # Training resumes its checkpoint (a retried launcher follows or replaces its TrainJob),
        # registration finds its run and version again: both retry safely. Only the data steps are
        # cached: training, evaluation, registration and deployment are what a new run is for.
        train_task.set_retry(num_retries=2, backoff_duration="30s")
        train_task.set_caching_options(enable_caching=False)
        quantize_task = c.quantize(
            model=train_task.outputs["model"],
            fit_jets=preprocess_task.outputs["fit_jets"],
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            max_auc_loss=max_auc_loss,
            calibration_jets=calibration_jets,
            validation_jets=quantize_validation_jets,
        )
        quantize_task.set_caching_options(enable_caching=False)
        evaluate_task = c.evaluate(
            model=train_task.outputs["model"],
            quantized=quantize_task.outputs["quantized"],
            test_jets=preprocess_task.outputs["test_jets"],
            n_bootstrap=n_bootstrap,
            seed=seed,
            max_auc_loss=max_auc_loss,
        )
        evaluate_task.set_caching_options(enable_caching=False)
        register_task = c.register(
            model=train_task.outputs["model"],
            quantized=quantize_task.outputs["quantized"],
            evaluation=evaluate_task.outputs["evaluation"],
            fit_jets=preprocess_task.outputs["fit_jets"],
            test_jets=preprocess_task.outputs["test_jets"],
            experiment=mlflow_experiment,
            model_name=model_name,
            run_key=run_key,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        _with_secrets(register_task, mlflow=True).set_retry(num_retries=2, backoff_duration="30s")
        register_task.set_caching_options(enable_caching=False)
        deploy_task = c.deploy(
            target=deploy_target,
            model_name=model_name,
            overlay=deploy_overlay,
            namespace=deploy_namespace,
            http_port=http_port,
            grpc_port=grpc_port,
            version=register_task.outputs["version"],
        )
        _with_secrets(deploy_task, mlflow=True)
        deploy_task.set_caching_options(enable_caching=False)
        return Outputs(
            fit_jets=preprocess_task.outputs["fit_jets"],
            test_jets=preprocess_task.outputs["test_jets"],
            training=train_task.outputs["metrics"],
            evaluation=evaluate_task.outputs["metrics"],
            run_id=register_task.outputs["run_id"],
            version=register_task.outputs["version"],
            aliases=register_task.outputs["aliases"],
            decision=register_task.outputs["decision"],
            reason=register_task.outputs["reason"],
            model_uri=register_task.outputs["model_uri"],
            url=deploy_task.outputs["url"],
            deployment=deploy_task.outputs["details"],
        )

    return top_tagging


top_tagging = build_pipeline()

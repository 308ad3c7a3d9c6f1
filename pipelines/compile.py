"""Compile the pipeline for a Kubeflow cluster.

    python -m pipelines.compile [--image REGISTRY/components:TAG] [--out FILE] [--check]
                                [--gpu-resource R] [--gpu-count N] [--gpu-node-selector KEY=VALUE|none]
                                [--gpu-toleration KEY[=VALUE][:EFFECT]|none]
                                [--trainjob --nodes N --gpus-per-node G [--trainjob-namespace NS]
                                 [--keep-trainjob never|on-failure|always]]

Writes ``manifests/pipelines/top_tagging.yaml`` (upload it in the KFP UI, or submit it with
``kfp.Client().create_run_from_pipeline_package``) and ``pipelines/kfp_config.ini``, which the
components image needs in its working directory: it tells KFP's executor which file holds each
containerized component (``components/Dockerfile`` copies it to ``/app/kfp_config.ini``).
``--check`` writes nothing and fails when the committed files differ from a fresh compile.
The ``--gpu-*`` options place the train task on your cluster's GPU pool (see
:mod:`toptagger.deploy.gpu_pool`; the defaults are NVIDIA's). ``--trainjob`` compiles the other
form of the train step: a launcher task that creates a Kubeflow Trainer ``TrainJob`` of ``--nodes``
x ``--gpus-per-node`` on that pool and waits for it (:mod:`components.trainjob`,
:mod:`toptagger.deploy.trainjob`); its default output is ``top_tagging_trainjob_<N>x<G>.yaml``.
"""

from __future__ import annotations

import argparse
import configparser
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from toptagger.cli import positive_int, run_cli
from toptagger.deploy.gpu_pool import GpuPool, add_gpu_pool_arguments, gpu_pool_from
from toptagger.deploy.trainjob.render import KEEP, TrainJobShape
from toptagger.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "manifests" / "pipelines" / "top_tagging.yaml"
KFP_CONFIG = REPO / "pipelines" / "kfp_config.ini"


def trainjob_out(shape: TrainJobShape) -> Path:
    """Where ``--trainjob`` writes by default: beside the single-pod pipeline, named by its size."""
    return DEFAULT_OUT.with_name(f"top_tagging_trainjob_{shape.nodes}x{shape.gpus_per_node}.yaml")


def compile_yaml(
    image: str | None = None, gpu_pool: GpuPool | None = None, trainjob: TrainJobShape | None = None
) -> str:
    """The compiled pipeline (two YAML documents: the pipeline spec, then the Kubernetes platform spec).

    ``trainjob`` compiles the train step as a TrainJob launcher (its pool is ``trainjob.pool``).
    """
    from kfp import compiler

    from pipelines.top_tagging import COMPONENTS_IMAGE, NVIDIA_POOL, build_pipeline, top_tagging

    gpu_pool = gpu_pool or NVIDIA_POOL
    if image in (None, COMPONENTS_IMAGE) and gpu_pool == NVIDIA_POOL and trainjob is None:
        pipeline = top_tagging
    else:
        pipeline = build_pipeline(image or COMPONENTS_IMAGE, gpu_pool=gpu_pool, trainjob=trainjob)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        return path.read_text()


def kfp_config() -> str:
    """``kfp_config.ini``: each component function -> its file, relative to the image's /app."""
    import inspect

    from pipelines.top_tagging import STEPS

    config = configparser.ConfigParser()
    config.optionxform = str  # function names are case-sensitive
    config["Components"] = {step.__name__: str(Path(inspect.getfile(step)).relative_to(REPO)) for step in STEPS}
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def cluster_only_settings() -> list[str]:
    """One line per task listing its settings that only a cluster applies (read from the compiled spec)."""
    import yaml

    docs = list(yaml.safe_load_all(compile_yaml()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    lines = []
    for executor, body in spec["deploymentSpec"]["executors"].items():
        task = executor.removeprefix("exec-")
        parts = []
        resources = body["container"].get("resources", {})
        if "accelerator" in resources:
            acc = resources["accelerator"]
            parts.append(f"accelerator {acc.get('resourceType', acc.get('type'))} x{acc.get('resourceCount', 1)}")
        for what in ("Cpu", "Memory"):
            for kind in ("Request", "Limit"):
                key = f"resource{what}{kind}"  # KFP also writes a numeric twice-told cpuRequest etc.
                if key in resources:
                    parts.append(f"{what.lower()} {kind.lower()} {resources[key]}")
        k8s = platform.get(executor, {})
        if "nodeSelector" in k8s:
            parts.append(f"node selector {k8s['nodeSelector'].get('labels')}")
        for toleration in k8s.get("tolerations", []):
            parts.append(f"toleration {toleration.get('key')} {toleration.get('operator')} {toleration.get('effect')}")
        secrets: dict[str, list[str]] = {}
        for secret in k8s.get("secretAsEnv", []):
            name = secret.get("secretName") or str(secret.get("secretNameParameter", {}).get("runtimeValue", {}))
            secrets.setdefault(name, []).extend(item["envVar"] for item in secret.get("keyToEnv", []))
        for name, env in secrets.items():
            parts.append(f"Secret {name} as env {', '.join(env)}")
        if parts:
            lines.append(f"{task}: {'; '.join(parts)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="components image (default: $TOPTAGGER_COMPONENTS_IMAGE or the make default)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"pipeline YAML (default {DEFAULT_OUT}; with --trainjob top_tagging_trainjob_<N>x<G>.yaml beside it)",
    )
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh compile")
    add_gpu_pool_arguments(parser)
    job = parser.add_argument_group("train step as a Kubeflow Trainer v2.3.0 TrainJob (runtime torch-distributed)")
    job.add_argument(
        "--trainjob", action="store_true", help="the train task creates a TrainJob on the GPU pool and waits for it"
    )
    job.add_argument("--nodes", type=positive_int, default=1, help="TrainJob nodes (default 1)")
    job.add_argument("--gpus-per-node", type=positive_int, default=1, help="GPUs and torchrun processes per node")
    job.add_argument("--trainjob-namespace", default="", help="namespace of the TrainJob (default: the launcher's)")
    job.add_argument(
        "--keep-trainjob",
        choices=KEEP,
        default="on-failure",
        help="keep the finished TrainJob and its pods: never, on-failure (default: to read a failure), always",
    )
    args = parser.parse_args(argv)
    if args.image is not None and not args.image.strip():
        raise ConfigError("--image is empty")
    gpu_pool = gpu_pool_from(args)
    trainjob = None
    if args.trainjob:
        if args.gpu_count is not None:
            raise ConfigError("--gpu-count is the single train pod's; a TrainJob takes --gpus-per-node")
        trainjob = TrainJobShape(args.nodes, args.gpus_per_node, gpu_pool, args.trainjob_namespace, args.keep_trainjob)
    elif (args.nodes, args.gpus_per_node, args.trainjob_namespace, args.keep_trainjob) != (1, 1, "", "on-failure"):
        raise ConfigError("--nodes, --gpus-per-node, --trainjob-namespace and --keep-trainjob need --trainjob")
    out = args.out or (trainjob_out(trainjob) if trainjob else DEFAULT_OUT)
    outputs = {out: compile_yaml(args.image, gpu_pool, trainjob), KFP_CONFIG: kfp_config()}
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"out of date (run python -m pipelines.compile): {', '.join(stale)}", file=sys.stderr)
            return 1
        print("compiled pipeline is up to date")
        return 0
    for path, text in outputs.items():
        if not path.parent.is_dir():
            raise ConfigError(f"{path}: the folder {path.parent} does not exist")
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Compile the pipeline for a Kubeflow cluster.

    python -m pipelines.compile [--image REGISTRY/components:TAG] [--out FILE] [--check]
                                [--gpu-resource R] [--gpu-count N] [--gpu-node-selector KEY=VALUE|none]
                                [--gpu-toleration KEY[=VALUE][:EFFECT]|none]

Writes ``manifests/pipelines/top_tagging.yaml`` (upload it in the KFP UI, or submit it with
``kfp.Client().create_run_from_pipeline_package``) and ``pipelines/kfp_config.ini``, which the
components image needs in its working directory: it tells KFP's executor which file holds each
containerized component (``components/Dockerfile`` copies it to ``/app/kfp_config.ini``).
``--check`` writes nothing and fails when the committed files differ from a fresh compile.
The ``--gpu-*`` options place the train task on your cluster's GPU pool (see
:mod:`pipelines.gpu_pool`; the defaults are NVIDIA's).
"""

from __future__ import annotations

import argparse
import configparser
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipelines.gpu_pool import GpuPool
from toptagger.cli import run_cli
from toptagger.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "manifests" / "pipelines" / "top_tagging.yaml"
KFP_CONFIG = REPO / "pipelines" / "kfp_config.ini"


def compile_yaml(image: str | None = None, gpu_pool: GpuPool | None = None) -> str:
    """The compiled pipeline (two YAML documents: the pipeline spec, then the Kubernetes platform spec)."""
    from kfp import compiler

    from pipelines.top_tagging import COMPONENTS_IMAGE, NVIDIA_POOL, build_pipeline, top_tagging

    gpu_pool = gpu_pool or NVIDIA_POOL
    if image in (None, COMPONENTS_IMAGE) and gpu_pool == NVIDIA_POOL:
        pipeline = top_tagging
    else:
        pipeline = build_pipeline(image or COMPONENTS_IMAGE, gpu_pool=gpu_pool)
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"pipeline YAML (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh compile")
    pool = parser.add_argument_group("GPU pool of the train task (defaults: NVIDIA's)")
    pool.add_argument("--gpu-resource", help="extended resource to request (default nvidia.com/gpu)")
    pool.add_argument("--gpu-count", type=int, help="how many (default 1)")
    pool.add_argument(
        "--gpu-node-selector", help="KEY=VALUE node label of the pool, or none (default nvidia.com/gpu.present=true)"
    )
    pool.add_argument(
        "--gpu-toleration",
        help="KEY[=VALUE][:EFFECT] taint of the pool to tolerate, or none (default nvidia.com/gpu:NoSchedule)",
    )
    args = parser.parse_args(argv)
    if args.image is not None and not args.image.strip():
        raise ConfigError("--image is empty")
    gpu_pool = GpuPool.parse(args.gpu_resource, args.gpu_count, args.gpu_node_selector, args.gpu_toleration)
    outputs = {args.out: compile_yaml(args.image, gpu_pool), KFP_CONFIG: kfp_config()}
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

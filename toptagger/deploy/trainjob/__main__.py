"""``python -m toptagger.deploy.trainjob render``: print the TrainJob that the pipeline's launcher creates.

    python -m toptagger.deploy.trainjob render --nodes 2 --gpus-per-node 4 --image REGISTRY/components:TAG \\
        [--namespace NS] [--checkpoint-root s3://bucket/checkpoints] [--run-key KEY] [training flags]

prints, as YAML for an operator to read or ``kubectl apply -f -``, the manifest of
:func:`toptagger.deploy.trainjob.render.render`, the same function the launcher
(:mod:`components.trainjob`) calls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from toptagger.cli import positive_int, run_cli

PROG = "python -m toptagger.deploy.trainjob"


def build_parser() -> argparse.ArgumentParser:
    from toptagger.deploy.gpu_pool import add_gpu_pool_arguments
    from toptagger.training import config

    parser = argparse.ArgumentParser(
        prog=PROG, description="The pipeline's train step as a Kubeflow Trainer v2.3.0 TrainJob, for kubectl."
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    render_parser = sub.add_parser(
        "render",
        help="print the TrainJob as YAML (kubectl apply -f - creates it)",
        description="Print the TrainJob that the pipeline's launcher creates, as YAML.",
    )
    job = render_parser.add_argument_group("the job")
    job.add_argument("--nodes", type=positive_int, required=True, help="nodes (numNodes)")
    job.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs and processes per node")
    job.add_argument("--image", required=True, help="the components image (REGISTRY/components:TAG)")
    job.add_argument("--namespace", help="namespace of the TrainJob (default: none in the manifest)")
    job.add_argument(
        "--checkpoint-root",
        default="s3://top-tagger/checkpoints",
        help="s3:// prefix of checkpoints, staged jets and export (default s3://top-tagger/checkpoints)",
    )
    job.add_argument("--run-key", default="manual", help="names the checkpoint and the job (default manual)")
    job.add_argument("--data", help="the preprocess step's fit jets on s3:// (default: <root>/<run key>.trainjob/)")
    add_gpu_pool_arguments(render_parser, count=False)
    config.add_arguments(render_parser.add_argument_group("training settings (python -m toptagger.training's)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from toptagger.deploy.gpu_pool import gpu_pool_from
    from toptagger.deploy.trainjob.render import TrainJobShape, render
    from toptagger.training.config import from_arguments, to_arguments

    args = build_parser().parse_args(argv)
    shape = TrainJobShape(args.nodes, args.gpus_per_node, gpu_pool_from(args))
    manifest = render(
        shape,
        args.image,
        run_key=args.run_key,
        checkpoint_root=args.checkpoint_root,
        config_args=to_arguments(from_arguments(args)),
        data_uri=args.data,
        namespace=args.namespace,
    )
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

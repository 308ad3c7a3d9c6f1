"""Accuracy study: the trained tagger through the engine in each precision, on the test split.

For every precision: AUC, background rejection 1/eps_B at signal efficiency eps_S = 0.3, the
AUC change against the fp32 engine (target: within 0.002 for int8 and bfp8), and the size of the
weight file. torch fp32 is the first row. int8 activation scales are calibrated on the first
--calibration-count jets, which are then left out of the evaluation.

    python -m benchmarks.opencl_accuracy --model MODEL --jets test.h5
    python -m benchmarks.opencl_accuracy --model MODEL --images test.npz   # arrays images, labels

MODEL is a saved tagger (folder with model.safetensors + tagger.json, s3:// or models:/ URI): its
own image configuration renders the jets, exactly as in training and serving.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.models.resnet import ResNet

from benchmarks.common import publish
from fpga_runtime.devices import select_device
from fpga_runtime.engine import Engine
from fpga_runtime.export import export_model
from fpga_runtime.quantize import PRECISIONS
from toptagger.cli import positive_int
from toptagger.errors import ConfigError, DataError
from toptagger.evaluation import metrics
from toptagger.images import ImageConfig, three_channels

AUC_TOLERANCE = 0.002
SIGNAL_EFFICIENCY = 0.3


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return float(metrics.auc(fpr, tpr))


def background_rejection(scores: np.ndarray, labels: np.ndarray, eff_s: float = SIGNAL_EFFICIENCY) -> float:
    """1/eps_B at the working point that keeps a fraction ``eff_s`` of the signal."""
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return float(metrics.rejection(fpr, tpr, eff_s))


def load_inputs(args: argparse.Namespace, image: ImageConfig, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, C, S, S], labels int [N]) from --images or --jets."""
    if args.images:
        path = Path(args.images)
        if not path.is_file():
            raise ConfigError(f"image file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data or "labels" not in data:
                raise DataError(f"{path} must hold arrays 'images' and 'labels', has {sorted(data.files)}")
            images, labels = data["images"][: args.limit], data["labels"][: args.limit]
    else:
        from toptagger.jets.dataset import read_jets

        jets = read_jets(args.jets, stop=args.limit)
        images, labels = image.render(jets.constituents), jets.labels
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[1] == 1 and channels == 3:
        images = np.ascontiguousarray(three_channels(images))
    if images.ndim != 4 or images.shape[1] != channels:
        raise DataError(f"images have shape {list(images.shape)}; the model wants [N, {channels}, S, S]")
    return images, np.asarray(labels).astype(np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.opencl_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="saved tagger: folder, s3:// prefix or models:/name@alias")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jets", help="test split in the reference jet format (rendered with toptagger.images)")
    source.add_argument("--images", help=".npz with arrays images [N, C, S, S] and labels [N]")
    parser.add_argument("--limit", type=positive_int, help="use only the first N jets")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--calibration-count", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", help="OpenCL device pin (default: automatic)")
    parser.add_argument("--package", help="keep the exported package here (default: a temporary directory)")
    parser.add_argument(
        "--fp16-emulation",
        action="store_true",
        help="run fp16 (half storage, fp32 arithmetic) even without cl_khr_fp16",
    )
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    from toptagger.model import load_model

    model = load_model(args.model)
    channels = model.conv1.in_channels
    images, labels = load_inputs(args, model.config.image, channels)
    if len(images) <= args.calibration_count:
        raise DataError(f"{len(images)} jets are not enough: {args.calibration_count} go to calibration")
    n_cal = args.calibration_count
    calib, images, labels = images[:n_cal], images[n_cal:], labels[n_cal:]
    info, _ = select_device(args.device)
    fp16_ok = info.fp16 or args.fp16_emulation
    precisions = [p for p in dict.fromkeys(["fp32", *args.precision]) if p != "fp16" or fp16_ok]
    skipped = [p for p in args.precision if p not in precisions]

    with torch.no_grad():  # ResNet.forward: the 3-channel images go in as they are
        ref = torch.cat(
            [
                torch.softmax(ResNet.forward(model, torch.from_numpy(images[i : i + args.batch_size])), dim=1)
                for i in range(0, len(images), args.batch_size)
            ]
        ).numpy()
    rows = [("torch fp32", ref[:, 1], None, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        pkg_dir = Path(args.package) if args.package else Path(tmp) / "pkg"
        export_model(
            model, pkg_dir, precisions, image_size=images.shape[-1], calibration=calib, overwrite=bool(args.package)
        )
        for p in precisions:
            engine = Engine.from_package(
                pkg_dir,
                device=args.device,
                precision=p,
                max_batch_size=args.batch_size,
                allow_fp16_emulation=args.fp16_emulation,
            )
            start = time.perf_counter()
            probs = engine.predict(images)
            seconds = time.perf_counter() - start
            size = engine.package.plan["precisions"][p]["bytes"]
            rows.append((f"engine {p}", probs[:, 1], size, seconds))

    base = auc(rows[1][1], labels)
    out = [
        f"Accuracy on {len(images)} test jets ({int(labels.sum())} top), device {info.label()}, "
        f"calibration on {len(calib)} jets.",
        "",
        "| model | AUC | ΔAUC vs engine fp32 | 1/εB at εS=0.3 | weights MB | within 0.002 | time s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, scores, size, seconds in rows:
        a = auc(scores, labels)
        narrow = not (name.startswith("torch") or name.endswith("fp32"))
        ok = ("yes" if abs(a - base) <= AUC_TOLERANCE else "NO") if narrow else ""
        mb = f"{size / 1e6:.1f}" if size else ""
        rej = background_rejection(scores, labels)
        out.append(f"| {name} | {a:.4f} | {a - base:+.4f} | {rej:.1f} | {mb} | {ok} | {seconds:.1f} |")
    if skipped:
        out += ["", f"Skipped {skipped}: {info.label()} lacks cl_khr_fp16 (--fp16-emulation runs it anyway)."]
    publish("\n".join(out) + "\n", args.out)
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))

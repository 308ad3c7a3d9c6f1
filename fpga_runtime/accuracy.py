"""Accuracy study: the trained tagger through the engine in each precision, on the test split.

For every precision: AUC, background rejection 1/eps_B at signal efficiency eps_S = 0.3, the
AUC change against the fp32 engine (target: within 0.002 for int8 and bfp8), and the size of the
weight file. torch fp32 is the first row. int8 activation scales are calibrated on the first
--calibration-count jets, which are then left out of the evaluation.

    python -m fpga_runtime.accuracy --model tagger.safetensors --jets test.h5 --image-config images.json
    python -m fpga_runtime.accuracy --model tagger.safetensors --images test.npz   # arrays images, labels
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from components.cli import positive_int
from components.errors import ConfigError, DataError
from fpga_runtime.devices import select_device
from fpga_runtime.engine import Engine
from fpga_runtime.export import export_model, load_torch_model
from fpga_runtime.quantize import PRECISIONS

AUC_TOLERANCE = 0.002
SIGNAL_EFFICIENCY = 0.3


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); label 1 = signal."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("AUC needs both signal (label 1) and background (label 0) jets")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def background_rejection(scores: np.ndarray, labels: np.ndarray, eff_s: float = SIGNAL_EFFICIENCY) -> float:
    """1/eps_B at the threshold that keeps a fraction ``eff_s`` of the signal."""
    labels = labels.astype(bool)
    threshold = np.quantile(scores[labels], 1.0 - eff_s)
    eff_b = float((scores[~labels] >= threshold).mean())
    return float("inf") if eff_b == 0 else 1.0 / eff_b


def load_inputs(args: argparse.Namespace, channels: int) -> tuple[np.ndarray, np.ndarray]:
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
        from components.images import ImageConfig
        from components.jetdata import read_jets

        config = ImageConfig()
        if args.image_config:
            config = ImageConfig.from_dict(json.loads(Path(args.image_config).read_text()))
        if args.image_size:
            config = ImageConfig.from_dict({**config.to_dict(), "image_size": args.image_size})
        jets = read_jets(args.jets, stop=args.limit)
        images, labels = config.render(jets.constituents), jets.labels
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[1] == 1 and channels == 3:
        images = np.ascontiguousarray(three_channels_np(images))
    if images.ndim != 4 or images.shape[1] != channels:
        raise DataError(f"images have shape {list(images.shape)}; the model wants [N, {channels}, S, S]")
    return images, np.asarray(labels).astype(np.int64)


def three_channels_np(images: np.ndarray) -> np.ndarray:
    return np.broadcast_to(images, (images.shape[0], 3, *images.shape[2:]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpga_runtime.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="trained tagger, resnet50 state_dict in .safetensors")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jets", help="test split in the reference jet format (rendered with components.images)")
    source.add_argument("--images", help=".npz with arrays images [N, C, S, S] and labels [N]")
    parser.add_argument("--image-config", help="JSON of components.images.ImageConfig used in training")
    parser.add_argument("--image-size", type=positive_int, help="override the image size of --image-config")
    parser.add_argument("--limit", type=positive_int, help="use only the first N jets")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--calibration-count", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", help="OpenCL device pin (default: automatic)")
    parser.add_argument("--package", help="keep the exported package here (default: a temporary directory)")
    parser.add_argument("--fp16-emulation", action="store_true",
                        help="run fp16 (half storage, fp32 arithmetic) even without cl_khr_fp16")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    model = load_torch_model(args.model)
    images, labels = load_inputs(args, model.conv1.in_channels)
    if len(images) <= args.calibration_count:
        raise DataError(f"{len(images)} jets are not enough: {args.calibration_count} go to calibration")
    n_cal = args.calibration_count
    calib, images, labels = images[:n_cal], images[n_cal:], labels[n_cal:]
    info, _ = select_device(args.device)
    fp16_ok = info.fp16 or args.fp16_emulation
    precisions = [p for p in dict.fromkeys(["fp32", *args.precision]) if p != "fp16" or fp16_ok]
    skipped = [p for p in args.precision if p not in precisions]

    with torch.no_grad():
        ref = torch.cat([torch.softmax(model(torch.from_numpy(images[i:i + args.batch_size])), dim=1)
                         for i in range(0, len(images), args.batch_size)]).numpy()
    rows = [("torch fp32", ref[:, 1], None, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        pkg_dir = Path(args.package) if args.package else Path(tmp) / "pkg"
        export_model(model, pkg_dir, precisions, image_size=images.shape[-1], calibration=calib,
                     overwrite=bool(args.package))
        for p in precisions:
            engine = Engine.from_package(pkg_dir, device=args.device, precision=p, max_batch_size=args.batch_size,
                                         allow_fp16_emulation=args.fp16_emulation)
            start = time.perf_counter()
            probs = engine.predict(images)
            seconds = time.perf_counter() - start
            size = engine.package.plan["precisions"][p]["bytes"]
            rows.append((f"engine {p}", probs[:, 1], size, seconds))

    base = auc(rows[1][1], labels)
    out = [f"Accuracy on {len(images)} test jets ({int(labels.sum())} top), device {info.label()}, "
           f"calibration on {len(calib)} jets.", "",
           "| model | AUC | ΔAUC vs engine fp32 | 1/εB at εS=0.3 | weights MB | within 0.002 | time s |",
           "|---|---:|---:|---:|---:|---|---:|"]
    for name, scores, size, seconds in rows:
        a = auc(scores, labels)
        narrow = not (name.startswith("torch") or name.endswith("fp32"))
        ok = ("yes" if abs(a - base) <= AUC_TOLERANCE else "NO") if narrow else ""
        mb = f"{size / 1e6:.1f}" if size else ""
        rej = background_rejection(scores, labels)
        out.append(f"| {name} | {a:.4f} | {a - base:+.4f} | {rej:.1f} | {mb} | {ok} | {seconds:.1f} |")
    if skipped:
        out += ["", f"Skipped {skipped}: {info.label()} lacks cl_khr_fp16 (--fp16-emulation runs it anyway)."]
    report = "\n".join(out) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    from components.cli import run_cli

    raise SystemExit(run_cli(main))

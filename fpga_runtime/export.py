"""Export a torchvision ResNet (the tagger) into an OpenCL engine package.

Batch-norm is folded into the convolutions, so every convolution becomes weights + bias with a fused
epilogue (residual add, ReLU). Weights are stored OHWI (output, kernel y, kernel x, input channel),
which matches the NHWC reduction order of the kernels; the engine packs them into vector panels for
the tile width of the device it runs on.

    python -m fpga_runtime.export --model tagger.safetensors --out pkg/ --precision fp32 int8 \
        --calibration calib.npz
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fpga_runtime import quantize
from fpga_runtime.errors import PackageError, PrecisionError, UnsupportedLayerError
from fpga_runtime.package import PLAN_FILE, PLAN_FORMAT, PLAN_VERSION, write_package
from toptagger.errors import ConfigError

CLASSES = ("qcd", "top")


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Return (OHWI float32 weights, bias) of ``bn(conv(x))`` in eval mode, computed in float64."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError(f"batch-norm after {conv} keeps no running statistics; cannot fold it")
    inv = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    wf = w * inv[:, None, None, None]
    bf = beta + (b - bn.running_mean.double()) * inv
    return wf.permute(0, 2, 3, 1).float().numpy().copy(), bf.float().numpy()


def _check_conv(name: str, conv: Any) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedLayerError(f"{name} is {type(conv).__name__}, expected Conv2d")
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"{name}: groups={conv.groups}, dilation={conv.dilation}, padding_mode={conv.padding_mode!r}; "
            "the engine runs dense, undilated, zero-padded convolutions"
        )
    if conv.stride[0] != conv.stride[1] or not isinstance(conv.padding, tuple) or conv.padding[0] != conv.padding[1]:
        raise UnsupportedLayerError(f"{name}: stride {conv.stride} / padding {conv.padding} must be square")
    return conv


def _check_bn(name: str, bn: Any) -> nn.BatchNorm2d:
    if not isinstance(bn, nn.BatchNorm2d):
        raise UnsupportedLayerError(f"{name} is {type(bn).__name__}, expected BatchNorm2d")
    return bn


class _PlanBuilder:
    """Collects layers and fp32 tensors while walking the network."""

    def __init__(self) -> None:
        self.layers: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self._count = 0

    def tensor(self) -> str:
        self._count += 1
        return f"t{self._count}"

    def layer(self, name: str, op: str, src: str, **attributes: Any) -> str:
        """Append a layer reading ``src`` into a new tensor; returns that tensor's name."""
        out = self.tensor()
        self.layers.append({"name": name, "op": op, "input": src, "output": out, **attributes})
        return out

    def conv(self, name: str, conv: Any, bn: Any, src: str, relu: bool, residual: str | None = None) -> str:
        conv, bn = _check_conv(name, conv), _check_bn(f"{name} (batch-norm)", bn)
        w, b = fold_bn(conv, bn)
        out = self.layer(
            name,
            "conv",
            src,
            cin=conv.in_channels,
            cout=conv.out_channels,
            kernel=list(conv.kernel_size),
            stride=conv.stride[0],
            padding=conv.padding[0],
            relu=relu,
            residual=residual,
        )
        self.tensors[f"{name}.weight"] = w
        self.tensors[f"{name}.bias"] = b
        return out


def _block(pb: _PlanBuilder, name: str, block: nn.Module, src: str) -> str:
    if isinstance(block, Bottleneck):
        convs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    elif isinstance(block, BasicBlock):
        convs = [("conv1", "bn1"), ("conv2", "bn2")]
    else:
        raise UnsupportedLayerError(
            f"{name} is {type(block).__name__}; expected a torchvision Bottleneck or BasicBlock"
        )
    identity = src
    if block.downsample is not None:
        ds = block.downsample
        if not isinstance(ds, nn.Sequential) or len(ds) != 2:
            raise UnsupportedLayerError(f"{name}.downsample must be Sequential(Conv2d, BatchNorm2d), got {ds}")
        identity = pb.conv(f"{name}.downsample.0", ds[0], ds[1], src, relu=False)
    x = src
    for i, (c, b) in enumerate(convs):
        last = i == len(convs) - 1
        # The block's final ReLU comes after the residual add; both fuse into the last conv.
        x = pb.conv(
            f"{name}.{c}", getattr(block, c), getattr(block, b), x, relu=True, residual=identity if last else None
        )
    return x


def build_plan(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], int]:
    """Walk a torchvision ResNet; returns (layers, fp32 tensors, input channels)."""
    if not isinstance(model, ResNet):
        raise UnsupportedLayerError(
            f"cannot export {type(model).__name__}: the engine runs torchvision ResNets (resnet18 ... resnet152)"
        )
    pb = _PlanBuilder()
    x = pb.conv("conv1", model.conv1, model.bn1, "input", relu=True)
    if not isinstance(model.relu, nn.ReLU):
        raise UnsupportedLayerError(f"relu is {type(model.relu).__name__}, expected ReLU")
    mp = model.maxpool
    if not isinstance(mp, nn.MaxPool2d) or mp.dilation != 1 or mp.ceil_mode:
        raise UnsupportedLayerError(f"maxpool is {mp}; expected MaxPool2d without dilation or ceil_mode")
    x = pb.layer("maxpool", "maxpool", x, kernel=int(mp.kernel_size), stride=int(mp.stride), padding=int(mp.padding))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            x = _block(pb, f"{stage}.{i}", block, x)
    ap = model.avgpool
    if not isinstance(ap, nn.AdaptiveAvgPool2d) or ap.output_size not in ((1, 1), 1):
        raise UnsupportedLayerError(f"avgpool is {ap}; expected AdaptiveAvgPool2d((1, 1))")
    out = pb.layer("avgpool", "global_avgpool", x)
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise UnsupportedLayerError(f"fc is {type(fc).__name__}, expected Linear")
    pb.layer("fc", "linear", out, in_features=fc.in_features, out_features=fc.out_features)
    pb.tensors["fc.weight"] = fc.weight.detach().float().numpy().copy()
    bias = fc.bias.detach().float().numpy() if fc.bias is not None else np.zeros(fc.out_features, np.float32)
    pb.tensors["fc.bias"] = bias.copy()
    return pb.layers, pb.tensors, model.conv1.in_channels


def _narrow(layers: list[dict[str, Any]], fp32: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The weights file of ``precision`` from the folded fp32 tensors."""
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        name = layer["name"]
        if layer["op"] == "linear":
            out[f"{name}.weight"], out[f"{name}.bias"] = fp32[f"{name}.weight"], fp32[f"{name}.bias"]
        if layer["op"] != "conv":
            continue
        w = fp32[f"{name}.weight"]
        out[f"{name}.bias"] = fp32[f"{name}.bias"]
        if precision == "fp32":
            out[f"{name}.weight"] = w
        elif precision == "fp16":
            out[f"{name}.weight"] = w.astype(np.float16)
        elif precision == "int8":
            out[f"{name}.weight_q"], out[f"{name}.weight_scale"] = quantize.int8_per_channel(w)
        elif precision == "bfp8":
            out[f"{name}.mantissa"], out[f"{name}.exponent"] = quantize.bfp8_encode(w)
    return out


def calibrate_int8(
    plan: dict[str, Any], weights: dict[str, np.ndarray], images: np.ndarray, percentile: float = 99.99
) -> dict[str, float]:
    """Per-tensor activation scales: the ``percentile`` of |x| of every conv input over ``images``."""
    from fpga_runtime.reference import run_reference

    record: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), 32):
        run_reference(plan, weights, "fp32", images[start : start + 32], record=record)
    scales = {}
    for name, chunks in record.items():
        values = torch.cat([c.abs().flatten() for c in chunks]).double()
        # A 99.99th percentile ignores the rare outliers that would waste most of the 8 bits.
        if values.numel() > 2**24:
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
        amax = float(torch.quantile(values, percentile / 100.0)) if percentile < 100 else float(values.max())
        scales[name] = max(amax, 1e-8) / quantize.INT8_MAX
    return scales


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    precisions: Iterable[str] = ("fp32",),
    *,
    image_size: int = 64,
    calibration: np.ndarray | None = None,
    percentile: float = 99.99,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (a torchvision ResNet) into the package directory ``out_dir``.

    ``calibration`` (float32 [N, C, S, S]) is required for int8, whose activation scales are
    calibrated on it. Returns the package path.
    """
    precisions = list(dict.fromkeys(precisions))
    for p in precisions:
        if p not in quantize.PRECISIONS:
            raise PrecisionError(f"unknown precision {p!r}; choose from {', '.join(quantize.PRECISIONS)}")
    out = Path(out_dir)
    if (out / PLAN_FILE).exists():
        if not overwrite:
            raise PackageError(f"{out} already holds a package; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    was_training = model.training
    model.eval()
    try:
        layers, fp32, channels = build_plan(model)
    finally:
        model.train(was_training)
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model": type(model).__name__,
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels,
            "height": image_size,
            "width": image_size,
        },
        "classes": list(CLASSES) if layers[-1]["out_features"] == len(CLASSES) else None,
        "output": layers[-1]["output"],
        "output_kind": "logits",
        "bfp_block": quantize.BFP_BLOCK,
        "layers": layers,
        "precisions": {p: {} for p in precisions},
    }
    if "int8" in precisions:
        if calibration is None or len(calibration) == 0:
            raise ConfigError("int8 export needs calibration images (float32 [N, C, S, S]); pass --calibration")
        calibration = np.asarray(calibration, dtype=np.float32)
        if calibration.ndim != 4 or calibration.shape[1:] != (channels, image_size, image_size):
            raise ConfigError(
                f"calibration images have shape {calibration.shape}, expected [N, {channels}, "
                f"{image_size}, {image_size}]"
            )
        plan["precisions"]["int8"] = {
            "activation_scales": calibrate_int8(plan, fp32, calibration, percentile),
            "calibration": {"images": len(calibration), "percentile": percentile},
        }
    weights = {p: _narrow(layers, fp32, p) for p in precisions}
    return write_package(out, plan, weights)


def load_torch_model(path: str | Path) -> nn.Module:
    """Rebuild a resnet50 tagger from a pickle-free safetensors state_dict (conv1 may be 1-channel)."""
    from safetensors.torch import load_file
    from torchvision.models import resnet50

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ConfigError(f"model file {path} must be a .safetensors state_dict (pickle-free)")
    state = load_file(str(path))
    try:
        conv1, fc = state["conv1.weight"], state["fc.weight"]
    except KeyError as exc:
        raise ConfigError(f"{path} is not a torchvision resnet50 state_dict: no {exc.args[0]}") from None
    model = resnet50(num_classes=fc.shape[0])
    if conv1.shape[1] != 3:
        model.conv1 = nn.Conv2d(conv1.shape[1], 64, kernel_size=7, stride=2, padding=3, bias=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit torchvision resnet50: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_images(path: str | Path, key: str = "images") -> np.ndarray:
    """float32 [N, C, S, S] images from a .npy or .npz file (array ``key``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        arr = data[key] if isinstance(data, np.lib.npyio.NpzFile) else data
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"cannot read images from {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ConfigError(f"{path}: images must be [N, C, S, S] or [N, S, S], got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fpga_runtime.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="trained tagger, a resnet50 state_dict in .safetensors")
    parser.add_argument("--out", required=True, help="package directory to write")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=quantize.PRECISIONS)
    parser.add_argument(
        "--image-size", type=int, default=None, help="input size S (default: from --calibration, else 64)"
    )
    parser.add_argument("--calibration", help=".npy/.npz images [N, C, S, S] for int8 activation scales")
    parser.add_argument("--calibration-count", type=int, default=256, help="images used for calibration")
    parser.add_argument("--percentile", type=float, default=99.99, help="|activation| percentile of an int8 scale")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package")
    args = parser.parse_args(argv)
    model = load_torch_model(args.model)
    calib = load_images(args.calibration)[: args.calibration_count] if args.calibration else None
    size = args.image_size or (calib.shape[-1] if calib is not None else 64)
    path = export_model(
        model,
        args.out,
        args.precision,
        image_size=size,
        calibration=calib,
        percentile=args.percentile,
        overwrite=args.overwrite,
    )
    print(f"wrote {path} ({', '.join(args.precision)})")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))

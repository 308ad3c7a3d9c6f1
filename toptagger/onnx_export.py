"""The tagger as an ONNX graph, for the runtimes that serve it faster than torch (ONNX Runtime, OpenVINO).

The graph takes the images the predictor receives from CMSSW, ``[N, C, S, S]`` with a dynamic
batch, and returns the logits; opset 17. It is written pickle-free (ONNX is a protobuf) beside
``model.safetensors`` as ``model.onnx``, and :func:`compare` checks it against torch on real jets.
The exporter is torch's TorchScript one (``dynamo=False``): the ResNet is a static graph, and it
needs no extra package.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision.models.resnet import ResNet

from toptagger import storage
from toptagger.errors import DataError
from toptagger.model import JetTagger

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT, OUTPUT = "images", "logits"
# What an export must agree with torch to: probabilities to 1e-3, the test AUC to 5e-4.
MAX_PROBABILITY_DIFFERENCE = 1e-3
MAX_AUC_DIFFERENCE = 5e-4


class _ChannelFirst(torch.nn.Module):
    """The network on images with the model's own channel count (the paper's 3 copies, or 1)."""

    def __init__(self, model: JetTagger) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ResNet.forward(self.model, images)


def export_onnx(model: JetTagger, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model.onnx`` (dynamic batch) into ``out_dir``, atomically; returns its path."""
    model = model.eval().cpu()
    size, channels = model.config.image.image_size, model.config.in_channels
    example = torch.zeros(1, channels, size, size)
    path = Path(out_dir) / ONNX_FILE
    with storage.atomic_output(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            _ChannelFirst(model),
            (example,),
            str(tmp),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def top_probabilities(path: Path, model: JetTagger, constituents: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Top probability of each jet through the ONNX graph at ``path`` (ONNX Runtime, CPU), from the same images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    channels = model.config.in_channels
    out = np.empty(len(constituents), np.float64)
    for start in range(0, len(constituents), batch_size):
        images = model.config.image.render(np.ascontiguousarray(constituents[start : start + batch_size]))
        images = np.ascontiguousarray(np.broadcast_to(images, (len(images), channels, *images.shape[2:])))
        (logits,) = session.run(None, {INPUT: images})
        out[start : start + len(images)] = softmax(logits)[:, 1]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def compare(onnx_probabilities: np.ndarray, torch_probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How an exported graph's top probabilities agree with torch's on the same jets; DataError beyond the bounds."""
    from toptagger.evaluation.metrics import auc, roc_curve  # evaluation's, not the predictor's: imported here

    difference = float(np.abs(onnx_probabilities - torch_probabilities).max())
    aucs = [float(auc(*roc_curve(labels, p)[:2])) for p in (torch_probabilities, onnx_probabilities)]
    result = {
        "onnx_max_probability_difference": difference,
        "onnx_test_auc": aucs[1],
        "onnx_auc_difference": abs(aucs[1] - aucs[0]),
    }
    if difference > MAX_PROBABILITY_DIFFERENCE or result["onnx_auc_difference"] > MAX_AUC_DIFFERENCE:
        raise DataError(
            f"the ONNX export disagrees with torch: top probabilities differ by up to {difference:.2e} "
            f"(bound {MAX_PROBABILITY_DIFFERENCE}), test AUC by {result['onnx_auc_difference']:.2e} "
            f"(bound {MAX_AUC_DIFFERENCE})"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    from toptagger.model import load_model

    parser = argparse.ArgumentParser(
        prog="python -m toptagger.onnx_export", description="Write model.onnx beside a saved tagger's weights."
    )
    parser.add_argument("model", type=Path, help="saved tagger folder (model.safetensors + tagger.json)")
    args = parser.parse_args(argv)
    print(f"wrote {export_onnx(load_model(args.model), args.model)}")
    return 0


if __name__ == "__main__":
    from toptagger.cli import run_cli

    raise SystemExit(run_cli(main))

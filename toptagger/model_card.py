"""What the registry says about the tagger: the registered model's description and each version's.

Both are Markdown (the MLflow UI renders it). The registered model's text says what the model is,
what it takes and returns (from :mod:`toptagger.signature`) and how to load it; a version's text
gives its test AUC and 1/eps_B at the reported signal efficiency beside the jet-mass window's, as
the evaluate step computed them (its ``metrics.json``, never recomputed here), and the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toptagger.constants import CHAMPION_URI
from toptagger.evaluation.metrics import SIGNAL_EFFICIENCIES
from toptagger.evaluation.report import format_entry
from toptagger.model import TaggerConfig
from toptagger.signature import CLASSES, CONSTITUENTS, IMAGES, Signature, TensorSpec

# The working point the project reports 1/eps_B at (the paper's eps_S = 0.3).
REPORTED_EFFICIENCY = SIGNAL_EFFICIENCIES[0]


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(["N", *(str(d) for d in spec.dims)]) + "]"


def _inputs(signature: Signature) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in signature.inputs}


def _tensors(signature: Signature) -> list[str]:
    images, constituents = _inputs(signature)[IMAGES], _inputs(signature)[CONSTITUENTS]
    (output,) = signature.outputs
    return [
        f"- `{IMAGES}`: float32 {_shape(images)}, jet images (pT fraction per pixel in eta x phi)",
        f"- `{CONSTITUENTS}`: float32 {_shape(constituents)}, ({', '.join(constituents.columns or ())}) of the "
        "pT-ordered, zero-padded constituents; rendered with the image options the model was trained with",
        f"- output `{output.name}`: float32 {_shape(output)}, columns ({', '.join(CLASSES)})",
    ]


def model_description(tagger: TaggerConfig) -> str:
    """The registered model's description; the shapes are those of ``tagger`` (each version's signature has its own)."""
    signature = Signature.of(tagger)
    return "\n".join(
        [
            "ResNet-50 top-quark jet tagger on jet images: tells hadronic top-quark jets from QCD jets "
            "(Duarte et al. 2019, trained on Pythia8 + FastJet jets or the Top Quark Tagging Reference Dataset).",
            "",
            "Inputs (the latest version's shapes; each version's signature has its own image size):",
            *_tensors(signature),
            "",
            "Load it with MLflow (no pickle: a pyfunc from code, safetensors weights). Both inputs are optional: "
            "give constituents (alone, or by name), images, or both; rows come back images first, then constituents:",
            "",
            "```python",
            f'model = mlflow.pyfunc.load_model("{CHAMPION_URI}")',
            f'probabilities = model.predict(jets)  # or {{"{CONSTITUENTS}": jets}}',
            f'probabilities = model.predict({{"{IMAGES}": images}})',
            f'probabilities = model.predict({{"{IMAGES}": images, "{CONSTITUENTS}": jets}})',
            "```",
            "",
            f"Serve it: `python -m serving --model-uri {CHAMPION_URI}` (KServe v2 / Triton gRPC), which reads the "
            "tagger's folder `artifacts/model/` of this MLflow Model: `model.safetensors`, `tagger.json`, "
            "`model.onnx` (onnxruntime, openvino backends), `opencl/` (FPGA backend).",
        ]
    )


def version_description(
    tagger: TaggerConfig,
    evaluated: Mapping[str, Any],
    dataset: Mapping[str, Any],
    run_id: str,
    pipeline_run_id: str,
) -> str:
    """A version's description: test AUC and 1/eps_B beside the mass window's, its images and its dataset.

    ``evaluated`` is the evaluate step's ``metrics.json``; ``dataset`` the fit jets' metadata
    (``source``, ``n_jets``, ``dataset_sha256``, ``split_seed``).
    """
    net, base = evaluated["network"], evaluated["mass_window"]

    def row(label: str, key: str) -> str:
        return f"| {label} | {format_entry(net[key])} | {format_entry(base[key])} |"

    image = tagger.image
    options = ", ".join(f"{k}={v}" for k, v in image.to_dict().items() if k != "image_size")
    return "\n".join(
        [
            f"Test jets: {evaluated['n_jets']} ({evaluated['n_top']} top, {evaluated['n_qcd']} QCD), "
            f"bootstrap errors over {evaluated['bootstrap_replicas']} replicas.",
            "",
            "| | ResNet-50 | jet-mass window |",
            "|---|---|---|",
            row("test AUC", "auc"),
            row(f"1/εB at εS = {REPORTED_EFFICIENCY}", f"rejection_{REPORTED_EFFICIENCY}"),
            "",
            f"Images: {image.image_size}×{image.image_size}, {tagger.in_channels} channel(s); {options}.",
            "",
            f"Dataset: {dataset.get('source') or 'unknown'}; {dataset.get('n_jets', 0)} training and validation "
            f"jets, {evaluated['n_jets']} test jets (split seed {dataset.get('split_seed', 0)}); "
            f"SHA-256 {dataset.get('dataset_sha256') or 'unknown'}.",
            "",
            f"MLflow run {run_id}, pipeline run {pipeline_run_id}.",
        ]
    )

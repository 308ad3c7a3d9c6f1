"""The exported package: ``plan.json`` (the layer plan) plus one safetensors file per precision.

Pickle-free and self-describing, so that the engine (or an FPGA toolchain) can check a package
before it touches a device: every layer op is known, every tensor the plan names exists with the
right dtype and shape, and each weights file still has the sha256 the plan recorded for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fpga_runtime.errors import PackageError, PrecisionError, UnsupportedLayerError
from fpga_runtime.quantize import BFP_BLOCK, PRECISIONS

PLAN_FORMAT = "toptagger-opencl-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
LAYER_OPS = ("conv", "maxpool", "global_avgpool", "linear")


def weights_file(precision: str) -> str:
    return f"weights-{precision}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_tensors(layer: dict[str, Any], precision: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) that ``layer`` needs in the weights file of ``precision``."""
    name = layer["name"]
    if layer["op"] == "linear":
        out, inp = layer["out_features"], layer["in_features"]
        # The 2x2048 head stays fp32 in every mode: it is 0.02% of the weights.
        return {f"{name}.weight": ("float32", (out, inp)), f"{name}.bias": ("float32", (out,))}
    if layer["op"] != "conv":
        return {}
    kh, kw = layer["kernel"]
    cout, cin = layer["cout"], layer["cin"]
    ohwi = (cout, kh, kw, cin)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {f"{name}.bias": ("float32", (cout,))}
    if precision == "fp32":
        tensors[f"{name}.weight"] = ("float32", ohwi)
    elif precision == "fp16":
        tensors[f"{name}.weight"] = ("float16", ohwi)
    elif precision == "int8":
        tensors[f"{name}.weight_q"] = ("int8", ohwi)
        tensors[f"{name}.weight_scale"] = ("float32", (cout,))
    elif precision == "bfp8":
        k = kh * kw * cin
        tensors[f"{name}.mantissa"] = ("int8", (cout, k))
        tensors[f"{name}.exponent"] = ("int8", (cout, -(-k // BFP_BLOCK)))
    return tensors


def write_package(out_dir: Path, plan: dict[str, Any], weights: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write ``plan`` and one weights file per precision into ``out_dir``; records their sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = dict(plan)
    plan["precisions"] = {p: dict(v) for p, v in plan["precisions"].items()}
    for precision, tensors in weights.items():
        path = out_dir / weights_file(precision)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        plan["precisions"][precision]["weights"] = path.name
        plan["precisions"][precision]["sha256"] = sha256_file(path)
        plan["precisions"][precision]["bytes"] = path.stat().st_size
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    return out_dir


@dataclass
class Package:
    """A validated package directory; weights are read lazily per precision."""

    path: Path
    plan: dict[str, Any]

    @property
    def precisions(self) -> list[str]:
        return list(self.plan["precisions"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.plan["layers"]

    def input_shape(self) -> tuple[int, int, int]:
        spec = self.plan["input"]
        return int(spec["channels"]), int(spec["height"]), int(spec["width"])

    def weights(self, precision: str) -> dict[str, np.ndarray]:
        """Load and check the weights of ``precision`` against the plan."""
        if precision not in self.plan["precisions"]:
            raise PrecisionError(
                f"package {self.path} was exported without precision {precision!r}; "
                f"it holds {', '.join(self.precisions)} (re-export with --precision {precision})"
            )
        meta = self.plan["precisions"][precision]
        path = self.path / meta["weights"]
        if not path.is_file():
            raise PackageError(f"package {self.path}: plan names {meta['weights']} but the file is missing")
        if sha256_file(path) != meta["sha256"]:
            raise PackageError(
                f"package {self.path}: {path.name} does not match the sha256 recorded in {PLAN_FILE}; "
                "plan and weights come from different exports"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise PackageError(f"package {self.path}: cannot read {path.name}: {exc}") from None
        expected: dict[str, tuple[str, tuple[int, ...]]] = {}
        for layer in self.layers:
            expected.update(expected_tensors(layer, precision))
        for name, (dtype, shape) in expected.items():
            if name not in tensors:
                raise PackageError(f"package {self.path}: plan needs tensor {name!r}, absent from {path.name}")
            got = tensors[name]
            if str(got.dtype) != dtype or tuple(got.shape) != shape:
                raise PackageError(
                    f"package {self.path}: tensor {name!r} in {path.name} is {got.dtype}{list(got.shape)}, "
                    f"the plan expects {dtype}{list(shape)}"
                )
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise PackageError(f"package {self.path}: {path.name} holds tensors the plan does not use: {extra[:5]}")
        return tensors


def _check_plan(path: Path, plan: Any) -> None:
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise PackageError(f"{path / PLAN_FILE} is not a {PLAN_FORMAT} file")
    if plan.get("version") != PLAN_VERSION:
        raise PackageError(f"{path / PLAN_FILE} has version {plan.get('version')}, this engine reads {PLAN_VERSION}")
    for key in ("input", "layers", "precisions", "output"):
        if key not in plan:
            raise PackageError(f"{path / PLAN_FILE} lacks the key {key!r}")
    unknown = [p for p in plan["precisions"] if p not in PRECISIONS]
    if unknown:
        raise PrecisionError(f"{path / PLAN_FILE} names unknown precision(s) {unknown}; known: {PRECISIONS}")
    known = {"input"}
    for i, layer in enumerate(plan["layers"]):
        op = layer.get("op")
        if op not in LAYER_OPS:
            raise UnsupportedLayerError(
                f"{path / PLAN_FILE}: layer {i} ({layer.get('name', '?')}) has op {op!r}; "
                f"this engine runs {', '.join(LAYER_OPS)}"
            )
        needed = [layer.get("input"), *([layer["residual"]] if layer.get("residual") else [])]
        missing = [t for t in needed if t not in known]
        if missing:
            raise PackageError(f"{path / PLAN_FILE}: layer {layer.get('name')} reads {missing} before they are written")
        known.add(layer["output"])
    if plan["output"] not in known:
        raise PackageError(f"{path / PLAN_FILE}: output tensor {plan['output']!r} is never written")


def load_package(path: str | Path) -> Package:
    """Open and validate the plan of the package directory ``path`` (weights are checked on use)."""
    path = Path(path)
    plan_path = path / PLAN_FILE
    if not plan_path.is_file():
        raise PackageError(f"{path} is not an exported package: {PLAN_FILE} is missing")
    try:
        plan = json.loads(plan_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{plan_path} is not valid JSON: {exc}") from None
    _check_plan(path, plan)
    return Package(path=path, plan=plan)

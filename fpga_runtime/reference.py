"""A torch (float64) interpreter of a package plan that emulates each precision's arithmetic.

It is the yardstick for the OpenCL kernels: int8 and bfp8 results must match it to rounding noise,
which tests the integer and block-float paths much harder than comparing them with fp32 would.
Export also uses it to calibrate the int8 activation scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fpga_runtime import quantize


def conv_weight(layer: dict[str, Any], weights: dict[str, np.ndarray], precision: str) -> torch.Tensor:
    """OIHW float64 weights of a conv layer as the engine sees them (int8: the integers)."""
    name = layer["name"]
    kh, kw = layer["kernel"]
    if precision == "int8":
        w = weights[f"{name}.weight_q"].astype(np.float64)
    elif precision == "bfp8":
        w = quantize.bfp8_decode(weights[f"{name}.mantissa"], weights[f"{name}.exponent"])
        w = w.reshape(layer["cout"], kh, kw, layer["cin"]).astype(np.float64)
    else:
        w = weights[f"{name}.weight"].astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(w)).permute(0, 3, 1, 2)


def run_reference(
    plan: dict[str, Any],
    weights: dict[str, np.ndarray],
    precision: str,
    images: np.ndarray,
    record: dict[str, list[torch.Tensor]] | None = None,
) -> np.ndarray:
    """Logits (float64 [N, classes]) of ``images`` (float32 NCHW) through the plan.

    With ``record`` given, appends every conv input tensor (by plan tensor name) to it.
    """
    scales = plan["precisions"].get(precision, {}).get("activation_scales", {})
    half = precision == "fp16"

    def store(t: torch.Tensor) -> torch.Tensor:
        # fp16 mode keeps activations in half between layers.
        return t.half().double() if half else t

    env = {"input": store(torch.from_numpy(np.asarray(images, dtype=np.float32)).double())}
    with torch.no_grad():
        for layer in plan["layers"]:
            x = env[layer["input"]]
            op = layer["op"]
            if op == "conv":
                name = layer["name"]
                if record is not None:
                    record.setdefault(layer["input"], []).append(x.float())
                w = conv_weight(layer, weights, precision)
                bias = torch.from_numpy(weights[f"{name}.bias"].astype(np.float64))
                if precision == "int8":
                    s = scales[layer["input"]]
                    acc = F.conv2d(quantize.int8_round_tensor(x, s), w, None, layer["stride"], layer["padding"])
                    wscale = torch.from_numpy(weights[f"{name}.weight_scale"].astype(np.float64))
                    y = acc * (s * wscale)[None, :, None, None] + bias[None, :, None, None]
                else:
                    xin = quantize.bfp8_round_channels(x) if precision == "bfp8" else x
                    y = F.conv2d(xin, w, bias, layer["stride"], layer["padding"])
                if layer.get("residual"):
                    y = y + env[layer["residual"]]
                if layer["relu"]:
                    y = torch.relu(y)
                env[layer["output"]] = store(y)
            elif op == "maxpool":
                env[layer["output"]] = F.max_pool2d(x, layer["kernel"], layer["stride"], layer["padding"])
            elif op == "global_avgpool":
                env[layer["output"]] = x.mean(dim=(2, 3))
            elif op == "linear":
                w = torch.from_numpy(weights[f"{layer['name']}.weight"].astype(np.float64))
                b = torch.from_numpy(weights[f"{layer['name']}.bias"].astype(np.float64))
                env[layer["output"]] = x @ w.T + b
    return env[plan["output"]].numpy()

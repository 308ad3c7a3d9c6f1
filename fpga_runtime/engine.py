"""The OpenCL inference engine: loads a package and runs batches of jet images on one device.

    engine = Engine.from_package("pkg/", precision="int8")
    probs = engine.predict(images)        # float32 [N, C, S, S] -> float32 [N, 2] (qcd, top)

Per batch size the engine lays out the whole network once: device buffers (reused between tensors
whose lifetimes do not overlap), one kernel object per step with its arguments bound, and launch
sizes. A forward pass is then one upload, a run of enqueues on one in-order queue, and one download.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl

from fpga_runtime import isolation, quantize
from fpga_runtime import program as prog
from fpga_runtime.devices import select_device
from fpga_runtime.errors import InputError, PackageError, PrecisionError, UnsupportedLayerError
from fpga_runtime.package import Package, load_package

MAX_CACHED_BATCH_SIZES = 8


@dataclass
class Step:
    """One kernel launch of the forward pass."""

    layer: str
    kind: str
    kernel: cl.Kernel
    global_size: tuple[int, ...]
    local_size: tuple[int, ...] | None
    flops: int


@dataclass
class BatchPlan:
    """Buffers and bound kernels of one batch size."""

    batch: int
    steps: list[Step]
    input_buf: cl.Buffer
    output_buf: cl.Buffer
    output_shape: tuple[int, int]
    buffers: list[cl.Buffer] = field(default_factory=list)
    tensors: dict[str, cl.Buffer] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        return sum(b.size for b in self.buffers)


@dataclass
class LayerTime:
    layer: str
    kind: str
    seconds: float
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 and self.flops else 0.0


def _shape_out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def _local(global_size: int, want: int) -> int:
    """Largest divisor of ``global_size`` that is <= ``want``."""
    for d in range(min(want, global_size), 0, -1):
        if global_size % d == 0:
            return d
    return 1


class Engine:
    """Runs an exported package on one OpenCL device (see module docstring)."""

    def __init__(
        self,
        package: Package,
        *,
        device: str | None = None,
        device_type: str | None = None,
        precision: str | None = None,
        max_batch_size: int = 64,
        tiles: prog.Tiles | None = None,
        binary_dir: str | Path | None = None,
        use_binary: bool | None = None,
        probe: bool = True,
        allow_fp16_emulation: bool = False,
    ) -> None:
        self.package = package
        self.precision = precision or ("fp32" if "fp32" in package.precisions else package.precisions[0])
        if self.precision not in quantize.PRECISIONS:
            raise PrecisionError(f"unknown precision {self.precision!r}; choose from {', '.join(quantize.PRECISIONS)}")
        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.info, self.device = select_device(device, device_type)
        self._check_precision(allow_fp16_emulation)
        weights = package.weights(self.precision)  # validates plan against weights before any device work
        self.tiles = tiles or prog.default_tiles(self.info)
        self.options = prog.build_options(self.precision, self.tiles, self.info)
        self.shapes = self._infer_shapes()
        if use_binary is None:
            # FPGAs cannot compile OpenCL C at run time; everything else builds from source.
            use_binary = self.info.kind == "ACCELERATOR"
        self.binary_dir = Path(binary_dir) if binary_dir is not None else package.path / "binaries"
        self.from_binary = use_binary
        if probe:
            isolation.probe_engine_kernels(
                self.info, self.precision, self.tiles, self.binary_dir if use_binary else None
            )
        self.ctx = prog.shared_context(self.device)
        if use_binary:
            self.program = prog.load_binary(self.ctx, self.device, self.binary_dir, self.precision, self.options)
        else:
            self.program = prog.build_from_source(self.ctx, self.device, self.options)
        self.queue = cl.CommandQueue(self.ctx, self.device, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self._weights = self._upload_weights(weights)
        self._plans: OrderedDict[int, BatchPlan] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_package(
        cls, path: str | Path, device: str | None = None, precision: str | None = None, **kwargs: Any
    ) -> Engine:
        """Open the package directory ``path`` and set the engine up on ``device`` (name pin or auto)."""
        return cls(load_package(path), device=device, precision=precision, **kwargs)

    # ---- public API -------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of one image."""
        return self.package.input_shape()

    @property
    def classes(self) -> list[str] | None:
        return self.package.plan.get("classes")

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, classes] logits of float32 images [N, C, S, S] (any N, split by max_batch_size)."""
        x = self._check_input(images)
        outs = [self._forward(x[i : i + self.max_batch_size])[0] for i in range(0, len(x), self.max_batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, self._n_out()), np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, classes] softmax probabilities (columns in :attr:`classes` order: qcd, top)."""
        z = self.logits(images).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def profile(self, images: np.ndarray) -> list[LayerTime]:
        """Per-layer device time of one forward pass of ``images`` (at most max_batch_size), from
        OpenCL profiling events; quantisation steps count toward the layer they feed."""
        x = self._check_input(images)
        if len(x) > self.max_batch_size:
            raise InputError(f"profile takes at most max_batch_size={self.max_batch_size} images, got {len(x)}")
        _, events, plan = self._forward(x, keep_events=True)
        table: OrderedDict[str, LayerTime] = OrderedDict()
        for step, ev in zip(plan.steps, events, strict=True):
            seconds = (ev.profile.end - ev.profile.start) * 1e-9
            row = table.setdefault(step.layer, LayerTime(step.layer, step.kind, 0.0, 0))
            row.seconds += seconds
            row.flops += step.flops
            if step.kind != "quantize":
                row.kind = step.kind
        return list(table.values())

    def save_binary(self, directory: str | Path | None = None) -> Path:
        """Save this engine's compiled program (for this device and precision) for the binary-load path."""
        return prog.save_binary(self.program, self.device, directory or self.binary_dir, self.precision, self.options)

    def device_bytes(self, batch: int) -> int:
        """Device memory of activations for ``batch`` images (weights not included)."""
        return self._batch_plan(batch).device_bytes

    # ---- set-up -----------------------------------------------------------------------------

    def _check_precision(self, allow_fp16_emulation: bool) -> None:
        if self.precision == "fp16" and not self.info.fp16 and not allow_fp16_emulation:
            raise PrecisionError(
                f"precision fp16 needs cl_khr_fp16, which device {self.info.label()} does not report; "
                "use fp32, int8 or bfp8 here (allow_fp16_emulation=True runs half storage with fp32 "
                "arithmetic, for testing the fp16 data path only)"
            )

    def _infer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shapes (H, W, C) or (C,) of every tensor; checks that the plan is consistent."""
        c, h, w = self.input_shape
        shapes: dict[str, tuple[int, ...]] = {"input": (h, w, c)}
        vw = self.tiles.vw
        for layer in self.package.layers:
            src = shapes[layer["input"]]
            name, op = layer["name"], layer["op"]
            if op in ("conv", "maxpool") and len(src) != 3:
                raise PackageError(f"layer {name} ({op}) needs an image tensor, its input has shape {src}")
            if op == "conv":
                if src[2] != layer["cin"]:
                    raise PackageError(f"layer {name} expects {layer['cin']} input channels, gets {src[2]}")
                if layer["cout"] % vw:
                    raise UnsupportedLayerError(
                        f"layer {name} has {layer['cout']} output channels; "
                        f"this device's kernels need a multiple of {vw}"
                    )
                kh, kw = layer["kernel"]
                s, p = layer["stride"], layer["padding"]
                out: tuple[int, ...] = (_shape_out(src[0], kh, s, p), _shape_out(src[1], kw, s, p), layer["cout"])
                if min(out[:2]) < 1:
                    raise InputError(f"image size {h}x{w} is too small for layer {name}")
                res = layer.get("residual")
                if res and shapes[res] != out:
                    raise PackageError(f"layer {name} adds residual {res} of shape {shapes[res]} to output {out}")
            elif op == "maxpool":
                k, s, p = layer["kernel"], layer["stride"], layer["padding"]
                out = (_shape_out(src[0], k, s, p), _shape_out(src[1], k, s, p), src[2])
            elif op == "global_avgpool":
                out = (src[2],)
            elif op == "linear":
                if src != (layer["in_features"],):
                    raise PackageError(f"layer {name} expects {layer['in_features']} features, gets shape {src}")
                out = (layer["out_features"],)
            else:  # load_package already rejects these; kept for plans built in memory
                raise UnsupportedLayerError(f"layer {name} has unsupported op {op!r}")
            shapes[layer["output"]] = out
        return shapes

    def _n_out(self) -> int:
        return int(self.shapes[self.package.plan["output"]][0])

    def _buffer(self, array: np.ndarray) -> cl.Buffer:
        return cl.Buffer(
            self.ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(array)
        )

    def _upload_weights(self, weights: dict[str, np.ndarray]) -> dict[str, cl.Buffer]:
        vw = self.tiles.vw
        bufs: dict[str, cl.Buffer] = {}
        scales = self.package.plan["precisions"][self.precision].get("activation_scales", {})
        max_cin = 1
        for layer in self.package.layers:
            name = layer["name"]
            if layer["op"] == "linear":
                bufs[f"{name}.weight"] = self._buffer(weights[f"{name}.weight"])
                bufs[f"{name}.bias"] = self._buffer(weights[f"{name}.bias"])
            if layer["op"] != "conv":
                continue
            cout = layer["cout"]
            max_cin = max(max_cin, layer["cin"])
            if self.precision == "int8":
                w = weights[f"{name}.weight_q"]
                if layer["input"] not in scales:
                    raise PackageError(f"int8 plan has no activation scale for {layer['input']} (input of {name})")
                dequant = scales[layer["input"]] * weights[f"{name}.weight_scale"].astype(np.float64)
                bufs[f"{name}.scale"] = self._buffer(dequant.astype(np.float32))
            elif self.precision == "bfp8":
                w = quantize.bfp8_decode(weights[f"{name}.mantissa"], weights[f"{name}.exponent"])
            else:
                w = weights[f"{name}.weight"]
            # [Cout, K] -> panels [Cout/VW, K, VW]: one contiguous vector load per reduction step.
            w = w.reshape(cout // vw, vw, -1).transpose(0, 2, 1)
            bufs[f"{name}.packed"] = self._buffer(w)
            bufs[f"{name}.bias"] = self._buffer(weights[f"{name}.bias"])
        bufs["zeros"] = self._buffer(np.zeros(max_cin, np.float32))
        return bufs

    # ---- per-batch layout -------------------------------------------------------------------

    def _act_itemsize(self) -> int:
        return 2 if self.precision == "fp16" else 4

    def _batch_plan(self, n: int) -> BatchPlan:
        if n in self._plans:
            self._plans.move_to_end(n)
            return self._plans[n]
        plan = self._layout(n)
        self._plans[n] = plan
        while len(self._plans) > MAX_CACHED_BATCH_SIZES:
            self._plans.popitem(last=False)
        return plan

    def _layout(self, n: int, recycle: bool = True) -> BatchPlan:
        """Bind kernels and buffers for batch size ``n``; ``recycle=False`` keeps every tensor."""
        layers = self.package.layers
        scales = self.package.plan["precisions"][self.precision].get("activation_scales", {})
        # Tensors each layer reads, including the quantised copy an int8/bfp8 conv reads instead.
        quant_prefix = {"int8": "q:", "bfp8": "b:"}.get(self.precision)
        ops: list[tuple[str, dict[str, Any], list[str], str]] = []  # (kind, layer, reads, writes)
        made: set[str] = set()
        for layer in layers:
            src = layer["input"]
            if layer["op"] == "conv" and quant_prefix:
                qname = quant_prefix + src
                if qname not in made:
                    ops.append(("quantize", layer, [src], qname))
                    made.add(qname)
                src = qname
            reads = [src] + ([layer["residual"]] if layer.get("residual") else [])
            ops.append((layer["op"], layer, reads, layer["output"]))
        last_use: dict[str, int] = {}
        for i, (_, _, reads, _) in enumerate(ops):
            for t in reads:
                last_use[t] = i
        out_name = self.package.plan["output"]

        def nbytes(t: str) -> int:
            base = t.split(":", 1)[-1]
            count = n * int(np.prod(self.shapes[base]))
            if t.startswith("q:"):
                return count
            if t.startswith("b:") or len(self.shapes[base]) == 1 or (base == "input" and self.precision != "fp16"):
                return count * 4
            return count * self._act_itemsize()

        free: list[cl.Buffer] = []
        allocated: list[cl.Buffer] = []
        where: dict[str, cl.Buffer] = {}

        def alloc(t: str) -> cl.Buffer:
            size = nbytes(t)
            fits = sorted((b for b in free if b.size >= size), key=lambda b: b.size)
            if fits:
                free.remove(fits[0])
                return fits[0]
            buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, size)
            allocated.append(buf)
            return buf

        where["input"] = alloc("input")
        steps: list[Step] = []
        for i, (kind, layer, reads, out) in enumerate(ops):
            where[out] = alloc(out)
            steps.append(self._step(n, kind, layer, [where[t] for t in reads], where[out], scales, reads))
            for t in reads:
                # The final logits and the input upload buffer are never recycled.
                if recycle and last_use.get(t) == i and t not in (out_name, "input"):
                    free.append(where[t])
        return BatchPlan(
            batch=n,
            steps=steps,
            input_buf=where["input"],
            output_buf=where[out_name],
            output_shape=(n, self._n_out()),
            buffers=allocated,
            tensors=where,
        )

    def _kernel(self, name: str, *args: Any) -> cl.Kernel:
        k = cl.Kernel(self.program, name)
        k.set_args(*args)
        return k

    def _step(
        self,
        n: int,
        kind: str,
        layer: dict[str, Any],
        ins: list[cl.Buffer],
        out: cl.Buffer,
        scales: dict[str, float],
        reads: list[str],
    ) -> Step:
        i32 = np.int32
        name = layer["name"]
        fpga = self.info.kind == "ACCELERATOR"
        if kind == "quantize":
            h, w, c = self.shapes[layer["input"]]
            if self.precision == "int8":
                inv = np.float32(1.0 / scales[layer["input"]])
                k = self._kernel("quantize_int8", ins[0], out, inv)
                g: tuple[int, ...] = (n * h * w * c,)
            else:
                k = self._kernel("bfp8_round", ins[0], out, i32(c), i32(quantize.BFP_BLOCK))
                g = (n * h * w, -(-c // quantize.BFP_BLOCK))
            return Step(name, "quantize", k, g, (1,) * len(g) if fpga else None, 0)
        if kind == "conv":
            h, w, cin = self.shapes[layer["input"]]
            oh, ow, cout = self.shapes[layer["output"]]
            kh, kw = layer["kernel"]
            m = n * oh * ow
            res = ins[1] if layer.get("residual") else out  # unused when the flag is off
            scale = self._weights.get(f"{name}.scale", self._weights[f"{name}.bias"])
            flags = (1 if layer.get("residual") else 0) | (2 if layer["relu"] else 0)
            k = self._kernel(
                "conv_gemm",
                ins[0],
                self._weights[f"{name}.packed"],
                self._weights[f"{name}.bias"],
                scale,
                res,
                out,
                self._weights["zeros"],
                *(i32(v) for v in (h, w, cin, oh, ow, cout, kh, kw, layer["stride"], layer["padding"], m, flags)),
            )
            t = self.tiles
            rows = -(-m // t.mr)
            lr = min(t.wg_rows, rows)
            rows = -(-rows // lr) * lr  # padded rows return early in the kernel
            panels = cout // t.vw
            flops = 2 * m * cout * kh * kw * cin
            return Step(name, "conv", k, (rows, panels), (lr, _local(panels, t.wg_panels)), flops)
        if kind == "maxpool":
            h, w, c = self.shapes[layer["input"]]
            oh, ow, _ = self.shapes[layer["output"]]
            k = self._kernel(
                "maxpool",
                ins[0],
                out,
                *(i32(v) for v in (h, w, c, oh, ow, layer["kernel"], layer["stride"], layer["padding"])),
            )
            return Step(name, "maxpool", k, (n * oh * ow, c), (1, 1) if fpga else None, 0)
        if kind == "global_avgpool":
            h, w, c = self.shapes[layer["input"]]
            k = self._kernel("global_avgpool", ins[0], out, i32(h * w), i32(c))
            return Step(name, "avgpool", k, (n, c), (1, 1) if fpga else None, n * h * w * c)
        if kind == "linear":
            c, j = layer["in_features"], layer["out_features"]
            k = self._kernel(
                "linear", ins[0], self._weights[f"{name}.weight"], self._weights[f"{name}.bias"], out, i32(c), i32(j)
            )
            return Step(name, "linear", k, (n, j), (1, 1) if fpga else None, 2 * n * c * j)
        raise UnsupportedLayerError(f"layer {name} has unsupported op {kind!r} (reads {reads})")

    # ---- running ----------------------------------------------------------------------------

    def _check_input(self, images: Any) -> np.ndarray:
        if not isinstance(images, np.ndarray):
            raise InputError(f"images must be a numpy array, got {type(images).__name__}")
        if not np.issubdtype(images.dtype, np.floating):
            raise InputError(f"images must be floating point (float32), got dtype {images.dtype}")
        shape = self.input_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            want = f"[N, {shape[0]}, {shape[1]}, {shape[2]}]"
            raise InputError(f"images must have shape {want}, got {list(images.shape)}")
        if not np.isfinite(images).all():
            raise InputError("images contain NaN or infinite values")
        return images.astype(np.float32, copy=False)

    def intermediates(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every plan tensor of one forward pass (NCHW float32 for images), for layer-by-layer checks.
        Uses a separate layout without buffer reuse, so it costs more device memory than logits()."""
        x = self._check_input(images)
        with self._lock:
            plan = self._layout(len(x), recycle=False)
        self._forward(x, plan=plan)
        out = {}
        for name, shape in self.shapes.items():
            half = self.precision == "fp16" and len(shape) == 3
            host = np.empty((len(x), *shape), np.float16 if half else np.float32)
            cl.enqueue_copy(self.queue, host, plan.tensors[name], is_blocking=True)
            host = host.astype(np.float32)
            out[name] = host.transpose(0, 3, 1, 2) if host.ndim == 4 else host
        return out

    def _forward(
        self, x: np.ndarray, keep_events: bool = False, plan: BatchPlan | None = None
    ) -> tuple[np.ndarray, list[cl.Event], BatchPlan]:
        with self._lock:
            plan = plan or self._batch_plan(len(x))
            host = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
            if self.precision == "fp16":
                host = host.astype(np.float16)
            cl.enqueue_copy(self.queue, plan.input_buf, host, is_blocking=False)
            events = [cl.enqueue_nd_range_kernel(self.queue, s.kernel, s.global_size, s.local_size) for s in plan.steps]
            out = np.empty(plan.output_shape, np.float32)
            cl.enqueue_copy(self.queue, out, plan.output_buf, is_blocking=True)
            if not keep_events:
                events = []
            return out, events, plan

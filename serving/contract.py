"""The checks every request goes through, against the served tensors of :mod:`toptagger.signature`.

Inputs (one per request, FP32): ``images`` ``[N, C, S, S]`` at the model's size, where C is the
model's channel count (3 for the paper's ResNet-50, whose CMSSW producer sends three copies) and
one channel is accepted too, since the network expands it itself; or ``constituents``
``[N, 200, 4]``, which the server renders with the same :func:`toptagger.images.jet_images`
configuration as training (3.2 kB per jet instead of 602 kB for a 224x224x3 image).
Output: ``probabilities``, FP32 ``[N, 2]``, columns (qcd, top).

Constituents must also be physical (:func:`toptagger.jets.kinematics.first_unphysical`): no
all-zero jet, no negative energy, no E < |p| beyond float32 rounding; zero rows are padding.

Every violation raises :class:`kserve.errors.InvalidInput`, which KServe answers with HTTP 400 and
gRPC INVALID_ARGUMENT, with a message that says what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferRequest

from toptagger.images import MAX_MOMENTUM_GEV
from toptagger.jets.kinematics import first_unphysical
from toptagger.signature import CONSTITUENTS, DATATYPE, IMAGES, Signature, TensorSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Contract:
    """What one served model accepts and returns."""

    channels: int
    image_size: int
    max_batch_size: int

    @cached_property
    def signature(self) -> Signature:
        return Signature(self.channels, self.image_size)

    @property
    def inputs(self) -> tuple[TensorSpec, TensorSpec]:
        return self.signature.inputs

    @property
    def outputs(self) -> tuple[TensorSpec]:
        return self.signature.outputs

    def parse(self, request: InferRequest) -> tuple[str, np.ndarray]:
        """Validate a decoded v2 request (REST, through KServe); return the input's name and array."""
        tensor = _single_input(request.inputs)
        shape = self.check_header(tensor.name, tensor.datatype, tensor.shape)
        try:
            array = tensor.as_numpy()
        except InvalidInput:
            raise
        except Exception as exc:  # byte length vs shape mismatches surface here in many forms
            raise InvalidInput(f"input '{tensor.name}': data does not match shape {shape} ({exc})") from None
        return tensor.name, self._check_data(tensor.name, array, shape)

    def parse_grpc(self, request: pb.ModelInferRequest) -> tuple[str, np.ndarray]:
        """Validate a gRPC ``ModelInferRequest`` as it came off the wire (raw or typed contents)."""
        tensor = _single_input(request.inputs)
        shape = self.check_header(tensor.name, tensor.datatype, tensor.shape)
        count = math.prod(shape)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
                raise InvalidInput(
                    f"send the data of input '{tensor.name}' once: one raw_input_contents entry, and no contents"
                )
            raw = request.raw_input_contents[0]
            if len(raw) != 4 * count:
                raise InvalidInput(
                    f"input '{tensor.name}': {len(raw)} bytes of data, but {DATATYPE} {shape} needs {4 * count}"
                )
            array = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                message = f"input '{tensor.name}': {len(values)} fp32_contents values, but {shape} needs {count}"
                raise InvalidInput(message)
            array = np.asarray(values, dtype=np.float32).reshape(shape)
        return tensor.name, self._check_data(tensor.name, array, shape)

    @cached_property
    def _input_specs(self) -> dict[str, TensorSpec]:  # looked up on every request
        return {spec.name: spec for spec in self.inputs}

    def check_header(self, name: str, datatype: str, dims: Iterable[int]) -> list[int]:
        """Check name, datatype and shape against the contract; return the shape.

        Needs no tensor data, so a request can be refused from its header alone.
        """
        spec = self._input_specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input '{name}'; expected '{IMAGES}' or '{CONSTITUENTS}'")
        if datatype != DATATYPE:
            raise InvalidInput(f"input '{name}' must be {DATATYPE}, got {datatype}")
        shape = [int(d) for d in dims]
        expected = [-1, *spec.dims]
        if name == IMAGES and len(shape) == 4 and shape[1] == 1:
            expected[1] = 1  # a single channel is always fine
        if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected, strict=True)):
            raise InvalidInput(f"input '{name}' must have shape {expected} (-1 = batch), got {shape}")
        if shape[0] == 0:
            raise InvalidInput(f"input '{name}' has an empty batch")
        if shape[0] < 0:  # -1 stands for "any batch" in metadata, never in a request
            raise InvalidInput(f"input '{name}' has batch dimension {shape[0]} in shape {shape}: send the row count")
        if shape[0] > self.max_batch_size:
            raise InvalidInput(f"batch of {shape[0]} exceeds the maximum batch size {self.max_batch_size}")
        return shape

    @staticmethod
    def _check_data(name: str, array: np.ndarray, shape: list[int]) -> np.ndarray:
        if array.dtype != np.float32 or list(array.shape) != shape:
            raise InvalidInput(f"input '{name}': data does not match FP32 {shape}")
        if not np.isfinite(array).all():
            raise InvalidInput(f"input '{name}' contains NaN or Inf")
        # Checked per request, not only when the merged batch is rendered: one bad request must
        # not fail the others it would be batched with.
        if name == CONSTITUENTS and max(float(array.max()), -float(array.min())) > MAX_MOMENTUM_GEV:
            raise InvalidInput(
                f"input '{name}' holds momenta beyond {MAX_MOMENTUM_GEV:.0e} GeV, whose squares overflow float32"
            )
        if name == CONSTITUENTS and (found := first_unphysical(array)) is not None:
            jet, constituent, what = found  # a score for something that is not a jet would mislead
            where = f"jet {jet}" if constituent < 0 else f"jet {jet}, constituent {constituent},"
            raise InvalidInput(f"input '{name}': {where} {what}")
        return array


def _single_input(inputs: Sequence[T]) -> T:
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise InvalidInput(f"send exactly one input, '{IMAGES}' or '{CONSTITUENTS}'; got {len(names)}: {names}")
    return inputs[0]

"""The served tensors of a tagger, defined once: what the predictor checks and the registry records.

Inputs (one per request, FP32):
- ``images``: ``[N, C, S, S]`` jet images at the model's size and channel count;
- ``constituents``: ``[N, 200, 4]`` (E, px, py, pz) four-vectors, rendered by the server with the
  model's own image configuration.

Output: ``probabilities``, FP32 ``[N, 2]``, columns (qcd, top).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toptagger.constants import FOUR_VECTOR, N_CONSTITUENTS

IMAGES, CONSTITUENTS, PROBABILITIES = "images", "constituents", "probabilities"
CLASSES = ("qcd", "top")
DATATYPE = "FP32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = any size
    columns: tuple[str, ...] | None = None  # what the last axis holds, where it is named

    def as_v2(self) -> dict[str, Any]:
        """The Open Inference Protocol's tensor metadata (batch dimension -1)."""
        return {"name": self.name, "datatype": DATATYPE, "shape": [-1, *self.dims]}

    def to_dict(self) -> dict[str, Any]:
        """:meth:`as_v2` plus the column names."""
        return self.as_v2() | ({"columns": list(self.columns)} if self.columns else {})


@dataclass(frozen=True)
class Signature:
    """The tensors a tagger with ``channels`` x ``image_size``² images takes and returns."""

    channels: int
    image_size: int

    @classmethod
    def of(cls, tagger: Any) -> Signature:
        """The signature of a :class:`toptagger.model.TaggerConfig`."""
        return cls(tagger.in_channels, tagger.image.image_size)

    @property
    def inputs(self) -> tuple[TensorSpec, TensorSpec]:
        return (
            TensorSpec(IMAGES, (self.channels, self.image_size, self.image_size)),
            TensorSpec(CONSTITUENTS, (N_CONSTITUENTS, len(FOUR_VECTOR)), FOUR_VECTOR),
        )

    @property
    def outputs(self) -> tuple[TensorSpec]:
        return (TensorSpec(PROBABILITIES, (len(CLASSES),), CLASSES),)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

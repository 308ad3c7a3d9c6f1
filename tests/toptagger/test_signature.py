"""The served tensors, defined once: their shapes follow the tagger, and the recorded form names columns."""

from __future__ import annotations

from toptagger.constants import N_CONSTITUENTS
from toptagger.images import ImageConfig
from toptagger.model import TaggerConfig
from toptagger.signature import CLASSES, CONSTITUENTS, IMAGES, PROBABILITIES, Signature


def test_shapes_follow_the_tagger_and_the_batch_dimension_is_free() -> None:
    signature = Signature.of(TaggerConfig(image=ImageConfig(image_size=40), in_channels=1))
    images, constituents = signature.inputs
    assert images.as_v2() == {"name": IMAGES, "datatype": "FP32", "shape": [-1, 1, 40, 40]}
    assert constituents.as_v2() == {"name": CONSTITUENTS, "datatype": "FP32", "shape": [-1, N_CONSTITUENTS, 4]}
    assert [o.as_v2()["shape"] for o in signature.outputs] == [[-1, len(CLASSES)]]


def test_the_recorded_signature_names_the_columns() -> None:
    recorded = Signature(3, 64).to_dict()
    assert recorded["inputs"][1]["columns"] == ["E", "px", "py", "pz"]
    assert recorded["outputs"] == [
        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, 2], "columns": ["qcd", "top"]}
    ]
    assert "columns" not in recorded["inputs"][0]  # an image's axes are pixels, not named columns

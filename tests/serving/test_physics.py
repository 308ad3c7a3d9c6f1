"""Physically impossible jets are refused (toptagger.jets.kinematics.first_unphysical via the contract),
real generated jets pass, and client errors are logged once per (endpoint, reason) a minute."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from serving.client_errors import ClientErrorLog, reason_of
from serving.contract import Contract
from toptagger.jets.dataset import JetBatch
from toptagger.jets.kinematics import ENERGY_TOLERANCE, first_unphysical

CONTRACT = Contract(channels=1, image_size=32, max_batch_size=16)
U = 2.0**-24  # float32's unit roundoff


def grpc_request(array: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="top-tagger")
    request.inputs.add(name="constituents", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
    return request


def massless(jets: int = 3) -> np.ndarray:
    """``jets`` jets of 20 massless constituents (E = |p| in float64, then rounded), zero-padded to 200."""
    rng = np.random.default_rng(7)
    momenta = rng.normal(scale=50.0, size=(jets, 20, 3))
    out = np.zeros((jets, 200, 4), np.float32)
    out[:, :20, 0] = np.linalg.norm(momenta, axis=-1)
    out[:, :20, 1:] = momenta
    return out


def test_the_generators_real_jets_are_physical(small_jets: JetBatch) -> None:
    """Every jet Pythia + FastJet produce here passes, through the contract too (in batches of 16)."""
    constituents = small_jets.constituents
    assert first_unphysical(constituents) is None
    for start in range(0, len(constituents), 16):
        assert CONTRACT.parse_grpc(grpc_request(constituents[start : start + 16]))[0] == "constituents"
    # and they use the tolerance: massless constituents sit within a few roundings of E = |p|
    p = np.linalg.norm(constituents[..., 1:].astype(np.float64), axis=-1)
    present = p > 0
    ratio = constituents[..., 0][present] / p[present]
    assert ratio.min() >= 1 - ENERGY_TOLERANCE


def test_massless_constituents_within_float32_rounding_pass() -> None:
    jets = massless()
    assert first_unphysical(jets) is None
    jets[0, 3, 0] = np.float32(jets[0, 3, 0] * (1 - 4 * U))  # a few roundings below |p|: still massless
    assert first_unphysical(jets) is None


@pytest.mark.parametrize(
    ("jet", "constituent", "value", "message"),
    [
        (1, 4, -3.0, "jet 1, constituent 4, has negative energy E = -3 GeV"),
        (2, 0, 0.0, "jet 2, constituent 0, has E = 0 GeV below |p|"),
        (0, 19, "below", "jet 0, constituent 19, has E = "),
    ],
)
def test_impossible_constituents_are_refused_by_name(jet: int, constituent: int, value: object, message: str) -> None:
    jets = massless()
    if value == "below":  # beyond rounding: E < |p| by 2**-12, 16 times the tolerance
        jets[jet, constituent, 0] *= np.float32(1 - 2.0**-12)
    else:
        jets[jet, constituent, 0] = value
    with pytest.raises(InvalidInput, match=r"input 'constituents': " + message.replace("|", r"\|")):
        CONTRACT.parse_grpc(grpc_request(jets))


def test_an_all_zero_jet_is_refused_but_padding_inside_a_jet_is_fine() -> None:
    jets = massless()
    jets[1, 5] = 0  # a zero row inside a jet: padding, fine
    assert CONTRACT.parse_grpc(grpc_request(jets))[0] == "constituents"
    jets[2] = 0
    with pytest.raises(InvalidInput, match=r"input 'constituents': jet 2 has no constituent .*not a jet"):
        CONTRACT.parse_grpc(grpc_request(jets))


# --- rate-limited client-error log -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_client_errors_are_logged_once_per_endpoint_and_reason_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors = ClientErrorLog(logging.getLogger("test.client_errors"), clock=clock)
    caplog.set_level(logging.INFO, logger="test.client_errors")
    assert errors.record("POST /infer", "input 'x' must be FP32, got 'INT8'", status=400)
    # the same kind of mistake (names and numbers masked), same endpoint: held back
    assert not errors.record("POST /infer", "input 'y' must be FP32, got 'BOOL'", status=400)
    assert errors.record("grpc ModelInfer", "input 'y' must be FP32, got 'BOOL'")  # another endpoint
    assert errors.record("POST /infer", "send exactly one input; got 2", status=400)  # another reason
    clock.now += 61
    assert errors.record("POST /infer", "input 'z' must be FP32, got 'FP64'", status=400)
    entries = [json.loads(r.getMessage()) for r in caplog.records]
    assert len(entries) == 4
    assert entries[-1]["suppressed"] == 1 and entries[-1]["status"] == 400
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in caplog.records)


def test_the_reason_table_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.client_errors.bounded")
    clock = Clock()
    errors = ClientErrorLog(logging.getLogger("test.client_errors.bounded"), clock=clock, max_reasons=4)
    logged = [errors.record("e", f"mistake kind {chr(97 + i)}") for i in range(10)]
    assert logged == [True] * 5 + [False] * 5  # 4 reasons, then one shared "other"
    assert reason_of("input 'abc' has 12 rows, 3.5e7 bytes") == "input '…' has # rows, # bytes"

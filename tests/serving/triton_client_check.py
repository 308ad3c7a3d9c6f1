"""Runs the real Triton Python client against our server; a separate process, never with kserve.

tritonclient.grpc and kserve cannot be imported into one process (both register
``inference.ServerLiveRequest``), so the tests run this script and read its JSON answer.

    python tests/serving/triton_client_check.py HTTP_URL GRPC_URL IMAGE_SIZE CHANNELS
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf.json_format import MessageToDict

MODEL = "top-tagger"


def main() -> None:
    http_url, grpc_url, size, channels = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(5)
    images = rng.random((3, channels, size, size), dtype=np.float32)
    result: dict = {"images": images.tolist()}

    g = grpcclient.InferenceServerClient(grpc_url)
    # CMSSW's TritonService asks for the repository index first and skips a server that fails it.
    result["grpc_index"] = MessageToDict(g.get_model_repository_index(), preserving_proto_field_name=True)
    result["grpc_live"] = g.is_server_live()
    result["grpc_ready"] = g.is_model_ready(MODEL)
    result["config"] = MessageToDict(g.get_model_config(MODEL).config, preserving_proto_field_name=True)
    result["metadata"] = MessageToDict(g.get_model_metadata(MODEL), preserving_proto_field_name=True)
    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)  # raw_input_contents: the binary path SONIC uses
    answer = g.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    result["grpc_probabilities"] = answer.as_numpy("probabilities").tolist()
    result["statistics"] = MessageToDict(g.get_inference_statistics(MODEL), preserving_proto_field_name=True)
    try:
        g.get_model_config("no-such-model")
        result["unknown_model_config"] = "answered"
    except Exception as exc:  # tritonclient raises InferenceServerException
        result["unknown_model_config"] = str(exc)

    h = httpclient.InferenceServerClient(http_url)
    hin = httpclient.InferInput("images", list(images.shape), "FP32")
    hin.set_data_from_numpy(images, binary_data=True)
    hanswer = h.infer(MODEL, [hin], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)])
    result["http_probabilities"] = hanswer.as_numpy("probabilities").tolist()
    result["http_metadata"] = h.get_model_metadata(MODEL)
    result["http_index"] = h.get_model_repository_index()
    result["http_config"] = h.get_model_config(MODEL)
    result["http_statistics"] = h.get_inference_statistics(MODEL)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

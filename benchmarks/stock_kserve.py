"""The peer for benchmarks: the same model behind a *stock* KServe predictor, one call per request.

This is what a KServe user gets without this project's server: ``kserve.Model.predict`` runs the
model once per request, with no batching, and KServe's default ``ModelServer``.

    python -m benchmarks.stock_kserve --model-uri DIR --http-port 8090 --grpc-port 8091 [--backend openvino]
        [--precision int8]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stock_kserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--http-port", type=int, default=8090)
    parser.add_argument("--grpc-port", type=int, default=8091)
    parser.add_argument("--backend", default="torch", help="the runtime (serving.backends.BACKENDS)")
    parser.add_argument("--precision", default="fp32", help="the runtime's precision (int8, bf16 where admitted)")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # KServe parses sys.argv at import time

    from kserve import Model, ModelServer
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from serving.backends import load_backend
    from toptagger.constants import MODEL_NAME

    class StockTagger(Model):
        def __init__(self) -> None:
            super().__init__(MODEL_NAME)

        def load(self) -> bool:
            self.backend = load_backend(args.model_uri, args.backend, precision=args.precision)
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
            tensor = payload.inputs[0]
            array = tensor.as_numpy()
            images = self.backend.render(array) if tensor.name == "constituents" else array
            probabilities = self.backend.predict(images)
            output = InferOutput("probabilities", list(probabilities.shape), "FP32")
            output.set_data_from_numpy(np.ascontiguousarray(probabilities), binary_data=False)
            return InferResponse(
                response_id=payload.id,
                model_name=self.name,
                infer_outputs=[output],
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    model = StockTagger()
    model.load()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_latency_logging=False).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())

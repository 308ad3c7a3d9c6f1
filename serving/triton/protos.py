"""Triton's protobuf messages, loaded so that they live beside KServe's in one process.

KServe's ``grpc_predict_v2_pb2`` and tritonclient's ``service_pb2`` both define
``inference.ServerLiveRequest`` and friends, so importing ``tritonclient.grpc`` next to KServe
fails with "duplicate symbol". Two pieces do coexist:

- tritonclient's ``model_config_pb2`` (the ``ModelConfig`` message), loaded from its file path
  without running ``tritonclient.grpc/__init__``;
- our ``triton_extensions_pb2`` with the few messages KServe lacks, at Triton's field numbers.
"""

from __future__ import annotations

from serving.triton.proto import load_model_config_pb2

model_config_pb2 = load_model_config_pb2()
from serving.triton.proto import triton_extensions_pb2 as extensions_pb2  # noqa: E402  (needs the module above)

__all__ = ["extensions_pb2", "model_config_pb2"]

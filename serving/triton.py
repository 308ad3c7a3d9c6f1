"""Triton's ``ModelConfig`` and ``ModelStatistics`` RPCs, served next to KServe's servicer.

CMSSW's ``TritonClient`` (SONIC) reads ``max_batch_size`` and the tensor specs from
``ModelConfig`` in its constructor and reads ``ModelStatistics`` for its reports; stock KServe
answers both with UNIMPLEMENTED. The handlers are ``async def`` because KServe's aio exception
interceptor awaits every handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from serving.batching import BatchStatistics
from serving.triton_protos import extensions_pb2, model_config_pb2
from toptagger.constants import MODEL_VERSION

if TYPE_CHECKING:
    from serving.predictor import TopTagger

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "kserve_top_tagger"


def model_config(model: TopTagger) -> model_config_pb2.ModelConfig:
    """The model's configuration as Triton describes it (dims exclude the batch dimension)."""
    # The backend that serves, not the one asked for: after a fallback (--fallback torch on a node
    # whose FPGA is missing) clients and operators see the truth here.
    backend = model.backend.kind if model.backend is not None else model.backend_name
    config = model_config_pb2.ModelConfig(name=model.name, platform=PLATFORM, backend=backend)
    contract = model.contract
    if contract is None:
        return config
    config.max_batch_size = contract.max_batch_size
    for spec in contract.inputs:
        config.input.add(name=spec.name, data_type=model_config_pb2.TYPE_FP32, dims=list(spec.dims))
    for spec in contract.outputs:
        config.output.add(name=spec.name, data_type=model_config_pb2.TYPE_FP32, dims=list(spec.dims))
    config.dynamic_batching.max_queue_delay_microseconds = round(model.batching.max_latency_ms * 1000)
    return config


def model_statistics(model: TopTagger) -> extensions_pb2.ModelStatistics:
    duration = extensions_pb2.StatisticDuration
    entry = extensions_pb2.ModelStatistics(name=model.name, version=MODEL_VERSION)
    if not model.batchers:
        return entry
    stats = BatchStatistics.combined(b.stats for b in model.batchers.values())
    entry.last_inference = stats.last_inference_ms
    entry.inference_count = stats.inference_count
    entry.execution_count = stats.execution_count
    entry.inference_stats.CopyFrom(
        extensions_pb2.InferStatistics(
            success=duration(count=stats.success_count, ns=stats.queue_ns + stats.compute_ns),
            fail=duration(count=stats.fail_count),
            queue=duration(count=stats.success_count, ns=stats.queue_ns),
            compute_infer=duration(count=stats.execution_count, ns=stats.compute_ns),
        )
    )
    for size, (count, ns) in sorted(stats.batch_sizes.items()):
        entry.batch_stats.add(batch_size=size, compute_infer=duration(count=count, ns=ns))
    return entry


def handler(model: TopTagger) -> grpc.GenericRpcHandler:
    async def config(request: extensions_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext):
        if not _check_name(request.name, model, allow_empty=False):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'; serving '{model.name}'")
        return extensions_pb2.ModelConfigResponse(config=model_config(model))

    async def statistics(request: extensions_pb2.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        if not _check_name(request.name, model, allow_empty=True):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'; serving '{model.name}'")
        return extensions_pb2.ModelStatisticsResponse(model_stats=[model_statistics(model)])

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                config,
                request_deserializer=extensions_pb2.ModelConfigRequest.FromString,
                response_serializer=extensions_pb2.ModelConfigResponse.SerializeToString,
            ),
            "ModelStatistics": grpc.unary_unary_rpc_method_handler(
                statistics,
                request_deserializer=extensions_pb2.ModelStatisticsRequest.FromString,
                response_serializer=extensions_pb2.ModelStatisticsResponse.SerializeToString,
            ),
        },
    )


def _check_name(name: str, model: TopTagger, allow_empty: bool) -> bool:
    return name == model.name or (allow_empty and name == "")

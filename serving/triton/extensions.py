"""Triton's ``RepositoryIndex``, ``ModelConfig`` and ``ModelStatistics``, served next to KServe's servicer.

CMSSW's ``TritonService`` asks every configured server for ``RepositoryIndex`` at job start and
skips a server whose call fails; ``TritonClient`` (SONIC) then reads ``max_batch_size`` and the
tensor specs from ``ModelConfig`` and reads ``ModelStatistics`` for its reports. Stock KServe
answers all three with UNIMPLEMENTED. The gRPC handlers are ``async def`` because KServe's aio
exception interceptor awaits every handler; :func:`as_json` gives the same messages in the form
Triton's HTTP endpoints answer (``serving.server`` routes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from serving.batching import BatchStatistics
from serving.triton import checksum
from serving.triton.protos import extensions_pb2, model_config_pb2
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
    served = model.backend
    if served is not None:  # what --backend/--precision auto picked, as Triton models show settings
        config.parameters["precision"].string_value = getattr(served, "precision", "fp32")
        config.parameters["selection"].string_value = getattr(served, "selection", served.description)
    contract = model.contract
    if contract is None:
        return config
    config.max_batch_size = contract.max_batch_size
    for spec in contract.inputs:
        config.input.add(name=spec.name, data_type=model_config_pb2.TYPE_FP32, dims=list(spec.dims))
    for spec in contract.outputs:
        config.output.add(name=spec.name, data_type=model_config_pb2.TYPE_FP32, dims=list(spec.dims))
    config.dynamic_batching.max_queue_delay_microseconds = round(model.batching.max_latency_ms * 1000)
    if model.checksums:  # as serving.triton.repository writes it for the same files: SONIC compares the two
        config.model_repository_agents.agents.add(name=checksum.AGENT, parameters=model.checksums)
    return config


def model_statistics(model: TopTagger) -> extensions_pb2.ModelStatistics:
    duration = extensions_pb2.StatisticDuration
    entry = extensions_pb2.ModelStatistics(name=model.name, version=MODEL_VERSION)
    if not model.batchers:
        return entry
    stats = BatchStatistics.combined(b.stats for b in list(model.batchers.values()))
    entry.last_inference = stats.last_inference_ms
    entry.inference_count = stats.inference_count
    entry.execution_count = stats.execution_count
    requests = stats.success_count
    # As Triton counts them: per request (a batch's compute time once for each of its requests);
    # the same numbers as the nv_inference_* metrics (serving.triton.metrics).
    entry.inference_stats.CopyFrom(
        extensions_pb2.InferStatistics(
            success=duration(count=requests, ns=stats.request_ns),
            fail=duration(count=stats.fail_count + model.admission.refused),
            queue=duration(count=requests, ns=stats.queue_ns),
            compute_input=duration(count=requests, ns=stats.compute_input_ns),
            compute_infer=duration(count=requests, ns=stats.compute_infer_ns),
            compute_output=duration(count=requests, ns=stats.compute_output_ns),
        )
    )
    for size, sized in sorted(stats.batch_sizes.items()):
        entry.batch_stats.add(
            batch_size=size,
            compute_input=duration(count=sized.count, ns=sized.compute_input_ns),
            compute_infer=duration(count=sized.count, ns=sized.compute_infer_ns),
            compute_output=duration(count=sized.count, ns=sized.compute_output_ns),
        )
    return entry


def repository_index(model: TopTagger, ready_only: bool = False) -> extensions_pb2.RepositoryIndexResponse:
    """The one model, with Triton's states: READY, or UNAVAILABLE with the reason it cannot load."""
    index = extensions_pb2.RepositoryIndexResponse()
    if model.ready:
        index.models.add(name=model.name, version=MODEL_VERSION, state="READY")
    elif not ready_only:
        index.models.add(name=model.name, version=MODEL_VERSION, state="UNAVAILABLE", reason=model.not_ready_reason)
    return index


_INTEGERS = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
}


def as_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: every field, proto names, 64-bit integers as numbers.

    (protobuf's ``MessageToDict`` writes 64-bit integers as strings, which Triton's clients do not
    expect, and leaves out fields at their default value.)
    """
    return {field.name: _field_json(field, getattr(message, field.name)) for field in message.DESCRIPTOR.fields}


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _value_json(value_field, item) for key, item in value.items()}
    if field.label == FieldDescriptor.LABEL_REPEATED:
        return [_value_json(field, item) for item in value]
    return _value_json(field, value)


def _value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return as_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type in _INTEGERS:
        return int(value)
    return value


def handler(model: TopTagger) -> grpc.GenericRpcHandler:
    async def index(request: extensions_pb2.RepositoryIndexRequest, context: grpc.aio.ServicerContext):
        return repository_index(model, ready_only=request.ready)

    async def config(request: extensions_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext):
        if not _check_name(request.name, model, allow_empty=False):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'; serving '{model.name}'")
        return extensions_pb2.ModelConfigResponse(config=model_config(model))

    async def statistics(request: extensions_pb2.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        if not _check_name(request.name, model, allow_empty=True):
            # Triton answers INVALID_ARGUMENT here (NOT_FOUND for ModelConfig): same as Triton.
            message = f"unknown model '{request.name}'; serving '{model.name}'"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return extensions_pb2.ModelStatisticsResponse(model_stats=[model_statistics(model)])

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "RepositoryIndex": grpc.unary_unary_rpc_method_handler(
                index,
                request_deserializer=extensions_pb2.RepositoryIndexRequest.FromString,
                response_serializer=extensions_pb2.RepositoryIndexResponse.SerializeToString,
            ),
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

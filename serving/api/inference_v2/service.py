"""inference.GRPCInferenceService: the Open Inference Protocol (KServe V2) over gRPC, with
Triton's ModelConfig, ModelStreamInfer, ModelStatistics and model repository extensions,
on the same engine as recur.v1.

This is the gRPC binding: it translates messages to the plain values of core.py, where
the protocol's semantics live (tensors, parameters, sequences, descriptions), and back.
Input tensors come as typed contents or raw_input_contents; outputs go back as raw
contents.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import json_format

from serving.api.inference_v2 import tensors
from serving.api.inference_v2.core import InferenceCore
from serving.api.inference_v2.messages import InferRequest, InferResult, InputTensor
from serving.api.rpc.auth import peer_of
from serving.api.rpc.handlers import message, rpc, until_closing
from serving.api.rpc.status import code_of
from serving.engine.errors import EngineError, InvalidArgument
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.inference import model_config_pb2 as mc

SERVICE = "GRPCInferenceService"
PARAMETER_TYPES = ("bool_param", "int64_param", "string_param", "double_param",
                   "uint64_param")


class InferenceService(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore,
                 client_of: Callable[[grpc.aio.ServicerContext], str] = peer_of):
        self.core, self.engine, self.metrics = core, core.engine, core.engine.metrics
        self.client_of = client_of

    # -- health and metadata --------------------------------------------------------------
    @rpc(SERVICE)
    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @rpc(SERVICE)
    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.core.ready())

    @rpc(SERVICE)
    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    @rpc(SERVICE)
    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:
        return json_format.ParseDict(self.core.server_metadata(), v2.ServerMetadataResponse())

    @rpc(SERVICE)
    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context) -> v2.ModelMetadataResponse:
        return json_format.ParseDict(self.core.model_metadata(request.name, request.version),
                                     v2.ModelMetadataResponse())

    @rpc(SERVICE)
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        config = self.core.model_config(request.name, request.version)
        return v2.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    @rpc(SERVICE)
    async def ModelStatistics(self, request: v2.ModelStatisticsRequest,
                              context) -> v2.ModelStatisticsResponse:
        return json_format.ParseDict(self.core.statistics(request.name, request.version),
                                     v2.ModelStatisticsResponse())

    # -- the model repository -------------------------------------------------------------
    @rpc(SERVICE)
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest,
                              context) -> v2.RepositoryIndexResponse:
        models = await self.core.repository_index(request.repository_name, request.ready)
        return json_format.ParseDict({"models": models}, v2.RepositoryIndexResponse())

    @rpc(SERVICE)
    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest,
                                  context) -> v2.RepositoryModelLoadResponse:
        await self.core.load(request.model_name, dict(request.parameters),
                             request.repository_name)
        return v2.RepositoryModelLoadResponse()

    @rpc(SERVICE)
    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context) -> v2.RepositoryModelUnloadResponse:
        await self.core.unload(request.model_name, request.repository_name)
        return v2.RepositoryModelUnloadResponse()

    # -- inference ------------------------------------------------------------------------
    @rpc(SERVICE)
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        return await self._infer(request, self.client_of(context))

    @rpc(SERVICE, stream=True)
    async def ModelStreamInfer(self, requests, context) -> None:
        """Requests run in order, each counted as a request; a failed one answers with its
        error_message and the stream goes on, as Triton's does."""
        client = self.client_of(context)
        async for request in until_closing(requests, self.engine.closing):
            try:
                with message(self.metrics, SERVICE, "ModelStreamInfer"):
                    await self._stream_one(request, client, context)
            except EngineError:
                pass  # answered on the stream (counted with its code): the stream goes on

    async def _stream_one(self, request: v2.ModelInferRequest, client: str, context) -> None:
        try:
            response = v2.ModelStreamInferResponse(
                infer_response=await self._infer(request, client))
        except EngineError as error:
            await context.write(v2.ModelStreamInferResponse(
                error_message=f"{code_of(error).name}: {error.message}",
                infer_response=v2.ModelInferResponse(model_name=request.model_name,
                                                     id=request.id)))
            raise
        await context.write(response)

    async def _infer(self, request: v2.ModelInferRequest, client: str) -> v2.ModelInferResponse:
        # the model first: an unknown one is NOT_FOUND whatever else is wrong
        self.core.model(request.model_name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument("raw_input_contents", f"{len(raw)} entries for "
                                  f"{len(request.inputs)} inputs: give one per input, or none")
        result = await self.core.infer(InferRequest(
            request.model_name, request.model_version, request.id,
            {key: _value(p) for key, p in request.parameters.items()},
            [_input(tensor, raw[index] if raw else None)
             for index, tensor in enumerate(request.inputs)],
            [o.name for o in request.outputs]), client)
        return _response(result)


def _input(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    return InputTensor(tensor.name, tensor.datatype, tensor.shape,
                       lambda field: tensors.read_input(tensor, raw, field))


def _value(parameter: v2.InferParameter):
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind in PARAMETER_TYPES else None


def _response(result: InferResult) -> v2.ModelInferResponse:
    response = v2.ModelInferResponse(model_name=result.model_name,
                                     model_version=result.model_version, id=result.id)
    for key, value in result.parameters.items():
        response.parameters[key].string_param = value
    for tensor in result.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype,
                             shape=list(tensor.array.shape))
        response.raw_output_contents.append(tensors.to_raw(tensor.array, tensor.datatype))
    return response

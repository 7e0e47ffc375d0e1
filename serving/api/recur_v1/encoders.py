"""recur.v1.Tagger and recur.v1.Classifier: batches of whole texts."""

from __future__ import annotations

from serving.api.recur_v1.convert import (
    class_probabilities,
    model_ref,
    response_limit,
    tagged_tokens,
    to_inputs,
)
from serving.api.rpc.handlers import rpc
from serving.engine.engine import Engine
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc


class TaggerService(pb_grpc.TaggerServicer):
    def __init__(self, engine: Engine, max_message_bytes: int = 4 << 20):
        self.engine, self.metrics = engine, engine.metrics
        self.max_message_bytes = max_message_bytes

    @rpc("Tagger")
    async def Tag(self, request: pb.TagRequest, context) -> pb.TagResponse:
        model = self.engine.model(request.model.name, request.model.version, "tag")
        longest_tag = max((len(t.encode()) for t in model.labels), default=0)
        results = await self.engine.tag(
            model, to_inputs(request.inputs, "inputs"),
            check=response_limit(self.max_message_bytes, "inputs", 0, longest_tag + 2))
        response = pb.TagResponse(model=model_ref(model))
        for tagged in results:
            response.results.add().tokens.extend(tagged_tokens(tagged))
        return response


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, engine: Engine):
        self.engine, self.metrics = engine, engine.metrics

    @rpc("Classifier")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        model = self.engine.model(request.model.name, request.model.version, "classify")
        results = await self.engine.classify(model, to_inputs(request.inputs, "inputs"))
        response = pb.ClassifyResponse(model=model_ref(model))
        for classified in results:
            classes = class_probabilities(classified)
            response.results.add(label=classes[0].label, classes=classes)
        return response

"""recur.v1.Tagger and recur.v1.Classifier: batches of whole texts."""

from __future__ import annotations

from serving import operations
from serving.config import ServerConfig
from serving.inputs import Encoded, encode_all
from serving.metrics import Metrics
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from serving.repository import LoadedModel, ModelRepository
from serving.services import gather, model_ref, rpc
from serving.services.language_model import class_probabilities


class _EncoderService:
    task = ""

    def __init__(self, repository: ModelRepository, config: ServerConfig, metrics: Metrics):
        self.repository, self.config, self.metrics = repository, config, metrics

    async def run(self, request) -> tuple[LoadedModel, list[tuple[Encoded, object]]]:
        model = self.repository.get(request.model.name, request.model.version, self.task)
        encoded = encode_all(request.inputs, model.runtime.vocab, "inputs",
                             self.config.max_sequences_per_request,
                             self.config.max_tokens_per_sequence)
        model.batcher.reserve(len(encoded))
        results = await gather(*(operations.run_chunks(model, e.ids, model.initial_state(),
                                                       None, self.config.chunk_tokens)
                                 for e in encoded))
        kind = "tagged" if self.task == "tag" else "classified"
        self.metrics.tokens.labels(model.label, kind).inc(sum(len(e.ids) for e in encoded))
        return model, list(zip(encoded, (r.outputs for r in results)))


class TaggerService(_EncoderService, pb_grpc.TaggerServicer):
    task = "tag"

    @rpc("Tagger")
    async def Tag(self, request: pb.TagRequest, context) -> pb.TagResponse:
        model, results = await self.run(request)
        names = model.runtime.labels.names
        response = pb.TagResponse(model=model_ref(model))
        for encoded, logprobs in results:
            best = logprobs.argmax(axis=1)
            response.results.add().tokens.extend(
                pb.TaggedToken(token=w, tag=names[b], logprob=float(row[b]))
                for w, b, row in zip(encoded.words, best, logprobs))
        return response


class ClassifierService(_EncoderService, pb_grpc.ClassifierServicer):
    task = "classify"

    @rpc("Classifier")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        model, results = await self.run(request)
        names = model.runtime.labels.names
        response = pb.ClassifyResponse(model=model_ref(model))
        for _, logprobs in results:
            classes = class_probabilities(logprobs, names)
            response.results.add(label=classes[0].label, classes=classes)
        return response

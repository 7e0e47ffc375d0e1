"""recur.v1.Models: what this server serves, and on which device."""

from __future__ import annotations

from serving.api.rpc.handlers import rpc
from serving.engine.engine import Engine
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc


class ModelsService(pb_grpc.ModelsServicer):
    def __init__(self, engine: Engine):
        self.engine, self.metrics = engine, engine.metrics

    @rpc("Models")
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse()
        for model in self.engine.models():
            meta = model.metadata
            response.models.add(
                name=model.name, version=model.version, latest=model.latest, task=model.task,
                cell=meta["cell"], layers=meta["layers"], hidden_size=meta["hidden_size"],
                bidirectional=meta["bidirectional"], vocab_size=len(model.vocab),
                labels=model.labels, ready=True, device=model.device,
                providers=model.providers, incremental=model.sessions_allowed is None)
        # versions in the policy that do not load: not served, retried at every look
        for (name, version), reason in self.engine.unavailable():
            response.unavailable.add(name=name, version=version, reason=reason)
        return response

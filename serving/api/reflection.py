"""gRPC server reflection, v1 and v1alpha, so that `grpcurl list` and other tools work.

grpcio-reflection implements only v1alpha, while current tools ask v1 first. The two
protocols are the same messages under another package name, so v1 is served by the same
implementation: its file descriptor is v1alpha's with the package renamed (so that v1 can
itself be described), and its messages go over the wire with v1alpha's classes.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from serving.api.rpc.wire import add_guarded

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool.Add(proto)


def add_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """Serves reflection of `services` (and of reflection itself) on `server`."""
    _register_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer([*services, V1, V1ALPHA])
    add_guarded(server, reflection_pb2_grpc.add_ServerReflectionServicer_to_server, servicer)
    add_guarded(server, _add_v1_to_server, servicer)


def _add_v1_to_server(servicer, server) -> None:
    """As a generated add_*_to_server would register it, under v1's name."""
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, handlers),))
    server.add_registered_method_handlers(V1, handlers)

"""The adapters: each translates one protocol's messages into engine calls and the
engine's results back, and none imports another.

    recur_v1/      recur.v1 over gRPC (protos/recur/v1/recur.proto)
    inference_v2/  the Open Inference Protocol (KServe V2) over gRPC, with Triton's extensions
    health.py      grpc.health.v1
    reflection.py  gRPC server reflection, v1 and v1alpha
    rpc/           what the gRPC adapters share: handler wrapper, status mapping, guard
                   against undecodable bytes, authentication
"""

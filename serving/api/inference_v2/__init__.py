"""The Open Inference Protocol (KServe V2) over gRPC, with Triton's ModelConfig and
ModelStreamInfer: service.py maps requests to engine calls, tensors.py reads and writes
the protocol's tensors."""

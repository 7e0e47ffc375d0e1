"""The engine: models, batching, sessions and the operations on them, protocol-free.

    engine.py        Engine: every operation the server offers, plain values in and out
    operations.py    a request as steps: token ids and states
    scheduler.py     continuous batching of all requests' steps into ONNX Runtime calls
    decoding.py      the decoding loop of completions and its stream of events
    repository.py    the served model versions (version policy, load, unload)
    sessions.py      sessions' stored states (TTL, LRU bounds)
    state_tokens.py  a session's state in an authenticated token, for any replica
    inputs.py        text or token ids to checked token ids
    results.py       the values operations return
    errors.py        the few kinds of error, which each adapter maps to its protocol
    config.py        the engine's settings
    metrics.py       Prometheus metrics

It imports no grpc, protobuf or generated code (tests/test_layering.py checks it).
"""

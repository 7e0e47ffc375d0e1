"""The scheduler keeps the event loop free: long steps run on the model's worker thread,
only a lone one-token step measured to be quick runs on the loop's own thread."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from export_helpers import save_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import RunningServer

from serving.engine.metrics import Metrics
from serving.engine.scheduler import BatchLimits, Scheduler
from serving.model.runtime import ModelRuntime
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from training.models.language_model import RecurrentLM


@pytest.fixture(scope="module")
def wide_repository(tmp_path_factory):
    """A 2 x 512 LSTM: long inputs take seconds on these cores."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wide")
    save_model(RecurrentLM(1000, "lstm", 512, 512, 2).eval(), root / "wide" / "1")
    return root


def test_health_answers_while_one_long_score_computes(wide_repository):
    """Also while the Score's 8,001 tokens become a response: the objects that existed
    when the server started are frozen out of the garbage collector's full collections,
    which had held the loop for 0.15 s walking the test process's heap."""
    server = RunningServer(wide_repository, threads=1)
    assert gc.get_freeze_count() > 10_000
    try:
        ids = np.random.default_rng(0).integers(2, 1000, 8000).tolist()
        request = pb.ScoreRequest(model=pb.ModelRef(name="wide"),
                                  inputs=[pb.Input(token_ids=pb.TokenIds(ids=ids))])
        health = health_pb2_grpc.HealthStub(server.channel)
        check = health_pb2.HealthCheckRequest(service="")
        health.Check(check, timeout=10)
        runtime = server.server.engine.model("wide").runtime
        started = time.monotonic()
        score = server.client.language_model.Score.future(request, timeout=120)
        while runtime.positions_run == 0:  # the Score is computing
            time.sleep(0.001)
        waits = []
        while not score.done():
            began = time.perf_counter()
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            waits.append(time.perf_counter() - began)
            time.sleep(0.02)
        computed = time.monotonic() - started
        assert len(score.result().scores[0].tokens) == 8001
    finally:
        server.stop()
    assert computed > 0.5 and len(waits) >= 10, (computed, len(waits))
    assert max(waits) < 0.1, f"health waited {max(waits):.3f} s while the Score computed"


def test_only_a_quick_lone_one_token_step_runs_on_the_loop(model_repository):
    runtime = ModelRuntime(model_repository / "demo-lm" / "1")
    threads = []
    run_lm = runtime.run_lm

    def recording(*args, **kwargs):  # the real call, noting the thread it runs on
        threads.append(threading.current_thread())
        return run_lm(*args, **kwargs)

    runtime.run_lm = recording

    async def steps(limits: BatchLimits, lengths: list[int]) -> list[bool]:
        scheduler = Scheduler(runtime, "demo-lm/1", limits, Metrics())
        scheduler.start()
        loop_thread = threading.current_thread()
        state = runtime.initial_state(1)[:, 0]
        on_loop = []
        try:
            for length in lengths:
                tokens = np.full(length, 5, np.int64)
                await scheduler.run(tokens, state, tokens)
                on_loop.append(threads[-1] is loop_thread)
        finally:
            await scheduler.close()
        return on_loop

    quick = BatchLimits(max_inline_step_s=1.0)
    # unmeasured at first: the worker; then measured quick: the loop; two tokens: the worker
    assert asyncio.run(steps(quick, [1, 1, 1, 2, 1])) == [False, True, True, False, True]
    assert asyncio.run(steps(BatchLimits(max_inline_step_s=0.0), [1, 1, 1])) == [False] * 3
    assert asyncio.run(steps(BatchLimits(max_inline_step_s=1e-9), [1, 1, 1])) == [False] * 3


def test_health_list_reports_every_service(model_repository):
    server = RunningServer(model_repository)
    try:
        listed = health_pb2_grpc.HealthStub(server.channel).List(health_pb2.HealthListRequest(),
                                                                 timeout=10)
    finally:
        server.stop()
    statuses = {name: value.status for name, value in listed.statuses.items()}
    assert statuses[""] == health_pb2.HealthCheckResponse.SERVING
    assert statuses["recur.v1.LanguageModel"] == health_pb2.HealthCheckResponse.SERVING
    assert statuses["liveness"] == health_pb2.HealthCheckResponse.SERVING
    assert "inference.GRPCInferenceService" in statuses


def test_cancelled_streams_leave_no_task_behind(model_repository, caplog):
    """A Converse or ModelStreamInfer stream cancelled by its client while the server waits
    for its next message: nothing is left to fail later ("Task exception was never
    retrieved")."""
    from serving.api.inference_v2.tensors import encode_bytes
    from serving.proto_gen.inference import grpc_service_pb2 as v2
    from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc

    server = RunningServer(model_repository)
    first_messages = {
        "converse": pb.ConverseRequest(model=pb.ModelRef(name="demo-lm"),
                                       input=pb.Input(text="the")),
        "v2": v2.ModelInferRequest(model_name="demo-lm", inputs=[
            v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                  shape=[1, 1])],
            raw_input_contents=[encode_bytes([b"the"])])}
    streams = {"converse": server.client.language_model.Converse,
               "v2": v2_grpc.GRPCInferenceServiceStub(server.channel).ModelStreamInfer}
    try:
        for kind in ("converse", "v2") * 10:
            gate = threading.Event()

            def requests(gate=gate, first=first_messages[kind]):
                yield first
                gate.wait(5)

            call = streams[kind](requests(), timeout=30)
            next(call)  # the server now waits for the stream's next message
            call.cancel()
            gate.set()
            with pytest.raises(grpc.RpcError):
                next(call)
        time.sleep(0.5)
        server.call(asyncio.sleep(0))
        import gc

        gc.collect()
        time.sleep(0.2)
    finally:
        server.stop()
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never_retrieved == []

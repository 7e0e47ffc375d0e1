"""`make bench-serve`, incremental steps: many sessions each reading one token per request,
the service's core use, against the same steps batched in process.

The model is a 2-layer, 256-unit LSTM over 10,000 words (random weights): small enough
that the server's own work per request, not the model, is what a step costs. The server
runs as its own process (`recur serve`); the clients are grpc.aio coroutines in this
process, closed loops (each sends its next request when its last is answered), on the same
two cores. Each comparison alternates the in-process side and the server side in rounds;
ratios are medians over the rounds. The batch sizes the server achieved come from its own
statistics (V2 ModelStatistics: executions and the rows they ran).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import lm_artifact
from serving.model.runtime import ModelRuntime
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from training.models.language_model import RecurrentLM

NAME, VOCAB, HIDDEN, LAYERS = "bench-lstm-256", 10_000, 256, 2
SESSIONS, STEPS, SCORE_LENGTH = 64, 40, 35
ROUNDS = 5


def make_model(repository: Path) -> Path:
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, "lstm", HIDDEN, HIDDEN, LAYERS, tie_weights=True).eval()
    return lm_artifact(model, repository / NAME / "1", verify=True)


class InProcess:
    """The same work batched in this process: what the server's calls could reach."""

    def __init__(self, path: Path, threads: int):
        self.runtime = ModelRuntime(path, "cpu", threads=threads)
        rng = np.random.default_rng(1)
        self.sequences = rng.integers(2, VOCAB, (SESSIONS, SCORE_LENGTH)).astype(np.int64)

    def steps(self) -> float:
        """Tokens/s of B = 64 one-token steps, the state fed back, every row's next-token
        log-probs computed (as an Append's are)."""
        runtime, batch = self.runtime, SESSIONS
        state = runtime.initial_state(batch)
        tokens, lengths = np.full((batch, 1), 5, np.int64), np.ones(batch, np.int64)
        started = time.perf_counter()
        for _ in range(STEPS):
            out = runtime.run_lm(tokens, lengths, state, tokens)
            state = out.state.numpy()
        return batch * STEPS / (time.perf_counter() - started)

    def step_b1_s(self, repeat: int = 200) -> float:
        runtime, one = self.runtime, np.array([[5]], np.int64)
        state, times = runtime.initial_state(1), []
        for _ in range(repeat):
            started = time.perf_counter()
            runtime.run_lm(one, np.ones(1, np.int64), state, one)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def score(self) -> float:
        """Tokens/s of the 64 sequences of 35 tokens scored in one call, as often as the
        server's clients score them."""
        started = time.perf_counter()
        for _ in range(STEPS // 4):
            self.runtime.score([list(row) for row in self.sequences])
        return SESSIONS * SCORE_LENGTH * (STEPS // 4) / (time.perf_counter() - started)


@dataclass
class Served:
    """A workload's timed part: tokens/s, and what the server did meanwhile."""

    tokens_per_s: float
    rows_per_call: float  # the server's statistics: rows run / calls
    cpu_s: float  # the server process's CPU, all threads
    loop_cpu_s: float  # its main thread's: the event loop


class Probe:
    """Snapshots of the server's statistics and CPU around a workload's timed part (not
    its setup: creating and closing sessions)."""

    def __init__(self, channel: grpc.aio.Channel, pid: int):
        self.channel, self.pid = channel, pid

    async def mark(self) -> tuple:
        return (*await batch_rows(self.channel), *cpu_seconds(self.pid), time.perf_counter())

    async def served(self, before: tuple, tokens: int) -> Served:
        after = await self.mark()
        calls, rows, cpu, loop, seconds = (a - b for a, b in zip(after, before, strict=True))
        return Served(tokens / seconds, rows / max(1, calls), cpu, loop)


async def appends(probe: Probe) -> Served:
    """64 sessions, each appending one token per request."""
    stub = pb_grpc.LanguageModelStub(probe.channel)
    created = await asyncio.gather(*(stub.CreateSession(pb.CreateSessionRequest(
        model=pb.ModelRef(name=NAME), prefix=pb.Input(token_ids=pb.TokenIds(ids=[5]))))
        for _ in range(SESSIONS)))

    async def one(session_id: str, seed: int) -> None:
        for step in range(STEPS):
            await stub.Append(pb.AppendRequest(session_id=session_id, input=pb.Input(
                token_ids=pb.TokenIds(ids=[2 + (seed * 31 + step) % (VOCAB - 2)]))))

    before = await probe.mark()
    await asyncio.gather(*(one(c.session_id, i) for i, c in enumerate(created)))
    served = await probe.served(before, SESSIONS * STEPS)
    await asyncio.gather(*(stub.CloseSession(pb.CloseSessionRequest(session_id=c.session_id))
                           for c in created))
    return served


def _infer(sequence: str, token: int, start: bool = False,
           end: bool = False) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=NAME, inputs=[v2.ModelInferRequest.InferInputTensor(
        name="TOKEN_IDS", datatype="INT64", shape=[1, 1])],
        raw_input_contents=[np.array([token], np.int64).tobytes()])
    request.parameters["sequence_id"].string_param = sequence
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


async def sequences(probe: Probe, round_index: int) -> Served:
    """64 V2 sequences (server-held state), one token per ModelInfer; the last ends each."""
    stub = v2_grpc.GRPCInferenceServiceStub(probe.channel)
    names = [f"r{round_index}-s{i}" for i in range(SESSIONS)]
    await asyncio.gather(*(stub.ModelInfer(_infer(name, 5, start=True)) for name in names))

    async def one(name: str, seed: int) -> None:
        for step in range(STEPS):
            await stub.ModelInfer(_infer(name, 2 + (seed * 31 + step) % (VOCAB - 2),
                                         end=step == STEPS - 1))

    before = await probe.mark()
    await asyncio.gather(*(one(name, i) for i, name in enumerate(names)))
    return await probe.served(before, SESSIONS * STEPS)


async def scores(probe: Probe, seed: int) -> Served:
    """64 clients, each scoring one 35-token sequence per request, every sequence new (so
    that no prefix is cached)."""
    stub = pb_grpc.LanguageModelStub(probe.channel)
    rng = np.random.default_rng(seed)
    rounds = STEPS // 4
    rows = rng.integers(2, VOCAB, (SESSIONS, rounds, SCORE_LENGTH))

    async def one(client: int) -> None:
        for row in rows[client]:
            await stub.Score(pb.ScoreRequest(
                model=pb.ModelRef(name=NAME), add_eos=False,
                inputs=[pb.Input(token_ids=pb.TokenIds(ids=row.tolist()))]))

    before = await probe.mark()
    await asyncio.gather(*(one(client) for client in range(SESSIONS)))
    return await probe.served(before, SESSIONS * SCORE_LENGTH * rounds)


async def batch_rows(channel: grpc.aio.Channel) -> tuple[int, int]:
    """(executions, rows) the server's model has run so far, from its V2 statistics."""
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    stats = await stub.ModelStatistics(v2.ModelStatisticsRequest(name=NAME))
    (model,) = stats.model_stats
    return (sum(b.compute_infer.count for b in model.batch_stats),
            sum(b.batch_size * b.compute_infer.count for b in model.batch_stats))


def appends_p50(target: str, repeat: int) -> tuple[float, float]:
    """(one session's Append p50, a no-op RPC's p50) in seconds, one request at a time,
    from a blocking client (as bench/serve.py's latencies)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(model=pb.ModelRef(name=NAME)))
        request = pb.AppendRequest(session_id=session.session_id,
                                   input=pb.Input(token_ids=pb.TokenIds(ids=[7])))
        check = health_pb2.HealthCheckRequest(service="")
        append, noop = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            stub.Append(request)
            append.append(time.perf_counter() - started)
            started = time.perf_counter()
            health.Check(check)
            noop.append(time.perf_counter() - started)
        stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    return statistics.median(append[repeat // 10:]), statistics.median(noop[repeat // 10:])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's CPU seconds, its main thread's: the event loop), from /proc."""
    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


async def _served(target: str, local: InProcess, pid: int) -> dict:
    ms = 1000.0
    sides: dict[str, list[float]] = {k: [] for k in (
        "in_process_steps", "appends", "sequences", "in_process_score", "scores",
        "append_p50", "noop_p50", "step_b1")}
    rows: dict[str, list[float]] = {"appends": [], "sequences": [], "scores": []}
    # the server's CPU per request: all its threads, and its event loop's alone
    cpu: dict[str, list[float]] = {"appends": [], "sequences": []}
    loop_cpu: dict[str, list[float]] = {"appends": [], "sequences": []}
    async with grpc.aio.insecure_channel(target) as channel:
        probe = Probe(channel, pid)
        await appends(probe)  # warm-up
        await sequences(probe, -1)
        local.steps()
        for index in range(ROUNDS):
            # the in-process side before the server's in even rounds, after in odd ones
            if index % 2 == 0:
                sides["in_process_steps"].append(local.steps())
                sides["in_process_score"].append(local.score())
            for name, run in (("appends", appends(probe)),
                              ("sequences", sequences(probe, index)),
                              ("scores", scores(probe, 100 + index))):
                served = await run
                sides[name].append(served.tokens_per_s)
                rows[name].append(served.rows_per_call)
                if name in cpu:
                    cpu[name].append(served.cpu_s / (SESSIONS * STEPS))
                    loop_cpu[name].append(served.loop_cpu_s / (SESSIONS * STEPS))
            if index % 2 == 1:
                sides["in_process_steps"].append(local.steps())
                sides["in_process_score"].append(local.score())
            append, noop = appends_p50(target, 100)
            sides["append_p50"].append(append)
            sides["noop_p50"].append(noop)
            sides["step_b1"].append(local.step_b1_s())

    def ratio(served: str, base: str) -> float:
        return statistics.median([s / b for s, b in zip(sides[served], sides[base],
                                                         strict=True)])

    median = {name: statistics.median(values) for name, values in sides.items()}
    return {
        "model": f"LSTM {LAYERS}x{HIDDEN}, V={VOCAB}, random weights",
        "sessions": SESSIONS, "steps_per_session": STEPS, "rounds": ROUNDS,
        "in_process_b64_steps_tokens_per_s": median["in_process_steps"],
        "appends_64_tokens_per_s": median["appends"],
        "v2_sequences_64_tokens_per_s": median["sequences"],
        "appends_64_vs_in_process": ratio("appends", "in_process_steps"),
        "v2_sequences_64_vs_in_process": ratio("sequences", "in_process_steps"),
        "mean_batch_rows": {name: statistics.median(v) for name, v in rows.items()},
        "server_cpu_ms_per_request": {name: ms * statistics.median(v)
                                      for name, v in cpu.items()},
        "server_loop_cpu_ms_per_request": {name: ms * statistics.median(v)
                                           for name, v in loop_cpu.items()},
        # the same steps' share of in-process B = 64 stepping, per token (both threads)
        "in_process_ms_per_token": ms / median["in_process_steps"],
        "in_process_score_b64_tokens_per_s": median["in_process_score"],
        "scores_64_clients_tokens_per_s": median["scores"],
        "scores_64_clients_vs_in_process": ratio("scores", "in_process_score"),
        "append_ms_p50": ms * median["append_p50"],
        "noop_rpc_ms_p50": ms * median["noop_p50"],
        "step_b1_ms_p50": ms * median["step_b1"],
        # Append p50 - (no-op RPC p50 + in-process step p50), the median over rounds
        "append_overhead_ms": ms * statistics.median(
            [a - n - s for a, n, s in zip(sides["append_p50"], sides["noop_p50"],
                                          sides["step_b1"], strict=True)]),
    }


def measure(repository: Path, threads: int, start_server) -> dict:
    """The workloads against a `recur serve` of `repository` started by `start_server`
    (bench/serve.py's), returning the figures and whether each target is met."""
    local = InProcess(make_model(repository), threads)
    process, target = start_server(repository)
    try:
        result = asyncio.run(_served(target, local, process.pid))
    finally:
        process.terminate()
        process.wait(30)
    result["targets"] = {
        "appends_64_vs_in_process >= 0.25": result["appends_64_vs_in_process"] >= 0.25,
        "v2_sequences_64_vs_in_process >= 0.20": result["v2_sequences_64_vs_in_process"] >= 0.20,
        "append_overhead_ms <= 0.5": result["append_overhead_ms"] <= 0.5,
        "scores_64_clients_vs_in_process >= 0.70":
            result["scores_64_clients_vs_in_process"] >= 0.70,
    }
    return result

"""`make bench-serve`: the gRPC server against the runtime called in process, client and
server on this machine, every ratio measured in one run.

The model is a 2-layer, 650-unit LSTM over a 10,000-word vocabulary with random weights,
exported through the normal path (graph, check, verification against torch). The server
runs as its own process (`recur serve`), so client and server do not share a GIL.
Results go to bench/results/serve.json (serve-cuda.json with --device cuda) and the report
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import steps
from bench.common import cpu, lm_artifact, now
from bench.report import save_results
from serving.client import RecurClient
from serving.model.runtime import ModelRuntime
from serving.model.sampler import SamplingParams, make_rng, sample_batch
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from training.models.language_model import RecurrentLM

VOCAB, HIDDEN, LAYERS, STREAMS, STREAM_TOKENS = 10_000, 650, 2, 64, 64
SAMPLING = SamplingParams(temperature=1.0)


def make_model(root: Path) -> Path:
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, "lstm", HIDDEN, HIDDEN, LAYERS, tie_weights=True).eval()
    return lm_artifact(model, root / "bench-lstm" / "1", verify=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


# -- measurements --------------------------------------------------------------------------
# Each comparison alternates its two sides in rounds, so that a burst of load on a shared
# machine hits both; ratios and the Append overhead are medians over the rounds.
ROUNDS = 9


class InProcess:
    """The runtime called in this process, the baseline of every ratio."""

    def __init__(self, path: Path, threads: int, spin: bool, device: str):
        self.runtime = ModelRuntime(path, device, threads=threads, spin=spin)
        self.state = self.runtime.initial_state(1)
        self.one = np.array([[5]], np.int64)

    def step(self) -> None:
        self.runtime.run_lm(self.one, np.array([1]), self.state, self.one)

    def decode(self) -> float:
        """Tokens/s of B=64 decoding with sampling, as the server's streams do it (one
        batched draw per step)."""
        runtime = self.runtime
        rngs = [make_rng(s) for s in range(STREAMS)]
        state = runtime.initial_state(STREAMS)
        tokens = np.full((STREAMS, 1), 1, np.int64)
        lengths = np.ones(STREAMS, np.int64)
        started = time.perf_counter()
        for _ in range(STREAM_TOKENS):
            out = runtime.run_lm(tokens, lengths, state, np.zeros_like(tokens))
            state = out.state.numpy()
            tokens = sample_batch(out.next_logprobs, [SAMPLING] * STREAMS, rngs)[:, None]
        return STREAMS * STREAM_TOKENS / (time.perf_counter() - started)

    def score(self, sentences: list[list[int]]) -> None:
        for i in range(0, len(sentences), 64):
            self.runtime.score(sentences[i:i + 64])


def start_server(repository: Path, threads: int, spin: bool, device: str,
                 *flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "recur", "serve", "--model-repository", str(repository),
         "--port", "0", "--metrics-port", "-1", "--threads", str(threads), "--device", device,
         "--max-completion-tokens", "100000", "--log-level", "WARNING",
         "--spin-threads" if spin else "--no-spin-threads", *flags],
        stdout=subprocess.PIPE, text=True)
    match = re.search(r"listening on ([\d.]+:\d+)", process.stdout.readline())
    if match is None:
        process.kill()
        raise SystemExit("recur serve did not start")
    return process, match[1]


# packed streams (CompleteRequest.stream_interval_ms): tokens gathered for up to this long
PACKED_INTERVAL_MS = 20


async def concurrent_streams(target: str, count: int, interval_ms: int = 0) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)

        async def one(seed: int) -> int:
            request = pb.CompleteRequest(model=pb.ModelRef(name="bench-lstm"),
                                         prompt=pb.Input(text=""), max_tokens=STREAM_TOKENS,
                                         temperature=1.0, seed=seed,
                                         stream_interval_ms=interval_ms)
            return sum([len(event.tokens) + event.HasField("token")
                        async for event in stub.Complete(request)])

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(seed) for seed in range(count)))
        return sum(tokens) / (time.perf_counter() - started)


def latencies(local: InProcess, client: RecurClient, health, per_round: int) -> dict:
    """In-process step, no-op RPC and one-token Appends (after 10 and after 10,000 tokens
    of history), in rounds. Returns per-round medians and every Append time."""
    sessions = {}
    for history in (10, 10_000):
        rng = np.random.default_rng(history)
        sessions[history] = client.create_session(
            "bench-lstm", [int(t) for t in rng.integers(2, VOCAB, history)]).session_id
    check = health_pb2.HealthCheckRequest(service="")

    def step_then_noop() -> None:
        local.step()
        health.Check(check)

    # step_then_noop: the same two pieces of work as an Append, one after the other, so
    # that the RPC runs on caches the step has just flushed (a B=1 step streams 53 MB of
    # weights through a 32 MB L3), as an Append's own RPC does
    calls = {"step": local.step, "noop": lambda: health.Check(check),
             "step_then_noop": step_then_noop,
             "append_10": lambda: client.append(sessions[10], [7]),
             "append_10000": lambda: client.append(sessions[10_000], [7])}
    for fn in calls.values():  # warm-up
        timed(fn, 20)
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    every: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            times = timed(fn, per_round)
            rounds[name].append(statistics.median(times))
            every[name].extend(times)
    for session_id in sessions.values():
        client.close_session(session_id)
    return {"rounds": rounds, "every": every}


def measure(path: Path, repository: Path, threads: int, spin: bool,
            sentences: list[list[int]], device: str = "cpu") -> dict:
    local = InProcess(path, threads, spin, device)
    # no prefix cache: the scoring rounds repeat their sentences, which it would serve
    # from memory (bench/cache.py measures it)
    process, target = start_server(repository, threads, spin, device, "--prefix-cache-mib", "0")
    try:
        with grpc.insecure_channel(target) as channel:
            client = RecurClient(target, channel=channel)
            lat = latencies(local, client, health_pb2_grpc.HealthStub(channel), 40)
            asyncio.run(concurrent_streams(target, 4))  # warm-up
            local.decode()
            streams, packed, decode, alone = [], [], [], []
            for _ in range(3):
                streams.append(asyncio.run(concurrent_streams(target, STREAMS)))
                packed.append(asyncio.run(concurrent_streams(target, STREAMS,
                                                             PACKED_INTERVAL_MS)))
                decode.append(local.decode())
                alone.append(asyncio.run(concurrent_streams(target, 1)))

            def score_all():
                futures = [client.language_model.Score.future(pb.ScoreRequest(
                    model=pb.ModelRef(name="bench-lstm"),
                    inputs=[pb.Input(token_ids=pb.TokenIds(ids=s[:-1]))
                            for s in sentences[i:i + 64]])) for i in range(0, len(sentences), 64)]
                return [f.result() for f in futures]

            score_all()
            local.score(sentences)
            served, in_process = [], []
            for _ in range(3):
                served.append(statistics.median(timed(score_all, 1)))
                in_process.append(statistics.median(timed(lambda: local.score(sentences), 1)))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    r, every = lat["rounds"], lat["every"]
    ms = 1000.0
    overheads = [a - n - s for a, n, s in zip(r["append_10"], r["noop"], r["step"], strict=True)]
    server_overheads = [a - b for a, b in zip(r["append_10"], r["step_then_noop"], strict=True)]
    scored = sum(len(s) for s in sentences)
    return {
        "in_process": {"step_b1_ms_p50": ms * statistics.median(r["step"]),
                       "decode_b64_tokens_per_s": statistics.median(decode),
                       "score_tokens_per_s": scored / statistics.median(in_process)},
        "server": {"noop_rpc_ms_p50": ms * statistics.median(r["noop"]),
                   "append_ms_p50_history_10": ms * statistics.median(r["append_10"]),
                   "append_ms_p99_history_10": percentile(every["append_10"], 99),
                   "append_ms_p50_history_10000": ms * statistics.median(r["append_10000"]),
                   "append_ms_p99_history_10000": percentile(every["append_10000"], 99),
                   "streams_64_tokens_per_s": statistics.median(streams),
                   "streams_64_packed_tokens_per_s": statistics.median(packed),
                   "streams_one_at_a_time_tokens_per_s": statistics.median(alone),
                   "score_tokens_per_s": scored / statistics.median(served)},
        "rounds": ROUNDS,
        # Append p50 - (no-op RPC p50 + in-process step p50), the median over rounds
        "append_overhead_ms": ms * statistics.median(overheads),
        # a no-op RPC right after an in-process step runs on cold caches
        "noop_rpc_after_step_ms_p50": ms * statistics.median(
            [b - a for a, b in zip(r["step"], r["step_then_noop"], strict=True)]),
        # Append p50 - p50 of (in-process step, then no-op RPC): the server's own share
        "append_overhead_vs_step_then_noop_ms": ms * statistics.median(server_overheads),
        "append_history_ratio": statistics.median(
            [b / a for a, b in zip(r["append_10"], r["append_10000"], strict=True)]),
        "streams_vs_in_process": statistics.median(
            [s / d for s, d in zip(streams, decode, strict=True)]),
        "packed_interval_ms": PACKED_INTERVAL_MS,
        "streams_packed_vs_in_process": statistics.median(
            [s / d for s, d in zip(packed, decode, strict=True)]),
        "streams_vs_one_at_a_time": statistics.median(
            [s / a for s, a in zip(streams, alone, strict=True)]),
        "score_vs_in_process": statistics.median(
            [i / s for s, i in zip(served, in_process, strict=True)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin-threads", action=argparse.BooleanOptionalAction, default=False,
                        help="let idle ONNX Runtime threads spin (both sides; off by default, "
                             "as in the server)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (both sides; results to "
                             "bench/results/serve-cuda.json)")
    parser.add_argument("--only", choices=["base", "incremental"],
                        help="run one part: the 2 x 650 model's latency, streams and scoring "
                             "(base), or many sessions stepping on the 2 x 256 model "
                             "(incremental); results then go to --out only")
    parser.add_argument("--out", type=Path,
                        help="also write the results here (with --only, only here)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sentences = [[int(t) for t in rng.integers(2, VOCAB, int(rng.integers(10, 30)))] + [1]
                 for _ in range(512)]
    measured: dict = {}
    if args.only != "incremental":
        with tempfile.TemporaryDirectory() as tmp:
            path = make_model(Path(tmp))
            measured = measure(path, Path(tmp), args.threads, args.spin_threads, sentences,
                               args.device)
        measured["append_target_met"] = measured["append_overhead_ms"] <= 0.2
    if args.only != "base":
        with tempfile.TemporaryDirectory() as tmp:
            measured["incremental"] = steps.measure(
                Path(tmp), args.threads,
                lambda repository: start_server(repository, args.threads, args.spin_threads,
                                                args.device))
    report = {
        "date": now(),
        "machine": f"{cpu()}, {args.threads} ONNX Runtime "
                   f"threads, onnxruntime {ort.__version__}, grpcio {grpc.__version__}",
        "device": args.device,
        **({"model": f"LSTM {LAYERS}x{HIDDEN}, V={VOCAB}, random weights"}
           if args.only != "incremental" else {}),
        "spin_threads": args.spin_threads, **measured,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.only is None:
        save_results("serve" if args.device == "cpu" else f"serve-{args.device}", report)
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

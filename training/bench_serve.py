"""`make bench-serve`: the gRPC server against the runtime called in process, client and
server on this machine, every ratio measured in one run.

The model is a 2-layer, 650-unit LSTM over a 10,000-word vocabulary with random weights,
exported through the normal path (graph, check, verification against torch). The server
runs as its own process (`recur serve`), so client and server do not share a GIL.
Results go to bench/serve.json and the README table between the bench-serve markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.artifact import write_artifact
from serving.client import RecurClient
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from serving.runtime import ModelRuntime
from serving.sampler import SamplingParams, make_rng, sample_next
from serving.tokenizer import EOS, UNK, Normalization, Vocabulary
from training.bench import REPO, fill_readme
from training.export import model_metadata
from training.export.graph import build_graph
from training.export.verify import verify
from training.models.language_model import RecurrentLM

RESULTS = REPO / "bench" / "serve.json"
VOCAB, HIDDEN, LAYERS, STREAMS, STREAM_TOKENS = 10_000, 650, 2, 64, 64
SAMPLING = SamplingParams(temperature=1.0)


def make_model(root: Path) -> Path:
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, "lstm", HIDDEN, HIDDEN, LAYERS, tie_weights=True).eval()
    vocab = Vocabulary([UNK, EOS] + [f"w{i}" for i in range(VOCAB - 2)], Normalization())
    graph = build_graph(model, name="bench")
    onnx.checker.check_model(graph, full_check=True)
    metadata = {**model_metadata(model, graph), "task": "lm", "vocab_size": VOCAB,
                "num_labels": None, "special_tokens": {"eos": 1, "unk": 0, "pad": None}}
    return write_artifact(root / "bench-lstm" / "1", graph.SerializeToString(), vocab, None,
                          metadata, check=lambda p: verify(model, ModelRuntime(p)))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


# -- in process ----------------------------------------------------------------------------
def in_process(path: Path, threads: int, spin: bool, sentences: list[list[int]]) -> dict:
    runtime = ModelRuntime(path, threads=threads, spin=spin)
    state = runtime.initial_state(1)
    one = np.array([[5]], np.int64)
    step = timed(lambda: runtime.run_lm(one, np.array([1]), state, one), 300)
    # B=64 decoding with sampling, as the server's streams do it
    rngs = [make_rng(s) for s in range(STREAMS)]
    batch_state = runtime.initial_state(STREAMS)
    tokens = np.full((STREAMS, 1), 1, np.int64)
    lengths = np.ones(STREAMS, np.int64)
    started = time.perf_counter()
    for _ in range(STREAM_TOKENS):
        out = runtime.run_lm(tokens, lengths, batch_state, np.zeros_like(tokens))
        batch_state = out.state.numpy()
        tokens = np.array([[sample_next(out.next_logprobs[b], SAMPLING, rngs[b])]
                           for b in range(STREAMS)], np.int64)
    decode_rate = STREAMS * STREAM_TOKENS / (time.perf_counter() - started)
    score_times = timed(lambda: [runtime.score(sentences[i:i + 64])
                                 for i in range(0, len(sentences), 64)], 3)
    scored = sum(len(s) for s in sentences)
    return {"step_b1_ms_p50": percentile(step, 50),
            "decode_b64_tokens_per_s": decode_rate,
            "score_tokens_per_s": scored / statistics.median(score_times)}


# -- through the server --------------------------------------------------------------------
def start_server(repository: Path, threads: int, spin: bool) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "recur", "serve", "--model-repository", str(repository),
         "--port", "0", "--metrics-port", "-1", "--threads", str(threads),
         "--max-completion-tokens", "100000", "--log-level", "WARNING",
         "--spin-threads" if spin else "--no-spin-threads"],
        stdout=subprocess.PIPE, text=True)
    match = re.search(r"listening on ([\d.]+:\d+)", process.stdout.readline())
    if match is None:
        process.kill()
        raise SystemExit("recur serve did not start")
    return process, match[1]


def append_latency(client: RecurClient, history: int, repeat: int) -> list[float]:
    rng = np.random.default_rng(history)
    prefix = [int(t) for t in rng.integers(2, VOCAB, history)]
    session = client.create_session("bench-lstm", prefix)
    times = timed(lambda: client.append(session.session_id, [7]), repeat)
    client.close_session(session.session_id)
    return times


async def concurrent_streams(target: str, count: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)

        async def one(seed: int) -> int:
            request = pb.CompleteRequest(model=pb.ModelRef(name="bench-lstm"),
                                         prompt=pb.Input(text=""), max_tokens=STREAM_TOKENS,
                                         temperature=1.0, seed=seed)
            return sum([1 async for event in stub.Complete(request) if event.HasField("token")])

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(seed) for seed in range(count)))
        return sum(tokens) / (time.perf_counter() - started)


def through_server(repository: Path, threads: int, spin: bool,
                   sentences: list[list[int]]) -> dict:
    process, target = start_server(repository, threads, spin)
    try:
        with grpc.insecure_channel(target) as channel:
            client = RecurClient(target, channel=channel)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            timed(lambda: health.Check(check), 50)
            noop = timed(lambda: health.Check(check), 500)
            append_latency(client, 10, 20)  # warm up
            short = append_latency(client, 10, 300)
            long = append_latency(client, 10_000, 300)
            asyncio.run(concurrent_streams(target, 4))  # warm up
            together = asyncio.run(concurrent_streams(target, STREAMS))
            alone = [asyncio.run(concurrent_streams(target, 1)) for _ in range(8)]

            def score_all():
                futures = [client.language_model.Score.future(pb.ScoreRequest(
                    model=pb.ModelRef(name="bench-lstm"),
                    inputs=[pb.Input(token_ids=pb.TokenIds(ids=s[:-1]))
                            for s in sentences[i:i + 64]])) for i in range(0, len(sentences), 64)]
                return [f.result() for f in futures]

            score_all()
            score_times = timed(score_all, 3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    scored = sum(len(s) for s in sentences)
    return {"noop_rpc_ms_p50": percentile(noop, 50),
            "append_ms_p50_history_10": percentile(short, 50),
            "append_ms_p99_history_10": percentile(short, 99),
            "append_ms_p50_history_10000": percentile(long, 50),
            "append_ms_p99_history_10000": percentile(long, 99),
            "streams_64_tokens_per_s": together,
            "streams_one_at_a_time_tokens_per_s": statistics.median(alone),
            "score_tokens_per_s": scored / statistics.median(score_times)}


def update_readme(report: dict) -> None:
    s, p = report["server"], report["in_process"]
    rows = [
        "| measure | value | target |", "|---|---|---|",
        f"| no-op unary RPC (health Check), p50 | {s['noop_rpc_ms_p50']:.3f} ms | |",
        f"| in-process B=1 step | {p['step_b1_ms_p50']:.3f} ms | |",
        f"| Append of one token, p50 / p99 (history 10) | {s['append_ms_p50_history_10']:.3f} / "
        f"{s['append_ms_p99_history_10']:.3f} ms | p50 <= {report['append_target_ms']:.3f} ms "
        f"({'met' if report['append_target_met'] else 'not met'}) |",
        f"| Append p50 after 10,000 tokens of history / after 10 | "
        f"{report['append_history_ratio']:.3f} | <= 1.1 |",
        f"| 64 completion streams, tokens/s | {s['streams_64_tokens_per_s']:,.0f} | |",
        f"| ... / in-process B=64 decoding with sampling ({p['decode_b64_tokens_per_s']:,.0f} "
        f"tokens/s) | {100 * report['streams_vs_in_process']:.0f}% | >= 70% |",
        f"| ... / the streams one at a time ({s['streams_one_at_a_time_tokens_per_s']:,.0f} "
        f"tokens/s) | {report['streams_vs_one_at_a_time']:.1f}x | >= 4x |",
        f"| Score tokens/s / in-process scoring of the same batches "
        f"({p['score_tokens_per_s']:,.0f}) | {100 * report['score_vs_in_process']:.0f}% | "
        f">= 80% |",
        "", f"{report['machine']}, {report['date']}."]
    fill_readme("serve", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin-threads", action=argparse.BooleanOptionalAction, default=False,
                        help="let idle ONNX Runtime threads spin (both sides; off by default, "
                             "as in the server)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sentences = [[int(t) for t in rng.integers(2, VOCAB, int(rng.integers(10, 30)))] + [1]
                 for _ in range(512)]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp))
        local = in_process(path, args.threads, args.spin_threads, sentences)
        server = through_server(Path(tmp), args.threads, args.spin_threads, sentences)
    target = server["noop_rpc_ms_p50"] + local["step_b1_ms_p50"] + 0.2
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} ONNX Runtime "
                   f"threads, onnxruntime {ort.__version__}, grpcio {grpc.__version__}",
        "model": f"LSTM {LAYERS}x{HIDDEN}, V={VOCAB}, random weights",
        "spin_threads": args.spin_threads,
        "in_process": local, "server": server,
        "append_target_ms": target,
        "append_target_met": server["append_ms_p50_history_10"] <= target,
        "append_history_ratio": server["append_ms_p50_history_10000"]
        / server["append_ms_p50_history_10"],
        "streams_vs_in_process": server["streams_64_tokens_per_s"]
        / local["decode_b64_tokens_per_s"],
        "streams_vs_one_at_a_time": server["streams_64_tokens_per_s"]
        / server["streams_one_at_a_time_tokens_per_s"],
        "score_vs_in_process": server["score_tokens_per_s"] / local["score_tokens_per_s"],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    update_readme(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

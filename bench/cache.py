"""`make bench-cache`: the server's prefix cache (serving/engine/prefix_cache.py) on and
off, two `recur serve` processes on this machine, every ratio measured in one run.

The model is bench/serve.py's: a 2-layer, 650-unit LSTM over 10,000 words with random
weights, exported through the normal path. One server runs with the default prefix cache,
the other with `--prefix-cache-mib 0`; only one is loaded at a time, the two taking turns
in rounds (off first in even rounds, on first in odd ones), each round on fresh random
token ids, so the cache starts cold for that round's contexts and prompts. Tokens run
through the network and the cache's counters are read from each server's /metrics before
and after every round; ratios are per round, reported with their median.

1. Multiple choice: one LogLikelihood request per context (about 100 tokens, 4
   continuations of about 10), 64 requests in flight: wall time and tokens run; then the
   same with 16 questions to a request (as a harness batches them), 4 in flight.
2. 64 concurrent completions of one 200-token prompt: time to first token and to the end.
3. Memory of the cache's tree in this process (tracemalloc) against its own accounting.
4. The hit rate of a mixed workload on the cache-on server.
Results go to bench/results/cache.json and the report (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from bench.common import cpu, now
from bench.report import save_results
from bench.serve import HIDDEN, LAYERS, VOCAB, make_model
from serving.engine.prefix_cache import ARRAY_BYTES, NODE_BYTES, TOKEN, PrefixCache, token_rows
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

MODEL = pb.ModelRef(name="bench-lstm")
LABEL = "bench-lstm/1"  # the version's label in the metrics
CHOICES, CONTEXT, CONTINUATION = 4, (90, 110), (8, 12)  # token counts: uniform, inclusive
PROMPT_TOKENS, COMPLETIONS, COMPLETION_TOKENS = 200, 64, 16
SPEEDUP_TARGET = 3.0


def random_ids(rng: np.random.Generator, low: int, high: int | None = None) -> list[int]:
    """Fresh token ids (not `<unk>` or `<eos>`), `low` of them, or uniform in low..high."""
    count = low if high is None else int(rng.integers(low, high + 1))
    return [int(t) for t in rng.integers(2, VOCAB, count)]


def ids_input(ids: list[int]) -> pb.Input:
    return pb.Input(token_ids=pb.TokenIds(ids=ids))


# -- the servers ---------------------------------------------------------------------------
class Server:
    """`recur serve` in its own process, with its metrics port for the counters."""

    def __init__(self, repository: Path, threads: int, cache_mib: float | None):
        cache = [] if cache_mib is None else ["--prefix-cache-mib", str(cache_mib)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recur", "serve", "--model-repository", str(repository),
             "--port", "0", "--metrics-port", "0", "--threads", str(threads),
             "--log-level", "WARNING", *cache], stdout=subprocess.PIPE, text=True)
        match = re.search(r"listening on ([\d.]+:\d+), metrics on (\d+)",
                          self.process.stdout.readline())
        if match is None:
            self.process.kill()
            raise SystemExit("recur serve did not start")
        self.target, self.metrics_url = match[1], f"http://127.0.0.1:{match[2]}/metrics"

    def metrics(self) -> dict[str, float]:
        """This model's tokens run and prefix cache samples, by name (and result label)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            if family.name not in ("recur_executed_tokens", "recur_batch_size") and not (
                    family.name.startswith("recur_prefix_cache_")):
                continue
            for sample in family.samples:
                if sample.labels.get("model") != LABEL or sample.name.endswith(
                        ("_created", "_bucket")):
                    continue
                result = sample.labels.get("result")
                values[sample.name if result is None else f"{sample.name}:{result}"] = (
                    sample.value)
        return values

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def measured(server: Server, work) -> tuple[object, dict[str, float], dict[str, float]]:
    """`work(target)`'s result, the counters' changes over it and the values after it."""
    before = server.metrics()
    result = asyncio.run(work(server.target))
    after = server.metrics()
    return result, {name: after[name] - before.get(name, 0.0) for name in after}, after


# -- 1. multiple choice --------------------------------------------------------------------
def questions(rng: np.random.Generator, count: int,
              per_request: int = 1) -> list[pb.LogLikelihoodRequest]:
    """`count` questions (a context, CHOICES continuations), `per_request` to a request."""
    pairs = [[pb.LogLikelihoodPair(context=ids_input(context),
                                   continuation=ids_input(random_ids(rng, *CONTINUATION)))
              for _ in range(CHOICES)]
             for context in (random_ids(rng, *CONTEXT) for _ in range(count))]
    return [pb.LogLikelihoodRequest(model=MODEL, pairs=sum(pairs[i: i + per_request], []))
            for i in range(0, count, per_request)]


def tokens_to_run(requests: list[pb.LogLikelihoodRequest], cached: bool) -> int:
    """What the network must run: without the cache every pair reads context and
    continuation from the start but for the last token (the start state gives the first
    token's log-prob); with it, the context once, then each continuation alone."""
    total = 0
    for request in requests:
        contexts = {tuple(p.context.token_ids.ids) for p in request.pairs}
        for pair in request.pairs:
            context, continuation = (len(pair.context.token_ids.ids),
                                     len(pair.continuation.token_ids.ids))
            total += continuation if cached else context + continuation - 1
        if cached:
            total += sum(len(c) - 1 for c in contexts)
    return total


def send_all(requests: list[pb.LogLikelihoodRequest], in_flight: int):
    async def work(target: str) -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = pb_grpc.LanguageModelStub(channel)
            gate = asyncio.Semaphore(in_flight)

            async def one(request: pb.LogLikelihoodRequest) -> None:
                async with gate:
                    await stub.LogLikelihood(request)

            started = time.perf_counter()
            await asyncio.gather(*(one(request) for request in requests))
            return time.perf_counter() - started
    return work


def multiple_choice(servers: dict[str, Server], contexts: int, rounds: int,
                    in_flight: int, per_request: int = 1) -> dict:
    sides = {side: {"wall_s": [], "tokens_run": [], "expected_tokens_run": [],
                    "contexts_per_s": [], "rows_per_call": []} for side in servers}
    for round_ in range(rounds):
        requests = questions(np.random.default_rng([1, round_, per_request]), contexts,
                             per_request)
        for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            wall, delta, _ = measured(servers[side], send_all(requests, in_flight))
            figures = sides[side]
            figures["wall_s"].append(wall)
            figures["tokens_run"].append(int(delta["recur_executed_tokens_total"]))
            figures["expected_tokens_run"].append(tokens_to_run(requests, side == "on"))
            figures["contexts_per_s"].append(contexts / wall)
            figures["rows_per_call"].append(delta["recur_batch_size_sum"]
                                            / max(delta["recur_batch_size_count"], 1))
    off, on = sides["off"], sides["on"]
    speedups = [a / b for a, b in zip(off["wall_s"], on["wall_s"], strict=True)]
    token_ratios = [a / b for a, b in zip(off["tokens_run"], on["tokens_run"], strict=True)]
    speedup = statistics.median(speedups)
    return {"contexts_per_round": contexts, "questions_per_request": per_request,
            "rounds": rounds, "contexts_per_side": contexts
            * rounds, "choices": CHOICES, "context_tokens": list(CONTEXT),
            "continuation_tokens": list(CONTINUATION), "in_flight": in_flight, **sides,
            "off_contexts_per_s": statistics.median(off["contexts_per_s"]),
            "on_contexts_per_s": statistics.median(on["contexts_per_s"]),
            **{f"{side}_tokens_run_per_s": statistics.median(
                t / w for t, w in zip(figures["tokens_run"], figures["wall_s"], strict=True))
               for side, figures in sides.items()},
            "speedup_per_round": speedups, "speedup": speedup,
            "tokens_run_ratio_per_round": token_ratios,
            "tokens_run_ratio": statistics.median(token_ratios),
            "target": SPEEDUP_TARGET, "target_met": speedup >= SPEEDUP_TARGET}


# -- 2. completions sharing a prompt -------------------------------------------------------
def complete_all(prompt: list[int], count: int):
    async def work(target: str) -> dict:
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = pb_grpc.LanguageModelStub(channel)

            async def one(seed: int) -> float:
                request = pb.CompleteRequest(model=MODEL, prompt=ids_input(prompt), n=1,
                                             max_tokens=COMPLETION_TOKENS, temperature=1.0,
                                             seed=seed)
                started, first = time.perf_counter(), None
                async for event in stub.Complete(request):
                    if first is None and event.HasField("token"):
                        first = time.perf_counter() - started
                return first

            started = time.perf_counter()
            firsts = await asyncio.gather(*(one(seed) for seed in range(count)))
            return {"first_token_s": firsts, "wall_s": time.perf_counter() - started}
    return work


def shared_prompt(servers: dict[str, Server], rounds: int) -> dict:
    sides = {side: {"first_token_ms_p50": [], "first_token_ms_p90": [], "wall_ms": [],
                    "tokens_run": []} for side in servers}
    for round_ in range(rounds):
        prompt = random_ids(np.random.default_rng([2, round_]), PROMPT_TOKENS)
        for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            result, delta, _ = measured(servers[side], complete_all(prompt, COMPLETIONS))
            firsts = 1000 * np.array(result["first_token_s"])
            figures = sides[side]
            figures["first_token_ms_p50"].append(float(np.percentile(firsts, 50)))
            figures["first_token_ms_p90"].append(float(np.percentile(firsts, 90)))
            figures["wall_ms"].append(1000 * result["wall_s"])
            figures["tokens_run"].append(int(delta["recur_executed_tokens_total"]))

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(sides["off"][name], sides["on"][name],
                                                       strict=True))

    return {"prompt_tokens": PROMPT_TOKENS, "completions": COMPLETIONS,
            "max_tokens": COMPLETION_TOKENS, "rounds": rounds, **sides,
            **{f"{side}_{name}": statistics.median(sides[side][name]) for side in sides
               for name in ("first_token_ms_p50", "first_token_ms_p90", "wall_ms",
                            "tokens_run")},
            "first_token_p50_speedup": ratio("first_token_ms_p50"),
            "first_token_p90_speedup": ratio("first_token_ms_p90"),
            "wall_speedup": ratio("wall_ms"), "tokens_run_ratio": ratio("tokens_run")}


# -- 3. memory -----------------------------------------------------------------------------
def cache_memory(paths: int, length: int, state_shape: tuple[int, ...], vocab: int,
                 with_states: bool) -> dict:
    """Bytes that `paths` random paths of `length` tokens (each with a state at its end,
    `with_states`) keep allocated in a PrefixCache, by tracemalloc, against the cache's
    own count. The ids are the same with or without states, so the two trees differ only
    by the states."""
    ids_rng, values_rng = np.random.default_rng(3), np.random.default_rng(4)
    cache = PrefixCache(1 << 40, 1 << 30, np.zeros(state_shape, np.float32),
                        np.full(vocab, -np.log(vocab), np.float32))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(paths):
            ids = ids_rng.integers(2, vocab, length)
            values = values_rng.standard_normal(length).astype(np.float32)
            states = ({length: values_rng.standard_normal(state_shape).astype(np.float32)}
                      if with_states else {})
            cache.insert(token_rows(ids, values, ids, values), states)
        del ids, values, states
        gc.collect()
        allocated = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return {"paths": paths, "tokens": paths * length, "nodes": cache.nodes,
            "entries": cache.entries, "measured_bytes": allocated,
            "accounted_bytes": cache.bytes}


def memory(paths: int, length: int) -> dict:
    shape = (LAYERS, 2 * HIDDEN)  # an LSTM's state: h and c per layer
    with_states = cache_memory(paths, length, shape, VOCAB, True)
    bare = cache_memory(paths, length, shape, VOCAB, False)
    state_bytes = int(np.prod(shape)) * 4
    # a token: its TOKEN row and its id again in the node's key
    node_measured = ((bare["measured_bytes"] - bare["tokens"] * (TOKEN.itemsize + 4))
                     / bare["nodes"])
    state_measured = (with_states["measured_bytes"] - bare["measured_bytes"]) / paths
    accounting = [r["measured_bytes"] / r["accounted_bytes"] for r in (with_states, bare)]
    return {"state_shape": list(shape), "state_bytes": state_bytes,
            "with_states": with_states, "without_states": bare,
            "bytes_per_entry_measured": with_states["measured_bytes"] / with_states["entries"],
            "bytes_per_entry_accounted": with_states["accounted_bytes"] / with_states["entries"],
            "bytes_per_token_measured": bare["measured_bytes"] / bare["tokens"],
            "bytes_per_token_accounted": bare["accounted_bytes"] / bare["tokens"],
            "node_bytes_measured": node_measured, "node_bytes_accounted": NODE_BYTES,
            "state_overhead_measured": state_measured - state_bytes,
            "state_overhead_accounted": ARRAY_BYTES,
            "measured_vs_accounted_with_states": accounting[0],
            "measured_vs_accounted_without_states": accounting[1],
            "accounting_within_25_percent": all(0.75 <= r <= 1.25 for r in accounting)}


# -- 4. a mixed workload -------------------------------------------------------------------
SHARES = {"chat": 0.4, "choice": 0.3, "score": 0.2, "session": 0.1}
SYSTEM_PROMPTS, SYSTEM_TOKENS, USER_TURN, SENTENCE = 4, 60, (10, 30), (20, 40)


def mixed_plan(requests: int, seed: int) -> list[tuple[str, object]]:
    """The mix, interleaved at random: chat-like completions (one of a few shared system
    prompts, then a fresh user turn), multiple-choice questions, Score of fresh sentences,
    and sessions that start with a system prompt, then append a user turn."""
    rng = np.random.default_rng(seed)
    systems = [random_ids(rng, SYSTEM_TOKENS) for _ in range(SYSTEM_PROMPTS)]
    plan: list[tuple[str, object]] = []
    for kind in rng.choice(list(SHARES), size=requests, p=list(SHARES.values())):
        system = systems[int(rng.integers(SYSTEM_PROMPTS))]
        if kind == "chat":
            plan.append((kind, system + random_ids(rng, *USER_TURN)))
        elif kind == "choice":
            plan.append((kind, questions(rng, 1)[0]))
        elif kind == "score":
            plan.append((kind, random_ids(rng, *SENTENCE)))
        else:
            plan.append((kind, (system, random_ids(rng, *USER_TURN))))
    return plan


def run_plan(plan: list[tuple[str, object]], in_flight: int):
    async def work(target: str) -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = pb_grpc.LanguageModelStub(channel)

            async def one(kind: str, item) -> None:
                if kind == "chat":
                    request = pb.CompleteRequest(model=MODEL, prompt=ids_input(item),
                                                 max_tokens=8, temperature=1.0, seed=0)
                    async for _ in stub.Complete(request):
                        pass
                elif kind == "choice":
                    await stub.LogLikelihood(item)
                elif kind == "score":
                    await stub.Score(pb.ScoreRequest(model=MODEL, inputs=[ids_input(item)]))
                else:
                    system, turn = item
                    session = await stub.CreateSession(pb.CreateSessionRequest(
                        model=MODEL, prefix=ids_input(system)))
                    await stub.Append(pb.AppendRequest(session_id=session.session_id,
                                                       input=ids_input(turn)))
                    await stub.CloseSession(pb.CloseSessionRequest(
                        session_id=session.session_id))

            pending = iter(plan)

            async def worker() -> None:
                for kind, item in pending:
                    await one(kind, item)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return time.perf_counter() - started
    return work


def mixed(server: Server, requests: int, in_flight: int) -> dict:
    plan = mixed_plan(requests, 5)
    wall, delta, after = measured(server, run_plan(plan, in_flight))
    looked_up = delta["recur_prefix_cache_lookup_tokens_total"]
    hits = delta["recur_prefix_cache_hit_tokens_total"]
    return {"requests": requests, "in_flight": in_flight, "shares": SHARES,
            "counts": {kind: sum(k == kind for k, _ in plan) for kind in SHARES},
            "wall_s": wall, "requests_per_s": requests / wall,
            "lookup_tokens": int(looked_up), "hit_tokens": int(hits),
            "hit_rate": hits / looked_up if looked_up else 0.0,
            "lookups_hit": int(delta.get("recur_prefix_cache_lookups_total:hit", 0)),
            "lookups_miss": int(delta.get("recur_prefix_cache_lookups_total:miss", 0)),
            "tokens_run": int(delta["recur_executed_tokens_total"]),
            "cached_bytes_end": int(after["recur_prefix_cache_bytes"]),
            "cached_bytes_added": int(delta["recur_prefix_cache_bytes"]),
            "entries_end": int(after["recur_prefix_cache_entries"]),
            "entries_added": int(delta["recur_prefix_cache_entries"]),
            "budget_bytes": int(after["recur_prefix_cache_budget_bytes"]),
            "evictions": int(delta["recur_prefix_cache_evictions_total"])}


def warm_up(servers: dict[str, Server], in_flight: int) -> None:
    """A few requests of every kind on each server, on ids no round uses, and a small
    multiple-choice round at full concurrency: without it the first measured round of a
    side ran up to 1.8x slower than its later ones."""
    plan = mixed_plan(16, 99)
    for server in servers.values():
        asyncio.run(run_plan(plan, 4)(server.target))
        asyncio.run(send_all(questions(np.random.default_rng([2, 99]), 2 * in_flight),
                             in_flight)(server.target))
        asyncio.run(complete_all(random_ids(np.random.default_rng(98), PROMPT_TOKENS), 8)(
            server.target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime threads of each server")
    parser.add_argument("--contexts", type=int, default=125,
                        help="multiple-choice contexts per round and side (4 continuations "
                             "each, one LogLikelihood request)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds of each on/off comparison (the sides alternate)")
    parser.add_argument("--batch-questions", type=int, default=16,
                        help="questions per LogLikelihood request in the batched variant "
                             "(as a harness batches them), with in-flight / this many "
                             "requests in flight: the same pairs in flight")
    parser.add_argument("--in-flight", type=int, default=64,
                        help="LogLikelihood requests in flight at once")
    parser.add_argument("--memory-paths", type=int, default=2000,
                        help="paths of 100 random tokens inserted to measure memory")
    parser.add_argument("--mixed-requests", type=int, default=800,
                        help="requests of the mixed workload (on the cache-on server)")
    parser.add_argument("--mixed-in-flight", type=int, default=16,
                        help="mixed-workload requests in flight at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp))
        servers: dict[str, Server] = {}
        try:
            servers["off"] = Server(Path(tmp), args.threads, 0)
            servers["on"] = Server(Path(tmp), args.threads, None)
            warm_up(servers, args.in_flight)
            choice = multiple_choice(servers, args.contexts, args.rounds, args.in_flight)
            batched = multiple_choice(servers, args.contexts, args.rounds,
                                      max(1, args.in_flight // args.batch_questions),
                                      args.batch_questions)
            completions = shared_prompt(servers, args.rounds)
            workload = mixed(servers["on"], args.mixed_requests, args.mixed_in_flight)
        finally:
            for server in servers.values():
                server.stop()
    report = {
        "date": now(),
        "machine": f"{cpu()}, {args.threads} ONNX Runtime threads per server, onnxruntime "
                   f"{ort.__version__}, grpcio {grpc.__version__}",
        "model": f"LSTM {LAYERS}x{HIDDEN}, V={VOCAB}, random weights",
        "multiple_choice": choice, "multiple_choice_batched": batched,
        "shared_prompt": completions,
        "memory": memory(args.memory_paths, 100), "mixed": workload,
    }
    save_results("cache", report)


if __name__ == "__main__":
    main()

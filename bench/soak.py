"""`make soak`: mixed traffic against a `recur serve` process for a bounded time, at a
fraction of the throughput measured first, reporting unexpected errors, latency and the
server's resident memory. Not in CI (ten minutes by default).

    python -m bench.soak runs/models --minutes 10 --load 0.8

The mix, one "operation" each: a session (create with a prefix, three appends, close), a
completion (16 tokens), Score (8 sentences), Tag (4 texts), Classify (4 texts). First the
maximum is measured closed-loop (32 callers, 20 s); then operations start at `load` times
that rate, open-loop, for `minutes`. Memory growth is measured from the end of the
warm-up (the first 10%) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.report import save_results
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

WORDS = ["the", "old", "dogs", "that", "cat", "sees", "run", "in", "rome", "some", "happy",
         "children", "laugh", "every", "dark", "house", "sleeps", "again", "a", "kind",
         "teacher", "follows"]
KINDS = ("session", "complete", "score", "tag", "classify")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15)))


class Traffic:
    def __init__(self, channel: grpc.aio.Channel, models: dict[str, str]):
        self.lm = pb_grpc.LanguageModelStub(channel)
        self.tagger = pb_grpc.TaggerStub(channel)
        self.classifier = pb_grpc.ClassifierStub(channel)
        self.models = models

    def ref(self, task: str) -> pb.ModelRef:
        return pb.ModelRef(name=self.models[task])

    async def run(self, kind: str, rng: random.Random) -> None:
        timeout = 60
        if kind == "session":
            session = await self.lm.CreateSession(pb.CreateSessionRequest(
                model=self.ref("lm"), prefix=pb.Input(text=sentence(rng)), top_k=3),
                timeout=timeout)
            for _ in range(3):
                await self.lm.Append(pb.AppendRequest(session_id=session.session_id,
                                                      input=pb.Input(text=sentence(rng))),
                                     timeout=timeout)
            await self.lm.CloseSession(pb.CloseSessionRequest(session_id=session.session_id),
                                       timeout=timeout)
        elif kind == "complete":
            call = self.lm.Complete(pb.CompleteRequest(
                model=self.ref("lm"), prompt=pb.Input(text=sentence(rng)), max_tokens=16,
                temperature=0.8, seed=rng.randrange(1 << 30)), timeout=timeout)
            async for _ in call:
                pass
        elif kind == "score":
            await self.lm.Score(pb.ScoreRequest(model=self.ref("lm"), inputs=[
                pb.Input(text=sentence(rng)) for _ in range(8)]), timeout=timeout)
        elif kind == "tag":
            await self.tagger.Tag(pb.TagRequest(model=self.ref("tag"), inputs=[
                pb.Input(text=sentence(rng)) for _ in range(4)]), timeout=timeout)
        else:
            await self.classifier.Classify(pb.ClassifyRequest(model=self.ref("classify"), inputs=[
                pb.Input(text=sentence(rng)) for _ in range(4)]), timeout=timeout)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def closed_loop(traffic: Traffic, seconds: float, workers: int = 32) -> float:
    """Operations per second with `workers` callers back to back."""
    done, deadline = 0, time.monotonic() + seconds

    async def worker(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            await traffic.run(KINDS[done % len(KINDS)], rng)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    return done / (time.monotonic() - started)


async def open_loop(traffic: Traffic, rate: float, seconds: float, pid: int,
                    workers: int = 32) -> dict:
    """Operations are due at a fixed rate; a pool of `workers` callers takes them in order,
    and latency counts from when an operation was due (so a server that falls behind shows
    it as latency rather than hiding it). Nothing is cancelled: at the end the callers
    finish what they hold, and operations not yet begun are reported, not failed."""
    rng = random.Random(0)
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: list[str] = []
    memory: list[tuple[float, int]] = []
    start = time.monotonic()
    plan = [(i / rate, rng.choice(KINDS), rng.randrange(1 << 30))
            for i in range(int(rate * seconds))]
    position = 0

    async def caller() -> None:
        nonlocal position
        while position < len(plan):
            due, kind, seed = plan[position]
            position += 1
            if (wait := start + due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            try:
                await traffic.run(kind, random.Random(seed))
                latencies[kind].append(time.monotonic() - start - due)
            except grpc.aio.AioRpcError as error:
                errors.append(f"{kind}: {error.code().name}: {error.details()}")
            if time.monotonic() - start > seconds:
                return

    async def sample_memory() -> None:
        while True:
            memory.append((time.monotonic() - start, resident_bytes(pid)))
            await asyncio.sleep(5.0)

    sampler = asyncio.ensure_future(sample_memory())
    await asyncio.gather(*(caller() for _ in range(workers)))
    sampler.cancel()
    memory.append((time.monotonic() - start, resident_bytes(pid)))
    warm = [m for t, m in memory if t >= seconds * 0.1]
    done = sum(len(v) for v in latencies.values()) + len(errors)
    return {
        "operations_due": len(plan), "operations_done": done,
        "achieved_operations_per_s": round(done / (time.monotonic() - start), 1),
        "errors": len(errors), "error_samples": errors[:10],
        "latency_ms": {k: {"count": len(v),
                           "p50": round(1000 * statistics.median(v), 1) if v else None,
                           "p99": round(1000 * statistics.quantiles(v, n=100)[98], 1)
                           if len(v) >= 100 else None} for k, v in latencies.items()},
        "rss_bytes": {"after_warmup": warm[0], "end": warm[-1], "max": max(warm)},
        "rss_growth": round(warm[-1] / warm[0] - 1, 4),
    }


async def soak(models: Path, minutes: float, load: float) -> dict:
    server = subprocess.Popen([sys.executable, "-m", "recur", "serve", "--model-repository",
                               str(models), "--port", "0", "--metrics-port", "-1",
                               "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"listening on ([\d.]+:\d+)", line)
        if match is None:
            raise SystemExit(f"recur serve did not start: {line!r}")
        async with grpc.aio.insecure_channel(match[1]) as channel:
            listed = await pb_grpc.ModelsStub(channel).ListModels(pb.ListModelsRequest())
            models_by_task: dict[str, str] = {}
            for info in listed.models:
                models_by_task.setdefault(info.task, info.name)
            traffic = Traffic(channel, models_by_task)
            maximum = await closed_loop(traffic, 20.0)
            result = await open_loop(traffic, maximum * load, minutes * 60, server.pid)
        return {"models": models_by_task, "minutes": minutes, "load": load,
                "max_operations_per_s": round(maximum, 1),
                "target_operations_per_s": round(maximum * load, 1), **result}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, help="model repository (make demo: runs/models)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the maximum")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of "
                        "bench/results/soak.json (and leave the report alone)")
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        parser.error(f"{args.models}: no model repository (run make demo first)")
    report = asyncio.run(soak(args.models, args.minutes, args.load))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    else:
        save_results("soak", report)
    ok = report["errors"] == 0 and report["rss_growth"] < 0.05
    print(f"soak {'passed' if ok else 'FAILED'}: {report['errors']} errors, resident memory "
          f"{100 * report['rss_growth']:+.1f}% after warm-up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

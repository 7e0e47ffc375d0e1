"""`make fuzz`: generated requests, valid and hostile, at every RPC of a real `recur serve`,
in batches, with checks after each batch; counts and failures into
bench/results/fuzz.json. Not in CI (a few minutes on 2 cores by default).

    python -m bench.fuzz                      # 10,000 requests per RPC, seed 0
    python -m bench.fuzz --requests 2000 --seed 7
    python -m bench.fuzz --dry-run            # a tiny run, in seconds; writes nothing

The server runs as its own process on 127.0.0.1 (an ephemeral port) over small
random-weight models that the run builds (bench/fuzzing/models.py: a language model in
two versions, a unidirectional and a bidirectional tagger, a final-state and a
mean-pooling classifier), with state-token keys, tight request limits and every version
served. Every RPC of both protocols is called (recur.v1 LanguageModel, Tagger,
Classifier, Models; the Open Inference Protocol's GRPCInferenceService; grpc.health.v1),
by 8 concurrent workers: valid requests and hostile ones (bench/fuzzing/cases.py and
cases_v2.py name each mutation in its label), plus sessions, Converse streams and V2
sequences that the fuzzer drives and replays (bench/fuzzing/scenarios.py).

The checks, after every batch (and, for health and memory, all along: a probe process
and a sampling thread):

    statuses     no response is INTERNAL or UNKNOWN (nor a ModelStreamInfer error_message
                 naming them); every status is counted per RPC
    memory       the server's resident memory (sampled, and the kernel's peak mark) stays
                 under its resident memory after the warm-up + --rss-bound-mb
    health       after each batch (its requests answered, the workers held), grpc.health.v1
                 Check answers within --health-ms; while the workers run, within --stall-ms
                 (the server's one event loop is then busy with them: that latency is
                 reported as a distribution, and only a stall fails)
    replay       driven sessions and V2 sequences answer the positions and log-probs of a
                 sequential replay (a stateless call on the concatenated tokens), within
                 --tolerance
    completions  answered completions are well-formed, and a tiny temperature gives the
                 greedy tokens
    hangs        no request with the normal deadline (--timeout-s) runs out of it
    server       the server neither dies nor fails to stop cleanly on SIGTERM; the fuzzer
                 itself raises nothing

The same seed gives the same requests (the interleaving of the workers, and what the
server answers, may differ). Exit status 1 if any check failed, 2 if the server did not
start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from bench.common import RESULTS, cpu, now
from bench.fuzzing.case import Context, Limits, finish
from bench.fuzzing.cases import Generators
from bench.fuzzing.client import RPCS, Caller, Recorder
from bench.fuzzing.models import Served, build
from bench.fuzzing.monitor import Monitor, memory, reset_peak
from bench.fuzzing.scenarios import Checks
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb

# Tight limits, so hostile requests meet them; completions may still be long and wide
# (256 tokens, 64 samples), where many stop strings cost the most.
LIMITS = Limits(max_completion_tokens=256, max_samples=64, max_sequences=16, max_tokens=512)
DEFAULT_COMPLETION_TOKENS = 8
CHECKS = ("statuses", "memory", "health", "replay", "completions", "hangs", "server")
DRAIN_S = 2.0  # the longest the checks wait for the jobs in progress (not for older ones)
# Of each RPC's requests, about this share comes from driven (replayed) scenarios.
SESSION_APPENDS, CONVERSE_SHARE, SEQUENCE_SHARE, STREAM_SHARE = 0.5, 0.2, 0.25, 0.15


@dataclass(frozen=True)
class Job:
    kind: str  # single, session, converse, sequence, stream-sequence
    seed: int
    rpc: str = ""  # of a single request
    size: int = 0  # appends of a session, requests of a sequence


def plan(rng: random.Random, per_rpc: int) -> list[Job]:
    """At least `per_rpc` requests of every RPC (scenarios first, then single requests for
    the rest), shuffled."""
    counts: Counter[str] = Counter()
    jobs: list[Job] = []

    def add(job: Job, *rpcs: tuple[str, int]) -> None:
        jobs.append(job)
        for rpc, n in rpcs:
            counts[rpc] += n

    while counts["LanguageModel.Append"] < per_rpc * SESSION_APPENDS:
        size = rng.randint(2, 10)
        add(Job("session", rng.getrandbits(64), size=size), ("LanguageModel.CreateSession", 1),
            ("LanguageModel.Append", size), ("LanguageModel.CloseSession", 1))
    while counts["LanguageModel.Converse"] < per_rpc * CONVERSE_SHARE:
        add(Job("converse", rng.getrandbits(64)), ("LanguageModel.Converse", 1))
    while counts["GRPCInferenceService.ModelInfer"] < per_rpc * SEQUENCE_SHARE:
        size = rng.randint(2, 8)
        add(Job("sequence", rng.getrandbits(64), size=size),
            ("GRPCInferenceService.ModelInfer", size))
    while counts["GRPCInferenceService.ModelStreamInfer"] < per_rpc * STREAM_SHARE:
        add(Job("stream-sequence", rng.getrandbits(64), size=rng.randint(2, 5)),
            ("GRPCInferenceService.ModelStreamInfer", 1))
    for rpc in RPCS:
        for _ in range(per_rpc - counts[rpc]):
            add(Job("single", rng.getrandbits(64), rpc), (rpc, 1))
    rng.shuffle(jobs)
    return jobs


class Run:
    """One fuzz run against a started server: the jobs, the batches, the checks."""

    def __init__(self, args, server: subprocess.Popen, target: str,
                 served: tuple[Served, ...]):
        self.args, self.server, self.target = args, server, target
        self.recorder = Recorder(args.timeout_s)
        self.ctx = Context(served, LIMITS)
        self.fuzzer_errors: Counter[str] = Counter()
        self.batch_health: list[float] = []
        self.peak_reported = 0
        self.batches_done = 0
        self.rss_by_batch: list[float] = []

    async def job(self, job: Job) -> None:
        rng = random.Random(job.seed)
        try:
            if job.kind == "single":
                case = finish(rng, self.generators.table[job.rpc](rng, self.ctx))
                outcome = await self.caller.call(case.rpc, case.request, case.label,
                                                 case.timeout, case.first_only)
                if case.after is not None and (pending := case.after(outcome)) is not None:
                    await pending
            elif job.kind == "session":
                await self.checks.session(rng, job.size)
            elif job.kind == "converse":
                await self.checks.converse(rng)
            else:
                await self.checks.sequence(rng, job.size, job.kind == "stream-sequence")
        except Exception as error:  # a bug of the fuzzer: counted, and it fails the run
            what = f"{job.kind} {job.rpc}: {type(error).__name__}: {error}"[:300]
            self.fuzzer_errors[what] += 1

    async def batch(self, jobs: list[Job]) -> None:
        """All of `jobs`, by the workers, with no checks (the warm-up)."""
        pending = deque(jobs)

        async def worker() -> None:
            while pending:
                await self.job(pending.popleft())

        await asyncio.gather(*(worker() for _ in range(self.args.workers)))

    async def pipeline(self, jobs: list[Job], started: float) -> str | None:
        """`jobs` by the workers, in batches of --batch jobs. When a batch's last job is
        done, the worker that did it holds the others at a gate until the jobs in progress
        end (at most DRAIN_S: a request that hangs is left running, and holds up only its
        own worker), runs the checks on the quiet server, and opens the gate. Returns why
        the run stopped early, if it did."""
        pending, size, total = deque(jobs), self.args.batch, -(-len(jobs) // self.args.batch)
        first, done, active, stopped = self.batches_done, 0, 0, None
        gate = asyncio.Event()
        gate.set()

        async def checks(number: int) -> None:
            nonlocal stopped
            gate.clear()
            deadline = time.monotonic() + DRAIN_S
            while active > self.recorder.running_longer_than(DRAIN_S) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            latency = await self._health()
            gate.set()
            stopped = stopped or self.after_batch(number, latency)
            self.batches_done = max(self.batches_done, number)
            if number - first == total or (number - first) % max(1, total // 10) == 0:
                self._progress(number, first + total, started)

        async def worker() -> None:
            nonlocal done, active
            while pending and stopped is None:
                await gate.wait()
                if not pending:
                    break
                active += 1
                try:
                    await self.job(pending.popleft())
                finally:
                    active -= 1
                done += 1
                self.recorder.batch = first + done // size + 1
                if done % size == 0 or done == len(jobs):
                    await checks(first + -(-done // size))

        await asyncio.gather(*(worker() for _ in range(self.args.workers)))
        return stopped

    async def warm_up(self) -> None:
        """Valid calls to every model (counted as the checks' own), before the memory
        baseline is taken."""
        call = self.caller.call
        for name in self.ctx.names():
            served = self.ctx.model(name)
            item = pb.Input(text="w1 w2 w3")
            if served.task == "lm":
                await call("LanguageModel.Score", pb.ScoreRequest(
                    model=pb.ModelRef(name=name), inputs=[item] * 4), "warm-up", check=True)
                await call("LanguageModel.Complete", pb.CompleteRequest(
                    model=pb.ModelRef(name=name), prompt=item, max_tokens=8, n=2),
                    "warm-up", check=True)
            elif served.task == "tag":
                await call("Tagger.Tag", pb.TagRequest(model=pb.ModelRef(name=name),
                                                       inputs=[item] * 4), "warm-up", check=True)
            else:
                await call("Classifier.Classify", pb.ClassifyRequest(
                    model=pb.ModelRef(name=name), inputs=[item] * 4), "warm-up", check=True)
            request = v2.ModelInferRequest(model_name=name)
            request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1]
                               ).contents.bytes_contents.append(b"w1 w2")
            await call("GRPCInferenceService.ModelInfer", request, "warm-up", check=True)
        jobs = [Job("session", i) for i in range(8)] + [Job("sequence", i, size=3)
                                                        for i in range(8)]
        saved, self.recorder = self.recorder, Recorder(self.args.timeout_s)
        self.caller.recorder = self.checks.recorder = self.recorder
        await self.batch([Job(j.kind, j.seed, size=max(j.size, 3)) for j in jobs])
        self.recorder = self.caller.recorder = self.checks.recorder = saved
        self.checks.replay.clear()

    def after_batch(self, number: int, latency_s: float | None) -> str | None:
        """The checks after a batch; a reason to stop, if any."""
        recorder, args = self.recorder, self.args
        if latency_s is not None:
            self.batch_health.append(latency_s)
            if latency_s > args.health_ms / 1000:
                recorder.fail("health", {"latency_ms": round(1000 * latency_s, 1),
                                         "when": "after the batch"}, f"after {number}")
        rss, peak = memory(self.server.pid)
        self.rss_by_batch.append(round(rss / 2**20, 1))
        if peak > self.rss_limit and peak > self.peak_reported:
            self.peak_reported = peak
            recorder.fail("memory", {"peak_rss_mb": round(peak / 2**20, 1),
                                     "bound_mb": round(self.rss_limit / 2**20, 1),
                                     "when": f"kernel peak mark after batch {number}"},
                          f"peak {number}")
        if self.server.poll() is not None:
            recorder.fail("server", {"why": f"the server exited with {self.server.returncode} "
                                     f"during batch {number}"}, "exited")
            return "the server exited"
        if self.monitor.aborted:
            return self.monitor.aborted
        return None

    async def run(self) -> dict:
        args = self.args
        started = time.monotonic()
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(self.target, options=options) as blocking, \
                ThreadPoolExecutor(args.workers, "fuzz-stream") as executor:
            return await self._run(started, options, blocking, executor)

    async def _run(self, started, options, blocking, executor) -> dict:
        args, recorder = self.args, self.recorder
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            self.caller = Caller(channel, recorder, args.timeout_s, blocking, executor)
            self.checks = Checks(self.caller, recorder, self.ctx, LIMITS,
                                 DEFAULT_COMPLETION_TOKENS, args.tolerance)
            self.generators = Generators(self.checks)
            await self.warm_up()
            pid = self.server.pid
            baseline_rss, startup_peak = memory(pid)
            peak_reset = reset_peak(pid)
            self.rss_limit = baseline_rss + args.rss_bound_mb * 2**20
            self.monitor = Monitor(self.target, pid, recorder, args.stall_ms / 1000,
                                   self.rss_limit, baseline_rss + args.rss_abort_mb * 2**20)
            self.monitor.start()
            jobs = plan(random.Random(args.seed), args.requests)
            try:
                stopped = await self.pipeline(jobs, started)
                # scenarios that ended early leave some RPCs short of the target
                short = [Job("single", random.Random(f"{args.seed}-{rpc}-{i}").getrandbits(64),
                             rpc) for rpc in RPCS
                         for i in range(max(0, args.requests - recorder.requests[rpc]))]
                if short and not stopped:
                    stopped = await self.pipeline(short, started)
                stopped = stopped or self.after_batch(self.batches_done, None)
            finally:
                self.monitor.stop()
            final_rss, final_peak = memory(pid)
        return self.report(started, stopped, baseline_rss, startup_peak, peak_reset,
                           final_rss, final_peak, self.batches_done)

    async def _health(self) -> float | None:
        outcome = await self.caller.call("Health.Check", health_pb2.HealthCheckRequest(),
                                         "after the batch", timeout=5.0, check=True)
        return outcome.seconds if outcome.ok else None

    def _progress(self, number: int, total: int, started: float) -> None:
        recorder = self.recorder
        failed = ", ".join(f"{k} {v}" for k, v in sorted(recorder.failures.items())) or "none"
        print(f"fuzz: batch {number}/{total}, {sum(recorder.requests.values()):,} requests, "
              f"{time.monotonic() - started:.0f} s, failures: {failed}", flush=True)

    def report(self, started, stopped, baseline_rss, startup_peak, peak_reset, final_rss,
               final_peak, batches) -> dict:
        args, recorder, checks = self.args, self.recorder, self.checks
        if self.fuzzer_errors:
            recorder.fail("server", {"why": "the fuzzer itself raised (a bug of the fuzzer)",
                                     "errors": dict(self.fuzzer_errors.most_common(5))},
                          "fuzzer")
        peak = max(final_peak if peak_reset else 0, self.monitor.rss_max)
        summary = checks.summary()
        result = {
            "date": now(), "machine": cpu(), "seed": args.seed,
            "requests_per_rpc": args.requests, "workers": args.workers,
            "settings": {"batch": args.batch, "timeout_s": args.timeout_s,
                         "rss_bound_mb": args.rss_bound_mb, "health_ms": args.health_ms,
                         "stall_ms": args.stall_ms, "tolerance": args.tolerance},
            "batches": batches, "wall_s": round(time.monotonic() - started, 1),
            "stopped_early": stopped,
            "server": {"models": [f"{s.name} ({s.task}, versions "
                                  f"{','.join(map(str, s.versions))})" for s in self.ctx.served],
                       "limits": {"max_completion_tokens": LIMITS.max_completion_tokens,
                                  "default_completion_tokens": DEFAULT_COMPLETION_TOKENS,
                                  "max_samples": LIMITS.max_samples,
                                  "max_sequences_per_request": LIMITS.max_sequences,
                                  "max_tokens_per_sequence": LIMITS.max_tokens},
                       "state_token_keys": True, "version_policy": "all"},
            "requests": dict(sorted(recorder.requests.items())),
            "statuses": {rpc: dict(c.most_common()) for rpc, c in sorted(recorder.codes.items())},
            # what each status was about: the first request that got it, and its message
            "status_samples": {rpc: {code: {"label": label, "details": details}
                                     for code, (label, details) in sorted(codes.items())}
                               for rpc, codes in sorted(recorder.samples.items())},
            # errors a client could not read: the status trailers (a message echoing a
            # 4 KB+ name, say) passed the client's metadata limit, so it saw only
            # RESOURCE_EXHAUSTED "Stream removed"
            "unreadable_errors": dict(sorted(recorder.unreadable.items())),
            "stream_error_messages": {rpc: dict(c.most_common())
                                      for rpc, c in sorted(recorder.stream_errors.items())},
            "max_request_s": {rpc: round(s, 3) for rpc, s in sorted(recorder.max_seconds.items())},
            "mean_request_ms": {rpc: round(1000 * s / max(1, recorder.requests[rpc]), 2)
                                for rpc, s in sorted(recorder.total_seconds.items())},
            "check_requests": dict(sorted(recorder.check_requests.items())),
            "check_statuses": {rpc: dict(c.most_common())
                               for rpc, c in sorted(recorder.check_codes.items())},
            "rss": {"after_warmup_mb": round(baseline_rss / 2**20, 1),
                    "startup_peak_mb": round(startup_peak / 2**20, 1),
                    "max_mb": round(peak / 2**20, 1),
                    "max_over_baseline_mb": round((peak - baseline_rss) / 2**20, 1),
                    "end_mb": round(final_rss / 2**20, 1),
                    "bound_mb": round(self.rss_limit / 2**20, 1),
                    "peak_from_kernel": peak_reset,
                    "after_each_batch_mb": self.rss_by_batch,
                    # the largest rises between two samples 50 ms apart, with what ran
                    "largest_rises": self.monitor.jumps},
            "health": {"after_batch": _latencies(self.batch_health, args.health_ms),
                       "under_load": {**_latencies(self.monitor.latencies, args.stall_ms),
                                      "over_health_ms": sum(1 for t in self.monitor.latencies
                                                            if t > args.health_ms / 1000),
                                      "probe_errors": self.monitor.health_errors,
                                      "slowest": self.monitor.slowest}},
            "replay": {"done": summary["replay"].get("done", 0),
                       "failed": summary["replay"].get("failed", 0),
                       "inconclusive": summary["replay"].get("inconclusive", 0),
                       "by_kind": {k: v for k, v in sorted(summary["replay"].items())
                                   if " " in k}, "tolerance": args.tolerance},
            "completions": summary["completions"],
            "fuzzer_errors": dict(self.fuzzer_errors.most_common(10)),
            "checks": {name: {"passed": recorder.failures[name] == 0,
                              "failures": recorder.failures[name],
                              "examples": recorder.examples.get(name, [])}
                       for name in CHECKS},
        }
        result["passed"] = all(c["passed"] for c in result["checks"].values())
        return result


def _latencies(values: list[float], limit_ms: float) -> dict:
    ms = sorted(1000 * v for v in values)
    return {"probes": len(ms), "limit_ms": limit_ms,
            "p50_ms": round(statistics.median(ms), 1) if ms else None,
            "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None}


# -- the server ------------------------------------------------------------------------
def start_server(root: Path, keys: Path, log: Path) -> tuple[subprocess.Popen, str | None]:
    command = [sys.executable, "-m", "recur", "serve", "--model-repository", str(root),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--version-policy", "all", "--state-token-keys", str(keys), "--threads", "1",
               "--max-completion-tokens", str(LIMITS.max_completion_tokens),
               "--default-completion-tokens", str(DEFAULT_COMPLETION_TOKENS),
               "--max-samples", str(LIMITS.max_samples),
               "--max-sequences-per-request", str(LIMITS.max_sequences),
               "--max-tokens-per-sequence", str(LIMITS.max_tokens), "--grace-s", "2",
               "--log-level", "ERROR"]
    with log.open("w") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  start_new_session=True, preexec_fn=_die_with_parent)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(server.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(120)
    match = re.search(r"listening on ([\d.]+:\d+)", lines[0]) if lines else None
    return server, match[1] if match else None


def _die_with_parent() -> None:
    """In the server's process before it starts: SIGTERM when the fuzzer dies, however it
    dies (Linux), so no server outlives its run."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_server(server: subprocess.Popen) -> int | None:
    """SIGTERM, then SIGKILL if it has not stopped in 30 s; its exit status."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    if server.stdout is not None:
        server.stdout.close()
    return server.returncode


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*)$")
_LOGGED = re.compile(r"\bERROR\s+([\w.]+): (.*)$")


def read_log(log: Path) -> dict:
    """What the server logged at ERROR: the messages and the exceptions, with counts."""
    messages: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        line = re.sub(r" at 0x[0-9a-f]+|\(error id [0-9a-f]+\)", "", line)
        if match := _LOGGED.search(line):
            messages[f"{match[1]}: {match[2].strip()}"[:200]] += 1
        elif match := _EXCEPTION.match(line):
            exceptions[match[1][:200]] += 1
    return {"errors_logged": sum(messages.values()),
            "messages": dict(messages.most_common(15)),
            "exceptions": dict(exceptions.most_common(15))}


# -- the command -----------------------------------------------------------------------
def summary(report: dict) -> str:
    lines = [f"fuzz: {sum(report['requests'].values()):,} requests to {len(report['requests'])} "
             f"RPCs in {report['wall_s']:.0f} s (seed {report['seed']}, "
             f"{report['workers']} workers)"]
    width = max(map(len, report["requests"]))
    for rpc, count in report["requests"].items():
        codes = report["statuses"].get(rpc, {})
        shown = ", ".join(f"{code} {n}" for code, n in codes.items())
        extra = report["stream_error_messages"].get(rpc)
        if extra:
            shown += "; in-stream errors: " + ", ".join(f"{c} {n}" for c, n in extra.items())
        lines.append(f"  {rpc:<{width}} {count:>7,}  {shown}")
    rss, replay = report["rss"], report["replay"]
    after, load = report["health"]["after_batch"], report["health"]["under_load"]
    lines.append(f"memory: {rss['after_warmup_mb']} MB after warm-up, max {rss['max_mb']} MB "
                 f"(bound {rss['bound_mb']} MB)")
    lines.append(f"health: after each batch max {after['max_ms']} ms over {after['probes']} "
                 f"checks (limit {after['limit_ms']:g} ms); under load p50 {load['p50_ms']} / "
                 f"p99 {load['p99_ms']} / max {load['max_ms']} ms over {load['probes']:,} "
                 f"probes, {load['over_health_ms']} over {after['limit_ms']:g} ms (stall "
                 f"limit {load['limit_ms']:g} ms)")
    lines.append(f"replay: {replay['done']:,} sessions and sequences replayed, "
                 f"{replay['failed']:,} failed, {replay['inconclusive']:,} inconclusive; "
                 f"completions: {report['completions'].get('checked', 0):,} checked, "
                 f"{report['completions'].get('failed', 0):,} failed")
    for name, check in report["checks"].items():
        lines.append(f"  {'ok  ' if check['passed'] else 'FAIL'} {name}"
                     + ("" if check["passed"] else f": {check['failures']:,} failures"))
        for example in check["examples"][:3]:
            shown = {k: v for k, v in example.items() if k not in ("in_flight", "sent")}
            if "in_flight" in example:
                shown["in_flight"] = [f"{e['rpc']} [{e['label']}] {e['request'][:160]}"
                                      for e in example["in_flight"][:3]]
            lines.append(f"       {json.dumps(shown, ensure_ascii=False)[:700]}")
    if report.get("server_log", {}).get("exceptions"):
        lines.append("server logged: " + "; ".join(
            f"{n} x {e[:120]}" for e, n in list(report["server_log"]["exceptions"].items())[:5]))
    lines.append(f"fuzz {'passed' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per RPC (at least; sessions and sequences add some); "
                        "default 10000, or 20 with --dry-run")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every generated request (default 0)")
    parser.add_argument("--workers", type=int, default=8,
                        help="concurrent callers (default 8)")
    parser.add_argument("--batch", type=int, default=4000,
                        help="jobs (a request, or a session or sequence driven to its end) "
                        "per batch: the checks run after each (default 4000)")
    parser.add_argument("--rss-bound-mb", type=float, default=300.0,
                        help="largest growth of the server's resident memory over its value "
                        "after the warm-up, in MB (default 300)")
    parser.add_argument("--rss-abort-mb", type=float, default=4000.0,
                        help="growth at which the server is killed and the run stops, in MB "
                        "(default 4000)")
    parser.add_argument("--health-ms", type=float, default=100.0,
                        help="slowest acceptable grpc.health.v1 Check after a batch (the "
                        "batch's requests answered), in ms (default 100)")
    parser.add_argument("--stall-ms", type=float, default=500.0,
                        help="slowest acceptable Check while the workers run (probed every "
                        "50 ms from another process): beyond it the server stalled, in ms "
                        "(default 500)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference of a log-prob or probability from the "
                        "replay (default 1e-4)")
    parser.add_argument("--timeout-s", type=float, default=20.0,
                        help="the normal deadline of a request (the slowest valid ones, 64 "
                        "samples of 256 tokens, take a few seconds here under the fuzzer's "
                        "load); running out of it is a hang (default 20)")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny run (20 requests per RPC) to check the fuzzer itself, in "
                        "seconds; writes no results unless --out is given")
    parser.add_argument("--server-log", type=Path,
                        help="keep the server's log (its stderr) here")
    parser.add_argument("--out", type=Path,
                        help="write the JSON here instead of bench/results/fuzz.json (and "
                        "leave the report alone)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 20 if args.dry_run else 10_000
    if args.dry_run:
        args.batch = min(args.batch, 100)
    if args.requests < 1 or args.workers < 1:
        parser.error("--requests and --workers must be >= 1")

    with tempfile.TemporaryDirectory(prefix="recur-fuzz-") as tmp:
        root, keys, log = Path(tmp) / "models", Path(tmp) / "keys", Path(tmp) / "server.log"
        served = build(root)
        keys.write_text(secrets.token_hex(32) + "\n")
        server, target = start_server(root, keys, log)
        report = None
        try:
            if target is None:
                stop_server(server)
                print(f"recur serve did not start:\n{log.read_text()[-3000:]}", file=sys.stderr)
                return 2
            loop = asyncio.new_event_loop()
            try:
                main_task = loop.create_task(Run(args, server, target, served).run())
                loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
                report = loop.run_until_complete(main_task)
            except (asyncio.CancelledError, KeyboardInterrupt):
                print("fuzz: interrupted; the server is stopped, nothing is written",
                      file=sys.stderr)
                return 1
            finally:
                loop.close()
        finally:
            code = stop_server(server)
        if report is None:
            return 1
        report["server"]["exit_code"] = code
        if code != 0 and report["checks"]["server"]["passed"]:
            report["checks"]["server"] = {"passed": False, "failures": 1, "examples": [
                {"why": f"recur serve exited with {code} on SIGTERM (expected 0)"}]}
            report["passed"] = False
        report["server_log"] = read_log(log)
        if args.server_log:
            args.server_log.write_text(log.read_text(errors="replace"))

    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    elif not args.dry_run:
        from bench.report import write_report

        path = RESULTS / "fuzz.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_report()  # as every benchmark does
    print(summary(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The watch on the server while the fuzzer runs: a grpc.health.v1 Check every
`interval_s` with its latency, from a process of its own (`python -m
bench.fuzzing.monitor TARGET`, with its own connection and its own GIL, so that the
fuzzer's work does not delay the probe), and the server's resident memory read from /proc
by a thread. A probe slower than the limit, or memory above the bound, is a failure whose
example names the requests in flight at that moment. Past `abort_bytes` the server is
killed, so a runaway allocation cannot take the machine with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.fuzzing.client import Recorder


def memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of a process, 0s if it is gone."""
    rss = peak = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, peak


def reset_peak(pid: int) -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of a process of ours."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


JUMP_BYTES = 64 << 20  # a rise of resident memory between two samples worth recording


class Monitor(threading.Thread):
    def __init__(self, target: str, pid: int, recorder: Recorder, health_limit_s: float,
                 rss_limit: int, abort_bytes: int, interval_s: float = 0.05):
        super().__init__(name="fuzz-monitor", daemon=True)
        self.target, self.pid, self.recorder = target, pid, recorder
        self.health_limit_s, self.rss_limit, self.abort_bytes = (health_limit_s, rss_limit,
                                                                 abort_bytes)
        self.interval_s = interval_s
        self.halt = threading.Event()
        self.latencies: list[float] = []
        self.slowest: list[dict] = []  # the 5 slowest probes, with what was in flight
        self.health_errors: dict[str, int] = {}
        self.rss_max = 0
        self.rss_last = 0
        self.jumps: list[dict] = []  # the largest rises between two samples, with what ran
        self.aborted: str | None = None
        self._over = False  # memory above the bound since the last sample below it

    def run(self) -> None:
        prober = subprocess.Popen([sys.executable, "-m", "bench.fuzzing.monitor", self.target,
                                   str(self.interval_s)], stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=self._read, args=(prober,), daemon=True)
        reader.start()
        try:
            while not self.halt.is_set():
                self.sample()
                self.halt.wait(self.interval_s)
        finally:
            prober.terminate()
            try:
                prober.wait(10)
            except subprocess.TimeoutExpired:
                prober.kill()
                prober.wait(10)
            reader.join(10)

    def _read(self, prober: subprocess.Popen) -> None:
        for line in prober.stdout:
            latency, _, code = line.strip().partition(" ")
            with contextlib.suppress(ValueError):
                self.probed(float(latency), code or None)

    def probed(self, latency: float, code: str | None) -> None:
        self.latencies.append(latency)
        if len(self.slowest) < 5 or latency > self.slowest[-1]["latency_ms"] / 1000:
            self.slowest.append({"latency_ms": round(1000 * latency, 1),
                                 "batch": self.recorder.batch,
                                 "in_flight": self.recorder.snapshot(6)})
            self.slowest.sort(key=lambda s: -s["latency_ms"])
            del self.slowest[5:]
        if code is not None:
            self.health_errors[code] = self.health_errors.get(code, 0) + 1
        if latency > self.health_limit_s or code is not None:
            self.recorder.fail("health", {
                "latency_ms": round(1000 * latency, 1), "code": code or "OK",
                "in_flight": self.recorder.snapshot()}, f"batch {self.recorder.batch}")

    def sample(self) -> None:
        rss, _ = memory(self.pid)
        self.rss_max = max(self.rss_max, rss)
        rise, self.rss_last = rss - self.rss_last, rss
        if rise > JUMP_BYTES and self.rss_last != rise:
            self.jumps.append({"rise_mb": round(rise / 2**20, 1), "rss_mb": round(rss / 2**20, 1),
                               "batch": self.recorder.batch,
                               "in_flight": self.recorder.snapshot(16)})
            self.jumps.sort(key=lambda j: -j["rise_mb"])
            del self.jumps[5:]
        if rss > self.rss_limit and not self._over:
            self._over = True
            self.recorder.fail("memory", {
                "rss_mb": round(rss / 2**20, 1), "bound_mb": round(self.rss_limit / 2**20, 1),
                "in_flight": self.recorder.snapshot()}, f"sampled {self.recorder.batch}")
        elif rss <= self.rss_limit:
            self._over = False
        if rss > self.abort_bytes and self.aborted is None:
            self.aborted = f"resident memory {rss / 2**20:.0f} MB passed the abort limit " \
                           f"{self.abort_bytes / 2**20:.0f} MB: the server was killed"
            self.recorder.fail("memory", {"why": self.aborted,
                                          "in_flight": self.recorder.snapshot()}, "abort")
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def probe_forever(target: str, interval_s: float) -> None:
    """The prober process: one line per Check, "SECONDS" or "SECONDS CODE", until killed."""
    channel = grpc.insecure_channel(target)
    check = health_pb2_grpc.HealthStub(channel).Check
    while True:
        started = time.perf_counter()
        try:
            check(health_pb2.HealthCheckRequest(), timeout=5.0)
            code = ""
        except grpc.RpcError as error:
            code = f" {error.code().name}"
        print(f"{time.perf_counter() - started:.6f}{code}", flush=True)
        time.sleep(interval_s)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        probe_forever(sys.argv[1], float(sys.argv[2]))

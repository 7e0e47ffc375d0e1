"""The server's lifecycle and its ports: the metrics port on the event loop (idle
connections cost no thread and are closed), a taken metrics port, Health.Watch (unknown
services refused, open streams ended by the drain), HTTP/2 max_concurrent_streams, when
open streams are told the server is stopping, and a second signal forcing the exit."""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import running
from test_server_process import ServeProcess, serve_command

import serving.api.metrics_http
import serving.server
from serving.client import RecurClient
from serving.config import ServerConfig
from serving.server import Server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Watcher:
    """A Health.Watch stream read on a thread: its statuses, and how it ended."""

    def __init__(self, channel: grpc.Channel, service: str = ""):
        self.call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=60)
        self.statuses: list[int] = []
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        assert self.first.wait(10), "no first status"

    def _follow(self) -> None:
        try:
            for update in self.call:
                self.statuses.append(update.status)
                self.first.set()
        except grpc.RpcError as error:
            self.error = error
        self.first.set()


# --- the metrics port -----------------------------------------------------------------


def test_idle_metrics_connections_cost_no_thread_and_are_closed(model_repository,
                                                                monkeypatch):
    monkeypatch.setattr(serving.api.metrics_http, "METRICS_KEEP_ALIVE_S", 1, raising=False)
    with running(model_repository) as server:
        port = server.ports.metrics
        assert "recur_model_info" in server.metrics_text()
        threads = threading.active_count()
        opened = time.monotonic()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickle.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request head never finished
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            kept.request("GET", "/metrics")  # a keep-alive connection, idle after its answer
            answer = kept.getresponse()
            assert answer.status == 200 and b"recur_model_info" in answer.read()
            time.sleep(0.3)  # a thread per connection would have started by now
            assert threading.active_count() <= threads + 1
            assert "recur_requests_total" in server.metrics_text()  # and the page answers
            assert threading.active_count() <= threads + 1
            for connection in [*idle, trickle, kept.sock]:
                assert connection.recv(1) == b"", "the server closes an idle connection"
            closed = time.monotonic() - opened
            assert 0.5 < closed < 4, closed  # after the keep-alive timeout (1 s here)
            assert "recur_model_info" in server.metrics_text()
        finally:
            for connection in [*idle, trickle]:
                connection.close()
            kept.close()


def test_a_taken_metrics_port_refuses_to_start_before_models_load(model_repository,
                                                                  monkeypatch):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the ports were bound")

    monkeypatch.setattr(serving.server, "Engine", no_models)
    config = ServerConfig(model_repository=str(model_repository), port=0, metrics_port=port)

    async def start() -> None:
        await Server(config).start()

    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} "
                                          r"\(metrics port\): it is in use"):
            asyncio.run(start())
    finally:
        taken.close()


def test_recur_serve_on_a_taken_metrics_port_says_so(model_repository):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(serve_command(model_repository, "--metrics-port", str(port)),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (metrics port)" in done.stderr
    assert "Traceback" not in done.stderr


# --- Health.Watch ---------------------------------------------------------------------


def test_watch_and_check_refuse_unknown_services_with_a_short_message(model_repository):
    with running(model_repository) as server:
        health = health_pb2_grpc.HealthStub(server.channel)
        name = "x" * 1_000_000
        with pytest.raises(grpc.RpcError) as watched:
            next(health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10))
        with pytest.raises(grpc.RpcError) as checked:
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        for caught in (watched.value, checked.value):
            assert caught.code() == grpc.StatusCode.NOT_FOUND
            details = caught.details()
            assert "'recur.v1.LanguageModel'" in details and "'liveness'" in details
            assert "x" * 64 + "..." in details and "x" * 65 not in details
            assert len(details) < 1000
        with pytest.raises(grpc.RpcError) as unknown:
            next(health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in unknown.value.details()
        watcher = Watcher(server.channel, "recur.v1.Models")  # a known one is watched
        assert watcher.statuses == [SERVING]
        watcher.call.cancel()


def test_open_watch_streams_end_with_not_serving_when_the_server_stops(model_repository):
    with running(model_repository, health_port=0) as server:
        watchers = [Watcher(server.channel, ""), Watcher(server.channel, "recur.v1.Tagger")]
        probes = grpc.insecure_channel(f"127.0.0.1:{server.ports.health}")
        liveness = Watcher(probes, "liveness")
        try:
            started = time.monotonic()
            server.call(server.server.stop(10))
            assert time.monotonic() - started < 3  # not the 10 s grace
            for watcher in watchers:
                watcher.thread.join(5)
                assert watcher.error is None, watcher.error  # the stream ended, with OK
                assert watcher.statuses == [SERVING, NOT_SERVING]
            liveness.thread.join(5)
            assert liveness.error is None and liveness.statuses == [SERVING]
        finally:
            probes.close()


# --- HTTP/2 max_concurrent_streams ----------------------------------------------------


def test_max_concurrent_streams_holds_a_third_call_on_a_connection(model_repository):
    with running(model_repository, max_concurrent_streams=2) as server:
        first, second = Watcher(server.channel), Watcher(server.channel)
        check = health_pb2_grpc.HealthStub(server.channel).Check.future(
            health_pb2.HealthCheckRequest(service=""), timeout=20)
        try:
            time.sleep(0.5)
            assert not check.done(), "a third stream ran beside two open ones"
            first.call.cancel()
            assert check.result(timeout=10).status == SERVING
        finally:
            first.call.cancel()
            second.call.cancel()
            check.cancel()


# --- the drain ------------------------------------------------------------------------


def test_open_streams_are_told_at_half_the_grace_and_the_drain_then_ends(model_repository):
    with running(model_repository, max_completion_tokens=1_000_000,
                 version_policy="all") as server:
        completion = server.client.complete("endless", "w3", version=1, seed=0,
                                            max_tokens=1_000_000, timeout=60)
        next(completion)
        ended: dict = {}

        def follow() -> None:
            try:
                for _ in completion:
                    pass
            except grpc.RpcError as error:
                ended["error"], ended["at"] = error, time.monotonic()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        started = time.monotonic()
        server.call(server.server.stop(6))
        stopped = time.monotonic() - started
        reader.join(5)
        error = ended["error"]
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.details()  # the server's reason, not a cancel
        told = ended["at"] - started
        assert 2.5 < told < 4.2, told  # at 3 s of 6 (it was 5 s: 1 s before the end)
        assert stopped < told + 1.5, (stopped, told)  # nothing else held the drain


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_during_the_drain_exits_at_once(model_repository, second):
    process = ServeProcess(serve_command(model_repository, "--grace-s", "60", "--health-port",
                                         "0", "--max-completion-tokens", "1000000"))
    client_channel = grpc.insecure_channel(process.target)
    probes = grpc.insecure_channel(process.health_target)
    try:
        completion = RecurClient(process.target, channel=client_channel).complete(
            "endless", "w3", version=1, seed=0, max_tokens=1_000_000, timeout=60)
        next(completion)  # a stream keeps the drain going for the grace
        process.process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(probes)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(service=""),
                           timeout=5).status == SERVING:
            assert time.monotonic() < deadline, "the drain did not start"
            time.sleep(0.02)
        time.sleep(0.2)
        assert process.process.poll() is None  # draining
        signalled = time.monotonic()
        process.process.send_signal(second)
        assert process.process.wait(10) == 1
        assert time.monotonic() - signalled < 2
        process.log.seek(0)
        log = process.log.read()
        assert f"{second.name} during the drain: exiting now" in log, log[-2000:]
    finally:
        client_channel.close()
        probes.close()
        process.stop()


def test_the_heap_stays_frozen_until_the_last_server_of_the_process_stops(model_repository):
    """Servers in one process share its garbage collector: the first to stop must not
    unfreeze what another still relies on, and the last leaves nothing frozen."""
    import gc

    assert gc.get_freeze_count() == 0  # no server runs between tests
    with running(model_repository) as first:
        assert gc.get_freeze_count() > 10_000
        with running(model_repository):
            first.call(first.server.stop(0.5))
            assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0

"""`recur serve` as a process: health (on the serving port and on its own probe port),
reflection, the metrics page, graceful shutdown. The serving image's environment is
tested in test_deploy_images.py."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from serving.client import RecurClient
from serving.proto_gen.recur.v1 import recur_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServeProcess:
    def __init__(self, command: list[str], env: dict | None = None, cwd: Path = REPO):
        # a pipe that nobody reads could fill up and block the server
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env, cwd=cwd)
        line = self.process.stdout.readline()
        match = re.search(r"listening on [\d.]+:(\d+), metrics on (\d+)", line)
        if match is None:
            self.process.kill()
            self.log.seek(0)
            raise AssertionError(f"no listening line: {line!r}\n{self.log.read()}")
        self.port, self.metrics_port = int(match[1]), int(match[2])
        self.target = f"127.0.0.1:{self.port}"
        health = re.search(r"health on (\d+)", line)
        self.health_target = f"127.0.0.1:{health[1]}" if health else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.log.close()


def serve_command(repository: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "recur", "serve", "--model-repository", str(repository),
            "--port", "0", "--metrics-port", "0", "--version-policy", "all", *flags]


@pytest.fixture
def process(model_repository):
    running = ServeProcess(serve_command(model_repository, "--grace-s", "3",
                                         "--max-completion-tokens", "1000000"))
    yield running
    running.stop()


def test_health_reflection_and_metrics(process):
    with grpc.insecure_channel(process.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "recur.v1.LanguageModel", "recur.v1.Tagger",
                        "recur.v1.Classifier", "recur.v1.Models"]:
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == SERVING, service
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"recur.v1.LanguageModel", "recur.v1.Tagger", "recur.v1.Classifier",
                "recur.v1.Models", "grpc.health.v1.Health"} <= services
        RecurClient(process.target, channel=channel).score("demo-lm", ["the dog"])
    page = urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics").read()
    assert b'recur_model_info{' in page and b"recur_requests_total{" in page
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); the page parsed")
    lint = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True)
    findings = (lint.stdout + lint.stderr).decode().splitlines()
    # Triton's families keep Triton's names (counters without _total, nv_inference_count),
    # which the linter flags on Triton's own page too; everything else must be clean.
    assert b"nv_inference_request_success{" in page
    assert [f for f in findings if f and not f.startswith("nv_inference_")] == []
    assert lint.returncode in (0, 3), findings


def test_a_second_server_on_a_taken_port_refuses_to_start(process, model_repository):
    """gRPC's default SO_REUSEPORT would let it start and take half the connections."""
    second = subprocess.run(serve_command(model_repository, "--port", str(process.port),
                                          "--metrics-port", "-1"),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert f"cannot listen on 127.0.0.1:{process.port} (serving port)" in second.stderr
    assert "Traceback" not in second.stderr


def test_reflection_v1_answers_as_v1alpha_does(process):
    """grpcio-reflection implements v1alpha only; current tools ask v1 first."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as messages  # the same wire format

    with grpc.insecure_channel(process.target) as channel:
        for service in ("grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"):
            info = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=messages.ServerReflectionRequest.SerializeToString,
                response_deserializer=messages.ServerReflectionResponse.FromString)
            listed, described, itself = list(info(iter([
                messages.ServerReflectionRequest(list_services=""),
                messages.ServerReflectionRequest(file_containing_symbol="recur.v1.Models"),
                messages.ServerReflectionRequest(file_containing_symbol=service)]), timeout=10))
            names = {s.name for s in listed.list_services_response.service}
            assert {"recur.v1.LanguageModel", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names, service
            for response, package in ((described, "recur.v1"),
                                      (itself, service.rpartition(".")[0])):
                files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in
                         response.file_descriptor_response.file_descriptor_proto]
                assert package in {f.package for f in files}, (service, package)


def test_sigterm_drains_in_flight_work_and_closes_streams_with_a_reason(model_repository):
    # Queued steps wait 300 ms, so the unary Scores below are in flight at SIGTERM.
    process = ServeProcess(serve_command(model_repository, "--grace-s", "3",
                                         "--max-queue-delay-ms", "300",
                                         "--max-completion-tokens", "1000000"))
    try:
        channel = grpc.insecure_channel(process.target)
        client = RecurClient(process.target, channel=channel)
        health_updates = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""))

        def follow():
            try:
                for update in watch:
                    health_updates.append(update.status)
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        completion = client.complete("endless", "w3", version=1, seed=0, max_tokens=1_000_000,
                                     timeout=30)
        next(completion)
        time.sleep(0.3)
        scores = [client.language_model.Score.future(
            pb.ScoreRequest(model=pb.ModelRef(name="demo-lm"), inputs=[pb.Input(text="a dog")]),
            timeout=30) for _ in range(8)]
        time.sleep(0.05)
        process.process.send_signal(signal.SIGTERM)
        for future in scores:  # every unary request in flight finishes
            assert len(future.result().scores) == 1
        with pytest.raises(grpc.RpcError) as refused:  # and no new work is accepted
            client.score("demo-lm", ["a dog"])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as caught:
            for _ in completion:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()
        assert process.process.wait(15) == 0
        watcher.join(5)
        assert health_updates[0] == SERVING and NOT_SERVING in health_updates
        channel.close()
    finally:
        process.stop()


def test_the_health_port_serves_probes_alone_and_stays_live_through_the_drain(
        model_repository):
    process = ServeProcess(serve_command(model_repository, "--health-port", "0", "--grace-s",
                                         "3", "--max-completion-tokens", "1000000"))
    try:
        assert process.health_target and process.health_target != process.target
        probes = grpc.insecure_channel(process.health_target)
        health = health_pb2_grpc.HealthStub(probes)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status("") == SERVING and status("liveness") == SERVING
        with pytest.raises(grpc.RpcError) as caught:  # the probe port serves health only
            RecurClient(process.health_target, channel=probes).score("demo-lm", ["a dog"])
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        client = RecurClient(process.target)
        completion = client.complete("endless", "w3", version=1, seed=0, max_tokens=1_000_000,
                                     timeout=30)
        next(completion)  # a stream keeps the drain going for the grace period
        process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while status("") == SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status("") == NOT_SERVING  # readiness fails: endpoints drop the pod
        assert status("liveness") == SERVING  # liveness holds: the drain is not a crash
        with pytest.raises(grpc.RpcError):
            for _ in completion:
                pass
        assert process.process.wait(15) == 0
        probes.close()
        client.close()
    finally:
        process.stop()

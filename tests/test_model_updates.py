"""Model versions while serving: a corrupt artifact stops a server at start with its reason;
a version added to the repository while serving is picked up by polling, and requests
keep succeeding throughout, including while a half-copied version is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import grpc
from serving_helpers import RunningServer

from serving.proto_gen.recur.v1 import recur_pb2 as pb


def test_a_corrupt_artifact_stops_the_server_with_its_reason(model_repository, tmp_path):
    shutil.copytree(model_repository / "demo-lm" / "1", tmp_path / "demo-lm" / "1")
    model = tmp_path / "demo-lm" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])
    done = subprocess.run([sys.executable, "-m", "recur", "serve", "--model-repository",
                           str(tmp_path), "--port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "model.onnx: sha256" in done.stderr and "corrupt or truncated" in done.stderr


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_new_versions_are_picked_up_without_failing_requests(model_repository, tmp_path):
    source = model_repository / "demo-lm" / "1"
    shutil.copytree(source, tmp_path / "demo-lm" / "1")
    server = RunningServer(tmp_path, repository_poll_s=0.1, version_policy="all")
    failures, served_versions, stop = [], set(), threading.Event()

    def traffic():
        request = pb.ScoreRequest(model=pb.ModelRef(name="demo-lm"),
                                  inputs=[pb.Input(text="the dog sleeps")])
        while not stop.is_set():
            try:
                served_versions.add(server.client.language_model.Score(request,
                                                                       timeout=10).model.version)
            except grpc.RpcError as error:
                failures.append(error)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # a version still being copied: its model file does not match its metadata
        partial = tmp_path / "demo-lm" / "3"
        shutil.copytree(source, partial)
        (partial / "model.onnx").write_bytes((source / "model.onnx").read_bytes()[:1000])
        # a complete version, published by a rename as `recur export` does
        shutil.copytree(source, tmp_path / "demo-lm" / ".staging")
        (tmp_path / "demo-lm" / ".staging").rename(tmp_path / "demo-lm" / "2")
        wait_for(lambda: 2 in served_versions)
        versions = {m.version for m in server.client.list_models() if m.name == "demo-lm"}
        assert versions == {1, 2}
        shutil.copyfile(source / "model.onnx", partial / "model.onnx")  # the copy finishes
        wait_for(lambda: 3 in served_versions)
        (score,) = server.client.score("demo-lm", ["the dog sleeps"], version=1)
        assert score.token_count == 4  # the old versions stay available by number
    finally:
        stop.set()
        thread.join(10)
        server.stop()
    assert failures == []
    assert served_versions == {1, 2, 3}

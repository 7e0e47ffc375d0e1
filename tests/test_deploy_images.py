"""What the images do, without a docker engine: their RUN step (deploy/docker/install.sh)
builds a fresh virtual environment here, and their ENTRYPOINT (entrypoint.sh) runs from it.
The serving environment has no torch, serves, answers probes and writes no files; the
training environment trains."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from conftest import demo_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_process import ServeProcess

from serving.client import RecurClient

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
pytestmark = pytest.mark.slow


def install(extra: str, venv: Path) -> None:
    done = subprocess.run([str(DOCKER / "install.sh"), extra, str(venv), str(REPO)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr


def image_env(venv: Path, **extra: str) -> dict:
    """The environment an image gives its entry point (ENV lines of the Dockerfiles)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"RECUR_VENV": str(venv)} | extra


def files_under(*folders: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for f in folders for p in f.rglob("*")}


def test_the_serving_image_has_no_torch_serves_and_writes_nothing(model_repository, tmp_path):
    venv = tmp_path / "venv"
    install("serve-cpu", venv)
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                              capture_output=True, text=True)
    assert "No module named 'torch'" in no_torch.stderr
    before = files_under(venv, model_repository)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    process = ServeProcess([str(DOCKER / "entrypoint.sh"), "serve", "--port", "0",
                            "--metrics-port", "0", "--health-port", "0"],
                           env=image_env(venv, RECUR_MODEL_REPOSITORY=str(model_repository)),
                           cwd=workdir)
    try:
        with grpc.insecure_channel(process.health_target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with RecurClient(process.target) as client:
            (score,) = client.score("demo-lm", ["the dog sleeps"])
            assert score.token_count == 4 and score.perplexity > 1
    finally:
        process.stop()
    # a read-only root filesystem is fine: nothing was written beside /tmp
    assert files_under(venv, model_repository) == before
    assert list(workdir.iterdir()) == []


def test_the_training_image_trains(synth_dir, tmp_path):
    venv = tmp_path / "venv"
    install("train", venv)
    config = tmp_path / "demo-lm.toml"
    config.write_text(demo_config("demo-lm", synth_dir).to_toml())
    done = subprocess.run([str(DOCKER / "entrypoint.sh"), "train", "--config", str(config),
                           "--out", str(tmp_path / "run"), "--dry-run"],
                          env=image_env(venv, MPLCONFIGDIR=str(tmp_path / "mpl")),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "best.pt").exists() and (run / "summary.json").exists()

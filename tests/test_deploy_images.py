"""What the images do, without a docker engine: their RUN step (deploy/docker/install.sh)
builds a fresh virtual environment here, and their ENTRYPOINT (entrypoint.sh) runs from it.
The serving image's build context holds serving's runtime code only, and its environment
has no torch, serves, answers probes and writes no files; the training environment trains
and exports."""

from __future__ import annotations

import os
import shutil
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


def build_context(dockerfile: str, into: Path) -> Path:
    """What the Dockerfile's build stage copies from the repository (its COPY lines before
    the first --from), laid out as in the image's /src: the source the install step sees."""
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("COPY --from"):
            break
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            for source in sources:
                destination = into / (source if target.endswith("/") else target)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, destination,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, destination)
    return into


def install(extra: str, venv: Path, source: Path) -> None:
    """The image's RUN step on its build context."""
    done = subprocess.run([str(DOCKER / "install.sh"), extra, str(venv), str(source)],
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
    source = build_context("Dockerfile.serve-cpu", tmp_path / "src")
    # the build context holds serving's runtime code only: no training, benchmarks or tests
    assert sorted(p.name for p in source.iterdir()) == [
        "README.md", "deploy", "pyproject.toml", "recur", "serving"]
    install("serve-cpu", venv, source)
    for module in ("torch", "training", "bench", "tools"):
        missing = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                                 capture_output=True, text=True, cwd=tmp_path)
        assert f"No module named '{module}'" in missing.stderr, module
    refused = subprocess.run([str(venv / "bin" / "recur"), "train", "--help"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "needs the train extra" in refused.stderr
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


def test_the_training_image_trains_and_exports(synth_dir, tmp_path):
    venv = tmp_path / "venv"
    install("train", venv, build_context("Dockerfile.train", tmp_path / "src"))
    config = tmp_path / "demo-lm.toml"
    config.write_text(demo_config("demo-lm", synth_dir).to_toml())
    done = subprocess.run([str(DOCKER / "entrypoint.sh"), "train", "--config", str(config),
                           "--out", str(tmp_path / "run"), "--dry-run"],
                          env=image_env(venv, MPLCONFIGDIR=str(tmp_path / "mpl")),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "best.pt").exists() and (run / "summary.json").exists()
    exported = subprocess.run([str(DOCKER / "entrypoint.sh"), "export", str(run), "--out",
                               str(tmp_path / "models" / "demo-lm" / "1")],
                              env=image_env(venv), capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verified against torch" in exported.stdout

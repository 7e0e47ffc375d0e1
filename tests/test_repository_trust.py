"""What the model repository serves when some of it is bad: a version folder beyond int64
is skipped (logged once) instead of breaking every versionless request and ListModels; a
version that does not load at start (a copy still in progress, a corrupt artifact) is
reported by ListModels and retried, while the versions that do load serve, the next
lower one in its place; `strict_start` refuses to start instead; and with nothing at all
loaded the start fails, naming every failure."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import pytest
from serving_helpers import RunningServer

from serving.engine.config import VersionPolicy
from serving.engine.metrics import Metrics
from serving.engine.repository import ModelRepository
from serving.engine.scheduler import BatchLimits
from serving.model.artifact import MAX_VERSION, ArtifactError, version_of
from serving.proto_gen.recur.v1 import recur_pb2 as pb

REPOSITORY_LOG = "serving.engine.repository"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A small random-weight language model's artifact (vocabulary <unk>, <eos>, w0..w37)."""
    import torch
    from export_helpers import save_model

    from training.models.language_model import RecurrentLM

    torch.manual_seed(3)
    return save_model(RecurrentLM(40, "gru", 16, 16, 1).eval(),
                      tmp_path_factory.mktemp("tiny") / "lm" / "1")


def publish(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def corrupt(version: Path) -> Path:
    """A version whose copy is not finished: its model file is cut short, so its sha256
    does not match its metadata."""
    model = version / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    return version


def repository(root: Path, **options) -> ModelRepository:
    return ModelRepository(root, "cpu", 1, False, BatchLimits(), Metrics(), **options)


def served(repo: ModelRepository) -> set[tuple[str, int]]:
    return {(m.name, m.version) for m in repo.all()}


def score_version(server: RunningServer, name: str, version: int = 0) -> int:
    request = pb.ScoreRequest(model=pb.ModelRef(name=name, version=version),
                              inputs=[pb.Input(text="w3 w4")])
    return server.client.language_model.Score(request, timeout=10).model.version


def list_models(server: RunningServer) -> pb.ListModelsResponse:
    return server.client.models.ListModels(pb.ListModelsRequest(), timeout=10)


def records_about(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == REPOSITORY_LOG and text in r.getMessage()]


# -- version folders ----------------------------------------------------------------------

@pytest.mark.parametrize("name, version", [
    ("1", 1), ("0", None), ("0042", None), ("01", None), ("9223372036854775807", MAX_VERSION),
    ("0" * 200 + "7", None), ("9223372036854775808", None), ("99999999999999999999", None),
    ("1" * 300, None), ("", None), ("-1", None), ("+1", None), ("1e3", None), (" 1", None),
    ("1\n", None), ("\u0661", None), ("\uff11", None), ("v2", None)])
def test_a_version_folder_is_ascii_digits_within_int64(name, version):
    assert MAX_VERSION == 2**63 - 1
    assert version_of(name) == version


def test_a_folder_beyond_int64_is_skipped_and_logged_once(tiny_lm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REPOSITORY_LOG)
    publish(tiny_lm, tmp_path / "lm" / "1")
    publish(tiny_lm, tmp_path / "lm" / "99999999999999999999")  # a whole, loadable artifact
    publish(tiny_lm, tmp_path / "other" / "1")
    server = RunningServer(tmp_path, repository_poll_s=0)
    try:
        assert score_version(server, "lm") == 1  # versionless: the highest valid version
        assert score_version(server, "other") == 1
        response = list_models(server)
        assert {(m.name, m.version) for m in response.models} == {("lm", 1), ("other", 1)}
        assert list(response.unavailable) == []  # not a version: nothing to report
        for _ in range(3):
            assert server.call(server.server.engine.repository.refresh()) == []
        assert score_version(server, "lm") == 1
    finally:
        server.stop()
    (skipped,) = records_about(caplog, "99999999999999999999")
    assert skipped.levelno == logging.WARNING
    assert "not a version folder" in skipped.getMessage()
    assert str(MAX_VERSION) in skipped.getMessage()


def test_the_highest_int64_version_is_served_and_named(tiny_lm, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=REPOSITORY_LOG)
    for version in (1, MAX_VERSION, MAX_VERSION + 1):
        publish(tiny_lm, tmp_path / "lm" / str(version))
    server = RunningServer(tmp_path, version_policy="all")
    try:
        assert {m.version for m in list_models(server).models} == {1, MAX_VERSION}
        assert score_version(server, "lm") == MAX_VERSION
        assert score_version(server, "lm", MAX_VERSION) == MAX_VERSION
        assert score_version(server, "lm", 1) == 1
    finally:
        server.stop()
    assert len(records_about(caplog, str(MAX_VERSION + 1))) == 1


def test_a_model_with_only_bad_folders_is_skipped_and_logged_once(tiny_lm, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=REPOSITORY_LOG)
    publish(tiny_lm, tmp_path / "lm" / "1")
    publish(tiny_lm, tmp_path / "huge" / "18446744073709551616")
    (tmp_path / "lm" / ".1.staging").mkdir()  # where `recur export` stages: silent
    repo = repository(tmp_path)
    for _ in range(3):
        asyncio.run(repo.refresh())
    assert served(repo) == {("lm", 1)}
    assert len(records_about(caplog, "18446744073709551616")) == 1
    assert len(records_about(caplog, "no version folders")) == 1
    assert records_about(caplog, "staging") == []
    asyncio.run(repo.close())


# -- versions that do not load at start --------------------------------------------------

def test_a_corrupt_version_at_start_is_reported_and_loaded_once_fixed(tiny_lm, tmp_path,
                                                                      caplog):
    caplog.set_level(logging.INFO, logger=REPOSITORY_LOG)
    publish(tiny_lm, tmp_path / "lm" / "1")
    corrupt(publish(tiny_lm, tmp_path / "lm" / "2"))
    server = RunningServer(tmp_path, repository_poll_s=0)  # a restart during the copy
    try:
        assert score_version(server, "lm") == 1  # latest:1 takes the next version that loads
        response = list_models(server)
        assert [(m.name, m.version, m.latest, m.ready) for m in response.models] == [
            ("lm", 1, True, True)]
        (unavailable,) = response.unavailable
        assert (unavailable.name, unavailable.version) == ("lm", 2)
        assert unavailable.reason.startswith("lm/2/model.onnx: sha256")
        assert "corrupt or truncated" in unavailable.reason
        assert str(tmp_path) not in unavailable.reason  # relative to the repository
        repo = server.server.engine.repository
        for _ in range(2):  # retried at every look, logged only the first time
            assert server.call(repo.refresh()) == []
        assert [u.version for u in list_models(server).unavailable] == [2]
        assert len(records_about(caplog, "not loaded")) == 1
        shutil.copyfile(tiny_lm / "model.onnx", tmp_path / "lm" / "2" / "model.onnx")
        assert server.call(repo.refresh()) == ["lm/2"]  # the copy finished
        response = list_models(server)
        assert [(m.version, m.latest) for m in response.models] == [(2, True)]
        assert list(response.unavailable) == [] and repo.unavailable == {}
        assert score_version(server, "lm") == 2
        assert len(records_about(caplog, "loaded after 3 failed attempts")) == 1
    finally:
        server.stop()


def test_health_per_model_follows_what_loads(tiny_lm, tmp_path):
    """A restart with one model's only version half-copied: the server starts, serving
    the other; "model/NAME" health says which is down, and follows the fix."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    publish(tiny_lm, tmp_path / "good" / "1")
    corrupt(publish(tiny_lm, tmp_path / "copying" / "1"))
    server = RunningServer(tmp_path, repository_poll_s=0.2)
    try:
        health = health_pb2_grpc.HealthStub(server.channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=10).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert status("") == serving and status("model/good") == serving
        assert status("model/copying") == health_pb2.HealthCheckResponse.NOT_SERVING
        shutil.copyfile(tiny_lm / "model.onnx", tmp_path / "copying" / "1" / "model.onnx")
        deadline = time.monotonic() + 20
        while status("model/copying") != serving and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status("model/copying") == serving
        assert score_version(server, "copying") == 1
    finally:
        server.stop()


def test_an_unavailable_version_that_leaves_the_repository_leaves_the_report(tiny_lm,
                                                                             tmp_path):
    publish(tiny_lm, tmp_path / "lm" / "1")
    corrupt(publish(tiny_lm, tmp_path / "lm" / "2"))
    repo = repository(tmp_path)
    assert served(repo) == {("lm", 1)}
    assert set(repo.unavailable) == {("lm", 2)}
    shutil.rmtree(tmp_path / "lm" / "2")
    assert asyncio.run(repo.refresh()) == []
    assert repo.unavailable == {} and served(repo) == {("lm", 1)}
    asyncio.run(repo.close())


def test_an_unavailable_version_that_leaves_the_policy_leaves_the_report(tiny_lm, tmp_path):
    publish(tiny_lm, tmp_path / "lm" / "1")
    corrupt(publish(tiny_lm, tmp_path / "lm" / "2"))
    repo = repository(tmp_path)
    assert set(repo.unavailable) == {("lm", 2)}

    async def roll_out() -> list[str]:
        publish(tiny_lm, tmp_path / "lm" / "3")  # latest:1 now takes 3; 2 is out of it
        loaded = await repo.refresh()
        await repo.close()
        return loaded

    assert asyncio.run(roll_out()) == ["lm/3"]
    assert repo.unavailable == {} and served(repo) == {("lm", 3)}


@pytest.mark.parametrize("policy, expected", [("latest:2", {1, 2}), ("all", {1, 2}),
                                              ("specific:1,3", {1})])
def test_the_policy_is_satisfied_by_versions_that_load(tiny_lm, tmp_path, policy, expected):
    for version in (1, 2):
        publish(tiny_lm, tmp_path / "lm" / str(version))
    corrupt(publish(tiny_lm, tmp_path / "lm" / "3"))
    repo = repository(tmp_path, policy=VersionPolicy.parse(policy))
    assert {v for _, v in served(repo)} == expected
    assert list(repo.unavailable) == [("lm", 3)]
    assert repo.get("lm", 0).version == max(expected)
    asyncio.run(repo.close())


def test_strict_start_refuses_a_version_that_does_not_load(tiny_lm, tmp_path):
    publish(tiny_lm, tmp_path / "lm" / "1")
    corrupt(publish(tiny_lm, tmp_path / "lm" / "2"))
    with pytest.raises(ArtifactError, match=r"lm/2/model.onnx: sha256 .* corrupt or truncated"):
        repository(tmp_path, strict_start=True)
    assert served(repository(tmp_path, strict_start=False)) == {("lm", 1)}


def test_with_nothing_loaded_the_start_fails_naming_every_failure(tiny_lm, tmp_path):
    corrupt(publish(tiny_lm, tmp_path / "lm" / "1"))
    corrupt(publish(tiny_lm, tmp_path / "other" / "4"))
    with pytest.raises(ValueError, match="no version loaded") as caught:
        repository(tmp_path)
    message = str(caught.value)
    assert "lm/1: " in message and "other/4: " in message
    assert message.count("corrupt or truncated") == 2

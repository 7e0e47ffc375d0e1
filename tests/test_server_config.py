"""Server configuration: flags over environment over file over defaults."""

from __future__ import annotations

import argparse

import pytest

from serving.config import ServerConfig, add_arguments, from_arguments


def test_precedence_is_flags_then_environment_then_file(tmp_path):
    file = tmp_path / "serve.toml"
    file.write_text("[serve]\nmax_batch_size = 8\nsession_ttl_s = 30\nport = 7000\n")
    env = {"RECUR_SESSION_TTL_S": "45", "RECUR_PORT": "7001", "RECUR_ALLOW_CPU_FALLBACK": "yes"}
    config = ServerConfig.resolve({"port": 7002}, env=env, file=file)
    assert config.port == 7002  # flag
    assert config.session_ttl_s == 45.0  # environment over file
    assert config.max_batch_size == 8  # file over default
    assert config.allow_cpu_fallback is True
    assert config.max_queue == ServerConfig().max_queue  # default


def test_flags_parse_into_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-batch-size", "16", "--allow-cpu-fallback",
                              "--model-repository", str(tmp_path)])
    config = from_arguments(args)
    assert config.max_batch_size == 16 and config.allow_cpu_fallback
    assert config.model_repository == str(tmp_path)


@pytest.mark.parametrize("source,message", [
    ({"env": {"RECUR_MAX_QUEUE": "many"}}, "RECUR_MAX_QUEUE: expected a int"),
    ({"flags": {"max_batch_size": 0}}, "max_batch_size must be >= 1"),
    ({"flags": {"session_ttl_s": -1.0}}, "session_ttl_s must be >= 0"),
    ({"file": "unknown"}, "unknown key(s) max_bach_size"),
])
def test_bad_settings_are_named(tmp_path, source, message):
    file = None
    if source.get("file"):
        file = tmp_path / "serve.toml"
        file.write_text("max_bach_size = 3\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.resolve(source.get("flags", {}), env=source.get("env", {}), file=file)


def test_connections_are_recycled_after_their_maximum_age(model_repository):
    """max_connection_age_s: the server sends GOAWAY, so clients reconnect (and a client
    balancing over DNS picks up new replicas); streams get grace_s more, then end."""
    import time

    import grpc
    from serving_helpers import RunningServer

    server = RunningServer(model_repository, max_connection_age_s=0.5, grace_s=0.5,
                           max_completion_tokens=1_000_000, version_policy="all")
    try:
        started = time.monotonic()
        stream = server.client.complete("endless", "w3", version=1, seed=0,
                                        max_tokens=1_000_000, timeout=30)
        with pytest.raises(grpc.RpcError) as cut:
            for _ in stream:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10
        (score,) = server.client.score("demo-lm", ["the dog"])  # the channel reconnects
        assert score.token_count == 3
    finally:
        server.stop()


def test_every_serve_option_says_what_it_does_in_help():
    from dataclasses import fields

    from serving.cli import serve_parser
    from serving.config import ServerConfig

    parser = serve_parser()
    helps = {action.dest: action.help for action in parser._actions}
    for f in fields(ServerConfig):
        text = helps[f.name]
        assert text and text.startswith(f.metadata["help"]), f.name
        assert len(f.metadata["help"].split()) >= 4, f"{f.name}: {f.metadata['help']!r}"
        assert text.endswith(f"Default: {f.default if f.default != '' else 'none'}."), f.name
    shown = parser.format_help()
    assert "Most sequences in one ONNX Runtime call." in shown and "Default: 64." in shown

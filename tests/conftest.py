"""Shared fixtures: the generated corpus and small models, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.environ.setdefault("RECUR_DATA", str((REPO / ".." / "shared" / "data").resolve()))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from training.data.synth import write_corpus

    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, seed=1234)
    return out


def demo_config(name: str, synth: Path, *overrides: str):
    """A demo recipe pointed at the session's generated corpus."""
    import tomllib

    from training.config import load_config

    data = tomllib.loads((REPO / "training" / "configs" / f"{name}.toml").read_text())["data"]
    paths = [f'data.{split}="{data[split].replace("data/synth", str(synth))}"'
             for split in ("train", "valid", "test")]
    return load_config(name, paths + list(overrides))


@pytest.fixture(scope="session")
def demo_lm_run(synth_dir, tmp_path_factory) -> Path:
    """The demo LSTM language model, trained once (about 20 s)."""
    from training.train import train

    run_dir = tmp_path_factory.mktemp("demo-lm")
    train(demo_config("demo-lm", synth_dir), run_dir)
    return run_dir

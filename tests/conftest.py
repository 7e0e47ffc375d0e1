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


@pytest.fixture(scope="session")
def model_repository(demo_lm_run, tmp_path_factory) -> Path:
    """A served repository: the trained demo LM (exported and verified as `recur export`
    does) and small random-weight encoders of every kind the server treats differently."""
    import torch
    from export_helpers import save_model

    from training.export import export_run
    from training.models.encoders import RecurrentClassifier, RecurrentTagger
    from training.models.language_model import RecurrentLM

    root = tmp_path_factory.mktemp("models")
    export_run(demo_lm_run, root / "demo-lm" / "1")
    torch.manual_seed(7)
    save_model(RecurrentTagger(30, 5, 0, "gru", 8, 12, bidirectional=True).eval(),
               root / "tagger-bi" / "1")
    save_model(RecurrentTagger(30, 5, 0, "lstm", 8, 12, 2, bidirectional=False).eval(),
               root / "tagger-uni" / "1")
    save_model(RecurrentClassifier(30, 3, 0, "elman_tanh", 8, 12, bidirectional=False).eval(),
               root / "classifier-uni" / "1")
    save_model(RecurrentClassifier(30, 3, 0, "gru", 8, 12, bidirectional=False,
                                   pooling="mean").eval(), root / "classifier-mean" / "1")
    endless = RecurrentLM(40, "gru", 16, 16, 1).eval()
    with torch.no_grad():  # <eos> (id 1) never sampled: completions run to max_tokens
        endless.output.bias[1] = -1e4
    save_model(endless, root / "endless" / "1")
    save_model(RecurrentLM(40, "gru", 16, 16, 1).eval(), root / "endless" / "2")
    return root

"""Data-parallel training: two gloo processes on this CPU compute what one process does
with the same global batch, and a two-process run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import demo_config

STEPS = 20
NO_DROPOUT = ("model.dropout=0.0", "model.dropout_input=0.0", "model.dropout_output=0.0")


def write_config(tmp_path: Path, name: str, synth: Path, *overrides: str) -> Path:
    config = demo_config(name, synth, "train.threads=1", f"train.max_steps={STEPS}",
                         "train.log_every=1", *NO_DROPOUT, *overrides)
    path = tmp_path / f"{name}.toml"
    path.write_text(config.to_toml())
    return path


def recur_train(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run([sys.executable, "-m", "recur", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    return [r["loss"] for r in train]


# the last cluster holds the two rarest of the corpus's 103 words: most windows of a rank
# have no target in it, so its weights get no gradient there
ADAPTIVE = ("model.tie_weights=false", "model.adaptive_cutoffs=[20, 101]")


@pytest.mark.parametrize("recipe, batch, extra", [
    ("demo-lm", 4, ()), ("demo-lm", 4, ADAPTIVE), ("demo-pos", 6, ()),
    ("demo-ner", 6, ('train.class_weighting="inverse_sqrt"',)),  # per-target weights
], ids=["lm", "lm-adaptive", "pos", "ner-class-weights"])
def test_two_processes_match_one_with_the_same_global_batch(recipe, batch, extra, synth_dir,
                                                            tmp_path):
    config = write_config(tmp_path, recipe, synth_dir, f"train.batch_size={batch}", *extra)
    recur_train("--config", str(config), "--out", str(tmp_path / "one"))
    recur_train("--config", str(config), "--out", str(tmp_path / "two"), "--nproc", "2")
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=1e-5)
    assert len(set(one)) > 1  # the model did train: losses move


def test_a_two_process_run_resumes_where_it_stopped(synth_dir, tmp_path):
    config = write_config(tmp_path, "demo-lm", synth_dir, "train.batch_size=4")
    recur_train("--config", str(config), "--out", str(tmp_path / "one"))
    split = tmp_path / "split"
    recur_train("--config", str(config), "--out", str(split), "--nproc", "2",
                "--set", f"train.max_steps={STEPS // 2}")
    assert len(step_losses(split)) == STEPS // 2
    recur_train("--resume", str(split), "--nproc", "2", "--set", f"train.max_steps={STEPS}")
    assert step_losses(split) == pytest.approx(step_losses(tmp_path / "one"), rel=1e-5)


def test_a_batch_that_does_not_split_evenly_is_refused(synth_dir, tmp_path):
    config = write_config(tmp_path, "demo-lm", synth_dir, "train.batch_size=5")
    done = subprocess.run([sys.executable, "-m", "recur", "train", "--config", str(config),
                           "--out", str(tmp_path / "run"), "--nproc", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "train.batch_size (5) must be divisible by the number of processes (2)" in (
        done.stderr)

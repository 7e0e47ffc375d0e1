"""Exact resume, atomic writes, and a clean stop on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, demo_config

from training import checkpoint
from training.train import train


def _weights(run_dir):
    return checkpoint.load(run_dir / checkpoint.LAST)["model"]


@pytest.mark.parametrize("recipe,overrides", [
    # LM: dropout (RNG), variable windows, the carried state and a mid-epoch stop
    ("demo-lm", ["model.dropout_input=0.2", "model.variational=true", "train.variable_bptt=true",
                 "train.epochs=2", "train.batch_size=64"]),
    # classifier: shuffled buckets and dropout, stopped mid-epoch
    ("demo-cls", ["model.dropout_output=0.3", "train.epochs=2"]),
    # AWD-LSTM: weight drop and embedding dropout (RNG), AR/TAR, weight decay, and the
    # weight average running since epoch 1 when the run stops in epoch 3
    ("demo-lm", ["model.weight_drop=0.3", "model.dropout_embedding=0.1",
                 "train.activation_reg=2.0", "train.temporal_activation_reg=1.0",
                 "optimizer.weight_decay=1e-4", "optimizer.average_after_epoch=1",
                 "train.epochs=3", "train.batch_size=64"]),
    # a tagger with class weights
    ("demo-ner", ["train.class_weighting=\"inverse_sqrt\"", "model.weight_drop=0.2",
                  "train.epochs=2"]),
])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(recipe, overrides, synth_dir,
                                                                 tmp_path):
    small = _small_train(recipe, synth_dir, tmp_path)
    base = overrides + ["train.threads=1", "data.train=" + small]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(demo_config(recipe, synth_dir, *base), whole)
    stopped = train(demo_config(recipe, synth_dir, *base, "train.max_steps=23"), split)
    assert stopped == {"stopped": "max_steps", "step": 23}
    # resume as `recur train --resume` does: the saved config, the step limit lifted
    from training.config import load_config

    train(load_config(split / "config.toml", ["train.max_steps=0"]), split, resume=True)
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    average_a = checkpoint.load(whole / checkpoint.LAST)["average"]
    average_b = checkpoint.load(split / checkpoint.LAST)["average"]
    assert (average_a is None) == ("optimizer.average_after_epoch=1" not in overrides)
    if average_a is not None:
        assert average_a.keys() == average_b.keys()
        assert all(torch.equal(average_a[k], average_b[k]) for k in average_a)
    best_a = checkpoint.load(whole / checkpoint.BEST)["model"]
    best_b = checkpoint.load(split / checkpoint.BEST)["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def _small_train(recipe, synth_dir, tmp_path):
    """A tenth of the training file, so two epochs take a few seconds."""
    source = {"demo-lm": "lm/train.txt", "demo-cls": "cls/train.txt",
              "demo-ner": "ner/train.conll"}[recipe]
    lines = (synth_dir / source).read_text().splitlines()[:3000]
    path = tmp_path / f"{recipe}-train.txt"
    path.write_text("\n".join(lines) + "\n")
    return f'"{path}"'


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"value": torch.tensor([1.0])}, path)

    def crash(*args):
        raise OSError("disk went away before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"value": torch.tensor([2.0])}, path)
    assert checkpoint.load(path)["value"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_checkpoints_hold_no_pickled_objects(tmp_path):
    checkpoint.save_atomic({"model": {"w": torch.zeros(2)}, "progress": {"epoch": 1}},
                           tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=True)  # raises on any pickled object


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "recur", "train", "--config", "demo-lm", "--out", str(run_dir),
               "--set", f'data.train="{synth_dir / "lm" / "train.txt"}"',
               "--set", f'data.valid="{synth_dir / "lm" / "valid.txt"}"',
               "--set", "train.epochs=50", "--set", "train.log_every=5"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopped (interrupted)" in output and "--resume" in output
    step = checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"]
    assert step >= 10
    resumed = subprocess.run([sys.executable, "-m", "recur", "train", "--resume", str(run_dir),
                              "--set", f"train.max_steps={step + 5}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == step + 5

"""Truncated BPTT: the state carried across windows, detached, and clipping."""

import json

import pytest
import torch
from conftest import demo_config

from training.config import load_config
from training.data import batching
from training.models.language_model import RecurrentLM
from training.models.recurrence import RecurrentLayer
from training.tasks import LanguageModelTask
from training.train import train


def test_window_by_window_evaluation_equals_one_pass():
    torch.manual_seed(1)
    lm = RecurrentLM(40, "lstm", 8, 16, num_layers=2).eval()
    stream = torch.randint(0, 40, (3, 101))
    with torch.no_grad():
        whole, _ = lm(stream[:, :-1])
        pieces, state = [], None
        schedule = batching.window_schedule(stream.shape[1], 7, True, seed=3, epoch=0)
        for _, inputs, _targets in batching.windows(stream, schedule):
            logits, state = lm(inputs, state)
            pieces.append(logits)
    assert sum(schedule) == 100
    assert (torch.cat(pieces, 1) - whole).abs().max() <= 1e-6


def test_carried_state_is_the_next_window_initial_state_and_is_detached(synth_dir):
    config = demo_config("demo-lm", synth_dir, "train.batch_size=4", "train.bptt=5")
    task = LanguageModelTask(config)
    lm = task.build_model()
    _, iterate = task.epoch_batches(0, torch.device("cpu"))
    batches = iterate(0)
    _, *first = next(batches)
    _, *second = next(batches)
    task.start_epoch()
    task.loss(lm, first)
    carried = task.carry
    seen = {}
    original_forward = lm.forward

    def spy(tokens, state=None, lengths=None, **loss):
        seen["state"] = state
        return original_forward(tokens, state, lengths, **loss)

    lm.forward = spy
    loss, _, _, _ = task.loss(lm, second)
    assert torch.equal(seen["state"], carried)
    assert not seen["state"].requires_grad  # detached: no gradient flows into window i


def test_leaf_initial_state_gets_no_gradient_from_the_next_window():
    layer = RecurrentLayer("gru", 3, 5)
    h0 = torch.randn(2, 5, requires_grad=True)
    _, state = layer(torch.randn(2, 4, 3), h0)
    out, _ = layer(torch.randn(2, 4, 3), state.detach())
    out.sum().backward()
    assert h0.grad is None or torch.count_nonzero(h0.grad) == 0
    # without the detach, the same loss does reach it
    _, state = layer(torch.randn(2, 4, 3), h0)
    out, _ = layer(torch.randn(2, 4, 3), state)
    out.sum().backward()
    assert torch.count_nonzero(h0.grad) > 0


def test_clipping_bounds_the_norm_and_fires_on_a_relu_elman(synth_dir, tmp_path):
    config = demo_config("demo-lm", synth_dir, 'model.cell="elman_relu"',
                         "model.tie_weights=false",
                         'optimizer.name="sgd"', "optimizer.lr=5.0", "train.clip=0.25",
                         "train.max_steps=30", "train.log_every=10")
    train(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert sum(r["clip_fraction"] for r in records) / len(records) > 0.3
    assert max(r["grad_norm"] for r in records) > 0.25  # logged before clipping

    layer = RecurrentLayer("elman_relu", 4, 6)
    out, _ = layer(torch.randn(3, 20, 4) * 100)
    out.pow(2).sum().backward()
    before = torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.25)
    after = torch.norm(torch.stack([p.grad.norm() for p in layer.parameters()]))
    assert before > 0.25 and after <= 0.25 + 1e-6


def test_variable_window_schedule_is_reproducible_and_covers_the_stream():
    a = batching.window_schedule(1000, 35, True, seed=9, epoch=2)
    assert a == batching.window_schedule(1000, 35, True, seed=9, epoch=2)
    assert a != batching.window_schedule(1000, 35, True, seed=9, epoch=3)
    assert sum(a) == 999 and len(set(a)) > 3
    fixed = batching.window_schedule(100, 35, False, seed=0, epoch=0)
    assert fixed == [35, 35, 29]


def test_recipe_configs_all_validate():
    from training.config import CONFIG_DIR

    recipes = sorted(CONFIG_DIR.glob("*.toml"))
    assert {"ptb-elman", "ptb-lstm", "shakespeare-char", "ud-pos", "sst2"} <= {
        p.stem for p in recipes}
    for path in recipes:
        load_config(path)


def _train_small(synth_dir, run_dir, *overrides: str) -> list[dict]:
    """Trains demo-lm on a small file (fast epochs) at a schedule; its metric records."""
    small = synth_dir / "lm" / "valid.txt"
    config = demo_config("demo-lm", synth_dir, f'data.train="{small}"',
                         "optimizer.decay_factor=0.5", "optimizer.plateau_factor=1.0",
                         *overrides)
    train(config, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_schedules(synth_dir, tmp_path):
    """Epoch decay: constant, then halved after every epoch from epoch 2 on."""
    records = _train_small(synth_dir, tmp_path / "decay", "train.epochs=4",
                           "optimizer.decay_after=2")
    rates = [r["lr"] for r in records if r["split"] == "valid"]
    assert rates == [0.01, 0.01, 0.005, 0.0025]  # the rate each epoch trained with
    # validation points sit at the training tokens seen, for the learning curve
    seen = {r["step"]: r["tokens"] for r in records if r["split"] == "train"}
    valid = [r for r in records if r["split"] == "valid"]
    assert all(r["tokens"] == seen[r["step"]] for r in valid)
    assert [r["tokens"] for r in valid] == sorted({r["tokens"] for r in valid})


def test_decay_over_the_last_epochs(synth_dir, tmp_path):
    """decay_last = 2 of 5 epochs: the last two train at a halved, then quartered rate."""
    records = _train_small(synth_dir, tmp_path / "last", "train.epochs=5",
                           "optimizer.decay_last=2")
    assert [r["lr"] for r in records if r["split"] == "valid"] == [
        0.01, 0.01, 0.01, 0.005, 0.0025]


def test_epochs_left_under_a_time_budget():
    """The anneal starts when only decay_last epochs fit the budget at the pace so far."""
    from training.config import TrainConfig
    from training.train import _epochs_left

    budget = TrainConfig(max_minutes=60.0, epochs=40)
    assert _epochs_left(budget, 30, elapsed_s=9 * 270.0, epochs_done_here=9) == pytest.approx(
        (3600 - 9 * 270) / 270)  # 4.33 epochs of 270 s still fit
    assert _epochs_left(budget, 2, elapsed_s=600.0, epochs_done_here=2) == 2.0  # count ends first
    assert _epochs_left(budget, 30, elapsed_s=4000.0, epochs_done_here=9) == 0.0
    assert _epochs_left(TrainConfig(epochs=10), 7, 100.0, 3) == 7.0  # no budget: by count

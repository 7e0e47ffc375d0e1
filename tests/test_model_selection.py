"""Best-checkpoint selection and the plateau rule by the task's metric; rare-class weights."""

import json

import pytest
import torch
from conftest import demo_config

from training import checkpoint
from training.config import OptimizerConfig, load_config
from training.tasks import make_task
from training.train import Progress, schedule_after_validation, train


def test_tasks_select_by_their_own_metric(synth_dir):
    assert make_task(demo_config("demo-ner", synth_dir)).select_by == "entity_f1"
    assert make_task(demo_config("demo-pos", synth_dir)).select_by == "accuracy"
    assert make_task(demo_config("demo-cls", synth_dir)).select_by == "accuracy"
    assert make_task(demo_config("demo-lm", synth_dir)).select_by == "ppl"


def test_the_default_patience_waits_before_cutting_the_rate():
    assert load_config(None, ['data.train="x"']).optimizer.plateau_patience > 0


def test_a_tagger_whose_loss_plateaus_while_its_f1_improves_keeps_its_rate():
    """The validation loss of a BIO tagger on rare entities flattens (most tokens are O and
    already right) while entity F1 keeps rising: the rate follows F1, so it is not cut."""
    o = OptimizerConfig(lr=2e-3, plateau_factor=0.5, plateau_patience=0)
    by_f1, by_loss = Progress(lr=o.lr), Progress(lr=o.lr)
    losses = [0.300, 0.299, 0.301, 0.300, 0.302]
    f1s = [0.05, 0.12, 0.20, 0.26, 0.31]
    for epoch, (loss, f1) in enumerate(zip(losses, f1s), 1):
        by_f1.epoch = by_loss.epoch = epoch
        improved, by_f1.lr = schedule_after_validation(by_f1, f1, True, o)
        assert improved
        _, by_loss.lr = schedule_after_validation(by_loss, loss, False, o)
    assert by_f1.lr == 2e-3 and by_f1.best == 0.31
    assert by_loss.lr < 2e-3  # what following the loss did: three cuts in five epochs


def test_patience_counts_epochs_without_improvement():
    o = OptimizerConfig(lr=1.0, plateau_factor=0.5, plateau_patience=2)
    progress, rates = Progress(lr=1.0), []
    for value in [0.5, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6]:  # accuracy
        _, progress.lr = schedule_after_validation(progress, value, True, o)
        rates.append(progress.lr)
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]


def test_best_checkpoint_of_a_bio_tagger_is_its_best_entity_f1(synth_dir, tmp_path,
                                                               monkeypatch):
    """The trainer selects by entity F1 even when the validation loss and the token
    accuracy say otherwise: here both are made to get worse every epoch (the real
    evaluation's, with those two numbers replaced), F1 is the real one."""
    from training.tasks import TaggingTask

    real = TaggingTask.evaluate
    calls = []

    def worsening(self, model, split, device):
        result = real(self, model, split, device)
        if split == "valid":
            calls.append(result["entity_f1"])
            result["loss"], result["accuracy"] = len(calls), 1.0 / len(calls)
        return result

    monkeypatch.setattr(TaggingTask, "evaluate", worsening)
    run = tmp_path / "ner"
    # a small, slow tagger, whose entity F1 is still rising over three epochs
    train(demo_config("demo-ner", synth_dir, "train.epochs=3", "optimizer.plateau_factor=0.5",
                      "optimizer.plateau_patience=0", "model.embedding_size=4",
                      "model.hidden_size=4", "optimizer.lr=0.003"), run)
    f1s = calls[:3]
    assert max(f1s) > f1s[0]  # F1 improved after epoch 1: loss or accuracy would keep it
    assert checkpoint.load(run / checkpoint.BEST)["epoch"] == 1 + f1s.index(max(f1s))
    # the rate each epoch trained with: cut after an epoch whose F1 did not improve
    expected, lr = [], 0.003
    for k in range(3):
        expected.append(lr)
        if f1s[k] <= max(f1s[:k], default=-1.0):
            lr *= 0.5
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "valid"]
    assert [r["lr"] for r in valid] == pytest.approx(expected)
    assert expected != [0.003, 0.0015, 0.00075]  # what following the rising loss gives
    best = checkpoint.load(run / checkpoint.BEST)
    kinds = {k.removeprefix("entity_f1_") for k in best["valid"] if k.startswith("entity_f1_")}
    assert kinds and all(0.0 <= best["valid"][f"entity_f1_{k}"] <= 1.0 for k in kinds)
    assert json.loads((run / "summary.json").read_text())["selected_by"] == "entity_f1"


@pytest.mark.parametrize("weighting,power", [("inverse_sqrt", 0.5), ("inverse", 1.0)])
def test_class_weights_favour_rare_tags_and_average_one(synth_dir, weighting, power):
    task = make_task(demo_config("demo-ner", synth_dir, f'train.class_weighting="{weighting}"'))
    weights = task.class_weights(torch.device("cpu")).double()
    counts = torch.zeros(len(task.labels), dtype=torch.float64)
    for _, tags in task.encoded("train"):
        for tag in tags:
            counts[tag] += 1
    assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)  # mean weight 1
    expected = (counts.sum() / counts) ** power
    torch.testing.assert_close(weights / weights[0], expected / expected[0], rtol=1e-5,
                               atol=0)
    o = task.labels.index["O"]
    assert weights[o] == weights.min() and counts[o] == counts.max()
    assert make_task(demo_config("demo-ner", synth_dir)).class_weights(
        torch.device("cpu")) is None

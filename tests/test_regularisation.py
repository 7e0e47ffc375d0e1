"""AWD-LSTM's regularisers: weight drop, embedding dropout, AR/TAR, NT-ASGD."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.averaging import WeightAverage, nonmonotone_trigger
from training.models.language_model import RecurrentLM
from training.models.recurrence import CELLS, RecurrentLayer, embed_dropping_words


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("fused", [True, False])
def test_weight_drop_uses_one_mask_for_every_time_step(cell, fused):
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 5, 8, weight_drop=0.5).train()
    layer.fused = fused
    x, state = torch.randn(3, 9, 5), torch.randn(3, layer.state_size)
    torch.manual_seed(7)
    out, final = layer(x, state)
    torch.manual_seed(7)  # the same draw: the mask the forward pass used
    dropped = F.dropout(layer.weight_hh, 0.5, training=True)
    assert 0.3 < float((dropped == 0).float().mean()) < 0.7
    reference, reference_final = layer.forward_loop(x, state, None, dropped)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, reference_final, rtol=1e-5, atol=1e-5)
    undropped, _ = layer.forward_loop(x, state)
    assert (out - undropped).abs().max() > 1e-3  # the mask changed the function


def test_weight_drop_is_resampled_per_forward_pass_and_off_in_evaluation():
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm", 4, 6, weight_drop=0.5).train()
    x = torch.randn(2, 5, 4)
    first, _ = layer(x)
    second, _ = layer(x)
    assert (first - second).abs().max() > 1e-3
    layer.eval()
    plain = RecurrentLayer("lstm", 4, 6)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[0], plain.eval()(x)[0], rtol=0, atol=0)


def test_weight_drop_gives_dropped_weights_no_gradient():
    torch.manual_seed(3)
    layer = RecurrentLayer("gru", 4, 6, weight_drop=0.5).train()
    x = torch.randn(2, 5, 4)
    torch.manual_seed(11)
    out, _ = layer(x, torch.randn(2, 6))
    out.sum().backward()
    torch.manual_seed(11)
    torch.randn(2, 6)  # the state drawn before the mask above
    mask = F.dropout(torch.ones_like(layer.weight_hh), 0.5, training=True)
    assert torch.all(layer.weight_hh.grad[mask == 0] == 0)
    assert layer.weight_hh.grad[mask != 0].abs().sum() > 0


def test_embedding_dropout_drops_whole_words_once_per_pass():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16).train()
    tokens = torch.randint(0, 50, (4, 30))
    seen = []
    for _ in range(2):
        vectors = embed_dropping_words(embedding, tokens, 0.5)
        dropped = (vectors == 0).all(-1)
        scaled = torch.isclose(vectors, embedding.weight[tokens] * 2).all(-1)
        assert torch.all(dropped | scaled)  # a vector is dropped whole, or kept and scaled
        for word in tokens.unique():
            at = tokens == word
            assert dropped[at].all() or not dropped[at].any()  # every occurrence alike
        seen.append({int(w) for w in tokens[dropped].unique()})
    assert seen[0] and seen[0] != seen[1]  # another mask for the next pass
    embedding.eval()
    assert torch.equal(embed_dropping_words(embedding, tokens, 0.5), embedding(tokens))


def test_activation_penalties_are_computed_on_the_last_layer():
    """AR on the last layer's dropped outputs, TAR on its undropped ones (in training: the
    output dropout is the only random draw, so reseeding replays it)."""
    torch.manual_seed(0)
    lm = RecurrentLM(30, "lstm", 8, 12, num_layers=2, dropout_output=0.5,
                     variational=True).train()
    tokens, targets = torch.randint(0, 30, (3, 10)), torch.randint(0, 30, (3, 10))
    torch.manual_seed(4)
    nll, _, penalty = lm(tokens, targets=targets, reduction="mean", activation_reg=2.0,
                         temporal_activation_reg=1.0)
    torch.manual_seed(4)
    plain, _ = lm(tokens, targets=targets, reduction="mean")
    torch.testing.assert_close(nll, plain)
    torch.manual_seed(4)
    raw, _ = lm.stack(lm.embedding(tokens))
    dropped = lm.dropout_output(raw)
    assert (dropped == 0).any()
    expected = 2.0 * dropped.pow(2).mean() + (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    torch.testing.assert_close(penalty, expected)
    on_raw = 2.0 * raw.pow(2).mean() + (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    assert abs(float((penalty - on_raw).detach())) > 1e-4  # which outputs AR reads shows


def test_nonmonotone_trigger_compares_with_the_best_before_the_last_epochs():
    # perplexities: lower is better; the last `nonmono` epochs are left out of the best
    assert not nonmonotone_trigger([100, 90, 95], 96, 5, higher_is_better=False)  # too early
    assert not nonmonotone_trigger([100, 90, 95, 94, 93, 92], 91, 5, higher_is_better=False)
    assert nonmonotone_trigger([100, 90, 95, 94, 93, 92, 91], 92, 5, higher_is_better=False)
    assert not nonmonotone_trigger([100, 90, 95, 94, 93, 92, 91], 89, 5,
                                   higher_is_better=False)
    assert nonmonotone_trigger([0.5, 0.7, 0.6], 0.65, 1, higher_is_better=True)
    assert not nonmonotone_trigger([0.5, 0.7, 0.6], 0.75, 1, higher_is_better=True)


def test_weight_average_is_the_mean_of_the_weights_after_each_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = WeightAverage()
    assert average.model(model) is model
    average.start(model)
    snapshots = [model.weight.detach().clone()]
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        average.update(model)
        snapshots.append(model.weight.detach().clone())
    assert average.steps_averaged == 5
    torch.testing.assert_close(average.model(model).weight, torch.stack(snapshots).mean(0))
    restored = WeightAverage()
    restored.load_state_dict(model, average.state_dict())
    assert torch.equal(restored.model(model).weight, average.model(model).weight)


def test_the_averaged_weights_are_what_best_pt_and_the_export_hold(synth_dir, tmp_path):
    from conftest import demo_config

    from training import checkpoint
    from training.evaluate import load_run
    from training.export import export_run
    from training.train import train

    run = tmp_path / "run"
    config = demo_config("demo-lm", synth_dir, "train.epochs=2", "train.max_steps=0",
                         "optimizer.average_after_epoch=1", "model.weight_drop=0.2")
    summary = train(config, run)
    last = checkpoint.load(run / checkpoint.LAST)
    steps_per_epoch = summary["steps"] // 2
    assert int(last["average"]["n_averaged"]) == steps_per_epoch + 1  # from epoch 1's end
    assert summary["averaged_steps"] == steps_per_epoch + 1
    assert summary["best_epoch"] == 2
    averaged = {k.removeprefix("module."): v for k, v in last["average"].items()
                if k.startswith("module.")}
    best = checkpoint.load(run / checkpoint.BEST)["model"]
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    assert any(not torch.equal(best[k], last["model"][k]) for k in best)  # not the last step
    _, _, model = load_run(run, device="cpu")
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    import numpy as np
    import onnx
    from onnx import numpy_helper

    export_run(run, tmp_path / "models" / "lm" / "1")  # verified against the average
    graph = onnx.load(tmp_path / "models" / "lm" / "1" / "model.onnx").graph
    embedding = averaged["embedding.weight"].numpy()
    tables = [numpy_helper.to_array(t) for t in graph.initializer
              if tuple(t.dims) == embedding.shape]
    assert any(np.array_equal(t, embedding) for t in tables)
    assert not any(np.array_equal(t, last["model"]["embedding.weight"].numpy())
                   for t in tables)

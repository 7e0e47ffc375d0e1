"""The adaptive softmax output layer: trained through its own loss, exported with exact
log-probs (a cluster computed only where a target or the greedy token needs it),
verified against torch, quantized, and served like any language model."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import demo_config
from export_helpers import save_model

from serving.model.runtime import ModelRuntime
from training.config import ConfigError, load_config
from training.export import export_run
from training.export.graph import build_graph
from training.export.lm_head import HEAD_ROWS
from training.export.quantize import Int8Options
from training.export.verify import verify
from training.models.language_model import RecurrentLM

VOCAB, CUTOFFS = 40, [8, 20]


def _adaptive(seed=0, cell="lstm", cutoffs=CUTOFFS) -> RecurrentLM:
    torch.manual_seed(seed)
    return RecurrentLM(VOCAB, cell, 12, 16, 2, adaptive_cutoffs=cutoffs,
                       adaptive_div_value=2.0).eval()


def _with_cluster_priors(model: RecurrentLM, boost: float) -> RecurrentLM:
    """Weights of unit scale, so that the distributions differ from position to position,
    and the head's cluster entries moved by `boost`: from -6 the shortlist always holds
    the greedy token, at 1 a cluster often does, from 4 always."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        model.output.head.bias[model.output.shortlist_size:] += boost
    return model


def test_scores_are_exact_log_probs_and_targets_take_the_cheap_path():
    model = _adaptive()
    tokens = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores, state = model(tokens)
        nll, state_again = model(tokens, targets=targets)
        mean, _ = model(tokens, targets=targets, reduction="mean")
        total, _ = model(tokens, targets=targets, reduction="sum")
    assert scores.shape == (3, 9, VOCAB)
    torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(3, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(-nll, scores.gather(2, targets[..., None])[..., 0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, nll.mean())
    torch.testing.assert_close(total, nll.sum())
    assert torch.equal(state, state_again)
    # the full softmax's two paths agree the same way
    full = RecurrentLM(VOCAB, "lstm", 12, 16, 1).eval()
    with torch.no_grad():
        logits, _ = full(tokens)
        nll, _ = full(tokens, targets=targets)
    torch.testing.assert_close(-nll, torch.log_softmax(logits, -1).gather(
        2, targets[..., None])[..., 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("override, says", [
    ("model.adaptive_cutoffs=[20, 8]", "increasing order"),
    ("model.adaptive_cutoffs=[0, 8]", "positive"),
    ("model.adaptive_cutoffs=[8, 8]", "increasing order"),
    ("model.adaptive_cutoffs=[2.5]", "positive word ids"),
    ("model.adaptive_div_value=0.5", "model.adaptive_div_value"),
])
def test_bad_cutoffs_are_refused_naming_the_key(override, says):
    with pytest.raises(ConfigError, match="model.adaptive") as error:
        load_config("demo-lm", ["model.tie_weights=false", override])
    assert says in str(error.value)


def test_tied_weights_and_taggers_are_refused_an_adaptive_softmax():
    with pytest.raises(ConfigError, match="model.adaptive_cutoffs cannot be used with "
                                          "model.tie_weights"):
        load_config("demo-lm", ["model.adaptive_cutoffs=[100]"])
    with pytest.raises(ConfigError, match="applies to recurrent language models"):
        load_config("demo-pos", ["model.adaptive_cutoffs=[100]"])
    with pytest.raises(ValueError, match="within 1..38"):
        RecurrentLM(VOCAB, "lstm", 8, 8, adaptive_cutoffs=[8, 39])
    with pytest.raises(ValueError, match="0 units"):  # 16 // 4^3: an empty projection
        RecurrentLM(VOCAB, "lstm", 8, 16, adaptive_cutoffs=[8, 20, 30])


@pytest.mark.parametrize("cell", ["elman_tanh", "lstm", "gru"])
def test_the_graph_matches_torch_at_once_and_in_chunks(cell, tmp_path):
    """Single steps, short batches and calls of more than HEAD_ROWS positions (the head in
    chunks, rows ending in different chunks); verify's random targets fall in every
    cluster, and some calls have a cluster with no target at all."""
    model = _adaptive(cell=cell)
    runtime = ModelRuntime(save_model(model, tmp_path / "m" / "1"))
    cases = ((1, 1), (7, 7), (64, 13), (3, 700))
    assert any(b * t > HEAD_ROWS for b, t in cases)
    report = verify(model, runtime, cases=cases)
    assert max(report["max_abs_diff"].values()) <= 1e-4


@pytest.mark.parametrize("boost", [-6.0, 1.0, 4.0], ids=["head-wins", "mixed", "clusters-win"])
@pytest.mark.parametrize("steps", [7, 300], ids=["at-once", "chunks"])
def test_greedy_tokens_are_torchs_argmax_wherever_it_falls(boost, steps, tmp_path):
    """The pruning is exact: the greedy token and its log-prob are torch's argmax over the
    whole distribution, whether it lies in the shortlist or in a cluster; and fed back as
    targets, the greedy tokens score their greedy log-probs."""
    model = _with_cluster_priors(_adaptive(seed=3), boost)
    runtime = ModelRuntime(save_model(model, tmp_path / "m" / "1"))
    rng = np.random.default_rng(steps)
    tokens = rng.integers(0, VOCAB, (4, steps))
    lengths = np.array([steps, steps // 2, 1, steps - 1])
    got = runtime.run_lm(tokens, lengths)
    with torch.no_grad():
        scores, _ = model(torch.from_numpy(tokens), None, torch.from_numpy(lengths))
        best = scores.max(dim=-1)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(got.greedy_tokens[valid], best.indices.numpy()[valid])
    np.testing.assert_allclose(got.greedy_logprobs[valid], best.values.numpy()[valid],
                               rtol=1e-5, atol=1e-5)
    in_clusters = (got.greedy_tokens[valid] >= CUTOFFS[0]).mean()
    if boost < 0:
        assert in_clusters == 0.0
    elif boost > 2:
        assert in_clusters == 1.0
    else:
        assert 0.0 < in_clusters < 1.0
    again = runtime.run_lm(tokens, lengths, None, np.where(valid, got.greedy_tokens, 0))
    np.testing.assert_allclose(again.token_logprobs[valid], got.greedy_logprobs[valid],
                               atol=1e-6)


def test_greedy_ties_made_by_rounding_go_to_the_lower_id(tmp_path):
    """Two words of a cluster whose log P(w | c) differ by less than float32 can show once
    log P(c) is added tie in log P(w): torch.argmax takes the lower id, and so must the
    graph (the prior is added before its TopK). The hidden state is fixed (a one-layer
    Elman RNN with zero weights: h = tanh(bias)), the clusters win the head, and word 3's
    logit exceeds word 2's by `delta`; two steps, so the sparse path runs."""
    ties = 0
    for prior in (1.0, 1.1, 1.5, 2.0):
        for delta in (3e-8, 6e-8, 9e-8, 1.2e-7):
            model = RecurrentLM(6, "elman_tanh", 2, 2, 1, adaptive_cutoffs=[2],
                                adaptive_div_value=2.0).eval()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.zero_()
                model.stack.forward_layers[0].bias.copy_(torch.tensor([1.0, 0.0]))
                model.output.head.bias.copy_(torch.tensor([0.0, 0.0, prior]))
                model.output.tail[0][0].weight.copy_(torch.tensor([[1.0, 0.0]]))
                model.output.tail[0][1].weight.copy_(
                    torch.tensor([[0.0], [delta / np.tanh(1.0)], [-30.0], [-30.0]]))
                scores, _ = model(torch.zeros(1, 2, dtype=torch.long))
            runtime = ModelRuntime(save_model(model, tmp_path / f"{prior}-{delta}" / "1"))
            got = runtime.run_lm(np.zeros((1, 2), np.int64), np.array([2]))
            ties += int(scores[0, 0, 2] == scores[0, 0, 3])
            np.testing.assert_array_equal(got.greedy_tokens[0], scores[0].argmax(-1).numpy())
    assert ties > 0  # some of these do tie in float32: the case this test is about


def test_no_product_runs_over_the_whole_vocabulary_at_every_position():
    """The head is [H, shortlist + clusters] and each cluster its two narrow products;
    only next_logprobs (the B rows after each row's last step) concatenates the whole
    distribution."""
    graph = build_graph(_adaptive()).graph
    subgraphs, pending = [], [graph]
    while pending:  # the graph and every body and branch in it
        g = pending.pop()
        subgraphs.append(g)
        pending += [a.g for n in g.node for a in n.attribute
                    if a.type == onnx.AttributeProto.GRAPH]
    weights = {i.name: tuple(i.dims) for g in subgraphs for i in g.initializer}
    shapes = [weights[n.input[1]] for g in subgraphs for n in g.node
              if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    head, clusters = (16, CUTOFFS[0] + 2), [(16, 8), (8, 12), (16, 4), (4, 20)]
    assert set(shapes) == {head, *clusters, (12, 64), (16, 64)}  # + the layers' products
    assert not any(shape[-1] == VOCAB for shape in shapes)


def test_int8_quantizes_the_head_and_the_clusters(tmp_path):
    from serving.model.tokenizer import EOS, UNK, Normalization, Vocabulary
    from training.export import export_model

    model = _with_cluster_priors(_adaptive(seed=5), 1.0)
    vocab = Vocabulary([UNK, EOS] + [f"w{i}" for i in range(VOCAB - 2)], Normalization())
    stream = np.random.default_rng(0).integers(0, VOCAB, 400).tolist()
    path, metadata, report = export_model(model, tmp_path / "m" / "1", vocab,
                                          int8=Int8Options(lambda: stream, 4, None, 400))
    graph = onnx.load(path / "model.onnx")

    def ops(g):
        for node in g.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from ops(attr.g)

    found = list(ops(graph.graph))
    assert "MatMul" not in found and "Gemm" not in found
    assert found.count("MatMulInteger") >= 5
    assert metadata["quantization"]["relative_ppl_cost"] < 0.05


def test_cutoffs_beyond_the_vocabulary_are_a_configuration_error(synth_dir, tmp_path,
                                                                 capsys):
    from training.cli import train_command

    config = demo_config("demo-lm", synth_dir, "model.tie_weights=false")
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml().replace("adaptive_cutoffs = []",
                                             "adaptive_cutoffs = [100, 100000]"))
    assert train_command(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "configuration error: model.adaptive_cutoffs must increase strictly within" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused before the run was written


def test_an_adaptive_run_trains_evaluates_exports_and_scores_as_torch_does(synth_dir,
                                                                           tmp_path):
    from training.evaluate import load_run
    from training.train import train

    config = demo_config("demo-lm", synth_dir, "model.tie_weights=false",
                         "model.adaptive_cutoffs=[20, 60]", "train.epochs=1")
    run = tmp_path / "run"
    summary = train(config, run)
    assert summary["valid"]["ppl"] < 60  # the uniform distribution over the vocabulary: 300+
    metadata = export_run(run, tmp_path / "models" / "lm" / "1")
    assert metadata["output_layer"] == {"type": "adaptive", "cutoffs": [20, 60],
                                        "div_value": 4.0}
    verification = json.loads((tmp_path / "models/lm/1/verification.json").read_text())
    assert set(verification["outputs"]) >= {"token_logprobs", "greedy_tokens"}
    _, task, model = load_run(run, device="cpu")
    runtime = ModelRuntime(tmp_path / "models" / "lm" / "1")
    ids = task.stream("test")[:30]
    (scored,) = runtime.score([ids])  # reads <eos> first, then ids[:-1]
    with torch.no_grad():
        nll, _ = model(torch.tensor([[task.vocab.eos_id] + ids[:-1]]),
                       targets=torch.tensor([ids]))
    np.testing.assert_allclose(scored, -nll[0].numpy(), atol=1e-4)

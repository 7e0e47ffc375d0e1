"""The recurrent layers against torch's own, parameter counts, tying, padding, dropout."""

import pytest
import torch
from torch import nn

from training.models.encoders import RecurrentClassifier, RecurrentTagger
from training.models.language_model import FeedForwardLM, RecurrentLM
from training.models.recurrence import (
    CELLS,
    LockedDropout,
    RecurrentLayer,
    RecurrentStack,
    reverse_within_lengths,
)

torch.manual_seed(0)


def copy_torch_weights(ours: RecurrentStack, theirs: nn.Module) -> None:
    """Loads an nn.RNN/LSTM/GRU's weights into our stack (its two biases folded into ours)."""
    with torch.no_grad():
        for i, layer in enumerate(ours.forward_layers):
            w_ih, w_hh = getattr(theirs, f"weight_ih_l{i}"), getattr(theirs, f"weight_hh_l{i}")
            b_ih, b_hh = getattr(theirs, f"bias_ih_l{i}"), getattr(theirs, f"bias_hh_l{i}")
            layer.weight_ih.copy_(w_ih)
            layer.weight_hh.copy_(w_hh)
            if layer.cell == "gru":
                h = layer.hidden_size
                layer.bias.copy_(b_ih + torch.cat([b_hh[: 2 * h], torch.zeros(h)]))
                layer.bias_hn.copy_(b_hh[2 * h :])
            else:
                layer.bias.copy_(b_ih + b_hh)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_matches_torch_modules(cell):
    d, h, layers = 6, 10, 2
    if cell.startswith("elman"):
        theirs = nn.RNN(d, h, layers, nonlinearity=cell.split("_")[1], batch_first=True)
    else:
        theirs = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](d, h, layers, batch_first=True)
    ours = RecurrentStack(cell, d, h, layers)
    copy_torch_weights(ours, theirs)
    x = torch.randn(4, 9, d)
    state = torch.randn(layers, 4, ours.state_size)
    if cell == "lstm":
        hx = (state[:, :, :h].contiguous(), state[:, :, h:].contiguous())
        expected, (h_n, c_n) = theirs(x, hx)
        expected_state = torch.cat([h_n, c_n], dim=2)
    else:
        expected, expected_state = theirs(x, state)
    out, final = ours(x, state)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(final, expected_state, atol=1e-6)


@pytest.mark.parametrize("learn_h0", [False, True])
def test_elman_parameter_count(learn_h0):
    d, h = 7, 11
    layer = RecurrentLayer("elman_tanh", d, h, learn_h0=learn_h0)
    count = sum(p.numel() for p in layer.parameters())
    assert count == h * (h + d + 1) + (h if learn_h0 else 0)


def test_learned_h0_is_the_initial_state_and_trains():
    layer = RecurrentLayer("elman_relu", 3, 4, learn_h0=True)
    with torch.no_grad():
        layer.h0.fill_(0.5)
    assert torch.equal(layer.initial_state(2), torch.full((2, 4), 0.5))
    out, _ = layer(torch.randn(2, 5, 3))
    out.sum().backward()
    assert layer.h0.grad is not None and layer.h0.grad.abs().sum() > 0


def test_tying_shares_one_tensor_and_refuses_mismatched_sizes():
    lm = RecurrentLM(50, "lstm", 16, 16, tie_weights=True)
    assert lm.output.weight is lm.embedding.weight
    names = [n for n, _ in lm.named_parameters()]
    assert "output.weight" not in names  # one tensor, counted once
    with pytest.raises(ValueError, match="model.tie_weights"):
        RecurrentLM(50, "lstm", 16, 32, tie_weights=True)


@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_changes_states_or_outputs(cell):
    lm = RecurrentLM(30, cell, 8, 12, num_layers=2).eval()
    sequences = [torch.randint(0, 30, (n,)) for n in (7, 3, 5, 1)]
    lengths = torch.tensor([len(s) for s in sequences])
    padded = torch.zeros(4, 7, dtype=torch.long)
    for i, s in enumerate(sequences):
        padded[i, : len(s)] = s
    logits, state = lm(padded, lengths=lengths)
    for i, s in enumerate(sequences):
        alone_logits, alone_state = lm(s[None])
        assert torch.allclose(logits[i, : len(s)], alone_logits[0], atol=1e-6)
        assert torch.allclose(state[:, i], alone_state[:, 0], atol=1e-6)


def _padded(sequences, pad=0):
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.full((len(sequences), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, : len(s)] = s
    return batch, lengths


def test_bidirectional_tagger_is_padding_invariant_and_concatenates_backward_forward():
    tagger = RecurrentTagger(20, 5, 0, "gru", 6, 8, num_layers=2, bidirectional=True).eval()
    sequences = [torch.randint(1, 20, (n,)) for n in (6, 2, 4)]
    batch, lengths = _padded(sequences)
    logits, _ = tagger(batch, lengths)
    for i, s in enumerate(sequences):
        alone, _ = tagger(s[None], torch.tensor([len(s)]))
        assert torch.allclose(logits[i, : len(s)], alone[0], atol=1e-6)
    # first layer output = [backward_h ; forward_h]
    x = tagger.embedding(sequences[0][None])
    forward_out, _ = tagger.stack.forward_layers[0](x)
    backward_out, _ = tagger.stack.backward_layers[0](x.flip(1))
    one_layer = RecurrentStack("gru", 6, 8, 1, bidirectional=True)
    one_layer.forward_layers[0].load_state_dict(tagger.stack.forward_layers[0].state_dict())
    one_layer.backward_layers[0].load_state_dict(tagger.stack.backward_layers[0].state_dict())
    out, _ = one_layer(x)
    assert torch.allclose(out, torch.cat([backward_out.flip(1), forward_out], dim=2), atol=1e-6)


@pytest.mark.parametrize("pooling", ["final", "mean", "max"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_classifier_pooling_ignores_padding(pooling, bidirectional):
    model = RecurrentClassifier(20, 3, 0, "lstm", 6, 8, bidirectional=bidirectional,
                                pooling=pooling).eval()
    sequences = [torch.randint(1, 20, (n,)) for n in (5, 1, 3)]
    batch, lengths = _padded(sequences)
    logits, _ = model(batch, lengths)
    for i, s in enumerate(sequences):
        alone, _ = model(s[None], torch.tensor([len(s)]))
        assert torch.allclose(logits[i], alone[0], atol=1e-6)


def test_unidirectional_classifier_runs_incrementally():
    model = RecurrentClassifier(20, 3, 0, "gru", 6, 8, bidirectional=False).eval()
    text = torch.randint(1, 20, (1, 9))
    whole, _ = model(text)
    _, state = model(text[:, :4])
    rest, _ = model(text[:, 4:], state=state)
    assert torch.allclose(whole, rest, atol=1e-6)


def test_reverse_within_lengths_keeps_padding_in_place():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    assert reverse_within_lengths(x, torch.tensor([3, 2])).tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]


def test_locked_dropout_uses_one_mask_per_sequence():
    drop = LockedDropout(0.5).train()
    out = drop(torch.ones(3, 10, 8))
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert drop.eval()(torch.ones(2, 2, 2)).eq(1).all()


def test_feedforward_lm_carries_its_window_across_calls():
    lm = FeedForwardLM(25, 4, 8, window=3, eos_id=1).eval()
    stream = torch.randint(0, 25, (2, 12))
    whole, _ = lm(stream)
    first, state = lm(stream[:, :5])
    second, _ = lm(stream[:, 5:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_kernels_agree_with_the_explicit_loop(cell):
    layer = RecurrentLayer(cell, 5, 7)
    x = torch.randn(4, 8, 5, requires_grad=True)
    state = torch.randn(4, layer.state_size)
    for lengths in (None, torch.tensor([8, 3, 1, 6])):
        fused_out, fused_state = layer(x, state, lengths)
        loop_out, loop_state = layer.forward_loop(x, state, lengths)
        valid = torch.ones(4, 8, dtype=torch.bool) if lengths is None else (
            torch.arange(8)[None, :] < lengths[:, None])
        assert torch.allclose(fused_out[valid], loop_out[valid], atol=1e-6)
        assert torch.allclose(fused_state, loop_state, atol=1e-6)
        grads = [torch.autograd.grad(o[valid].sum() + s.sum(), [x, layer.weight_hh])
                 for o, s in ((fused_out, fused_state), (loop_out, loop_state))]
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5)

"""Parity of an exported graph with the torch model it came from, through the runtime that
will serve it, on random padded batches from random non-zero states.

The reference is the torch model in float64. The ONNX graph runs in float32, and so does
the torch model it was trained as: both round, and the wider and deeper the model, the
more (a 2 x 1024 LSTM's log-probs move by 3e-4 between two float32 implementations). So
a graph passes when, on every output, it is as close to the float64 reference as torch's
own float32 forward is, within FACTOR (plus FLOOR, float32's noise on values of this size),
and never further than CEILING: beyond that a model's float32 numbers are too unstable to
serve, whatever torch does. A wrong graph (a gate in the wrong place, a missing bias)
misses by orders of magnitude more than the float32 forward does.

`greedy_tokens` is an index, not a number to compare: where two tokens' log-probs are
closer than float32's rounding, either may legitimately win. Its difference is the
log-prob it gives up, the reference's max minus the reference's log-prob at the chosen
token (0 when it chose the reference's argmax), and it is allowed what `greedy_logprobs`
is allowed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch

from serving.model.runtime import ModelRuntime
from training.models.language_model import RecurrentLM

# (batch, time): single steps, short and long sequences, small and large batches
CASES = ((1, 1), (1, 7), (7, 1), (7, 7), (7, 64), (64, 7), (64, 64))
FACTOR = 4.0
FLOOR = 1e-5
CEILING = 1e-3
GIVEN_UP = ("log-prob given up: the max of a reference's log-probs minus its log-prob at the "
            "chosen token; allowed as greedy_logprobs")


class ExportMismatch(AssertionError):
    pass


def _valid_mask(lengths: torch.Tensor, steps: int) -> np.ndarray:
    return (torch.arange(steps)[None, :] < lengths[:, None]).numpy()


def _torch_outputs(model: torch.nn.Module, tokens, lengths, state,
                   targets) -> tuple[dict, torch.Tensor | None]:
    """The outputs the graph has, computed by `model` (in its own precision), and for a
    language model the log-probs [B, T, V] they come from (None otherwise)."""
    if isinstance(model, RecurrentLM):
        logits, new_state = model(tokens, state, lengths)
        logprobs = torch.log_softmax(logits, dim=-1)
        batch = tokens.shape[0]
        greedy = logprobs.max(dim=-1)  # ties: the lowest index, as the graph's TopK
        return {"token_logprobs": logprobs.gather(2, targets[..., None])[..., 0],
                "next_logprobs": logprobs[torch.arange(batch), lengths - 1],
                "greedy_tokens": greedy.indices, "greedy_logprobs": greedy.values,
                "new_state": new_state}, logprobs
    logits, final = model(tokens, lengths, state)
    name = "tag_logprobs" if logits.dim() == 3 else "class_logprobs"
    outputs = {name: torch.log_softmax(logits, dim=-1)}
    if state is not None:
        outputs["new_state"] = final
    return outputs, None


def _given_up(logprobs: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[B, T]: how much less than its max `logprobs` [B, T, V] has at the `chosen` tokens
    (clipped into the vocabulary: padded positions may hold anything)."""
    chosen = np.clip(chosen, 0, logprobs.shape[-1] - 1)[..., None]
    return logprobs.max(axis=-1) - np.take_along_axis(logprobs, chosen, axis=-1)[..., 0]


def _graph_outputs(runtime: ModelRuntime, tokens, lengths, state, targets,
                   names) -> dict:
    state = None if state is None else state.numpy()
    if runtime.task == "lm":
        got = runtime.run_lm(tokens.numpy(), lengths.numpy(), state, targets.numpy())
        outputs = {"token_logprobs": got.token_logprobs, "next_logprobs": got.next_logprobs,
                   "new_state": got.state.numpy()}
        if runtime.has_greedy:  # artifacts exported before the greedy outputs lack them
            outputs.update(greedy_tokens=got.greedy_tokens, greedy_logprobs=got.greedy_logprobs)
        return outputs
    out, new_state = runtime.run_encoder(tokens.numpy(), lengths.numpy(), state)
    outputs = {next(n for n in names if n != "new_state"): out}
    if new_state is not None:
        outputs["new_state"] = new_state.numpy()
    return outputs


def verification_inputs(vocab: int, layers: int, state_size: int, with_state: bool,
                        seed: int = 0, cases=CASES,
                        spelling: tuple[int, int] | None = None) -> Iterator[tuple]:
    """The random batches a graph is checked on, in order: per case (batch, steps) the
    tokens, lengths (the first row full), a state ([layers, batch, state_size], or None
    without one) and targets, all from one generator seeded `seed`, so every check of an
    export (verify, and quantize.compare against float32) sees the same inputs.

    `spelling` (characters, word length): a character-aware model's tokens [B, T, 1 + L],
    random character ids after each word id, with random words cut short by padding and
    some positions all padding."""
    generator = torch.Generator().manual_seed(seed)
    for batch, steps in cases:
        tokens = torch.randint(0, vocab, (batch, steps), generator=generator)
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps  # at least one full row
        state = (0.5 * torch.randn(layers, batch, state_size, generator=generator)
                 if with_state else None)
        targets = torch.randint(0, vocab, (batch, steps), generator=generator)
        if spelling is not None:
            characters, width = spelling
            chars = torch.randint(1, characters, (batch, steps, width), generator=generator)
            ends = torch.randint(0, width + 1, (batch, steps, 1), generator=generator)
            chars[torch.arange(width)[None, None, :] >= ends] = 0  # 0: CHAR_PAD
            tokens = torch.cat([tokens[..., None], chars], dim=2)
        yield tokens, lengths, state, targets


def spelling_of(model: torch.nn.Module, runtime: ModelRuntime) -> tuple[int, int] | None:
    """(characters, word length) of a character-aware model, None for the others."""
    if getattr(model, "chars", None) is None:
        return None
    return len(runtime.vocab.spelling), runtime.vocab.spelling.max_word_length


@torch.inference_mode()
def verify(model: torch.nn.Module, runtime: ModelRuntime, seed: int = 0, cases=CASES,
           factor: float = FACTOR, floor: float = FLOOR, ceiling: float = CEILING) -> dict:
    """Per output, the largest differences over all cases (graph and torch float32 from
    the float64 reference, graph from torch float32) and what was allowed; raises
    ExportMismatch when any output is outside what is allowed."""
    model.eval()
    reference = copy.deepcopy(model).double().eval()
    graph_err: dict[str, float] = {}
    torch_err: dict[str, float] = {}
    graph_vs_torch: dict[str, float] = {}
    for tokens, lengths, state, targets in verification_inputs(
            model.embedding.weight.shape[0], model.stack.num_layers, model.stack.state_size,
            runtime.incremental, seed, cases, spelling_of(model, runtime)):
        valid = _valid_mask(lengths, tokens.shape[1])
        masks = {name: valid for name in ("token_logprobs", "greedy_tokens",
                                          "greedy_logprobs", "tag_logprobs")}
        exact, exact_logprobs = _torch_outputs(
            reference, tokens, lengths, None if state is None else state.double(), targets)
        ours, our_logprobs = _torch_outputs(model, tokens, lengths, state, targets)
        exact, ours = ({k: v.numpy() for k, v in o.items()} for o in (exact, ours))
        graph = _graph_outputs(runtime, tokens, lengths, state, targets, list(exact))
        for key in graph:
            mask = masks.get(key)
            if key == "greedy_tokens":  # the log-prob given up by each choice
                diffs = (_given_up(exact_logprobs.numpy(), graph[key]),
                         _given_up(exact_logprobs.numpy(), ours[key]),
                         _given_up(our_logprobs.numpy().astype(np.float64), graph[key]))
            else:
                diffs = (np.abs(graph[key].astype(np.float64) - exact[key]),
                         np.abs(ours[key].astype(np.float64) - exact[key]),
                         np.abs(graph[key].astype(np.float64) - ours[key]))
            for worst, diff in zip((graph_err, torch_err, graph_vs_torch), diffs):
                diff = diff[mask] if mask is not None else diff
                worst[key] = max(worst.get(key, 0.0), float(diff.max()))
    outputs = {}
    refused = []
    for key in graph_err:
        basis = "greedy_logprobs" if key == "greedy_tokens" else key
        allowed = min(factor * torch_err[basis] + floor, ceiling)
        outputs[key] = {"graph_vs_float64": graph_err[key],
                        "torch_float32_vs_float64": torch_err[key],
                        "graph_vs_torch_float32": graph_vs_torch[key], "allowed": allowed}
        if key == "greedy_tokens":
            outputs[key]["measure"] = GIVEN_UP
        if not graph_err[key] <= allowed:
            what = "of log-prob given up" if key == "greedy_tokens" else "from float64"
            refused.append(f"{key}: {graph_err[key]:.2e} {what} (torch's float32 "
                           f"forward: {torch_err[key]:.2e}; allowed {allowed:.2e})")
    report = {"reference": "the torch model in float64", "factor": factor, "floor": floor,
              "ceiling": ceiling, "cases": [list(c) for c in cases], "outputs": outputs,
              "max_abs_diff": graph_vs_torch}
    if refused:
        raise ExportMismatch("the ONNX graph differs from the torch model more than float32 "
                             "rounding explains: " + "; ".join(refused) + ". Nothing was "
                             "written.")
    return report

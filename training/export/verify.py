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
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from serving.model.runtime import ModelRuntime
from training.models.language_model import RecurrentLM

# (batch, time): single steps, short and long sequences, small and large batches
CASES = ((1, 1), (1, 7), (7, 1), (7, 7), (7, 64), (64, 7), (64, 64))
FACTOR = 4.0
FLOOR = 1e-5
CEILING = 1e-3


class ExportMismatch(AssertionError):
    pass


def _valid_mask(lengths: torch.Tensor, steps: int) -> np.ndarray:
    return (torch.arange(steps)[None, :] < lengths[:, None]).numpy()


def _torch_outputs(model: torch.nn.Module, tokens, lengths, state, targets) -> dict:
    """The outputs the graph has, computed by `model` (in its own precision)."""
    if isinstance(model, RecurrentLM):
        logits, new_state = model(tokens, state, lengths)
        logprobs = torch.log_softmax(logits, dim=-1)
        batch = tokens.shape[0]
        return {"token_logprobs": logprobs.gather(2, targets[..., None])[..., 0],
                "next_logprobs": logprobs[torch.arange(batch), lengths - 1],
                "new_state": new_state}
    logits, final = model(tokens, lengths, state)
    name = "tag_logprobs" if logits.dim() == 3 else "class_logprobs"
    outputs = {name: torch.log_softmax(logits, dim=-1)}
    if state is not None:
        outputs["new_state"] = final
    return outputs


def _graph_outputs(runtime: ModelRuntime, tokens, lengths, state, targets,
                   names) -> dict:
    state = None if state is None else state.numpy()
    if runtime.task == "lm":
        got = runtime.run_lm(tokens.numpy(), lengths.numpy(), state, targets.numpy())
        return {"token_logprobs": got.token_logprobs, "next_logprobs": got.next_logprobs,
                "new_state": got.state.numpy()}
    out, new_state = runtime.run_encoder(tokens.numpy(), lengths.numpy(), state)
    outputs = {next(n for n in names if n != "new_state"): out}
    if new_state is not None:
        outputs["new_state"] = new_state.numpy()
    return outputs


@torch.inference_mode()
def verify(model: torch.nn.Module, runtime: ModelRuntime, seed: int = 0, cases=CASES,
           factor: float = FACTOR, floor: float = FLOOR, ceiling: float = CEILING) -> dict:
    """Per output, the largest differences over all cases (graph and torch float32 from
    the float64 reference, graph from torch float32) and what was allowed; raises
    ExportMismatch when any output is outside what is allowed."""
    model.eval()
    reference = copy.deepcopy(model).double().eval()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.embedding.weight.shape[0]
    graph_err: dict[str, float] = {}
    torch_err: dict[str, float] = {}
    graph_vs_torch: dict[str, float] = {}
    for batch, steps in cases:
        tokens = torch.randint(0, vocab, (batch, steps), generator=generator)
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps  # at least one full row
        masks = {"token_logprobs": _valid_mask(lengths, steps),
                 "tag_logprobs": _valid_mask(lengths, steps)}
        state = None
        if runtime.incremental:
            state = 0.5 * torch.randn(model.stack.num_layers, batch, model.stack.state_size,
                                      generator=generator)
        targets = torch.randint(0, vocab, (batch, steps), generator=generator)
        exact = {k: v.numpy() for k, v in _torch_outputs(
            reference, tokens, lengths, None if state is None else state.double(),
            targets).items()}
        ours = {k: v.numpy() for k, v in _torch_outputs(model, tokens, lengths, state,
                                                        targets).items()}
        graph = _graph_outputs(runtime, tokens, lengths, state, targets, list(exact))
        for key, value in exact.items():
            mask = masks.get(key)
            for worst, other, against in ((graph_err, graph[key], value),
                                          (torch_err, ours[key], value),
                                          (graph_vs_torch, graph[key], ours[key])):
                diff = np.abs(other.astype(np.float64) - against)
                diff = diff[mask] if mask is not None else diff
                worst[key] = max(worst.get(key, 0.0), float(diff.max()))
    outputs = {}
    refused = []
    for key in graph_err:
        allowed = min(factor * torch_err[key] + floor, ceiling)
        outputs[key] = {"graph_vs_float64": graph_err[key],
                        "torch_float32_vs_float64": torch_err[key],
                        "graph_vs_torch_float32": graph_vs_torch[key], "allowed": allowed}
        if not graph_err[key] <= allowed:
            refused.append(f"{key}: {graph_err[key]:.2e} from float64 (torch's float32 "
                           f"forward: {torch_err[key]:.2e}; allowed {allowed:.2e})")
    report = {"reference": "the torch model in float64", "factor": factor, "floor": floor,
              "ceiling": ceiling, "cases": [list(c) for c in cases], "outputs": outputs,
              "max_abs_diff": graph_vs_torch}
    if refused:
        raise ExportMismatch("the ONNX graph differs from the torch model more than float32 "
                             "rounding explains: " + "; ".join(refused) + ". Nothing was "
                             "written.")
    return report

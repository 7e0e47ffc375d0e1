"""Parity of an exported graph with the torch model it came from, through the runtime
that will serve it, on random padded batches from random non-zero states."""

from __future__ import annotations

import numpy as np
import torch

from serving.model.runtime import ModelRuntime
from training.models.language_model import RecurrentLM

# (batch, time): single steps, short and long sequences, small and large batches
CASES = ((1, 1), (1, 7), (7, 1), (7, 7), (7, 64), (64, 7), (64, 64))
TOLERANCE = 1e-4


class ExportMismatch(AssertionError):
    pass


def _valid_mask(lengths: torch.Tensor, steps: int) -> np.ndarray:
    return (torch.arange(steps)[None, :] < lengths[:, None]).numpy()


@torch.inference_mode()
def verify(model: torch.nn.Module, runtime: ModelRuntime, seed: int = 0,
           cases=CASES, tolerance: float = TOLERANCE) -> dict:
    """Max abs differences per output over all cases; raises ExportMismatch above tolerance."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.embedding.weight.shape[0]
    worst: dict[str, float] = {}
    for batch, steps in cases:
        tokens = torch.randint(0, vocab, (batch, steps), generator=generator)
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps  # at least one full row
        valid = _valid_mask(lengths, steps)
        state = None
        if runtime.incremental:
            state = 0.5 * torch.randn(model.stack.num_layers, batch, model.stack.state_size,
                                      generator=generator)
        if isinstance(model, RecurrentLM):
            targets = torch.randint(0, vocab, (batch, steps), generator=generator)
            logits, new_state = model(tokens, state, lengths)
            logprobs = torch.log_softmax(logits, dim=-1)
            expected = {
                "token_logprobs": logprobs.gather(2, targets[..., None])[..., 0].numpy(),
                "next_logprobs": logprobs[torch.arange(batch), lengths - 1].numpy(),
                "new_state": new_state.numpy()}
            got = runtime.run_lm(tokens.numpy(), lengths.numpy(), state.numpy(), targets.numpy())
            actual = {"token_logprobs": got.token_logprobs, "next_logprobs": got.next_logprobs,
                      "new_state": got.state.numpy()}
            masks = {"token_logprobs": valid}
        else:
            logits, final = model(tokens, lengths, state)
            name = "tag_logprobs" if logits.dim() == 3 else "class_logprobs"
            expected = {name: torch.log_softmax(logits, dim=-1).numpy()}
            out, new_state = runtime.run_encoder(tokens.numpy(), lengths.numpy(),
                                                 None if state is None else state.numpy())
            actual = {name: out}
            if new_state is not None:
                expected["new_state"], actual["new_state"] = final.numpy(), new_state.numpy()
            masks = {"tag_logprobs": valid}
        for key, value in expected.items():
            diff = np.abs(value - actual[key])
            if key in masks:
                diff = diff[masks[key]]
            worst[key] = max(worst.get(key, 0.0), float(diff.max()))
    report = {"max_abs_diff": worst, "cases": [list(c) for c in cases], "tolerance": tolerance}
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ExportMismatch(f"the ONNX graph differs from the torch model: {bad} "
                             f"(tolerance {tolerance}); nothing was written")
    return report

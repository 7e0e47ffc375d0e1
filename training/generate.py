"""Text generation by repeated sampling: each sampled token is fed back as the next input.

Sampling goes through serving.model.sampler, the server's sampler, so the same seed gives the
same text here and from the server.
"""

from __future__ import annotations

import torch

from serving.model.sampler import SamplingParams, make_rng, sample_next
from serving.model.tokenizer import Vocabulary


@torch.inference_mode()
def generate(model: torch.nn.Module, vocab: Vocabulary, prompt: str, max_tokens: int,
             params: SamplingParams, seed: int = 0, sample_index: int = 0) -> list[int]:
    """Reads `<eos>` + prompt from the zero state, then samples until `<eos>` or max_tokens.
    Returns the generated ids (without the prompt; a final `<eos>` included if sampled)."""
    model.eval()
    device = next(model.parameters()).device
    context = [vocab.eos_id] + vocab.encode(prompt)
    logits, state = model(torch.tensor([context], device=device))
    rng = make_rng(seed, sample_index)
    generated: list[int] = []
    while len(generated) < max_tokens:
        logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1).double().cpu().numpy()
        token = sample_next(logprobs, params, rng)
        generated.append(token)
        if token == vocab.eos_id:
            break
        logits, state = model(torch.tensor([[token]], device=device), state)
    return generated

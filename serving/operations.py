"""What the services compute, in terms of token ids and states, through a model's batcher.

Long inputs run in chunks of `chunk_tokens` steps with the state carried, so one request's
memory and its share of a batch stay bounded whatever its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.repository import LoadedModel


@dataclass
class Advance:
    """The result of reading tokens from a state."""

    state: np.ndarray  # [L, S]
    next_logprobs: np.ndarray | None  # LM: [V] after the last token
    outputs: np.ndarray  # LM: log-probs of the read tokens [n]; tagger [n, C]; classifier [C]


async def run_chunks(model: LoadedModel, tokens: np.ndarray, state: np.ndarray,
                     targets: np.ndarray | None, chunk: int) -> Advance:
    """Reads `tokens` from `state` (a bidirectional encoder: whole, from no state)."""
    if model.task != "lm" and not model.runtime.incremental:
        result = await model.batcher.run(tokens, None)
        return Advance(state, None, result.outputs)
    pieces = []
    next_logprobs = None
    for start in range(0, len(tokens), chunk):
        end = start + chunk
        result = await model.batcher.run(tokens[start:end], state,
                                         None if targets is None else targets[start:end])
        state, next_logprobs = result.state, result.next_logprobs
        pieces.append(result.outputs)
    outputs = pieces[-1] if model.task == "classify" else np.concatenate(pieces)
    return Advance(state, next_logprobs, outputs)


async def score(model: LoadedModel, ids: np.ndarray, chunk: int) -> np.ndarray:
    """log P(ids[i] | <eos>, ids[:i]) from the initial state: the scoring convention (the
    caller appends `<eos>` to ids to have it scored)."""
    eos = model.runtime.vocab.eos_id
    inputs = np.concatenate([[eos], ids[:-1]]).astype(np.int64)
    return (await run_chunks(model, inputs, model.initial_state(), ids, chunk)).outputs


async def read_prompt(model: LoadedModel, ids: np.ndarray, chunk: int) -> Advance:
    """The state and next-token distribution after `<eos>` + ids."""
    inputs = np.concatenate([[model.runtime.vocab.eos_id], ids]).astype(np.int64)
    targets = np.concatenate([inputs[1:], [0]]).astype(np.int64)
    return await run_chunks(model, inputs, model.initial_state(), targets, chunk)


async def advance(model: LoadedModel, state: np.ndarray, next_logprobs: np.ndarray | None,
                  ids: np.ndarray, chunk: int) -> Advance:
    """A session step: reads only `ids` from the stored state. For a language model the
    first token's log-prob comes from the stored next-token distribution, so the network
    runs exactly len(ids) tokens."""
    if model.task != "lm":
        return await run_chunks(model, ids, state, None, chunk)
    targets = np.concatenate([ids[1:], [0]]).astype(np.int64)
    result = await run_chunks(model, ids, state, targets, chunk)
    logprobs = np.concatenate([[next_logprobs[ids[0]]], result.outputs[:-1]])
    return Advance(result.state, result.next_logprobs, logprobs.astype(np.float32))


def top_k(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    k = min(k, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in best]

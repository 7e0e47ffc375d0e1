"""Next-token sampling in numpy, the one sampler used by `recur generate` and the server.

Each sequence owns a generator seeded from (seed, sample index), so a seeded
request gives the same tokens alone or batched with others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Temperatures below this are greedy (as in vLLM): dividing by a smaller one sends every
# logit but the largest to -inf in float32, and a draw from that is no draw at all.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0  # nucleus mass in (0, 1]

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_rng(seed: int, sample_index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(sample_index)])


def sample_next(logprobs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw one token id from a [V] vector of log-probabilities, with one uniform draw.

    Only top-p needs the candidates sorted (by log-prob, ties by id); otherwise they stay in
    vocabulary order, top-k uses a partial partition, and the draw never builds a
    cumulative sum over the whole vocabulary (see `draw`), so plain sampling over a large
    vocabulary costs a few vectorised passes: it runs once per token of every stream."""
    if params.greedy:
        return _argmax(logprobs)
    logits = _scaled(logprobs, params.temperature)
    if not np.isfinite(logits.max()):  # nothing finite to draw from (or a NaN)
        return _argmax(logprobs)
    candidates = None
    if 0 < params.top_k < len(logits):
        # the k largest, ties broken by the lower id; in vocabulary order
        kth = np.partition(logits, len(logits) - params.top_k)[len(logits) - params.top_k]
        above = np.flatnonzero(logits > kth)
        ties = np.flatnonzero(logits == kth)[: params.top_k - len(above)]
        candidates = np.sort(np.concatenate([above, ties]))
    if params.top_p < 1.0:
        if candidates is None:
            candidates = np.arange(len(logits))
        candidates = candidates[np.lexsort((candidates, -logits[candidates]))]
        kept = logits[candidates].astype(np.float64)
        cumulative = np.cumsum(np.exp(kept - kept.max()))
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cutoff = int(np.searchsorted(cumulative / cumulative[-1], params.top_p, side="left")) + 1
        cumulative = cumulative[:cutoff]
        choice = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(choice, cutoff - 1)])
    kept = logits if candidates is None else logits[candidates]
    choice = int(draw(_weights(kept[None]), np.array([rng.random()]))[0])
    return choice if candidates is None else int(candidates[choice])


def sample_batch(logprobs: np.ndarray, params: Sequence[SamplingParams],
                 rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """sample_next for each row of a [B, V] batch, each row with its own parameters and
    generator, giving exactly the tokens sample_next gives row by row. Rows that sample
    the whole vocabulary (no top-k, no top-p: the common case) share one vectorised draw
    per temperature, about twice as fast as row by row at B = 64, V = 10,000; the others
    go through sample_next."""
    tokens = np.empty(len(logprobs), np.int64)
    by_temperature: dict[float, list[int]] = {}
    for row, p in enumerate(params):
        if (not p.greedy and p.top_p == 1.0 and not 0 < p.top_k < logprobs.shape[1]
                and np.isfinite(logprobs[row].max())):
            by_temperature.setdefault(p.temperature, []).append(row)
        else:
            tokens[row] = sample_next(logprobs[row], p, rngs[row])
    for temperature, rows in by_temperature.items():
        logits = _scaled(logprobs[rows], temperature)
        tokens[rows] = draw(_weights(logits), np.array([rngs[row].random() for row in rows]))
    return tokens


def _argmax(logprobs: np.ndarray) -> int:
    """The most likely token, a NaN counting as impossible."""
    values = np.asarray(logprobs, np.float64)
    return int(np.argmax(np.where(np.isnan(values), -np.inf, values)))


def _scaled(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.asarray(logprobs)
    if logits.dtype not in (np.float32, np.float64):  # float32 (the model's) stays float32
        logits = logits.astype(np.float64)
    if temperature not in (0.0, 1.0):
        logits = logits / logits.dtype.type(temperature)
    return logits


def _weights(logits: np.ndarray) -> np.ndarray:
    """Each row's unnormalised probabilities in float32, zero-padded to whole blocks. The
    steps are element-wise or along rows, so a row gets the same weights alone or batched
    (tests/test_sampler.py checks it)."""
    rows, size = logits.shape
    weights = np.empty((rows, -(-size // BLOCK) * BLOCK), np.float32)
    weights[:, size:] = 0.0
    np.exp(logits - logits.max(axis=1, keepdims=True), out=weights[:, :size])
    return weights


BLOCK = 128


def draw(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row of `weights` [R, N] (non-negative, N a multiple of BLOCK), the index i where
    the cumulative weight first exceeds u[row] x the row's total (u in [0, 1)):
    inverse-CDF sampling in two levels, block sums and then one block's running sum,
    because numpy's cumsum over the whole vector is a sequential loop (about 3x slower
    than the rest of a draw together at V = 10,000). Every step works along rows, so a
    row's result does not depend on the others. A zero weight is never drawn."""
    rows = len(weights)
    blocks = weights.reshape(rows, -1, BLOCK)
    cumulative = np.cumsum(blocks.sum(axis=2, dtype=np.float64), axis=1)  # [R, blocks]
    target = u * cumulative[:, -1]
    # the count of running sums <= target is numpy's searchsorted(side="right")
    b = np.minimum((cumulative <= target[:, None]).sum(axis=1), blocks.shape[1] - 1)
    row = np.arange(rows)
    before = np.where(b > 0, cumulative[row, b - 1], 0.0)
    chosen = blocks[row, b]  # [R, BLOCK]
    i = (np.cumsum(chosen, axis=1, dtype=np.float64) <= (target - before)[:, None]).sum(axis=1)
    for r in np.flatnonzero((i >= BLOCK) | (chosen[row, np.minimum(i, BLOCK - 1)] == 0.0)):
        i[r] = np.flatnonzero(chosen[r])[-1]  # rounding between the two sums: the block's
    return b * BLOCK + i  # last token that can be drawn


def most_likely(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, log-prob), most likely first (ties: the lower id first), by a
    partial sort: O(V + k log k), not a sort of the whole vocabulary."""
    if k <= 0:
        return []
    k = min(k, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k]
    best = best[np.lexsort((best, -logprobs[best]))]
    return [(int(i), float(logprobs[i])) for i in best]

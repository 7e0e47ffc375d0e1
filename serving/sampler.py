"""Next-token sampling in numpy, the one sampler used by `recur generate` and the server.

Each sequence owns a generator seeded from (seed, sample index), so a seeded
request gives the same tokens alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0  # nucleus mass in (0, 1]

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def make_rng(seed: int, sample_index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(sample_index)])


def sample_next(logprobs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw one token id from a [V] vector of log-probabilities, with one uniform draw.

    Only top-p needs the candidates sorted (by log-prob, ties by id); otherwise they stay in
    vocabulary order, top-k uses a partial partition, and the draw never builds a
    cumulative sum over the whole vocabulary (see `draw`), so plain sampling over a large
    vocabulary costs a few vectorised passes: it runs once per token of every stream."""
    logits = np.asarray(logprobs)
    if logits.dtype not in (np.float32, np.float64):  # float32 (the model's) stays float32
        logits = logits.astype(np.float64)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    if params.temperature != 1.0:
        logits = logits / logits.dtype.type(params.temperature)
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
    choice = draw(np.exp(kept - kept.max()), rng.random())
    return choice if candidates is None else int(candidates[choice])


BLOCK = 128


def draw(weights: np.ndarray, u: float) -> int:
    """The index i where the cumulative weight first exceeds u x the total (u in [0, 1)):
    inverse-CDF sampling in two levels, block sums and then one block's running sum,
    because numpy's cumsum over the whole vector is a sequential loop (about 3x slower
    than the rest of a draw together at V = 10,000). A zero weight is never drawn."""
    n = len(weights)
    padded = np.zeros(-(-n // BLOCK) * BLOCK, np.float64)
    padded[:n] = weights
    blocks = padded.reshape(-1, BLOCK)
    cumulative = np.cumsum(blocks.sum(axis=1))
    target = u * cumulative[-1]
    b = min(int(np.searchsorted(cumulative, target, side="right")), len(cumulative) - 1)
    within = np.cumsum(blocks[b])
    i = int(np.searchsorted(within, target - (cumulative[b - 1] if b else 0.0), side="right"))
    if i >= BLOCK or blocks[b, i] == 0.0:  # rounding between the two sums: the block's last
        i = int(np.flatnonzero(blocks[b])[-1])  # token that can be drawn
    return b * BLOCK + i

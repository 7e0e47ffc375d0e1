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
    vocabulary order and top-k uses a partial partition, so plain sampling over a large
    vocabulary costs O(V), not O(V log V)."""
    logits = np.asarray(logprobs, dtype=np.float64)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < len(logits):
        # the k largest, ties broken by the lower id; in vocabulary order
        kth = np.partition(logits, len(logits) - params.top_k)[len(logits) - params.top_k]
        above = np.flatnonzero(logits > kth)
        ties = np.flatnonzero(logits == kth)[: params.top_k - len(above)]
        candidates = np.sort(np.concatenate([above, ties]))
    else:
        candidates = np.arange(len(logits))
    if params.top_p < 1.0:
        candidates = candidates[np.lexsort((candidates, -logits[candidates]))]
    kept = logits[candidates]
    probs = np.exp(kept - kept.max())
    cumulative = np.cumsum(probs)
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cutoff = int(np.searchsorted(cumulative / cumulative[-1], params.top_p, side="left")) + 1
        cumulative = cumulative[:cutoff]
        candidates = candidates[:cutoff]
    choice = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(choice, len(candidates) - 1)])

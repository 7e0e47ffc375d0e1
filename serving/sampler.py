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
    """Draw one token id from a [V] vector of log-probabilities."""
    logits = np.asarray(logprobs, dtype=np.float64)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    order = np.argsort(-logits, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    kept = logits[order]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        cumulative = np.cumsum(probs)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cutoff = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        probs = probs[:cutoff] / cumulative[min(cutoff, len(cumulative)) - 1]
        order = order[:cutoff]
    choice = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(order[min(choice, len(order) - 1)])

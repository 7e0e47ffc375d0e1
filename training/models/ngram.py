"""Interpolated Kneser-Ney n-gram language model, the classic count-based baseline.

Counts are exact integers, so fitting is deterministic; a run directory keeps only the
configuration and vocabulary, and `recur evaluate` refits from the training data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


class KneserNey:
    """P(w | h) = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * P(w | h'),
    with continuation counts N1+(. h w) in place of raw counts below the top order,
    and a uniform distribution over the vocabulary at the bottom."""

    def __init__(self, order: int, vocab_size: int, discount: float = 0.75):
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.counts: list[Counter] = [Counter() for _ in range(order + 1)]  # by n-gram length
        self.context_totals: list[Counter] = [Counter() for _ in range(order + 1)]
        self.context_types: list[Counter] = [Counter() for _ in range(order + 1)]

    def fit(self, stream: Sequence[int]) -> KneserNey:
        top = self.order
        tokens = list(stream)
        for i in range(len(tokens)):
            for n in range(1, top + 1):
                if i - n + 1 < 0:
                    break
                self.counts[n][tuple(tokens[i - n + 1 : i + 1])] += 1
        # Lower orders use continuation counts: the number of distinct left extensions.
        continuation: list[Counter] = [Counter() for _ in range(top + 1)]
        for n in range(2, top + 1):
            for gram in self.counts[n]:
                continuation[n - 1][gram[1:]] += 1
        self.effective = [self.counts[top] if n == top else continuation[n] for n in range(top + 1)]
        for n in range(1, top + 1):
            for gram, count in self.effective[n].items():
                self.context_totals[n][gram[:-1]] += count
                self.context_types[n][gram[:-1]] += 1
        return self

    def prob(self, history: tuple[int, ...], word: int) -> float:
        p = 1.0 / self.vocab_size
        for n in range(1, self.order + 1):
            if n - 1 > len(history):
                break
            context = history[len(history) - (n - 1):] if n > 1 else ()
            total = self.context_totals[n].get(context, 0)
            if total == 0:
                continue
            count = self.effective[n].get(context + (word,), 0)
            backoff = self.discount * self.context_types[n][context] / total
            p = max(count - self.discount, 0.0) / total + backoff * p
        return p

    def stream_logprobs(self, stream: Sequence[int], history: Sequence[int] = ()) -> list[float]:
        """log P(stream[i] | the order-1 tokens before it), history continuing into the stream."""
        context = list(history)
        out = []
        for word in stream:
            out.append(math.log(self.prob(tuple(context[-(self.order - 1):]) if self.order > 1
                                          else (), word)))
            context.append(word)
        return out

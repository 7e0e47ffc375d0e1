"""Interpolated Kneser-Ney n-gram language model, the classic count-based baseline.

Counts are exact integers, so fitting is deterministic; a run directory keeps only the
configuration and vocabulary, and `recur evaluate` refits from the training data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


class KneserNey:
    """P(w | h) = max(c(h w) - D(c), 0) / c(h) + gamma(h) * P(w | h'),
    with continuation counts N1+(. h w) in place of raw counts below the top order and a
    uniform distribution over the vocabulary at the bottom.

    `discount` in (0, 1) is one absolute discount for every count. `discount = 0` is
    modified Kneser-Ney (Chen and Goodman 1998): three discounts per order, for counts 1,
    2 and 3+, estimated from that order's count-of-counts, and
    gamma(h) = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / c(h)."""

    def __init__(self, order: int, vocab_size: int, discount: float = 0.0):
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.counts: list[Counter] = [Counter() for _ in range(order + 1)]  # by n-gram length

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
        self.discounts = [self._discounts(self.effective[n]) for n in range(top + 1)]
        self.context_totals: list[Counter] = [Counter() for _ in range(top + 1)]
        self.context_mass: list[Counter] = [Counter() for _ in range(top + 1)]  # gamma * c(h)
        for n in range(1, top + 1):
            for gram, count in self.effective[n].items():
                self.context_totals[n][gram[:-1]] += count
                self.context_mass[n][gram[:-1]] += self._discount(n, count)
        return self

    def _discounts(self, counts: Counter) -> tuple[float, float, float]:
        if self.discount > 0 or not counts:
            d = self.discount or 0.75
            return d, d, d
        n1, n2, n3, n4 = (sum(1 for c in counts.values() if c == k) for k in (1, 2, 3, 4))
        if min(n1, n2, n3, n4) == 0:  # too few counts to estimate: the classic 0.75
            return 0.75, 0.75, 0.75
        y = n1 / (n1 + 2 * n2)
        return (max(0.0, 1 - 2 * y * n2 / n1), max(0.0, 2 - 3 * y * n3 / n2),
                max(0.0, 3 - 4 * y * n4 / n3))

    def _discount(self, n: int, count: int) -> float:
        return self.discounts[n][min(count, 3) - 1]

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
            seen = max(count - self._discount(n, count), 0.0) if count else 0.0
            p = seen / total + self.context_mass[n][context] / total * p
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

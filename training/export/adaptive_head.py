"""The adaptive softmax (torch's nn.AdaptiveLogSoftmaxWithLoss) as graph nodes, for
lm_head.py: exact log-probs, with a cluster computed only at the positions that need it.

log P(w) = log P(w) from the head for the shortlist's words, and
log P(cluster c) from the head + log P(w | c) from cluster c's own softmax for the rest.

- Scoring a known next token: the head at every position, then each cluster only at the
  positions whose target is in it (Compress), its log-probs added back (ScatterElements).
- The greedy token at every position, exactly: a cluster's words all have log-probs at
  most log P(c) (its own log-softmax is <= 0, and so is their float32 sum), so a cluster
  is computed only where log P(c) beats the best word found so far; clusters are tried in
  id order and must beat it strictly, so ties keep the lowest id as torch.argmax does.
- The whole distribution only where a step needs it (each row's next token): B rows. A
  one-step call reads everything off those rows' distributions (lm_head.Dense).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from training.export.builder import GraphBuilder
from training.export.lm_head import pick


class AdaptiveSoftmax:
    keeps_distribution = False

    def __init__(self, g: GraphBuilder, output: nn.AdaptiveLogSoftmaxWithLoss):
        self.vocab, self.hidden = output.n_classes, output.in_features
        self.shortlist = output.shortlist_size
        head = output.head
        self.head_t = g.const(head.weight.t())
        self.head_bias = g.const(head.bias) if head.bias is not None else None
        # cluster c: (first id, last id + 1, [H, h_c], [h_c, size_c])
        self.clusters = [(lo, hi, g.const(tail[0].weight.t()), g.const(tail[1].weight.t()))
                         for lo, hi, tail in zip(output.cutoffs[:-1], output.cutoffs[1:],
                                                 output.tail)]

    def _head(self, b: GraphBuilder, rows: str) -> str:
        """rows [n, H] -> the head's log-probs [n, shortlist + clusters]."""
        if self.head_bias is None:
            logits = b.op("MatMul", [rows, self.head_t])
        else:
            logits = b.op("Gemm", [rows, self.head_t, self.head_bias])
        return b.op("LogSoftmax", [logits], axis=1)

    def _cluster(self, b: GraphBuilder, index: int, rows: str) -> str:
        """rows [k, H] -> log P(w | cluster) [k, size]."""
        _, _, down, up = self.clusters[index]
        return b.op("LogSoftmax", [b.op("MatMul", [b.op("MatMul", [rows, down]), up])], axis=1)

    def _cluster_prior(self, b: GraphBuilder, head: str, index: int) -> str:
        """The head's log P(cluster) [n]."""
        return b.op("Gather", [head, b.const(self.shortlist + index, dtype=np.int64)], axis=1)

    def score(self, b: GraphBuilder, rows: str, targets: str):
        i64 = lambda value: b.const(value, dtype=np.int64)  # noqa: E731
        head = self._head(b, rows)
        positions = b.op("Range", [i64(0), b.op("Gather", [b.op("Shape", [rows]), i64(0)],
                                                         axis=0), i64(1)])
        # the head's entry for each target: the word itself, or shortlist + its cluster,
        # which is shortlist + clusters - (the clusters whose end is above it)
        in_head = b.op("Less", [targets, i64(self.shortlist)])
        cluster_of = b.op("Sub", [i64(self.shortlist + len(self.clusters)), b.op(
            "ReduceSum", [b.op("Cast", [b.op("Less", [
                b.op("Unsqueeze", [targets, i64([1])]),
                i64([hi for _, hi, _, _ in self.clusters])])], to=7), i64([1])], keepdims=0)])
        head_index = b.op("Where", [in_head, targets, cluster_of])
        picked = pick(b, head, head_index)
        greedy_logprobs, greedy_tokens = (
            b.op("Reshape", [t, i64([-1])]) for t in b.op(
                "TopK", [b.op("Slice", [head, i64([0]), i64([self.shortlist]), i64([1])]),
                         i64([1])], 2, axis=1, largest=1, sorted=1))
        for index, (lo, hi, _, _) in enumerate(self.clusters):
            prior = self._cluster_prior(b, head, index)
            # scoring: the positions whose target is in this cluster
            wanted = b.op("And", [b.op("GreaterOrEqual", [targets, i64(lo)]),
                                  b.op("Less", [targets, i64(hi)])])
            at = b.op("Compress", [positions, wanted], axis=0)
            within = pick(b, self._cluster(b, index, b.op("Compress", [rows, wanted],
                                                                  axis=0)),
                                  b.op("Sub", [b.op("Compress", [targets, wanted], axis=0),
                                               i64(lo)]))
            picked = b.op("ScatterElements", [picked, at, b.op("Add", [
                b.op("Gather", [picked, at], axis=0), within])], axis=0)
            # greedy: the positions where this cluster could hold a better word
            hopeful = b.op("Greater", [prior, greedy_logprobs])
            at = b.op("Compress", [positions, hopeful], axis=0)
            # the prior added before TopK: two words whose log P(w | c) differ by a rounding
            # may tie once it is added, and the lower id must win, as in torch.argmax
            joint = b.op("Add", [
                self._cluster(b, index, b.op("Compress", [rows, hopeful], axis=0)),
                b.op("Unsqueeze", [b.op("Compress", [prior, hopeful], axis=0), i64([1])])])
            values, indices = b.op("TopK", [joint, i64([1])], 2, axis=1, largest=1, sorted=1)
            values = b.op("Reshape", [values, i64([-1])])
            best_so_far = b.op("Gather", [greedy_logprobs, at], axis=0)
            better = b.op("Greater", [values, best_so_far])
            greedy_logprobs = b.op("ScatterElements", [greedy_logprobs, at, b.op(
                "Where", [better, values, best_so_far])], axis=0)
            greedy_tokens = b.op("ScatterElements", [greedy_tokens, at, b.op("Where", [
                better, b.op("Add", [b.op("Reshape", [indices, i64([-1])]), i64(lo)]),
                b.op("Gather", [greedy_tokens, at], axis=0)])], axis=0)
        return picked, greedy_tokens, greedy_logprobs, None

    def distribution(self, b: GraphBuilder, rows: str) -> str:
        head = self._head(b, rows)
        parts = [b.op("Slice", [head, b.const([0], dtype=np.int64),
                                b.const([self.shortlist], dtype=np.int64),
                                b.const([1], dtype=np.int64)])]
        for index in range(len(self.clusters)):
            prior = b.op("Unsqueeze", [self._cluster_prior(b, head, index),
                                       b.const([1], dtype=np.int64)])
            parts.append(b.op("Add", [self._cluster(b, index, rows), prior]))
        return b.op("Concat", parts, axis=1)


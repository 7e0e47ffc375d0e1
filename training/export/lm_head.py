"""A language model's outputs from its top layer's outputs [T,B,H]: token_logprobs [B,T]
(log P(targets[b,t] | ...)), next_logprobs [B,V] (after each row's last step), and at
every position the most likely token, greedy_tokens [B,T], with its log-prob,
greedy_logprobs [B,T]. The greedy pair answers "was every token the argmax" and "the
likeliest token at each position" from the one pass that scores the targets; with the
full softmax a TopK (k = 1: the lowest index on ties) on the same LogSoftmax tensor the
targets are gathered from, so greedy_logprobs is bitwise the token_logprobs of
targets = greedy_tokens. At a row's padded positions the [B,T] outputs hold values nobody
should read. How the positions are scored is the softmax's (FullSoftmax here,
AdaptiveSoftmax in adaptive_head.py); this file lays the work out.

The output layer runs after the recurrence, never inside a step. A call of up to
HEAD_ROWS positions (every single-token step, every short batch) runs it over all of them
at once. A longer one runs it over chunks of about HEAD_ROWS positions, in a Loop over
chunks (not steps), so the [T*B, V] logits are never held at once (a 16,384-token scoring
call at V = 10,000 would hold 0.6 GB of them, and as much again of log-probabilities) and
each chunk's logits are still in cache when LogSoftmax, the target gather and TopK read
them. An If picks between the two: the chunked Loop's extra kernels would cost a single
step at H = 256 a tenth of its time.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from training.export.builder import Dims, GraphBuilder

HEAD_ROWS = 512  # positions per chunk: [512, V] logits stay in cache
HEAD_OUTPUTS = ("token_logprobs", "next_logprobs", "greedy_tokens", "greedy_logprobs")
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


class Softmax(Protocol):
    """How an output layer scores positions, as graph nodes."""

    vocab: int
    hidden: int
    keeps_distribution: bool  # score() returns every position's [n, V] log-probs

    def score(self, b: GraphBuilder, rows: str, targets: str
              ) -> tuple[str, str, str, str | None]:
        """rows [n, H], targets [n] -> (log P(target) [n], greedy_tokens [n],
        greedy_logprobs [n], the log-probs [n, V] when it computed them all, else None)."""
        ...

    def distribution(self, b: GraphBuilder, rows: str) -> str:
        """rows [n, H] -> log-probs [n, V]."""
        ...


class FullSoftmax:
    """A [H, V] Gemm and LogSoftmax over every position."""

    keeps_distribution = True

    def __init__(self, g: GraphBuilder, output: torch.nn.Linear):
        self.vocab, self.hidden = output.weight.shape
        self.weight_t, self.bias = g.const(output.weight.t()), g.const(output.bias)

    def score(self, b: GraphBuilder, rows: str, targets: str):
        return _dense_score(self, b, rows, targets)

    def distribution(self, b: GraphBuilder, rows: str) -> str:
        return b.op("LogSoftmax", [b.op("Gemm", [rows, self.weight_t, self.bias])], axis=1)


class Dense:
    """A softmax that scores sparsely (the adaptive one), scored through its whole
    distribution instead: for one-step calls, where every position is a row's last and
    its distribution is computed anyway."""

    keeps_distribution = True

    def __init__(self, softmax: Softmax):
        self.softmax, self.vocab, self.hidden = softmax, softmax.vocab, softmax.hidden

    def score(self, b: GraphBuilder, rows: str, targets: str):
        return _dense_score(self, b, rows, targets)

    def distribution(self, b: GraphBuilder, rows: str) -> str:
        return self.softmax.distribution(b, rows)


def _dense_score(softmax: Softmax, b: GraphBuilder, rows: str, targets: str):
    """The targets and the greedy tokens read off the whole distribution, so that a greedy
    token fed back as the target scores bitwise its greedy log-prob."""
    logprobs = softmax.distribution(b, rows)
    greedy_logprobs, greedy_tokens = _greedy(b, logprobs)
    return pick(b, logprobs, targets), greedy_tokens, greedy_logprobs, logprobs


def lm_head(g: GraphBuilder, softmax: Softmax, out: str, dims: Dims) -> None:
    """Adds the nodes that compute the graph outputs `token_logprobs`, `next_logprobs`,
    `greedy_tokens` and `greedy_logprobs`."""
    targets = g.op("Transpose", ["targets"], perm=[1, 0])  # [T, B]
    # steps per chunk: HEAD_ROWS // B, at least 1, at most T
    chunk = g.op("Min", [dims.steps, g.op("Max", [
        g.const(1, dtype=np.int64),
        g.op("Div", [g.const(HEAD_ROWS, dtype=np.int64), dims.batch_size])])])
    one_chunk = g.op("Equal", [chunk, dims.steps])
    whole = _whole(g.child(), softmax, out, targets, dims)
    if not softmax.keeps_distribution:
        # a single step needs each row's whole distribution anyway: reading its target and
        # greedy token off it computes each part of the softmax once, not up to three times
        b = g.child()
        names = [b.fresh(name) for name in HEAD_OUTPUTS]
        b.op("If", [b.op("Equal", [dims.steps, b.const(1, dtype=np.int64)])], names,
             then_branch=_whole(b.child(), Dense(softmax), out, targets, dims),
             else_branch=whole)
        whole = helper.make_graph(b.nodes, b.fresh("whole_or_step"), [],
                                  output_infos(tuple(names), softmax.vocab),
                                  initializer=b.initializers)
    chunked = _chunked(g.child(), softmax, out, targets, dims, chunk)
    g.op("If", [one_chunk], list(HEAD_OUTPUTS), then_branch=whole, else_branch=chunked)


def output_infos(names: tuple[str, ...], vocab: int) -> list:
    """Value infos of the head's outputs (HEAD_OUTPUTS' order), under `names`."""
    token_logprobs, next_logprobs, greedy_tokens, greedy_logprobs = names
    return [helper.make_tensor_value_info(token_logprobs, FLOAT, ["batch", "time"]),
            helper.make_tensor_value_info(next_logprobs, FLOAT, ["batch", vocab]),
            helper.make_tensor_value_info(greedy_tokens, INT64, ["batch", "time"]),
            helper.make_tensor_value_info(greedy_logprobs, FLOAT, ["batch", "time"])]


def _rows(b: GraphBuilder, positions: str, hidden: int) -> str:
    """[t, B, H] -> [t*B, H]."""
    return b.op("Reshape", [positions, b.const([-1, hidden], dtype=np.int64)])


def _flat(b: GraphBuilder, values: str) -> str:
    return b.op("Reshape", [values, b.const([-1], dtype=np.int64)])


def _next_logprobs(b: GraphBuilder, softmax: Softmax, out: str, dims: Dims) -> str:
    """The distribution after each row's last step, computed for those B rows alone."""
    # row b's last step is position last * B + b
    at = b.op("Add", [b.op("Mul", [dims.last, dims.batch_size]), dims.rows])
    return softmax.distribution(b, b.op("Gather", [_rows(b, out, softmax.hidden), at], axis=0))


def _whole(b: GraphBuilder, softmax: Softmax, out: str, targets: str,
           dims: Dims) -> onnx.GraphProto:
    """Every position at once."""
    picked, greedy_tokens, greedy_logprobs, logprobs = softmax.score(
        b, _rows(b, out, softmax.hidden), _flat(b, targets))  # [T*B] each
    token_logprobs, greedy_tokens, greedy_logprobs = (
        b.op("Transpose", [b.op("Reshape", [flat, dims.time_batch])], perm=[1, 0])
        for flat in (picked, greedy_tokens, greedy_logprobs))
    if logprobs is not None:
        at = b.op("Add", [b.op("Mul", [dims.last, dims.batch_size]), dims.rows])
        next_logprobs = b.op("Gather", [logprobs, at], axis=0)
    else:
        next_logprobs = _next_logprobs(b, softmax, out, dims)
    return helper.make_graph(
        b.nodes, b.fresh("whole_head"), [],
        output_infos((token_logprobs, next_logprobs, greedy_tokens, greedy_logprobs),
                     softmax.vocab),
        initializer=b.initializers)


def _chunked(b: GraphBuilder, softmax: Softmax, out: str, targets: str, dims: Dims,
             chunk: str) -> onnx.GraphProto:
    """A Loop over chunks of `chunk` steps, T padded to whole chunks. A softmax that
    computes every position's distribution keeps each row's next-token distribution from
    the chunk that holds its last step; another computes it for those rows after."""
    vocab = softmax.vocab
    i64 = lambda value: b.const(value, dtype=np.int64)  # noqa: E731
    chunks = b.op("Div", [b.op("Sub", [b.op("Add", [dims.steps, chunk]), i64(1)]), chunk])
    padded = b.op("Mul", [chunks, chunk])
    extra = b.op("Unsqueeze", [b.op("Sub", [padded, dims.steps]), i64([0])])
    out_padded = b.op("Pad", [out, b.op("Concat", [i64([0, 0, 0]), extra, i64([0, 0])],
                                        axis=0)])
    targets_padded = b.op("Pad", [targets, b.op("Concat", [i64([0, 0]), extra, i64([0])],
                                                axis=0)])
    c = b.child()
    index, cond, next_prev = c.fresh("chunk"), c.fresh("cond"), c.fresh("next_prev")
    start = c.op("Mul", [index, chunk])
    begin, end = (c.op("Unsqueeze", [v, c.const([0], dtype=np.int64)])
                  for v in (start, c.op("Add", [start, chunk])))
    axis0 = c.const([0], dtype=np.int64)
    picked, greedy_tokens, greedy_logprobs, logprobs = softmax.score(
        c, _rows(c, c.op("Slice", [out_padded, begin, end, axis0]), softmax.hidden),
        _flat(c, c.op("Slice", [targets_padded, begin, end, axis0])))
    carried_in, carried_out = [], []
    if softmax.keeps_distribution:
        # rows whose last step is in this chunk take its distribution there
        local = c.op("Sub", [dims.last, start])  # [B]
        inside = c.op("And", [c.op("GreaterOrEqual", [local, c.const(0, dtype=np.int64)]),
                              c.op("Less", [local, chunk])])
        last_in_chunk = c.op("Sub", [chunk, c.const(1, dtype=np.int64)])
        clipped = c.op("Max", [c.op("Min", [local, last_in_chunk]),
                               c.const(0, dtype=np.int64)])
        at = c.op("Add", [c.op("Mul", [clipped, dims.batch_size]), dims.rows])
        next_new = c.op("Where", [c.op("Unsqueeze", [inside, c.const([1], dtype=np.int64)]),
                                  c.op("Gather", [logprobs, at], axis=0), next_prev])
        carried_in = [helper.make_tensor_value_info(next_prev, FLOAT, ["batch", vocab])]
        carried_out = [helper.make_tensor_value_info(next_new, FLOAT, ["batch", vocab])]
    body = helper.make_graph(
        c.nodes, c.fresh("head_body"),
        [helper.make_tensor_value_info(index, INT64, []),
         helper.make_tensor_value_info(cond, BOOL, []), *carried_in],
        [helper.make_tensor_value_info(cond, BOOL, []), *carried_out,
         helper.make_tensor_value_info(picked, FLOAT, [None]),
         helper.make_tensor_value_info(greedy_tokens, INT64, [None]),
         helper.make_tensor_value_info(greedy_logprobs, FLOAT, [None])],
        initializer=c.initializers)
    keep_going = b.const(True, dtype=np.bool_)
    if softmax.keeps_distribution:
        start_next = b.op("ConstantOfShape",
                          [b.op("Concat", [dims.batch, i64([vocab])], axis=0)],
                          value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
        # each stacked output: [chunks, chunk * B]
        next_logprobs, *stacked = b.op("Loop", [chunks, keep_going, start_next], 4, body=body)
    else:
        stacked = b.op("Loop", [chunks, keep_going], 3, body=body)
        next_logprobs = _next_logprobs(b, softmax, out, dims)
    padded_by_batch = b.op("Concat", [b.op("Unsqueeze", [padded, i64([0])]), dims.batch],
                           axis=0)
    steps_end = b.op("Unsqueeze", [dims.steps, i64([0])])
    token_logprobs, greedy_tokens, greedy_logprobs = (
        b.op("Transpose", [b.op("Slice", [b.op("Reshape", [s, padded_by_batch]), i64([0]),
                                          steps_end, i64([0])])], perm=[1, 0])
        for s in stacked)
    return helper.make_graph(
        b.nodes, b.fresh("chunked_head"), [],
        output_infos((token_logprobs, next_logprobs, greedy_tokens, greedy_logprobs), vocab),
        initializer=b.initializers)


def pick(b: GraphBuilder, logprobs: str, targets: str) -> str:
    """logprobs [n, V] at targets [n] -> [n]."""
    wanted = b.op("Reshape", [targets, b.const([-1, 1], dtype=np.int64)])
    return b.op("Reshape", [b.op("GatherElements", [logprobs, wanted], axis=1),
                            b.const([-1], dtype=np.int64)])


def _greedy(b: GraphBuilder, logprobs: str) -> tuple[str, str]:
    """logprobs [n, V] -> (the largest log-prob [n], its token [n]); on ties the
    lowest token id, as torch.argmax."""
    values, indices = b.op("TopK", [logprobs, b.const([1], dtype=np.int64)], 2, axis=1,
                           largest=1, sorted=1)
    flat = b.const([-1], dtype=np.int64)
    return b.op("Reshape", [values, flat]), b.op("Reshape", [indices, flat])

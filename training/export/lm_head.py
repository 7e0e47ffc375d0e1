"""A language model's outputs from its top layer's outputs [T,B,H]: token_logprobs [B,T]
(log P(targets[b,t] | ...)), next_logprobs [B,V] (after each row's last step), and at
every position the most likely token, greedy_tokens [B,T], with its log-prob,
greedy_logprobs [B,T]. The greedy pair answers "was every token the argmax" and "the
likeliest token at each position" from the one pass that scores the targets; a TopK
(k = 1: the lowest index on ties) on the same LogSoftmax tensor the targets are gathered
from, so greedy_logprobs is bitwise the token_logprobs of targets = greedy_tokens. At a
row's padded positions the [B,T] outputs hold values nobody should read.

The [H,V] projection and LogSoftmax run after the recurrence, never inside a step. A call
of up to HEAD_ROWS positions (every single-token step, every short batch) runs them as one
Gemm. A longer one runs them over chunks of about HEAD_ROWS positions, in a Loop over
chunks (not steps), so the [T*B, V] logits are never held at once (a 16,384-token scoring
call at V = 10,000 would hold 0.6 GB of them, and as much again of log-probabilities) and
each chunk's logits are still in cache when LogSoftmax, the target gather and TopK read
them. An If picks between the two: the chunked Loop's extra kernels would cost a single
step at H = 256 a tenth of its time.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from training.export.builder import Dims, GraphBuilder

HEAD_ROWS = 512  # positions per chunk: [512, V] logits stay in cache
HEAD_OUTPUTS = ("token_logprobs", "next_logprobs", "greedy_tokens", "greedy_logprobs")
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def lm_head(g: GraphBuilder, output: torch.nn.Linear, out: str, dims: Dims) -> None:
    """Adds the nodes that compute the graph outputs `token_logprobs`, `next_logprobs`,
    `greedy_tokens` and `greedy_logprobs`."""
    vocab, hidden = output.weight.shape
    weight_t, bias = g.const(output.weight.t()), g.const(output.bias)
    targets = g.op("Transpose", ["targets"], perm=[1, 0])  # [T, B]
    # steps per chunk: HEAD_ROWS // B, at least 1, at most T
    chunk = g.op("Min", [dims.steps, g.op("Max", [
        g.const(1, dtype=np.int64),
        g.op("Div", [g.const(HEAD_ROWS, dtype=np.int64), dims.batch_size])])])
    one_chunk = g.op("Equal", [chunk, dims.steps])
    whole = _whole(g.child(), out, targets, weight_t, bias, dims, vocab, hidden)
    chunked = _chunked(g.child(), out, targets, weight_t, bias, dims, vocab, hidden, chunk)
    g.op("If", [one_chunk], list(HEAD_OUTPUTS), then_branch=whole, else_branch=chunked)


def output_infos(names: tuple[str, ...], vocab: int) -> list:
    """Value infos of the head's outputs (HEAD_OUTPUTS' order), under `names`."""
    token_logprobs, next_logprobs, greedy_tokens, greedy_logprobs = names
    return [helper.make_tensor_value_info(token_logprobs, FLOAT, ["batch", "time"]),
            helper.make_tensor_value_info(next_logprobs, FLOAT, ["batch", vocab]),
            helper.make_tensor_value_info(greedy_tokens, INT64, ["batch", "time"]),
            helper.make_tensor_value_info(greedy_logprobs, FLOAT, ["batch", "time"])]


def _whole(b: GraphBuilder, out: str, targets: str, weight_t: str, bias: str, dims: Dims,
           vocab: int, hidden: int) -> onnx.GraphProto:
    """Every position in one Gemm and one LogSoftmax."""
    logprobs = _logprobs(b, out, weight_t, bias, hidden)  # [T*B, V]
    picked = _pick(b, logprobs, targets)  # [T*B]
    greedy_logprobs, greedy_tokens = _greedy(b, logprobs)  # [T*B] each
    token_logprobs, greedy_tokens, greedy_logprobs = (
        b.op("Transpose", [b.op("Reshape", [flat, dims.time_batch])], perm=[1, 0])
        for flat in (picked, greedy_tokens, greedy_logprobs))
    # row b's last step is position last * B + b
    at = b.op("Add", [b.op("Mul", [dims.last, dims.batch_size]), dims.rows])
    next_logprobs = b.op("Gather", [logprobs, at], axis=0)
    return helper.make_graph(
        b.nodes, b.fresh("whole_head"), [],
        output_infos((token_logprobs, next_logprobs, greedy_tokens, greedy_logprobs), vocab),
        initializer=b.initializers)


def _chunked(b: GraphBuilder, out: str, targets: str, weight_t: str, bias: str, dims: Dims,
             vocab: int, hidden: int, chunk: str) -> onnx.GraphProto:
    """A Loop over chunks of `chunk` steps, T padded to whole chunks; each row's next-token
    distribution is kept from the chunk that holds its last step."""
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
    logprobs = _logprobs(c, c.op("Slice", [out_padded, begin, end, axis0]), weight_t, bias,
                         hidden)
    picked = _pick(c, logprobs, c.op("Slice", [targets_padded, begin, end, axis0]))
    greedy_logprobs, greedy_tokens = _greedy(c, logprobs)
    # rows whose last step is in this chunk take its distribution there
    local = c.op("Sub", [dims.last, start])  # [B]
    inside = c.op("And", [c.op("GreaterOrEqual", [local, c.const(0, dtype=np.int64)]),
                          c.op("Less", [local, chunk])])
    last_in_chunk = c.op("Sub", [chunk, c.const(1, dtype=np.int64)])
    clipped = c.op("Max", [c.op("Min", [local, last_in_chunk]), c.const(0, dtype=np.int64)])
    at = c.op("Add", [c.op("Mul", [clipped, dims.batch_size]), dims.rows])
    next_new = c.op("Where", [c.op("Unsqueeze", [inside, c.const([1], dtype=np.int64)]),
                              c.op("Gather", [logprobs, at], axis=0), next_prev])
    body = helper.make_graph(
        c.nodes, c.fresh("head_body"),
        [helper.make_tensor_value_info(index, INT64, []),
         helper.make_tensor_value_info(cond, BOOL, []),
         helper.make_tensor_value_info(next_prev, FLOAT, ["batch", vocab])],
        [helper.make_tensor_value_info(cond, BOOL, []),
         helper.make_tensor_value_info(next_new, FLOAT, ["batch", vocab]),
         helper.make_tensor_value_info(picked, FLOAT, [None]),
         helper.make_tensor_value_info(greedy_tokens, INT64, [None]),
         helper.make_tensor_value_info(greedy_logprobs, FLOAT, [None])],
        initializer=c.initializers)
    start_next = b.op("ConstantOfShape", [b.op("Concat", [dims.batch, i64([vocab])], axis=0)],
                      value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
    # each stacked output: [chunks, chunk * B]
    next_logprobs, *stacked = b.op("Loop", [chunks, b.const(True, dtype=np.bool_), start_next],
                                   4, body=body)
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


def _logprobs(b: GraphBuilder, positions: str, weight_t: str, bias: str, hidden: int) -> str:
    """[t, B, H] -> log-probabilities [t*B, V]."""
    rows = b.op("Reshape", [positions, b.const([-1, hidden], dtype=np.int64)])
    return b.op("LogSoftmax", [b.op("Gemm", [rows, weight_t, bias])], axis=1)


def _pick(b: GraphBuilder, logprobs: str, targets: str) -> str:
    """logprobs [t*B, V] at targets [t, B] -> [t*B]."""
    wanted = b.op("Reshape", [targets, b.const([-1, 1], dtype=np.int64)])
    return b.op("Reshape", [b.op("GatherElements", [logprobs, wanted], axis=1),
                            b.const([-1], dtype=np.int64)])


def _greedy(b: GraphBuilder, logprobs: str) -> tuple[str, str]:
    """logprobs [t*B, V] -> (the largest log-prob [t*B], its token [t*B]); on ties the
    lowest token id, as torch.argmax."""
    values, indices = b.op("TopK", [logprobs, b.const([1], dtype=np.int64)], 2, axis=1,
                           largest=1, sorted=1)
    flat = b.const([-1], dtype=np.int64)
    return b.op("Reshape", [values, flat]), b.op("Reshape", [indices, flat])

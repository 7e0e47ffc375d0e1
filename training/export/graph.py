"""ONNX graphs built directly from trained weights, the recurrence as an ONNX Loop.

The layout mirrors RecurrentLayer.forward_loop: work that does not depend on the previous
step stays outside the loop body (the embedding Gather and each layer's input projection
for all steps as one MatMul before its Loop; the output projection and LogSoftmax after
the last one), so the body holds only the recurrent product. Everything inside the graph
is time-major ([T, B, ...]); one Loop per layer and direction, its trip count read from
the input's shape, so the same graph runs T = 1 and T = 5000 and its size does not
depend on T. Steps past a row's length keep that row's state (Where on `lengths`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from training.models.encoders import RecurrentClassifier, RecurrentTagger
from training.models.language_model import RecurrentLM
from training.models.recurrence import RecurrentLayer, RecurrentStack

OPSET = 17
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


class _Builder:
    """Collects nodes and initializers; names are unique across the model and its bodies."""

    def __init__(self, counter: list[int] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = counter if counter is not None else [0]

    def fresh(self, prefix: str) -> str:
        self._counter[0] += 1
        return f"{prefix}_{self._counter[0]}"

    def child(self) -> _Builder:
        return _Builder(self._counter)

    def const(self, value, name: str | None = None, dtype=np.float32) -> str:
        array = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                           else value, dtype=dtype)
        name = name or self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs):
        names = ([self.fresh(op_type.lower()) for _ in range(outputs)]
                 if isinstance(outputs, int) else outputs)
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if len(names) == 1 else names


def _cell_body(g: _Builder, layer: RecurrentLayer, projected: str, lengths: str, w_hh_t: str,
               b_hn: str | None) -> onnx.GraphProto:
    """One step: x_t = projected[t]; new state from x_t and the previous state; rows whose
    length is <= t keep their state."""
    b = g.child()
    h_size, s_size = layer.hidden_size, layer.state_size
    step, cond, prev = b.fresh("t"), b.fresh("cond"), b.fresh("state_prev")
    x_t = b.op("Gather", [projected, step], axis=0)  # [B, G*H]
    if layer.cell.startswith("elman"):
        pre = b.op("Add", [x_t, b.op("MatMul", [prev, w_hh_t])])
        h = b.op("Tanh" if layer.cell == "elman_tanh" else "Relu", [pre])
        candidate = h
    elif layer.cell == "lstm":
        h_prev, c_prev = b.op("Split", [prev], 2, axis=1)
        gates = b.op("Add", [x_t, b.op("MatMul", [h_prev, w_hh_t])])
        i, f, cand, o = b.op("Split", [gates], 4, axis=1)
        c = b.op("Add", [b.op("Mul", [b.op("Sigmoid", [f]), c_prev]),
                         b.op("Mul", [b.op("Sigmoid", [i]), b.op("Tanh", [cand])])])
        h = b.op("Mul", [b.op("Sigmoid", [o]), b.op("Tanh", [c])])
        candidate = b.op("Concat", [h, c], axis=1)
    else:  # gru, PyTorch's formulation (ONNX's linear_before_reset = 1)
        x_r, x_z, x_n = b.op("Split", [x_t], 3, axis=1)
        h_r, h_z, h_n = b.op("Split", [b.op("MatMul", [prev, w_hh_t])], 3, axis=1)
        r = b.op("Sigmoid", [b.op("Add", [x_r, h_r])])
        z = b.op("Sigmoid", [b.op("Add", [x_z, h_z])])
        n = b.op("Tanh", [b.op("Add", [x_n, b.op("Mul", [r, b.op("Add", [h_n, b_hn])])])])
        h = b.op("Add", [n, b.op("Mul", [z, b.op("Sub", [prev, n])])])  # (1-z) n + z h
        candidate = h
    valid = b.op("Unsqueeze", [b.op("Less", [step, lengths]), b.const([1], dtype=np.int64)])
    new_state = b.op("Where", [valid, candidate, prev])
    cond_out = b.op("Identity", [cond])
    return helper.make_graph(
        b.nodes, b.fresh("step_body"),
        [helper.make_tensor_value_info(step, INT64, []),
         helper.make_tensor_value_info(cond, BOOL, []),
         helper.make_tensor_value_info(prev, FLOAT, ["batch", s_size])],
        [helper.make_tensor_value_info(cond_out, BOOL, []),
         helper.make_tensor_value_info(new_state, FLOAT, ["batch", s_size]),
         helper.make_tensor_value_info(h, FLOAT, ["batch", h_size])],
        initializer=b.initializers)


def _recurrence(g: _Builder, layer: RecurrentLayer, projected: str, lengths: str, state: str,
                steps: str) -> tuple[str, str]:
    """A Loop over T steps of `projected` [T,B,G*H] from `state` [B,S].
    Returns (final state [B,S], outputs [T,B,H])."""
    w_hh_t = g.const(layer.weight_hh.t())
    b_hn = g.const(layer.bias_hn) if layer.bias_hn is not None else None
    body = _cell_body(g, layer, projected, lengths, w_hh_t, b_hn)
    keep_going = g.const(True, dtype=np.bool_)
    final, outputs = g.op("Loop", [steps, keep_going, state], 2, body=body)
    return final, outputs


def _stack(g: _Builder, stack: RecurrentStack, x: str, lengths: str, state: str | None,
           steps: str, batch: str) -> tuple[str, list[str], list[str]]:
    """Runs the stack on x [T,B,D]. Returns (outputs [T,B,F], forward finals, backward finals)."""
    forward_finals, backward_finals = [], []
    for index, forward in enumerate(stack.forward_layers):
        layers = [forward] + ([stack.backward_layers[index]] if stack.bidirectional else [])
        # one MatMul projects the input for every step (and both directions)
        weight = torch.cat([layer.weight_ih for layer in layers], 0).t()
        bias = torch.cat([layer.bias for layer in layers], 0)
        projected = g.op("Add", [g.op("MatMul", [x, g.const(weight)]), g.const(bias)])
        parts = (g.op("Split", [projected], 2, axis=2) if stack.bidirectional else [projected])
        initial = []
        for layer in layers:
            if state is not None:
                initial.append(g.op("Gather", [state, g.const(index, dtype=np.int64)], axis=0))
            else:  # bidirectional encoders start every text from h0 (zero unless learned)
                h0 = layer.initial_state(1)
                shape = g.op("Concat", [batch, g.const([layer.state_size], dtype=np.int64)],
                             axis=0)
                initial.append(g.op("Expand", [g.const(h0.detach()), shape]))
        final, out_forward = _recurrence(g, forward, parts[0], lengths, initial[0], steps)
        forward_finals.append(final)
        if stack.bidirectional:
            reversed_in = g.op("ReverseSequence", [parts[1], lengths], batch_axis=1, time_axis=0)
            final_b, out_b = _recurrence(g, layers[1], reversed_in, lengths, initial[1], steps)
            backward_finals.append(final_b)
            out_backward = g.op("ReverseSequence", [out_b, lengths], batch_axis=1, time_axis=0)
            x = g.op("Concat", [out_backward, out_forward], axis=2)
        else:
            x = out_forward
    return x, forward_finals, backward_finals


def _stacked_state(g: _Builder, finals: list[str], name: str) -> str:
    axis0 = g.const([0], dtype=np.int64)
    return g.op("Concat", [g.op("Unsqueeze", [f, axis0]) for f in finals], [name], axis=0)


def _linear(g: _Builder, x: str, linear: torch.nn.Linear) -> str:
    return g.op("Add", [g.op("MatMul", [x, g.const(linear.weight.t())]), g.const(linear.bias)])


def build_graph(model: torch.nn.Module, name: str = "recur", stack_fn=None) -> onnx.ModelProto:
    """The ONNX model of a trained RecurrentLM, RecurrentTagger or RecurrentClassifier.

    `stack_fn` replaces the Loop-based recurrence; the export benchmark passes one built
    on ONNX's fused RNN/LSTM/GRU operators, for comparison only."""
    model = model.eval()
    stack: RecurrentStack = model.stack
    layers, state_size = stack.num_layers, stack.state_size
    g = _Builder()
    inputs = [helper.make_tensor_value_info("tokens", INT64, ["batch", "time"]),
              helper.make_tensor_value_info("lengths", INT64, ["batch"])]
    incremental = not stack.bidirectional
    if incremental:
        inputs.append(helper.make_tensor_value_info("state", FLOAT,
                                                    [layers, "batch", state_size]))
    shape = g.op("Shape", ["tokens"])
    batch = g.op("Slice", [shape, g.const([0], dtype=np.int64), g.const([1], dtype=np.int64)])
    steps = g.op("Gather", [shape, g.const(1, dtype=np.int64)], axis=0)
    tokens_tm = g.op("Transpose", ["tokens"], perm=[1, 0])
    embedded = g.op("Gather", [g.const(model.embedding.weight), tokens_tm], axis=0)  # [T,B,D]
    out, forward_finals, backward_finals = (stack_fn or _stack)(
        g, stack, embedded, "lengths", "state" if incremental else None, steps, batch)
    outputs = []
    if isinstance(model, RecurrentLM):
        inputs.append(helper.make_tensor_value_info("targets", INT64, ["batch", "time"]))
        vocab = model.output.weight.shape[0]
        logprobs = g.op("LogSoftmax", [_linear(g, out, model.output)], axis=2)  # [T,B,V]
        targets = g.op("Unsqueeze", [g.op("Transpose", ["targets"], perm=[1, 0]),
                                     g.const([2], dtype=np.int64)])
        picked = g.op("GatherElements", [logprobs, targets], axis=2)
        g.op("Transpose", [g.op("Squeeze", [picked, g.const([2], dtype=np.int64)])],
             ["token_logprobs"], perm=[1, 0])
        # next-token distribution after each row's last valid token: logprobs[len-1, b]
        one = g.const([1], dtype=np.int64)
        rows = g.op("Range", [g.const(0, dtype=np.int64), g.op("Squeeze", [batch]),
                              g.const(1, dtype=np.int64)])
        last = g.op("Sub", ["lengths", one])
        index = g.op("Concat", [g.op("Unsqueeze", [last, one]), g.op("Unsqueeze", [rows, one])],
                     axis=1)
        g.op("GatherND", [logprobs, index], ["next_logprobs"])
        outputs = [helper.make_tensor_value_info("token_logprobs", FLOAT, ["batch", "time"]),
                   helper.make_tensor_value_info("next_logprobs", FLOAT, ["batch", vocab])]
    elif isinstance(model, RecurrentTagger):
        tags = model.output.weight.shape[0]
        logprobs = g.op("LogSoftmax", [_linear(g, out, model.output)], axis=2)
        g.op("Transpose", [logprobs], ["tag_logprobs"], perm=[1, 0, 2])
        outputs = [helper.make_tensor_value_info("tag_logprobs", FLOAT,
                                                 ["batch", "time", tags])]
    elif isinstance(model, RecurrentClassifier):
        classes = model.output.weight.shape[0]
        pooled = _pool(g, model, out, forward_finals, backward_finals, steps)
        g.op("LogSoftmax", [_linear(g, pooled, model.output)], ["class_logprobs"], axis=1)
        outputs = [helper.make_tensor_value_info("class_logprobs", FLOAT, ["batch", classes])]
    else:
        raise TypeError(f"cannot export {type(model).__name__}: only recurrent models have a Loop")
    if incremental:
        _stacked_state(g, forward_finals, "new_state")
        outputs.append(helper.make_tensor_value_info("new_state", FLOAT,
                                                     [layers, "batch", state_size]))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="recur")
    onnx_model.ir_version = 8
    return onnx_model


def _pool(g: _Builder, model: RecurrentClassifier, out: str, forward_finals: list[str],
          backward_finals: list[str], steps: str) -> str:
    hidden = model.stack.hidden_size
    zero, h_end = g.const([0], dtype=np.int64), g.const([hidden], dtype=np.int64)
    axis1 = g.const([1], dtype=np.int64)
    if model.pooling == "final":
        h_forward = g.op("Slice", [forward_finals[-1], zero, h_end, axis1])
        if not model.stack.bidirectional:
            return h_forward
        h_backward = g.op("Slice", [backward_finals[-1], zero, h_end, axis1])
        return g.op("Concat", [h_backward, h_forward], axis=1)
    positions = g.op("Range", [g.const(0, dtype=np.int64), steps, g.const(1, dtype=np.int64)])
    valid = g.op("Less", [g.op("Unsqueeze", [positions, axis1]), "lengths"])  # [T,B]
    valid = g.op("Unsqueeze", [valid, g.const([2], dtype=np.int64)])  # [T,B,1]
    if model.pooling == "mean":
        summed = g.op("ReduceSum", [g.op("Mul", [out, g.op("Cast", [valid], to=FLOAT)]), zero],
                      keepdims=0)
        count = g.op("Unsqueeze", [g.op("Cast", ["lengths"], to=FLOAT), axis1])
        return g.op("Div", [summed, count])
    masked = g.op("Where", [valid, out, g.const(-np.inf)])
    return g.op("ReduceMax", [masked], axes=[0], keepdims=0)

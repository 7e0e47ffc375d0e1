"""ONNX graphs built directly from trained weights, the recurrence as an ONNX Loop.

The layout mirrors RecurrentLayer.forward_loop: work that does not depend on the previous
step stays outside the loop body (the embedding Gather and each layer's input projection
for all steps as one Gemm before its Loop; the output projection and LogSoftmax after the
last one, see lm_head.py), so the body holds only the recurrent product and the cell's
element-wise work. Everything inside the graph is time-major ([T, B, ...]); one Loop per
layer and direction, its trip count read from the input's shape, so the same graph runs
T = 1 and T = 5000 and its size does not depend on T. A row's final state is its state
at its own length (`lengths`), picked from the Loop's per-step outputs; the steps past it
change nothing the caller reads.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from serving.model.tokenizer import CHAR_PAD
from training.export.adaptive_head import AdaptiveSoftmax
from training.export.builder import Dims, GraphBuilder
from training.export.lm_head import HEAD_OUTPUTS, FullSoftmax, lm_head, output_infos
from training.models.characters import CharCNN
from training.models.encoders import RecurrentClassifier, RecurrentTagger
from training.models.language_model import RecurrentLM
from training.models.recurrence import RecurrentLayer, RecurrentStack

OPSET = 17
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _gate_order(layer: RecurrentLayer) -> list[int]:
    """Gate blocks in the order the body wants them. LSTM: PyTorch's (i, f, g, o) becomes
    (i, f, o, g), so one Sigmoid covers the three sigmoid gates; GRU's (r, z, n) already
    has its two sigmoid gates first."""
    gates = layer.weight_ih.shape[0] // layer.hidden_size
    return [0, 1, 3, 2] if layer.cell == "lstm" else list(range(gates))


def _by_gate(layer: RecurrentLayer, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s gate blocks (along its first axis) reordered by _gate_order."""
    order = _gate_order(layer)
    return tensor.reshape(len(order), layer.hidden_size, -1)[order].reshape(tensor.shape)


def _cell_body(g: GraphBuilder, layer: RecurrentLayer, projected: str, w_hh_t: str,
               bias_hh: str | None) -> onnx.GraphProto:
    """One step: the new state from x_t = projected[t] and the previous state.

    There is no masking: padding always sits at the end of a row (the backward direction
    reads its rows reversed within their lengths), so a row's steps past its length only
    produce outputs nobody reads, and its final state is taken from the step outputs at
    its length after the Loop. Each node here runs once per step, so the body is kept to
    the fewest kernels: 11 for an LSTM (MatMul + Add run as one Gemm), where masking and
    packed states took 18."""
    b = g.child()
    h_size = layer.hidden_size
    step, cond = b.fresh("t"), b.fresh("cond")
    carried = [b.fresh("h_prev")] + ([b.fresh("c_prev")] if layer.cell == "lstm" else [])
    h_prev = carried[0]
    x_t = b.op("Gather", [projected, step], axis=0)  # [B, G*H]
    recurrent = b.op("MatMul", [h_prev, w_hh_t])
    if bias_hh is not None:
        recurrent = b.op("Add", [recurrent, bias_hh])
    if layer.cell.startswith("elman"):
        h = b.op("Tanh" if layer.cell == "elman_tanh" else "Relu",
                 [b.op("Add", [x_t, recurrent])])
        new = [h]
    elif layer.cell == "lstm":  # gates (i, f, o, g), see _gate_order
        gates = b.op("Add", [x_t, recurrent])
        sigmoid_part, g_part = b.op("Split", [gates, b.const([3 * h_size, h_size],
                                                             dtype=np.int64)], 2, axis=1)
        i, f, o = b.op("Split", [b.op("Sigmoid", [sigmoid_part])], 3, axis=1)
        c = b.op("Add", [b.op("Mul", [f, carried[1]]),
                         b.op("Mul", [i, b.op("Tanh", [g_part])])])
        h = b.op("Mul", [o, b.op("Tanh", [c])])
        new = [h, c]
    else:  # gru, PyTorch's formulation (ONNX's linear_before_reset = 1)
        sizes = b.const([2 * h_size, h_size], dtype=np.int64)
        x_rz, x_n = b.op("Split", [x_t, sizes], 2, axis=1)
        h_rz, h_n = b.op("Split", [recurrent, sizes], 2, axis=1)
        r, z = b.op("Split", [b.op("Sigmoid", [b.op("Add", [x_rz, h_rz])])], 2, axis=1)
        n = b.op("Tanh", [b.op("Add", [x_n, b.op("Mul", [r, h_n])])])
        h = b.op("Add", [n, b.op("Mul", [z, b.op("Sub", [h_prev, n])])])  # (1-z) n + z h
        new = [h]

    def state_info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, FLOAT, ["batch", h_size])

    # outputs: condition (passed through), the carried states, then the same states
    # stacked over steps
    return helper.make_graph(
        b.nodes, b.fresh("step_body"),
        [helper.make_tensor_value_info(step, INT64, []),
         helper.make_tensor_value_info(cond, BOOL, []), *map(state_info, carried)],
        [helper.make_tensor_value_info(cond, BOOL, []), *map(state_info, new),
         *map(state_info, new)],
        initializer=b.initializers)


def _recurrence(g: GraphBuilder, layer: RecurrentLayer, projected: str, dims: Dims,
                state: str) -> tuple[str, str]:
    """A Loop over T steps of `projected` [T,B,G*H] from `state` [B,S].
    Returns (each row's state at its length [B,S], outputs [T,B,H])."""
    w_hh_t = g.const(_by_gate(layer, layer.weight_hh).t())
    bias_hh = None
    if layer.bias_hn is not None:  # GRU: b_hn sits inside the reset gate's product
        bias_hh = g.const(torch.cat([torch.zeros(2 * layer.hidden_size), layer.bias_hn]))
    body = _cell_body(g, layer, projected, w_hh_t, bias_hh)
    keep_going = g.const(True, dtype=np.bool_)
    if layer.cell == "lstm":
        initial = g.op("Split", [state], 2, axis=1)
        _, _, outputs, cells = g.op("Loop", [dims.steps, keep_going, *initial], 4, body=body)
        per_step = [outputs, cells]
    else:
        _, outputs = g.op("Loop", [dims.steps, keep_going, state], 2, body=body)
        per_step = [outputs]
    at_length = [g.op("GatherND", [s, dims.last_step]) for s in per_step]
    final = at_length[0] if len(at_length) == 1 else g.op("Concat", at_length, axis=1)
    return g.op("Where", [dims.nonempty, final, state]), outputs


def _stack(g: GraphBuilder, stack: RecurrentStack, x: str, dims: Dims,
           state: str | None) -> tuple[str, list[str], list[str]]:
    """Runs the stack on x [T,B,D]. Returns (outputs [T,B,F], forward finals, backward finals)."""
    forward_finals, backward_finals = [], []
    for index, forward in enumerate(stack.forward_layers):
        layers = [forward] + ([stack.backward_layers[index]] if stack.bidirectional else [])
        # one Gemm projects the input for every step (and both directions)
        weight = torch.cat([_by_gate(layer, layer.weight_ih) for layer in layers], 0)
        bias = torch.cat([_by_gate(layer, layer.bias) for layer in layers], 0)
        projected = _affine(g, x, weight, bias, dims)
        parts = (g.op("Split", [projected], 2, axis=2) if stack.bidirectional else [projected])
        initial = []
        for layer in layers:
            if state is not None:
                initial.append(g.op("Gather", [state, g.const(index, dtype=np.int64)], axis=0))
            else:  # bidirectional encoders start every text from h0 (zero unless learned)
                h0 = layer.initial_state(1)
                shape = g.op("Concat", [dims.batch, g.const([layer.state_size],
                                                             dtype=np.int64)], axis=0)
                initial.append(g.op("Expand", [g.const(h0.detach()), shape]))
        final, out_forward = _recurrence(g, forward, parts[0], dims, initial[0])
        forward_finals.append(final)
        if stack.bidirectional:
            reversed_in = g.op("ReverseSequence", [parts[1], dims.lengths], batch_axis=1,
                               time_axis=0)
            final_b, out_b = _recurrence(g, layers[1], reversed_in, dims, initial[1])
            backward_finals.append(final_b)
            out_backward = g.op("ReverseSequence", [out_b, dims.lengths], batch_axis=1, time_axis=0)
            x = g.op("Concat", [out_backward, out_forward], axis=2)
        else:
            x = out_forward
    return x, forward_finals, backward_finals


def _stacked_state(g: GraphBuilder, finals: list[str], name: str) -> str:
    axis0 = g.const([0], dtype=np.int64)
    return g.op("Concat", [g.op("Unsqueeze", [f, axis0]) for f in finals], [name], axis=0)


def _affine(g: GraphBuilder, x: str, weight: torch.Tensor, bias: torch.Tensor,
            dims: Dims | None = None) -> str:
    """x @ weight.T + bias. A [T,B,D] input runs as one [T*B,D] Gemm: the bias is added
    inside the product instead of as a second pass over a [T,B,N] tensor (ONNX Runtime
    fuses MatMul + Add only for 2-D inputs)."""
    weight_t, bias = g.const(weight.t()), g.const(bias)
    if dims is None:  # already [B, D]
        return g.op("Gemm", [x, weight_t, bias])
    rows = g.op("Reshape", [x, g.const([-1, weight.shape[1]], dtype=np.int64)])
    shape = g.op("Concat", [dims.time_batch, g.const([weight.shape[0]], dtype=np.int64)],
                 axis=0)
    out = g.op("Reshape", [g.op("Gemm", [rows, weight_t, bias]), shape])
    # the shape is computed, so ONNX Runtime would not know the rank; stating it lets the
    # Loop body's Add of this tensor fuse with its MatMul into one Gemm
    g.value_info.append(helper.make_tensor_value_info(out, FLOAT, ["time", "batch",
                                                                   weight.shape[0]]))
    return out


def _linear(g: GraphBuilder, x: str, linear: torch.nn.Linear, dims: Dims | None = None) -> str:
    return _affine(g, x, linear.weight, linear.bias, dims)


def build_graph(model: torch.nn.Module, name: str = "recur", stack_fn=None) -> onnx.ModelProto:
    """The ONNX model of a trained RecurrentLM, RecurrentTagger or RecurrentClassifier.

    `stack_fn` replaces the Loop-based recurrence; the export benchmark passes one built
    on ONNX's fused RNN/LSTM/GRU operators, for comparison only."""
    model = model.eval()
    stack: RecurrentStack = model.stack
    layers, state_size = stack.num_layers, stack.state_size
    g = GraphBuilder()
    inputs = [helper.make_tensor_value_info("tokens", INT64, ["batch", "time"]),
              helper.make_tensor_value_info("lengths", INT64, ["batch"])]
    incremental = not stack.bidirectional
    if incremental:
        inputs.append(helper.make_tensor_value_info("state", FLOAT,
                                                    [layers, "batch", state_size]))
    tokens_tm = g.op("Transpose", ["tokens"], perm=[1, 0])
    dims = Dims(g, tokens_tm, "lengths")
    embedded = g.op("Gather", [g.const(model.embedding.weight), tokens_tm], axis=0)  # [T,B,D]
    chars = getattr(model, "chars", None)
    if chars is not None:
        inputs.append(helper.make_tensor_value_info("chars", INT64,
                                                    ["batch", "time", "word_length"]))
        embedded = g.op("Concat", [embedded, _char_features(g, chars, dims)], axis=2)
    out, forward_finals, backward_finals = (stack_fn or _stack)(
        g, stack, embedded, dims, "state" if incremental else None)
    outputs = []
    if isinstance(model, RecurrentLM):
        inputs.append(helper.make_tensor_value_info("targets", INT64, ["batch", "time"]))
        softmax = (AdaptiveSoftmax(g, model.output) if model.adaptive
                   else FullSoftmax(g, model.output))
        lm_head(g, softmax, out, dims)
        outputs = output_infos(HEAD_OUTPUTS, model.vocab_size)
    elif isinstance(model, RecurrentTagger):
        tags = model.output.weight.shape[0]
        logprobs = g.op("LogSoftmax", [_linear(g, out, model.output, dims)], axis=2)
        g.op("Transpose", [logprobs], ["tag_logprobs"], perm=[1, 0, 2])
        outputs = [helper.make_tensor_value_info("tag_logprobs", FLOAT,
                                                 ["batch", "time", tags])]
    elif isinstance(model, RecurrentClassifier):
        classes = model.output.weight.shape[0]
        pooled = _pool(g, model, out, forward_finals, backward_finals, dims.steps)
        g.op("LogSoftmax", [_linear(g, pooled, model.output)], ["class_logprobs"], axis=1)
        outputs = [helper.make_tensor_value_info("class_logprobs", FLOAT, ["batch", classes])]
    else:
        raise TypeError(f"cannot export {type(model).__name__}: only recurrent models have a Loop")
    if incremental:
        _stacked_state(g, forward_finals, "new_state")
        outputs.append(helper.make_tensor_value_info("new_state", FLOAT,
                                                     [layers, "batch", state_size]))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers,
                              value_info=g.value_info)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="recur")
    onnx_model.ir_version = 8
    return onnx_model


def _char_features(g: GraphBuilder, chars: CharCNN, dims: Dims) -> str:
    """CharCNN.forward on the "chars" input [B, T, L]: [T, B, filters], every word of the
    batch in one Conv."""
    i64 = np.int64
    by_time = g.op("Transpose", ["chars"], perm=[1, 0, 2])  # [T, B, L]
    flat = g.op("Flatten", [by_time], axis=2)  # [N = T * B, L]
    x = g.op("Transpose", [g.op("Gather", [g.const(chars.embedding.weight), flat], axis=0)],
             perm=[0, 2, 1])  # [N, E, L]
    width = chars.conv.kernel_size[0]
    features = g.op("Conv", [x, g.const(chars.conv.weight), g.const(chars.conv.bias)],
                    kernel_shape=[width], pads=[width // 2, width // 2])  # [N, F, L]
    present = g.op("Not", [g.op("Equal", [flat, g.const(CHAR_PAD, dtype=i64)])])  # [N, L]
    present = g.op("Unsqueeze", [present, g.const([1], dtype=i64)])  # [N, 1, L]
    best = g.op("ReduceMax", [g.op("Where", [present, features, g.const(-np.inf)])],
                axes=[2], keepdims=0)  # [N, F]
    any_char = g.op("ReduceMax", [g.op("Cast", [present], to=FLOAT)], axes=[2],
                    keepdims=0)  # [N, 1]: 0 for a padding position
    best = g.op("Where", [g.op("Greater", [any_char, g.const(0.0)]), best, g.const(0.0)])
    shape = g.op("Concat", [dims.time_batch, g.const([chars.filters], dtype=i64)], axis=0)
    return g.op("Reshape", [g.op("Tanh", [best]), shape])


def _pool(g: GraphBuilder, model: RecurrentClassifier, out: str, forward_finals: list[str],
          backward_finals: list[str], steps: str) -> str:
    hidden = model.stack.hidden_size
    axis1 = g.const([1], dtype=np.int64)
    if model.pooling == "final":
        zero, h_end = g.const([0], dtype=np.int64), g.const([hidden], dtype=np.int64)
        h_forward = g.op("Slice", [forward_finals[-1], zero, h_end, axis1])
        if not model.stack.bidirectional:
            return h_forward
        h_backward = g.op("Slice", [backward_finals[-1], zero, h_end, axis1])
        return g.op("Concat", [h_backward, h_forward], axis=1)
    positions = g.op("Range", [g.const(0, dtype=np.int64), steps, g.const(1, dtype=np.int64)])
    valid = g.op("Less", [g.op("Unsqueeze", [positions, axis1]), "lengths"])  # [T,B]
    valid = g.op("Unsqueeze", [valid, g.const([2], dtype=np.int64)])  # [T,B,1]
    if model.pooling == "mean":
        # Where, not a multiplication by the mask: outputs past a row's length are not
        # meaningful (see _cell_body), and an unbounded one times zero would be NaN
        summed = g.op("ReduceSum", [g.op("Where", [valid, out, g.const(0.0)]),
                                    g.const([0], dtype=np.int64)],
                      keepdims=0)
        count = g.op("Unsqueeze", [g.op("Cast", ["lengths"], to=FLOAT), axis1])
        return g.op("Div", [summed, count])
    masked = g.op("Where", [valid, out, g.const(-np.inf)])
    return g.op("ReduceMax", [masked], axes=[0], keepdims=0)

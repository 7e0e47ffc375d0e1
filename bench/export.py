"""`make bench-export`: the exported Loop graph against torch eager and ONNX's fused
RNN/LSTM/GRU operators (same weights, built here only for comparison), with ONNX
Runtime's own MatMul rate for the output projection's shape measured in the same run.

Results go to bench/results/export.json and the report (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from bench.common import cpu, median_ms, now
from bench.report import save_results
from training.export.builder import Dims, GraphBuilder
from training.export.graph import build_graph
from training.models.language_model import RecurrentLM

VOCAB, LAYERS, SCORE_SHAPE = 10_000, 2, (32, 256)
ONNX_GATES = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}  # ours (i,f,g,o)/(r,z,n) -> ONNX order


def _fused_op_stack(g: GraphBuilder, stack, x, dims: Dims, state):
    """The recurrence as ONNX's fused RNN / LSTM / GRU operators, one per layer."""
    lengths32 = g.op("Cast", [dims.lengths], to=onnx.TensorProto.INT32)
    finals = []
    for index, layer in enumerate(stack.forward_layers):
        h = layer.hidden_size
        order = ONNX_GATES.get(layer.cell, [0])

        def gates(t, order=order, h=h):
            """Reorders gate blocks along the first axis into ONNX's order."""
            return t.view(len(order), h, -1)[order].reshape(t.shape)

        w, r = gates(layer.weight_ih)[None], gates(layer.weight_hh)[None]
        recurrent_bias = torch.zeros_like(layer.bias)
        if layer.cell == "gru":
            recurrent_bias[2 * h:] = layer.bias_hn
        b = torch.cat([gates(layer.bias), gates(recurrent_bias)])[None]
        layer_state = g.op("Gather", [state, g.const(index, dtype=np.int64)], axis=0)
        axis0 = g.const([0], dtype=np.int64)
        if layer.cell == "lstm":
            h0, c0 = g.op("Split", [layer_state], 2, axis=1)
            y, y_h, y_c = g.op("LSTM", [x, g.const(w), g.const(r), g.const(b), lengths32,
                                        g.op("Unsqueeze", [h0, axis0]),
                                        g.op("Unsqueeze", [c0, axis0])], 3, hidden_size=h)
            final = g.op("Concat", [g.op("Squeeze", [y_h, axis0]),
                                    g.op("Squeeze", [y_c, axis0])], axis=1)
        else:
            op, attrs = ("GRU", {"linear_before_reset": 1}) if layer.cell == "gru" else (
                "RNN", {"activations": ["Tanh" if layer.cell == "elman_tanh" else "Relu"]})
            y, y_h = g.op(op, [x, g.const(w), g.const(r), g.const(b), lengths32,
                               g.op("Unsqueeze", [layer_state, axis0])], 2, hidden_size=h,
                          **attrs)
            final = g.op("Squeeze", [y_h, axis0])
        x = g.op("Squeeze", [y, g.const([1], dtype=np.int64)])
        finals.append(final)
    return x, finals, []


def _session(model_proto, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model_proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _feeds(model, batch, steps, rng):
    tokens = rng.integers(0, VOCAB, (batch, steps))
    return {"tokens": tokens, "lengths": np.full(batch, steps, np.int64),
            "state": np.zeros((LAYERS, batch, model.stack.state_size), np.float32),
            "targets": rng.integers(0, VOCAB, (batch, steps))}


def _torch_call(model, feeds):
    tokens = torch.from_numpy(feeds["tokens"])
    state = torch.from_numpy(feeds["state"])
    targets = torch.from_numpy(feeds["targets"])

    def run():
        with torch.inference_mode():
            logits, _ = model(tokens, state)
            logprobs = torch.log_softmax(logits, -1)
            return logprobs.gather(2, targets[..., None]), logprobs[:, -1]

    return run


def _product_call(x: np.ndarray, columns: int, threads: int, reduce_rows: bool):
    """A session computing x @ W for a random W [H, columns] (then, with `reduce_rows`, a
    ReduceMax over the rows, which keeps a large product inside the session so that
    copying it out is not timed), as a call."""
    g = GraphBuilder()
    hidden = x.shape[1]
    weight = g.const(np.random.default_rng(0).standard_normal((hidden, columns)) * 0.01)
    product = g.op("MatMul", ["x", weight], 1 if reduce_rows else ["y"])
    if reduce_rows:
        g.op("ReduceMax", [product], ["y"], axes=[0], keepdims=0)
    float_ = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, "product", [helper.make_tensor_value_info("x", float_, [None, hidden])],
        [helper.make_tensor_value_info("y", float_, None)], g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    session = _session(proto, threads)
    return lambda: session.run(None, {"x": x})


def matmul_call(hidden: int, threads: int):
    """ONNX Runtime's float32 [B*T, H] x [H, V] as a call, and its FLOPs."""
    rows = SCORE_SHAPE[0] * SCORE_SHAPE[1]
    x = np.random.default_rng(1).standard_normal((rows, hidden)).astype(np.float32)
    return _product_call(x, VOCAB, threads, reduce_rows=True), 2 * rows * hidden * VOCAB


def step_weight_bytes(model) -> int:
    """Bytes of weights a B=1 step reads once each: every layer's input and recurrent
    matrices and the output projection (the embedding contributes one row)."""
    total = model.output.weight.numel()
    for layer in model.stack.forward_layers:
        total += layer.weight_ih.numel() + layer.weight_hh.numel()
    return 4 * total


def streaming_call(hidden: int, weight_bytes: int, threads: int):
    """ONNX Runtime's [1, H] x [H, N] MatMul over as many bytes of weights as a B=1 step
    reads: a B=1 step cannot take less time than this on the same machine once its
    weights do not fit in the caches (the bound of every variant, torch's included)."""
    x = np.ones((1, hidden), np.float32)
    return _product_call(x, weight_bytes // (4 * hidden), threads, reduce_rows=False)


def flops_per_token(model) -> int:
    total = 0
    for layer in model.stack.forward_layers:
        total += layer.weight_ih.numel() + layer.weight_hh.numel()
    return 2 * (total + model.output.weight.numel())


def bench_one(cell: str, hidden: int, threads: int, rounds: int) -> dict:
    """Every variant of one shape runs once per round, in turn, so that a burst of load
    on a shared machine hits all of them; times are medians over rounds and each ratio is
    the median of the rounds' ratios. The MatMul reference runs in the scoring rounds."""
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, cell, hidden, hidden, LAYERS).eval()
    sessions = {"loop": _session(build_graph(model), threads),
                "fused_op": _session(build_graph(model, stack_fn=_fused_op_stack), threads)}
    rng = np.random.default_rng(0)
    check = _feeds(model, 3, 9, rng)
    expected = _torch_call(model, check)()[0][..., 0].numpy()
    result: dict = {"cell": cell, "hidden": hidden}
    for name, session in sessions.items():
        diff = np.abs(session.run(["token_logprobs"], check)[0] - expected).max()
        result[f"{name}_max_abs_diff_vs_torch"] = float(diff)
    variants = ("loop", "fused_op", "torch_eager")
    matmul, matmul_flops = matmul_call(hidden, threads)
    weight_bytes = step_weight_bytes(model)
    streaming = streaming_call(hidden, weight_bytes, threads)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    matmul_ms: list[float] = []
    streaming_ms: list[float] = []
    for label, (batch, steps, repeat) in {"step_b1_ms": (1, 1, 200), "step_b32_ms": (32, 1, 100),
                                          "score_ms": (*SCORE_SHAPE, 5)}.items():
        feeds = _feeds(model, batch, steps, rng)
        runs = {"torch_eager": _torch_call(model, feeds)}
        for name, session in sessions.items():
            runs[name] = (lambda s=session, f=feeds: s.run(None, f))
        for fn in runs.values():
            median_ms(fn, 1)  # warm-up
        for _ in range(rounds):
            for name in variants:
                times[name].setdefault(label, []).append(
                    median_ms(runs[name], max(1, repeat // rounds), warmup=0))
            if label == "score_ms":
                matmul_ms.append(median_ms(matmul, 1, warmup=1))
            if label == "step_b1_ms":
                streaming_ms.append(median_ms(streaming, max(1, repeat // rounds), warmup=1))
    tokens = SCORE_SHAPE[0] * SCORE_SHAPE[1]
    flops = flops_per_token(model)
    rates = [matmul_flops / (ms / 1000) for ms in matmul_ms]  # FLOP/s, per round
    result["matmul_gflops"] = round(statistics.median(rates) / 1e9, 1)
    for name in variants:
        v = {label: round(statistics.median(values), 3) for label, values in times[name].items()}
        v["score_tokens_per_s"] = round(tokens / (v["score_ms"] / 1000))
        v["score_fraction_of_matmul_rate"] = round(statistics.median(
            [flops * tokens / (ms / 1000) / rate
             for ms, rate in zip(times[name]["score_ms"], rates, strict=True)]), 3)
        result[name] = v

    def ratio(label: str, slower: str, faster: str) -> float:
        return round(statistics.median([a / b for a, b in zip(
            times[slower][label], times[faster][label], strict=True)]), 3)

    result["loop_vs_fused_op_scoring"] = ratio("score_ms", "fused_op", "loop")
    result["loop_vs_torch_step_b1"] = ratio("step_b1_ms", "torch_eager", "loop")
    result["loop_vs_fused_op_step_b1"] = ratio("step_b1_ms", "fused_op", "loop")
    # the B=1 step against the time to stream its weights once
    result["step_b1_weight_mb"] = round(weight_bytes / 2**20, 1)
    result["step_b1_streaming_bound_ms"] = round(statistics.median(streaming_ms), 3)
    result["loop_step_b1_vs_bound"] = round(statistics.median(
        [a / b for a, b in zip(times["loop"]["step_b1_ms"], streaming_ms, strict=True)]), 3)
    result["torch_step_b1_vs_bound"] = round(statistics.median(
        [a / b for a, b in zip(times["torch_eager"]["step_b1_ms"], streaming_ms,
                               strict=True)]), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", default="elman_tanh,lstm,gru")
    parser.add_argument("--hidden", default="256,650")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(h) for h in args.hidden.split(",")]
    results = [bench_one(cell, h, args.threads, args.rounds)
               for cell in args.cells.split(",") for h in sizes]
    report = {"date": now(),
              "machine": f"{cpu()}, {args.threads} threads,"
                         f" onnxruntime {ort.__version__}, torch {torch.__version__}",
              "rounds": args.rounds, "results": results}
    save_results("export", report)


if __name__ == "__main__":
    main()

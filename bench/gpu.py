"""`make bench-gpu`, on a machine with a CUDA GPU: the exported Loop graph on ONNX Runtime's
CUDA provider, through the serving runtime (states kept on the GPU by I/O binding), against
torch eager on CUDA with cuDNN's fused RNN kernels, same weights, float32, TF32 off in both.

Results go to bench/results/gpu.json and the report (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from bench.common import lm_artifact, median_ms, now
from bench.report import save_results
from serving.model.runtime import ModelRuntime
from training.models.language_model import RecurrentLM

VOCAB, LAYERS, SCORE_SHAPE = 10_000, 2, (32, 256)
SHAPES = {"step_b1_ms": (1, 1, 300), "step_b32_ms": (32, 1, 300), "score_ms": (*SCORE_SHAPE, 20)}


def _calls(model, runtime: ModelRuntime, batch: int, steps: int, rng) -> dict:
    """Each call ends with its results on the host (ONNX Runtime) or copied there (torch),
    so a host clock times the device's work."""
    tokens = rng.integers(0, VOCAB, (batch, steps))
    targets = rng.integers(0, VOCAB, (batch, steps))
    lengths = np.full(batch, steps, np.int64)
    state = runtime.to_device(np.zeros((LAYERS, batch, model.stack.state_size), np.float32))
    cuda_tokens, cuda_targets = (torch.from_numpy(a).cuda() for a in (tokens, targets))
    cuda_state = torch.zeros(LAYERS, batch, model.stack.state_size, device="cuda")

    def loop():
        return runtime.run_lm(tokens, lengths, state, targets)

    def eager():
        with torch.inference_mode():
            logits, _ = model(cuda_tokens, cuda_state)
            logprobs = torch.log_softmax(logits, -1)
            out = logprobs.gather(2, cuda_targets[..., None]).cpu(), logprobs[:, -1].cpu()
        return out

    return {"loop_cuda": loop, "torch_cuda": eager}


def _loop_of_adds(nodes: int, batch: int, hidden: int) -> onnx.ModelProto:
    """A Loop over the first axis of `x` whose body adds 1 to its state [B, H] `nodes` times
    (at least once: a state passed straight through the body costs a synchronous copy)."""
    def value(name, kind, shape):
        return helper.make_tensor_value_info(name, kind, shape)

    sums = ["state"] + [f"sum{k}" for k in range(nodes)]
    body_nodes = [helper.make_node("Identity", ["cond"], ["cond_out"])]
    body_nodes += [helper.make_node("Add", [sums[k], "one"], [sums[k + 1]]) for k in range(nodes)]
    state_out = [value(sums[-1], TensorProto.FLOAT, [batch, hidden])]
    body = helper.make_graph(
        body_nodes, "body",
        [value("i", TensorProto.INT64, []), value("cond", TensorProto.BOOL, []),
         value("state", TensorProto.FLOAT, [batch, hidden])],
        [value("cond_out", TensorProto.BOOL, [])] + state_out,
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "zero"], ["steps"], axis=0),
         helper.make_node("Loop", ["steps", "true", "h0"], ["h_last"], body=body)],
        "loop_of_adds", [value("x", TensorProto.FLOAT, [None, 1]),
                         value("h0", TensorProto.FLOAT, [batch, hidden])],
        [value("h_last", TensorProto.FLOAT, [batch, hidden])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
         helper.make_tensor("true", TensorProto.BOOL, [], [True])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def loop_costs(batch: int = 32, hidden: int = 650, steps: int = 256) -> dict:
    """What ONNX Runtime's Loop costs per iteration on CUDA with a one-node body, and per
    further element-wise node (bodies of 1 and 11 Adds): the floor under any Loop graph."""
    per_iteration = {}
    for nodes in (1, 11):
        session = ort.InferenceSession(_loop_of_adds(nodes, batch, hidden).SerializeToString(),
                                       providers=["CUDAExecutionProvider"])
        binding = session.io_binding()
        binding.bind_cpu_input("x", np.zeros((steps, 1), np.float32))
        binding.bind_ortvalue_input("h0", ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, hidden), np.float32), "cuda", 0))
        binding.bind_output("h_last", "cpu")
        session.run_with_iobinding(binding)
        assert np.all(binding.get_outputs()[0].numpy() == nodes * steps)
        per_iteration[nodes] = 1000 * median_ms(
            lambda s=session, b=binding: s.run_with_iobinding(b), 30) / steps
    return {"one_node_body_us": round(per_iteration[1], 1),
            "per_node_us": round((per_iteration[11] - per_iteration[1]) / 10, 1)}


def bench_one(cell: str, hidden: int, root: Path, rounds: int) -> dict:
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, cell, hidden, hidden, LAYERS).eval()
    runtime = ModelRuntime(lm_artifact(model, root / cell / "1"), device="cuda")
    model = model.cuda()
    rng = np.random.default_rng(0)
    calls = {label: _calls(model, runtime, b, t, rng) for label, (b, t, _) in SHAPES.items()}
    ours, theirs = calls["score_ms"]["loop_cuda"](), calls["score_ms"]["torch_cuda"]()
    result: dict = {"cell": cell, "hidden": hidden, "providers": runtime.providers,
                    "max_abs_diff_vs_torch": float(np.abs(ours.token_logprobs
                                                          - theirs[0][..., 0].numpy()).max())}
    times: dict[str, dict[str, list[float]]] = {"loop_cuda": {}, "torch_cuda": {}}
    for label, (_, _, repeat) in SHAPES.items():
        for _ in range(rounds):  # the two take turns, so drifts hit both
            for name, fn in calls[label].items():
                times[name].setdefault(label, []).append(median_ms(fn, repeat // rounds))
    tokens = SCORE_SHAPE[0] * SCORE_SHAPE[1]
    for name, by_label in times.items():
        v = {label: round(statistics.median(values), 3) for label, values in by_label.items()}
        v["score_tokens_per_s"] = round(tokens / (v["score_ms"] / 1000))
        result[name] = v
    for label in SHAPES:
        result[f"loop_vs_torch_{label.removesuffix('_ms')}"] = round(statistics.median(
            [b / a for a, b in zip(times["loop_cuda"][label], times["torch_cuda"][label],
                                   strict=True)]), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="elman_tanh,lstm,gru")
    parser.add_argument("--hidden", default="256,650")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench-gpu needs a CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as root:
        results = [bench_one(cell, int(h), Path(root) / h, args.rounds)
                   for cell in args.cells.split(",") for h in args.hidden.split(",")]
    report = {"date": now(),
              "machine": f"{torch.cuda.get_device_name()}, onnxruntime {ort.__version__}, "
                         f"torch {torch.__version__}",
              "rounds": args.rounds, "loop_on_cuda": loop_costs(), "results": results}
    save_results("gpu", report)


if __name__ == "__main__":
    main()

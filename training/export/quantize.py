"""`recur export --quantize int8`: the float32 export's graph with its weight matrices
quantized by ONNX Runtime's dynamic quantization (`onnxruntime.quantization.
quantize_dynamic`), checked against the float32 graph through the serving runtime and
refused when it costs more validation perplexity than allowed.

Why dynamic and not static: quantize_static fixes every activation's range from
calibration data, and a recurrent state's range depends on how long the text has run;
dynamic quantization reads each activation's range on every call, needs no calibration,
and is the only mode whose quantizer descends into subgraphs.

What the quantizer does with this graph (onnxruntime 1.31, checked by node counts in
`quantized_products` and tests/test_quantize.py):

- It skips subgraphs unless `extra_options={"EnableSubgraph": True}`: without it the
  recurrent product in every Loop body and the output projection (in the head's If
  branches and its chunked Loop body, lm_head.py) stay float32, and only the input
  projections outside the Loops are quantized. With it, each subgraph is quantized as a
  model of its own, with the enclosing graphs' initializers in scope.
- In dynamic mode it rewrites every Gemm (the input and output projections) into MatMul +
  Add itself (`ONNXModel.replace_gemm_with_matmul`, subgraphs included), then quantizes
  each MatMul whose B is an initializer of its graph or of an enclosing one
  (`MatMulConstBOnly`, on by default in dynamic mode): the weights used in the bodies live
  in the main graph. Nothing is rewritten by hand for it.
- Its final node sort counts only a node's explicit inputs, not what a Loop body reads
  from the enclosing graph, so the graph it writes fails the ONNX checker (ONNX Runtime
  loads it anyway; microsoft/onnxruntime#18748): `sort_topologically` restores the order.
- A Gather from an initializer (the embedding table) is quantized too: the table is
  stored as uint8 (per tensor) and each looked-up row dequantized; a quarter of the
  bytes, no int8 arithmetic.
- When ONNX Runtime loads the graph, its optimizer fuses each DynamicQuantizeLinear +
  MatMulInteger + Mul (+ the bias Add) into one DynamicQuantizeMatMul, in the bodies too.

Weights are int8, symmetric, one scale per output column (per_channel); activations are
uint8 with the range of the tensor at hand, computed on every call. `reduce_range` (7-bit
weights) is off: ONNX Runtime documents it as possibly more accurate only on CPUs without
VNNI (whose u8 x s8 multiply-adds saturate in 16 bits). The figures recorded are those of
the machine that exported; serve int8 artifacts on CPUs like it.

Only language models are quantized: their acceptance test is the validation perplexity
cost. A tagger or classifier would need its own accuracy check, so it is refused rather
than published on a log-prob difference alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from serving.model.artifact import METADATA_FILE, load_artifact, write_artifact
from serving.model.runtime import ModelRuntime
from serving.model.tokenizer import LabelSet, Vocabulary
from training.data.batching import columns
from training.data.readers import CorpusError
from training.export.verify import (
    CASES,
    _graph_outputs,
    _valid_mask,
    verification_inputs,
    verify,
)
from training.models.language_model import RecurrentLM

QUANTIZE_CHOICES = ("int8",)
MAX_PPL_COST = 0.02  # relative: int8 perplexity at most 2% above float32's
PPL_TOKENS = 20_000  # validation tokens scored per graph: keeps the export quick
WINDOW = 256  # steps per scoring call, the state carried between calls
PRODUCTS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul")
SCHEME = ("int8 dynamic (onnxruntime.quantization.quantize_dynamic, EnableSubgraph): weight "
          "matrices int8 symmetric per output column, activations uint8 per tensor quantized "
          "on every call, the embedding table uint8 per tensor; biases, LogSoftmax and the "
          "cells' element-wise work in float32")
LOGPROB_OUTPUTS = ("token_logprobs", "next_logprobs", "greedy_logprobs")


class QuantizationError(ValueError):
    """An int8 export that cannot be made or is refused; nothing was published."""


@dataclass(frozen=True)
class Int8Options:
    """What an int8 export needs besides the model: the validation token stream (read only
    once the graph is quantized), laid out in `rows` columns as training evaluates it, at
    most `ppl_tokens` of it scored, and the largest relative perplexity cost accepted
    (None: measured and recorded, never refused; for benchmarks)."""

    validation: Callable[[], Sequence[int]]
    rows: int = 10
    max_ppl_cost: float | None = MAX_PPL_COST
    ppl_tokens: int = PPL_TOKENS

    def __post_init__(self):
        if self.max_ppl_cost is not None and not (0 <= self.max_ppl_cost < math.inf):
            raise QuantizationError(f"max_ppl_cost (--max-ppl-cost) must be a finite number "
                                    f">= 0 (relative), got {self.max_ppl_cost}")
        if self.rows < 1:
            raise QuantizationError(f"rows must be >= 1, got {self.rows}")
        if self.ppl_tokens < 2 * self.rows:
            raise QuantizationError(f"ppl_tokens (--ppl-tokens) must be at least "
                                    f"{2 * self.rows} (two steps of {self.rows} columns), got "
                                    f"{self.ppl_tokens}")


def check_choice(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise QuantizationError(f"quantize: {quantize!r} is not supported (choose from "
                                f"{', '.join(QUANTIZE_CHOICES)})")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer warns on the root logger about pre-processing (symbolic shape
    inference and graph optimization, which this graph does not need: its shapes are
    declared) and about every integer tensor it cannot quantize; neither is news."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(graph: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` (a float32 export) with its weight matrices quantized; raises
    QuantizationError if any float product with a constant weight is left, in any
    subgraph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="recur-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(graph, out, op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         extra_options={"EnableSubgraph": True})
        quantized = onnx.load(out)
    sort_topologically(quantized.graph)
    try:
        onnx.checker.check_model(quantized, full_check=True)
    except onnx.checker.ValidationError as error:
        raise QuantizationError(f"the quantized graph fails the ONNX checker: {error}; "
                                "nothing was written") from error
    left = [where for where, counts in quantized_products(quantized).items()
            if counts["float"]]
    if left:
        raise QuantizationError("ONNX Runtime's quantizer left float32 products (MatMul or "
                                f"Gemm) in {', '.join(left)}; nothing was written")
    return quantized


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """The names `graph` (a Loop body or If branch) reads from its enclosing graphs."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
        defined.update(node.output)
    return used - defined


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Orders `graph`'s nodes (and its subgraphs', in place) so that each comes after the
    producers of what it reads, counting what its subgraphs read from outside them, with
    the original order kept where it is free. The quantizer's own sort counts only a
    node's explicit inputs, so it moves a Loop before the Gemm whose output the body reads
    from the enclosing graph (microsoft/onnxruntime#18748): ONNX Runtime still loads such a
    graph, the ONNX checker refuses it."""
    for node in graph.node:
        for sub in _subgraphs(node):
            sort_topologically(sub)
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    needs = []
    for index, node in enumerate(nodes):
        reads = {name for name in node.input if name}
        for sub in _subgraphs(node):
            reads |= _outer_names(sub)
        needs.append({producer[name] for name in reads if name in producer} - {index})
    order: list[int] = []
    placed: set[int] = set()
    while len(order) < len(nodes):
        ready = next((i for i in range(len(nodes)) if i not in placed and needs[i] <= placed),
                     None)
        if ready is None:
            raise QuantizationError(f"graph {graph.name}: its nodes read each other in a cycle")
        order.append(ready)
        placed.add(ready)
    sorted_nodes = [copy.deepcopy(nodes[i]) for i in order]
    graph.ClearField("node")
    graph.node.extend(sorted_nodes)


def _graphs(graph: onnx.GraphProto, where: str = "main") -> Iterator[tuple[str, onnx.GraphProto]]:
    yield where, graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, f"{where}/{node.op_type}[{node.name or node.output[0]}]"
                                   f".{attr.name}")


def quantized_products(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Per graph (the main graph, then each Loop body and If branch by its path): how many
    int8 products (`int8`) and float32 ones (`float`: MatMul, Gemm) it holds."""
    found = {}
    for where, graph in _graphs(model.graph):
        ops = Counter(node.op_type for node in graph.node)
        found[where] = {"int8": sum(ops[op] for op in PRODUCTS),
                        "float": ops["MatMul"] + ops["Gemm"]}
    return found


def _node_summary(model: onnx.ModelProto) -> dict:
    """int8 products in all, in the recurrence's Loop bodies (the Loops of the main graph)
    and in the output head (the If's branches, its chunked Loop's body included)."""
    products = quantized_products(model)

    def int8_in(keep) -> int:
        return sum(c["int8"] for where, c in products.items() if keep(where))

    return {"int8_products": int8_in(lambda where: True),
            "in_recurrence_bodies": int8_in(lambda where: where.count("/") == 1
                                            and where.startswith("main/Loop[")),
            "in_output_head": int8_in(lambda where: where.startswith("main/If[")),
            "float_products": sum(c["float"] for c in products.values()),
            "per_graph": products}


# -- measurements --------------------------------------------------------------------------
def compare(float32: ModelRuntime, int8: ModelRuntime, seed: int = 0, cases=CASES) -> dict:
    """The int8 graph against the float32 one on the verification inputs: per output, the
    largest absolute difference (greedy_tokens: the float32 log-prob its choices give up),
    how often the two greedy tokens agree, and how far the int8 log-probs of a batch's
    first row move when it runs alone (activations are quantized with the range of the
    whole call, so an int8 row's numbers depend on the rows it is batched with; float32's
    do not)."""
    worst: dict[str, float] = {}
    agree = positions = 0
    batch_dependence = 0.0
    for tokens, lengths, state, targets in verification_inputs(
            len(float32.vocab), float32.layers, float32.state_size, float32.incremental,
            seed, cases):
        valid = _valid_mask(lengths, tokens.shape[1])
        names = float32.output_names
        reference = _graph_outputs(float32, tokens, lengths, state, targets, names)
        ours = _graph_outputs(int8, tokens, lengths, state, targets, names)
        # float32's log-probs at int8's greedy tokens: what following int8 gives up
        at_ours = float32.run_lm(tokens.numpy(), lengths.numpy(),
                                 None if state is None else state.numpy(),
                                 np.clip(ours["greedy_tokens"], 0, len(float32.vocab) - 1))
        for key in ours:
            if key == "greedy_tokens":
                diff = reference["greedy_logprobs"] - at_ours.token_logprobs
                agree += int((ours[key] == reference[key])[valid].sum())
                positions += int(valid.sum())
            else:
                diff = np.abs(ours[key].astype(np.float64) - reference[key])
            diff = diff[valid] if diff.shape == valid.shape else diff
            worst[key] = max(worst.get(key, 0.0), float(np.max(diff)))
        if tokens.shape[0] > 1:
            steps = int(lengths[0])  # the first row is full length
            alone = int8.run_lm(tokens[:1].numpy(), lengths[:1].numpy(),
                                None if state is None else state[:, :1].numpy(),
                                targets[:1].numpy())
            batch_dependence = max(
                batch_dependence,
                float(np.abs(alone.token_logprobs[0, :steps]
                             - ours["token_logprobs"][0, :steps]).max()),
                float(np.abs(alone.next_logprobs[0] - ours["next_logprobs"][0]).max()))
    report = {"reference": "the float32 graph through the same runtime",
              "cases": [list(c) for c in cases], "max_abs_diff": worst,
              "max_logprob_diff": max(worst[k] for k in LOGPROB_OUTPUTS if k in worst),
              "batch_dependence": batch_dependence,
              "batch_dependence_measure": ("int8 log-probs of each case's first row run alone "
                                           "against the same row run in its batch")}
    if "greedy_tokens" in worst:
        report["greedy_tokens_measure"] = ("float32 log-prob given up: float32's max minus "
                                           "its log-prob at int8's chosen token")
        report["greedy_agreement"] = agree / positions
    return report


def stream_perplexity(runtime: ModelRuntime, stream: Sequence[int], rows: int,
                      window: int = WINDOW) -> dict:
    """Perplexity of a token stream laid out in `rows` parallel columns and read from the
    initial state with the state carried, as training evaluates a language model
    (tasks.py), here through the serving runtime: `window` steps a call."""
    data = columns(stream, rows).numpy()
    state, nll, count = runtime.initial_state(rows), 0.0, 0
    for start in range(0, data.shape[1] - 1, window):
        targets = data[:, start + 1 : start + 1 + window]
        inputs = data[:, start : start + targets.shape[1]]
        step = runtime.run_lm(inputs, np.full(rows, inputs.shape[1], np.int64), state, targets)
        nll -= float(step.token_logprobs.astype(np.float64).sum())
        count += targets.size
        state = step.state
    return {"ppl": math.exp(min(nll / count, 700.0)), "tokens": count}


def perplexity_cost(float32: ModelRuntime, int8: ModelRuntime, stream: Sequence[int],
                    rows: int, tokens: int) -> dict:
    """Both graphs' perplexity on the first ~`tokens` tokens of `stream` and the relative
    cost of int8: ppl_int8 / ppl_float32 - 1."""
    head = list(stream[: tokens + rows])  # columns of n steps score rows * (n - 1) tokens
    if len(head) < 2 * rows:
        raise QuantizationError(f"the validation split has {len(head)} tokens: too few to "
                                f"measure a perplexity in {rows} columns")
    reference, ours = (stream_perplexity(r, head, rows) for r in (float32, int8))
    return {"validation_ppl_float32": reference["ppl"], "validation_ppl_int8": ours["ppl"],
            "relative_ppl_cost": ours["ppl"] / reference["ppl"] - 1.0,
            "tokens": reference["tokens"], "token_cap": tokens, "columns": rows}


# -- the export ----------------------------------------------------------------------------
def _add_metadata(staging: Path, extra: dict) -> None:
    """Adds keys to a staged artifact's metadata.json (in write_artifact's layout); the
    graph and so its recorded sha256 are unchanged."""
    path = staging / METADATA_FILE
    metadata = {**json.loads(path.read_text()), **extra}
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    load_artifact(staging)


def export_int8(model: torch.nn.Module, graph: onnx.ModelProto, out: str | Path,
                vocab: Vocabulary, labels: LabelSet | None, metadata: dict,
                options: Int8Options) -> tuple[Path, dict, dict]:
    """The int8 artifact REPO/NAME/VERSION of `model`, whose checked float32 graph is
    `graph`. Before it is published (write_artifact's check, on the staged directory): the
    float32 graph is verified against torch as a float32 export is, the int8 graph is
    compared with it on the same inputs, and both score the validation stream; a relative
    perplexity cost above options.max_ppl_cost refuses it. Returns (path, metadata,
    verification report)."""
    if not isinstance(model, RecurrentLM):
        raise QuantizationError(
            f"int8 export is for language models only (this is a {metadata.get('task')} "
            "model): its acceptance test is the validation perplexity cost, and taggers and "
            "classifiers have no accuracy check here; export it in float32")
    quantized = quantize_int8(graph)
    nodes = _node_summary(quantized)
    full = {**metadata, "opset": max(o.version for o in quantized.opset_import
                                     if o.domain in ("", "ai.onnx"))}
    report: dict = {}
    quantization: dict = {}

    def check(staging: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="recur-float32-") as tmp:
            reference = write_artifact(Path(tmp) / "float32" / "1", graph.SerializeToString(),
                                       vocab, labels, metadata)
            float32 = ModelRuntime(reference, device="cpu")
            float32_sha256 = float32.artifact.metadata["onnx_sha256"]
            report["float32"] = verify(model, float32)
            int8 = ModelRuntime(staging, device="cpu")
            report["int8_vs_float32"] = compare(float32, int8)
            try:
                stream = options.validation()
            except (CorpusError, FileNotFoundError, ValueError) as error:  # no valid split
                raise QuantizationError(f"int8 export measures its perplexity cost on the "
                                        f"validation split, which could not be read: {error}"
                                        ) from error
            cost = perplexity_cost(float32, int8, stream, options.rows, options.ppl_tokens)
        quantization.update({
            "scheme": SCHEME, "onnxruntime": onnxruntime.__version__,
            **cost, "max_ppl_cost": options.max_ppl_cost, "split": "valid",
            "max_logprob_diff": report["int8_vs_float32"]["max_logprob_diff"],
            "greedy_agreement": report["int8_vs_float32"].get("greedy_agreement"),
            "batch_dependence": report["int8_vs_float32"]["batch_dependence"],
            "nodes": {k: v for k, v in nodes.items() if k != "per_graph"},
            "float32_onnx_sha256": float32_sha256})
        report["int8_vs_float32"]["nodes"] = nodes
        report["perplexity"] = cost
        bound = options.max_ppl_cost
        if bound is not None and not quantization["relative_ppl_cost"] <= bound:
            raise QuantizationError(
                f"int8 quantization costs {100 * cost['relative_ppl_cost']:.3g}% validation "
                f"perplexity (float32 {cost['validation_ppl_float32']:.3f}, int8 "
                f"{cost['validation_ppl_int8']:.3f}, on {cost['tokens']:,} tokens of the "
                f"valid split), above the allowed {100 * bound:.3g}% "
                "(--max-ppl-cost); nothing was written")
        _add_metadata(staging, {"quantization": quantization})

    path = write_artifact(out, quantized.SerializeToString(), vocab, labels, full, check)
    return path, {**full, "quantization": quantization}, report

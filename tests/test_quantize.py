"""`recur export --quantize int8`: ONNX Runtime's dynamic quantization reaches the Loop
bodies and the output head, the artifact serves unchanged within the tolerance it records,
its perplexity cost is measured, and a cost above the bound publishes nothing."""

import contextlib
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.model.runtime import ModelRuntime
from serving.model.tokenizer import PAD, UNK, LabelSet, Normalization, Vocabulary
from training.cli import export_command
from training.export import export_model, export_run
from training.export.graph import build_graph
from training.export.quantize import Int8Options, QuantizationError
from training.models.encoders import RecurrentTagger
from training.models.language_model import RecurrentLM

FLOAT_PRODUCTS = {"MatMul", "Gemm"}


def _bodies(graph: onnx.GraphProto):
    """(op_type of the node, attribute name, subgraph) for each subgraph of `graph`'s nodes."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield node.op_type, attr.name, attr.g


def _all_ops(graph: onnx.GraphProto) -> list[str]:
    ops = [node.op_type for node in graph.node]
    for _, _, sub in _bodies(graph):
        ops += _all_ops(sub)
    return ops


@pytest.fixture(scope="module")
def exported(demo_lm_run, tmp_path_factory):
    """The demo LM exported as float32 (version 1) and, through the CLI, as int8 (2)."""
    root = tmp_path_factory.mktemp("int8") / "demo-lm"
    export_run(demo_lm_run, root / "1")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_command([str(demo_lm_run), "--out", str(root / "2"), "--quantize", "int8"])
    assert code == 0
    return root / "1", root / "2", printed.getvalue()


def test_every_weight_product_is_int8_loop_bodies_and_output_head_included(exported, tmp_path):
    _, int8, printed = exported
    assert "int8" in printed and "validation ppl" in printed
    graph = onnx.load(int8 / "model.onnx")
    onnx.checker.check_model(graph, full_check=True)
    assert not FLOAT_PRODUCTS & set(_all_ops(graph.graph))
    recurrences = [sub for op, _, sub in _bodies(graph.graph) if op == "Loop"]
    (head,) = [node for node in graph.graph.node if node.op_type == "If"]
    assert len(recurrences) == 1  # the demo LM: one LSTM layer
    for body in recurrences:  # the recurrent product, once per step
        assert [n.op_type for n in body.node].count("MatMulInteger") == 1
    whole, chunked = (next(a.g for a in head.attribute if a.name == name)
                      for name in ("then_branch", "else_branch"))
    (chunk_loop,) = [sub for op, _, sub in _bodies(chunked) if op == "Loop"]
    for output_projection in (whole, chunk_loop):
        assert "MatMulInteger" in [n.op_type for n in output_projection.node]
    # as ONNX Runtime runs it: each product one fused int8 kernel, in the bodies too
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8 / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert _all_ops(optimized.graph).count("DynamicQuantizeMatMul") == 4
    body = next(sub for op, _, sub in _bodies(optimized.graph) if op == "Loop")
    assert "DynamicQuantizeMatMul" in [n.op_type for n in body.node]
    assert (int8 / "model.onnx").stat().st_size < 0.4 * (exported[0] / "model.onnx").stat().st_size


def test_the_int8_artifact_serves_within_the_tolerance_it_records(exported, synth_dir):
    float32_path, int8_path, _ = exported
    float32, int8 = ModelRuntime(float32_path), ModelRuntime(int8_path)
    metadata = int8.artifact.metadata
    quantization = metadata["quantization"]
    tolerance = quantization["max_logprob_diff"]
    assert 0 < tolerance < 0.5
    # per-tensor activation ranges: a row's int8 log-probs depend on its batch (docs)
    assert 0 < quantization["batch_dependence"] < 0.5
    report = json.loads((int8_path / "verification.json").read_text())
    assert max(report["float32"]["max_abs_diff"].values()) <= 1e-4  # vs torch, as ever
    assert report["int8_vs_float32"]["max_logprob_diff"] == tolerance
    # real sentences through the serving scoring path, both artifacts
    lines = (synth_dir / "lm" / "valid.txt").read_text().splitlines()[:64]
    ids = [int8.vocab.encode(line, add_eos=True) for line in lines]
    ours, reference = int8.score(ids), float32.score(ids)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference))
    assert 0 < worst <= tolerance
    # the greedy outputs: present, and greedy_logprobs is the log-prob of greedy_tokens
    tokens = np.array([row[:12] for row in ids if len(row) >= 12])
    lengths = np.full(len(tokens), tokens.shape[1])
    step = int8.run_lm(tokens, lengths)
    assert int8.has_greedy and step.greedy_tokens.shape == tokens.shape
    again = int8.run_lm(tokens, lengths, None, step.greedy_tokens)
    np.testing.assert_array_equal(again.token_logprobs, step.greedy_logprobs)
    reference_step = float32.run_lm(tokens, lengths)
    assert (step.greedy_tokens == reference_step.greedy_tokens).mean() > 0.95
    assert np.abs(step.greedy_logprobs - reference_step.greedy_logprobs).max() <= tolerance


def test_a_server_serves_the_int8_version_within_its_tolerance_of_float32(exported):
    """The server runs a text in other calls than ModelRuntime.score (from the state after
    `<eos>`, batched with whatever else is queued): float32 gives the same log-probs there,
    int8 does not (activations are quantized with the range of the whole call), but stays
    within the tolerance it recorded of float32."""
    from serving_helpers import RunningServer

    float32_path, int8_path, _ = exported
    int8 = ModelRuntime(int8_path)
    tolerance = int8.artifact.metadata["quantization"]["max_logprob_diff"]
    text = "the old dogs that see a cat sleep"
    reference = ModelRuntime(float32_path).score([int8.vocab.encode(text, add_eos=True)])[0]
    server = RunningServer(float32_path.parent.parent, version_policy="all")
    try:
        assert {(m.version, m.ready) for m in server.client.list_models()} == {(1, True),
                                                                               (2, True)}
        served = {version: np.array([t.logprob for t in score.tokens])
                  for version in (1, 2)
                  for (score,) in [server.client.score("demo-lm", [text], version=version)]}
    finally:
        server.stop()
    np.testing.assert_allclose(served[1], reference, atol=1e-4)
    assert 0 < np.abs(served[2] - reference).max() <= tolerance


def test_the_perplexity_cost_is_measured_on_the_validation_split(exported):
    float32_path, int8_path, _ = exported
    metadata = json.loads((int8_path / "metadata.json").read_text())
    q = metadata["quantization"]
    # the whole split (15,330 tokens < the 20,000 cap) in the run's 10 columns: the
    # float32 graph gives the perplexity training measured with torch (summary.json)
    assert q["token_cap"] == 20_000 and q["tokens"] == metadata["validation"]["tokens"]
    assert q["validation_ppl_float32"] == pytest.approx(metadata["validation"]["ppl"], rel=1e-5)
    assert q["relative_ppl_cost"] == pytest.approx(
        q["validation_ppl_int8"] / q["validation_ppl_float32"] - 1)
    assert abs(q["relative_ppl_cost"]) <= q["max_ppl_cost"] == 0.02
    assert q["nodes"]["float_products"] == 0 and q["nodes"]["in_recurrence_bodies"] == 1
    assert "per output column" in q["scheme"]
    assert q["float32_onnx_sha256"] == json.loads(
        (float32_path / "metadata.json").read_text())["onnx_sha256"]


def test_a_cost_above_the_bound_is_refused_and_nothing_is_published(exported, demo_lm_run,
                                                                     tmp_path):
    _, int8, _ = exported
    cost = json.loads((int8 / "metadata.json").read_text())["quantization"]["relative_ppl_cost"]
    assert cost > 0, "int8 came out no worse than float32: a bound of 0 cannot refuse it"
    out = tmp_path / "repo" / "demo-lm" / "1"
    with pytest.raises(QuantizationError, match=r"above the allowed 0%.*nothing was written"):
        export_run(demo_lm_run, out, "int8", max_ppl_cost=0.0, ppl_tokens=4_000)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no staging left either


def test_bad_quantize_requests_are_refused_before_anything_is_written(demo_lm_run, tmp_path,
                                                                      capsys):
    out = tmp_path / "repo" / "m" / "1"
    with pytest.raises(QuantizationError, match="'int4' is not supported"):
        export_run(demo_lm_run, out, "int4")
    for argv, says in ((["--quantize", "int4"], "invalid choice: 'int4'"),
                       (["--max-ppl-cost", "0.1"], "apply only with --quantize int8"),
                       (["--quantize", "int8", "--max-ppl-cost", "-1"], "finite fraction >= 0"),
                       (["--quantize", "int8", "--max-ppl-cost", "nan"], "finite fraction")):
        with pytest.raises(SystemExit) as done:
            export_command([str(demo_lm_run), "--out", str(out), *argv])
        assert done.value.code == 2 and says in capsys.readouterr().err
    assert not out.parent.exists()


def test_taggers_are_refused_int8(tmp_path):
    torch.manual_seed(0)
    tagger = RecurrentTagger(20, 3, 0, "lstm", 8, 8, bidirectional=False).eval()
    vocab = Vocabulary([PAD, UNK] + [f"w{i}" for i in range(18)], Normalization())
    with pytest.raises(QuantizationError, match="language models only"):
        export_model(tagger, tmp_path / "t" / "1", vocab, LabelSet(["A", "B", "C"]),
                     int8=Int8Options(lambda: list(range(100))))
    assert not (tmp_path / "t").exists()


def test_onnx_runtime_quantizes_loop_bodies_only_with_enable_subgraph(tmp_path):
    """Why quantize.py passes EnableSubgraph: by default the recurrent product in the Loop
    body (and the output head, in the If's branches) would stay float32."""
    from onnxruntime.quantization import quantize_dynamic

    torch.manual_seed(0)
    graph = build_graph(RecurrentLM(30, "gru", 8, 8, 1).eval())
    quantize_dynamic(graph, tmp_path / "default.onnx")
    default = onnx.load(tmp_path / "default.onnx")
    body = next(sub for op, _, sub in _bodies(default.graph) if op == "Loop")
    assert "MatMul" in [n.op_type for n in body.node]
    assert "MatMulInteger" in [n.op_type for n in default.graph.node]  # outside: quantized

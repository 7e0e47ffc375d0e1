"""`recur export`: a trained run becomes a verified model artifact (serving/model/artifact.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import onnx

from serving.model.artifact import write_artifact
from serving.model.runtime import ModelRuntime
from serving.model.tokenizer import LabelSet, Vocabulary
from training.evaluate import load_run
from training.export.graph import OPSET, build_graph
from training.export.quantize import (
    MAX_PPL_COST,
    PPL_TOKENS,
    Int8Options,
    check_choice,
    export_int8,
)
from training.export.verify import verify
from training.models.encoders import RecurrentTagger
from training.models.language_model import RecurrentLM


class ExportError(ValueError):
    pass


def model_metadata(model, graph: onnx.ModelProto, vocab: Vocabulary | None = None) -> dict:
    """What an artifact says about the network itself, read off the model and its graph."""
    stack = model.stack
    h0 = None
    if stack.forward_layers[0].h0 is not None and not stack.bidirectional:
        h0 = [layer.h0.detach().tolist() for layer in stack.forward_layers]
    return {
        "cell": stack.cell, "layers": stack.num_layers,
        "embedding_size": model.embedding.weight.shape[1], "hidden_size": stack.hidden_size,
        "state_size": stack.state_size, "bidirectional": stack.bidirectional,
        "state_layout": "[layers, batch, state_size]; LSTM packs [h ; c], so state_size = 2H",
        "initial_state": h0,
        **({"output_layer": _output_layer(model)} if isinstance(model, RecurrentLM) else {}),
        **({"characters": _characters(model.chars, vocab)}
           if getattr(model, "chars", None) is not None else {}),
        "inputs": [i.name for i in graph.graph.input],
        "outputs": [o.name for o in graph.graph.output], "opset": OPSET,
    }


def _characters(chars, vocab: Vocabulary | None) -> dict:
    """A character-aware encoder's CNN, which reads the "chars" input (vocab.json's
    spelling gives each word's ids: the artifact loader checks the two agree)."""
    spelling = None if vocab is None else vocab.spelling
    if spelling is None or chars.embedding.weight.shape[0] != len(spelling):
        raise ExportError(f"the character CNN has {chars.embedding.weight.shape[0]} character "
                          f"ids, the vocabulary's spelling "
                          f"{'none' if spelling is None else len(spelling)}")
    return {"embedding_size": chars.embedding.weight.shape[1], "filters": chars.filters,
            "width": chars.conv.kernel_size[0], "characters": len(spelling),
            "max_word_length": spelling.max_word_length}


def _output_layer(model: RecurrentLM) -> dict:
    if not model.adaptive:
        return {"type": "softmax"}
    return {"type": "adaptive", "cutoffs": list(model.output.cutoffs[:-1]),
            "div_value": float(model.output.div_value)}


def export_model(model, out: str | Path, vocab: Vocabulary, labels: LabelSet | None = None,
                 metadata: dict | None = None, verified: bool = True,
                 int8: Int8Options | None = None) -> tuple[Path, dict, dict]:
    """A recurrent network as the artifact REPO/NAME/VERSION: the graph built from its
    weights and checked, the network's metadata (plus `metadata`), and, unless `verified`
    is False, its verification against torch through the serving runtime before anything
    is published. With `int8`, the graph published is that graph quantized, always
    verified (quantize.py). Returns (path, metadata, verification report: {} when
    unverified)."""
    graph = build_graph(model, name=Path(out).parent.name or "recur")
    onnx.checker.check_model(graph, full_check=True)
    task = ("lm" if isinstance(model, RecurrentLM) else
            "tag" if isinstance(model, RecurrentTagger) else "classify")
    full = {
        **model_metadata(model, graph, vocab), "task": task,
        "pooling": model.pooling if task == "classify" else None, "vocab_size": len(vocab),
        "num_labels": len(labels) if labels is not None else None,
        "special_tokens": {"eos": vocab.eos_id, "unk": vocab.unk_id, "pad": vocab.pad_id},
        **(metadata or {}),
    }
    if int8 is not None:
        return export_int8(model, graph, out, vocab, labels, full, int8)
    report: dict = {}

    def check(staging: Path) -> None:
        report.update(verify(model, ModelRuntime(staging, device="cpu")))

    path = write_artifact(out, graph.SerializeToString(), vocab, labels, full,
                          check if verified else None)
    return path, full, report


def export_run(run_dir: str | Path, out: str | Path, quantize: str | None = None,
               max_ppl_cost: float | None = MAX_PPL_COST, ppl_tokens: int = PPL_TOKENS) -> dict:
    """Builds the graph, checks it, verifies it against torch through the serving runtime,
    and only then publishes REPO/NAME/VERSION. With quantize="int8" (a language model),
    the graph published is quantized and refused when it costs more than `max_ppl_cost`
    (relative) perplexity on the first `ppl_tokens` of the run's validation split.
    Returns the artifact's metadata."""
    check_choice(quantize)
    run_dir = Path(run_dir)
    config, task, model = load_run(run_dir, device="cpu")
    if config.model.type != "rnn":
        raise ExportError(f"{run_dir}: model.type '{config.model.type}' is a baseline without a "
                          "recurrence; only recurrent models are exported")
    int8 = None
    if quantize == "int8":
        int8 = Int8Options(lambda: task.stream("valid"), config.train.eval_batch_size,
                           max_ppl_cost, ppl_tokens)
    summary = run_dir / "summary.json"
    path, metadata, report = export_model(model, out, task.vocab, task.labels, {
        "tied": config.model.tie_weights, "training_config": config.to_dict(),
        "validation": (json.loads(summary.read_text())["valid"]
                       if summary.exists() else None),
        "source_run": str(run_dir.resolve()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, int8=int8)
    (path / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    return {**metadata, "verification": report, "path": str(path)}

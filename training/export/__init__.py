"""`recur export`: a trained run becomes a verified model artifact (serving/model/artifact.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import onnx

from serving.model.artifact import write_artifact
from serving.model.runtime import ModelRuntime
from training.evaluate import load_run
from training.export.graph import OPSET, build_graph
from training.export.verify import verify


class ExportError(ValueError):
    pass


def model_metadata(model, graph: onnx.ModelProto) -> dict:
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
        "inputs": [i.name for i in graph.graph.input],
        "outputs": [o.name for o in graph.graph.output], "opset": OPSET,
    }


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Builds the graph, checks it, verifies it against torch through the serving runtime,
    and only then publishes REPO/NAME/VERSION. Returns the artifact's metadata."""
    run_dir = Path(run_dir)
    config, task, model = load_run(run_dir, device="cpu")
    if config.model.type != "rnn":
        raise ExportError(f"{run_dir}: model.type '{config.model.type}' is a baseline without a "
                          "recurrence; only recurrent models are exported")
    graph = build_graph(model, name=Path(out).parent.name or "recur")
    onnx.checker.check_model(graph, full_check=True)
    summary = run_dir / "summary.json"
    vocab = task.vocab
    metadata = {
        **model_metadata(model, graph), "task": config.data.task,
        "pooling": config.model.pooling if config.data.task == "classify" else None,
        "tied": config.model.tie_weights, "vocab_size": len(vocab),
        "num_labels": len(task.labels) if task.labels is not None else None,
        "special_tokens": {"eos": vocab.eos_id, "unk": vocab.unk_id, "pad": vocab.pad_id},
        "training_config": config.to_dict(),
        "validation": (json.loads(summary.read_text())["valid"]
                       if summary.exists() else None),
        "source_run": str(run_dir.resolve()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report = {}

    def check(staging: Path) -> None:
        report.update(verify(model, ModelRuntime(staging, device="cpu")))

    path = write_artifact(out, graph.SerializeToString(), vocab, task.labels, metadata, check)
    (path / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    return {**metadata, "verification": report, "path": str(path)}

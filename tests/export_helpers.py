"""Writing an artifact for a model made in a test, as `recur export` would."""

from pathlib import Path

from serving.artifact import write_artifact
from serving.tokenizer import EOS, PAD, UNK, LabelSet, Normalization, Vocabulary
from training.export.graph import build_graph
from training.models.language_model import RecurrentLM


def save_model(model, out: Path, vocab: Vocabulary | None = None) -> Path:
    size = model.embedding.weight.shape[0]
    is_lm = isinstance(model, RecurrentLM)
    specials = [UNK, EOS] if is_lm else [PAD, UNK]
    vocab = vocab or Vocabulary(specials + [f"w{i}" for i in range(size - 2)], Normalization())
    labels = None if is_lm else LabelSet([f"L{i}" for i in range(model.output.weight.shape[0])])
    graph = build_graph(model)
    stack = model.stack
    h0 = None
    if stack.forward_layers[0].h0 is not None and not stack.bidirectional:
        h0 = [layer.h0.detach().tolist() for layer in stack.forward_layers]
    metadata = {"task": "lm" if is_lm else ("tag" if labels and "Tagger" in type(model).__name__
                                            else "classify"),
                "cell": stack.cell, "layers": stack.num_layers, "embedding_size": 0,
                "hidden_size": stack.hidden_size, "state_size": stack.state_size,
                "bidirectional": stack.bidirectional, "vocab_size": len(vocab),
                "num_labels": None if labels is None else len(labels), "initial_state": h0,
                "special_tokens": {"eos": vocab.eos_id, "unk": vocab.unk_id},
                "inputs": [i.name for i in graph.graph.input],
                "outputs": [o.name for o in graph.graph.output]}
    return write_artifact(out, graph.SerializeToString(), vocab, labels, metadata)

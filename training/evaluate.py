"""Loading a finished run and measuring it: split metrics, sentence scores, agreement probes."""

from __future__ import annotations

from pathlib import Path

import torch

from serving.model.tokenizer import Vocabulary
from training import checkpoint
from training.config import load_config
from training.models.ngram import KneserNey
from training.tasks import make_task
from training.train import device_of


def load_run(run_dir: str | Path, device: str | None = None):
    """(config, task, model with its best weights) of a run directory. Reads no corpus: the
    vocabulary, labels, config and weights are all in the run directory (only a count-based
    model is fitted from its training data); the task reads a split when it is evaluated."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.toml)")
    overrides = [f'train.device="{device}"'] if device else []
    config = load_config(run_dir / "config.toml", overrides)
    torch.set_num_threads(config.train.threads)
    task = make_task(config, run_dir)
    model = task.build_model()
    if not isinstance(model, KneserNey):
        target = device_of(config)
        model.load_state_dict(checkpoint.load(run_dir / checkpoint.BEST, target)["model"])
        model.to(target).eval()
    return config, task, model


@torch.inference_mode()
def sentence_logprobs(model: torch.nn.Module, vocab: Vocabulary, sentences: list[str],
                      add_eos: bool = True) -> list[float]:
    """log P(sentence) under the scoring convention: start from the state reached by reading
    `<eos>` from the zero state; the final `<eos>` is scored unless add_eos is False."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for text in sentences:
        ids = [vocab.eos_id] + vocab.encode(text, add_eos=add_eos)
        tokens = torch.tensor([ids], device=device)
        logits, _ = model(tokens[:, :-1])
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        scores.append(float(logprobs.gather(1, tokens[0, 1:, None]).sum()))
    return scores


def probe_accuracy(model: torch.nn.Module, vocab: Vocabulary, probes_path: str | Path) -> float:
    """Share of (grammatical, ungrammatical) pairs where the grammatical one scores higher."""
    pairs = [line.split("\t") for line in Path(probes_path).read_text().splitlines() if line]
    good = sentence_logprobs(model, vocab, [g for g, _ in pairs])
    bad = sentence_logprobs(model, vocab, [b for _, b in pairs])
    return sum(g > b for g, b in zip(good, bad)) / len(pairs)

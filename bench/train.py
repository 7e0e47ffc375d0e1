"""`make bench-train RECIPE=...`: train one recipe under its time budget and record the result.

Results are merged into bench/results/train.json (one entry per recipe), learning curves go
to bench/results/curves/, and the report is regenerated. For recurrent language models the
same process also measures training throughput of a reference model of the same size built
from torch's own nn.LSTM / nn.RNN / nn.GRU modules (the layout of PyTorch's
word_language_model example), so speed is reported as a ratio measured in one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import REPO, RESULTS, cpu, now
from bench.report import save_results
from training.config import Config, load_config
from training.evaluate import load_run
from training.train import device_of, train


class _TorchReferenceLM(nn.Module):
    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        m = config.model
        self.embedding = nn.Embedding(vocab_size, m.embedding_size)
        if m.cell.startswith("elman"):
            self.rnn = nn.RNN(m.embedding_size, m.hidden_size, m.layers, batch_first=True,
                              nonlinearity=m.cell.split("_")[1], dropout=m.dropout)
        else:
            cls = nn.LSTM if m.cell == "lstm" else nn.GRU
            self.rnn = cls(m.embedding_size, m.hidden_size, m.layers, batch_first=True,
                           dropout=m.dropout)
        if m.adaptive_cutoffs:
            self.output = nn.AdaptiveLogSoftmaxWithLoss(
                m.hidden_size, vocab_size, m.adaptive_cutoffs, div_value=m.adaptive_div_value,
                head_bias=True)
        else:
            self.output = nn.Linear(m.hidden_size, vocab_size)
        if m.tie_weights:
            self.output.weight = self.embedding.weight

    def forward(self, tokens, targets, reduction="mean"):
        """-> the mean negative log-likelihood of targets, as RecurrentLM's training loss."""
        out, _ = self.rnn(self.embedding(tokens))
        if isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss):
            return self.output(out.reshape(-1, out.shape[-1]), targets.reshape(-1)).loss, None
        logits = self.output(out)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), None


def step_times(model: nn.Module, config: Config, vocab_size: int, steps: int,
               seed: int) -> list[float]:
    """Seconds per SGD step on random windows of the recipe's batch shape."""
    t = config.train
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (t.batch_size, t.bptt + 1), generator=generator)
        started = time.perf_counter()
        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:], reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def compare_step_rates(ours: nn.Module, reference: nn.Module, config: Config, vocab_size: int,
                       rounds: int = 7, steps: int = 10) -> dict:
    """Training tokens per second of both models, measured in alternating rounds so that
    a burst of load on a shared machine hits both; the ratio is the median of the rounds'."""
    tokens_per_step = config.train.batch_size * config.train.bptt
    for model in (ours, reference):  # warm-up: allocator, kernels
        step_times(model, config, vocab_size, 3, seed=0)
    ours_rates, reference_rates = [], []
    for r in range(rounds):
        ours_rates.append(tokens_per_step / statistics.median(
            step_times(ours, config, vocab_size, steps, seed=r)))
        reference_rates.append(tokens_per_step / statistics.median(
            step_times(reference, config, vocab_size, steps, seed=r)))
    ratios = [a / b for a, b in zip(ours_rates, reference_rates, strict=True)]
    return {"ours_tokens_per_s": round(statistics.median(ours_rates)),
            "torch_modules_tokens_per_s": round(statistics.median(reference_rates)),
            "ratio": round(statistics.median(ratios), 3)}


def run(recipe: str, minutes: float | None, overrides: list[str]) -> dict:
    config = load_config(recipe, overrides + ([f"train.max_minutes={minutes}"] if minutes else []))
    torch.set_num_threads(config.train.threads)
    run_dir = REPO / "runs" / f"bench-{recipe}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result: dict = {"recipe": recipe, "date": now(),
                    "machine": f"{cpu()}, "
                               f"{config.train.threads} threads, torch {torch.__version__}",
                    "budget_minutes": config.train.max_minutes, "overrides": overrides}
    started = time.monotonic()
    summary = train(config, run_dir)
    result["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    _, task, model = load_run(run_dir)
    result["test"] = task.evaluate(model, "test", device_of(config))
    result["valid"] = summary["valid"]
    metrics = run_dir / "metrics.jsonl"  # count-based models have no training steps
    records = ([json.loads(line) for line in metrics.read_text().splitlines()]
               if metrics.exists() else [])
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    result.update(epochs=epochs_trained(records),
                  steps=summary["steps"], train_tokens=summary["tokens"],
                  parameters=summary.get("parameters"),
                  median_train_tokens_per_s=round(statistics.median(rates)) if rates else None)
    if config.data.task == "lm" and config.model.type == "rnn":
        result["throughput_vs_torch_modules"] = compare_step_rates(
            task.build_model(), _TorchReferenceLM(config, len(task.vocab)), config,
            len(task.vocab))
    curves = RESULTS / "curves"
    curves.mkdir(parents=True, exist_ok=True)
    if (run_dir / "learning_curve.png").exists():
        shutil.copy(run_dir / "learning_curve.png", curves / f"{recipe}.png")
    return result


def epochs_trained(records: list[dict]) -> float:
    """Epochs as training tokens over one epoch's tokens: a time budget can stop mid-epoch."""
    valid = [r for r in records if r["split"] == "valid"]
    if not valid:
        return 0.0
    return round(valid[-1]["tokens"] / valid[0]["tokens"], 1)


def save(result: dict) -> None:
    path = RESULTS / "train.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[result["recipe"]] = result
    save_results("train", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--minutes", type=float, help="override the recipe's time budget")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    save(run(args.recipe, args.minutes, args.set))


if __name__ == "__main__":
    main()

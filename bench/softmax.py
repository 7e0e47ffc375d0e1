"""`make bench-softmax`: fewer FLOPs per token. Two trained language models that differ
only in their output layer (ptb-lstm's tied full softmax, ptb-lstm-adaptive's adaptive
softmax), each exported in float32 and in int8, all four through the serving runtime:
scoring tokens/s on the test split, the four taking turns in rounds, one-token steps, and
test perplexity.

    python -m bench.softmax                    # runs/ptb-lstm and runs/ptb-lstm-adaptive
    python -m bench.softmax --pair FULL_RUN ADAPTIVE_RUN [--pair ...]
    python -m bench.softmax --dry-run          # tiny random models, one round; writes nothing

Train the two first with the same budget (make bench-train RECIPE=ptb-lstm, then
RECIPE=ptb-lstm-adaptive; or `recur train --config ... --set train.max_minutes=N`). The
runs of a pair read PTB through their configs from RECUR_DATA (default ../shared/data),
and must share their vocabulary, so every side scores the same ids. Each pair is measured
on its own, one after the other. Results go to
bench/results/softmax.json and the report (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import REPO, cpu, now
from bench.scoring import add_timing_flags, check_timing_flags, timed_rounds
from serving.model.runtime import ModelRuntime
from serving.model.tokenizer import EOS, UNK, Normalization, Vocabulary
from training.export import export_model, export_run
from training.export.quantize import Int8Options, stream_perplexity
from training.models.language_model import RecurrentLM

DEFAULT_FULL = REPO / "runs" / "ptb-lstm"
DEFAULT_ADAPTIVE = REPO / "runs" / "ptb-lstm-adaptive"
SIDES = ("full", "full_int8", "adaptive", "adaptive_int8")
BASELINE = "full"


def _exports_of_run(run: Path, root: Path) -> tuple[Path, Path, dict]:
    float32 = export_run(run, root / "float32" / "1")
    int8 = export_run(run, root / "int8" / "1", quantize="int8", max_ppl_cost=None)
    return Path(float32["path"]), Path(int8["path"]), int8


def _tiny_exports(root: Path, adaptive: bool) -> tuple[Path, Path, dict]:
    """--dry-run: a random 1 x 32 LSTM over 200 ids."""
    torch.manual_seed(0)
    model = RecurrentLM(200, "lstm", 32, 32, 1, tie_weights=not adaptive,
                        adaptive_cutoffs=[40, 120] if adaptive else ()).eval()
    vocab = Vocabulary([UNK, EOS] + [f"w{i}" for i in range(198)], Normalization())
    ids = np.random.default_rng(1).integers(0, 200, 400).tolist()
    tied = {"tied": not adaptive}  # as export_run records a run's
    float32 = export_model(model, root / "float32" / "1", vocab, metadata=tied)[0]
    int8, metadata, _ = export_model(model, root / "int8" / "1", vocab, metadata=tied,
                                     int8=Int8Options(lambda: ids, rows=4, max_ppl_cost=None,
                                                      ppl_tokens=200))
    return float32, int8, metadata


def measure(paths: dict[str, Path], speed_ids: list[int], args) -> dict:
    """Every side in every round, the order rotating; medians over the rounds, each ratio
    the median of the per-round ratios to the full softmax in float32."""
    def rotating(names: list[str], round_index: int) -> list[str]:
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        return order[::-1] if round_index % 2 else order

    rates, steps = timed_rounds(paths, speed_ids, args, rotating)
    names = list(paths)
    sides = {}
    for name in names:
        speedups = [ours / base for ours, base in zip(rates[name], rates[BASELINE])]
        sides[name] = {
            "score_tokens_per_s": statistics.median(rates[name]),
            "score_tokens_per_s_per_round": rates[name],
            "score_speedup": statistics.median(speedups),
            "score_speedup_per_round": speedups,
            "step_b1_ms": statistics.median(steps[name]),
            "step_b1_speedup": statistics.median(
                [base / ours for ours, base in zip(steps[name], steps[BASELINE])]),
            "onnx_mb": (paths[name] / "model.onnx").stat().st_size / 1e6}
    return sides


def measure_pair(full: Path | None, adaptive: Path | None, root: Path, args) -> dict:
    """One pair (None, None: --dry-run's tiny random models): the four exports, their
    speed in rounds and their test perplexity."""
    paths, models, test = {}, {}, None
    for kind, run in (("full", full), ("adaptive", adaptive)):
        if run is None:
            float32, int8, meta = _tiny_exports(root / kind, kind == "adaptive")
        else:
            float32, int8, meta = _exports_of_run(run, root / kind)
        paths[kind], paths[f"{kind}_int8"] = float32, int8
        models[kind] = {"run": None if run is None else str(run),
                        "output_layer": meta["output_layer"],
                        "layers": meta["layers"], "hidden": meta["hidden_size"],
                        "vocab": meta["vocab_size"], "tied": meta.get("tied"),
                        "validation": meta.get("validation"),
                        "int8_validation_ppl_cost": meta["quantization"]["relative_ppl_cost"]}
    if full is None:
        speed_ids = np.random.default_rng(2).integers(0, 200, args.speed_tokens).tolist()
    else:
        from training.evaluate import load_run

        config, full_task, _ = load_run(full, device="cpu")
        _, adaptive_task, _ = load_run(adaptive, device="cpu")
        if full_task.vocab.tokens != adaptive_task.vocab.tokens:
            raise SystemExit(f"{full} and {adaptive} have different vocabularies: train both "
                             "on the same data")
        stream = full_task.stream("test")
        speed_ids = stream[: args.speed_tokens]
        scored = stream[: args.ppl_tokens or None]
        rows = config.train.eval_batch_size
        figures = {name: stream_perplexity(ModelRuntime(path, threads=args.threads), scored,
                                           rows) for name, path in paths.items()}
        test = {"split": config.data.test, "columns": rows,
                "tokens": figures[BASELINE]["tokens"],
                "perplexity": {name: f["ppl"] for name, f in figures.items()}}
        test["relative_ppl_cost"] = {name: ppl / test["perplexity"][BASELINE] - 1.0
                                     for name, ppl in test["perplexity"].items()}
    return {"models": models, "speed_tokens": len(speed_ids),
            "sides": measure(paths, speed_ids, args), "test": test}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, type=Path, action="append",
                        metavar=("FULL_RUN", "ADAPTIVE_RUN"),
                        help="a run with the full softmax and one with the adaptive softmax, "
                             "trained alike; repeat for more pairs (default: runs/ptb-lstm "
                             "runs/ptb-lstm-adaptive)")
    add_timing_flags(parser, "softmax.json")
    args = parser.parse_args(argv)
    check_timing_flags(parser, args)
    if args.dry_run and args.pair:
        parser.error("--dry-run measures tiny random models: it takes no --pair")
    pairs = ([(None, None)] if args.dry_run
             else args.pair or [(DEFAULT_FULL, DEFAULT_ADAPTIVE)])
    for run in (r for pair in pairs for r in pair if r is not None):
        if not (run / "config.toml").exists():
            parser.error(f"{run}: not a run directory (make bench-train RECIPE=ptb-lstm and "
                         "RECIPE=ptb-lstm-adaptive train the default pair)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="recur-bench-softmax-") as tmp:
        measured = [measure_pair(full, adaptive, Path(tmp) / str(index), args)
                    for index, (full, adaptive) in enumerate(pairs)]
    report = {"date": now(), "machine": f"{cpu()}, {args.threads} threads, onnxruntime "
                                        f"{ort.__version__}",
              "dry_run": args.dry_run, "rounds": args.rounds, "rows": args.rows,
              "window": args.window, "pairs": measured}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    elif args.dry_run:
        print(json.dumps(report, indent=2))
    else:
        from bench.report import save_results

        save_results("softmax", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

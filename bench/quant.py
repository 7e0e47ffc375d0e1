"""`make bench-quant`: an int8 export (`recur export --quantize int8`) against the float32
export of the same model, both through the serving runtime: scoring tokens/s and one-token
steps, the two sides taking turns in rounds, and perplexity on the test split.

    python -m bench.quant                      # runs/ptb-lstm (train it first), PTB test
    python -m bench.quant --run RUN_DIR        # any trained language model, its test split
    python -m bench.quant --random-model       # 2 x 650 LSTM, V = 10,000: speed only
    python -m bench.quant --dry-run            # a tiny random model, one round; writes nothing

A trained run is read through its own config, so its test split comes from RECUR_DATA
(default ../shared/data; runs/ptb-lstm: ptb/ptb.test.txt). An untrained model has no
perplexity worth reporting: it scores random ids, whose speed is that of any ids.
Results go to bench/results/quant.json and the report (docs/benchmarks.md).
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

DEFAULT_RUN = REPO / "runs" / "ptb-lstm"
RANDOM = {"vocab": 10_000, "hidden": 650, "layers": 2}  # bench/serve.py's model
TINY = {"vocab": 200, "hidden": 32, "layers": 1}


def _random_exports(root: Path, size: dict) -> tuple[Path, Path, dict]:
    """A random-weight tied LSTM exported in float32 and int8 (its "validation" stream is
    random ids: the int8 export's perplexity figures mean nothing, its checks still run)."""
    torch.manual_seed(0)
    model = RecurrentLM(size["vocab"], "lstm", size["hidden"], size["hidden"], size["layers"],
                        tie_weights=True).eval()
    vocab = Vocabulary([UNK, EOS] + [f"w{i}" for i in range(size["vocab"] - 2)],
                       Normalization())
    ids = np.random.default_rng(1).integers(0, size["vocab"], 4_000).tolist()
    float32 = export_model(model, root / "float32" / "1", vocab)[0]
    int8, metadata, _ = export_model(model, root / "int8" / "1", vocab, int8=Int8Options(
        lambda: ids, rows=10, max_ppl_cost=None, ppl_tokens=2_000))
    return float32, int8, metadata


def _run_exports(run: Path, root: Path) -> tuple[Path, Path, dict]:
    float32 = Path(export_run(run, root / "float32" / "1")["path"])
    metadata = export_run(run, root / "int8" / "1", quantize="int8", max_ppl_cost=None)
    return float32, Path(metadata["path"]), metadata


def measure(float32: Path, int8: Path, speed_ids: list[int], args) -> dict:
    """Both sides in every round, which goes first alternating; medians over the rounds,
    the ratios medians of the per-round ratios."""
    def alternating(names: list[str], round_index: int) -> list[str]:
        return names if round_index % 2 == 0 else names[::-1]

    rates, steps = timed_rounds({"float32": float32, "int8": int8}, speed_ids, args,
                                alternating)
    sides = {name: {"score_tokens_per_s": statistics.median(rates[name]),
                    "score_tokens_per_s_per_round": rates[name],
                    "step_b1_ms": statistics.median(steps[name]),
                    "onnx_mb": (path / "model.onnx").stat().st_size / 1e6}
             for name, path in (("float32", float32), ("int8", int8))}
    speedups = [q / f for q, f in zip(rates["int8"], rates["float32"])]
    step_speedups = [f / q for q, f in zip(steps["int8"], steps["float32"])]
    return {**sides, "score_speedup": statistics.median(speedups),
            "score_speedup_per_round": speedups,
            "step_b1_speedup": statistics.median(step_speedups)}


def split_perplexity(float32: Path, int8: Path, ids: list[int], rows: int,
                     threads: int) -> dict:
    figures = {name: stream_perplexity(ModelRuntime(path, threads=threads), ids, rows)
               for name, path in (("float32", float32), ("int8", int8))}
    return {"tokens": figures["float32"]["tokens"], "columns": rows,
            "ppl_float32": figures["float32"]["ppl"], "ppl_int8": figures["int8"]["ppl"],
            "relative_ppl_cost": figures["int8"]["ppl"] / figures["float32"]["ppl"] - 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path,
                        help=f"a trained language model's run directory (default "
                             f"{DEFAULT_RUN.relative_to(REPO)} when it exists)")
    parser.add_argument("--random-model", action="store_true",
                        help="an untrained 2 x 650 LSTM over 10,000 words instead of a run: "
                             "the speed ratio only, no perplexity")
    add_timing_flags(parser, "quant.json")
    args = parser.parse_args(argv)
    check_timing_flags(parser, args)
    random_model = args.random_model or args.dry_run
    run = args.run or (None if random_model else DEFAULT_RUN)
    if random_model and args.run:
        parser.error("--run and --random-model (or --dry-run) exclude each other")
    if run is not None and not (run / "config.toml").exists():
        parser.error(f"{run}: not a run directory (train one: make bench-train RECIPE=ptb-lstm,"
                     " or use --random-model)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="recur-bench-quant-") as tmp:
        test = None
        if random_model:
            size = TINY if args.dry_run else RANDOM
            float32, int8, metadata = _random_exports(Path(tmp), size)
            speed_ids = np.random.default_rng(2).integers(0, size["vocab"],
                                                          args.speed_tokens).tolist()
            source = {"model": "random weights", **size, "cell": "lstm"}
        else:
            from training.evaluate import load_run

            float32, int8, metadata = _run_exports(run, Path(tmp))
            config, task, _ = load_run(run, device="cpu")
            stream = task.stream("test")
            speed_ids = stream[: args.speed_tokens]
            test = {"split": config.data.test,
                    **split_perplexity(float32, int8, stream[: args.ppl_tokens or None],
                                       config.train.eval_batch_size, args.threads)}
            source = {"model": str(run), "vocab": metadata["vocab_size"],
                      "hidden": metadata["hidden_size"], "layers": metadata["layers"],
                      "cell": metadata["cell"]}
        report = {"date": now(), "machine": f"{cpu()}, {args.threads} threads, onnxruntime "
                                            f"{ort.__version__}",
                  "mode": "random-model" if random_model else "run", "source": source,
                  "dry_run": args.dry_run, "rounds": args.rounds, "rows": args.rows,
                  "window": args.window, "speed_tokens": len(speed_ids),
                  **measure(float32, int8, speed_ids, args), "test": test,
                  "export": {k: v for k, v in metadata["quantization"].items()
                             if k not in ("scheme", "float32_onnx_sha256")},
                  "scheme": metadata["quantization"]["scheme"]}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    elif args.dry_run:
        print(json.dumps(report, indent=2))
    else:
        from bench.report import save_results

        save_results("quant", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

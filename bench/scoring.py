"""Timing exported language models through the serving runtime, side by side in rounds:
the scoring rate on a token stream and one-token steps, and the flags that size them.
Shared by bench/quant.py (int8 against float32) and bench/softmax.py (output layers)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving.model.runtime import ModelRuntime
from training.export.quantize import stream_perplexity


def scoring_rate(runtime: ModelRuntime, ids: list[int], rows: int, window: int) -> float:
    """Tokens/s scoring `ids` in `rows` columns, `window` steps a call, the state carried."""
    started = time.perf_counter()
    scored = stream_perplexity(runtime, ids, rows, window)["tokens"]
    return scored / (time.perf_counter() - started)


def step_ms(runtime: ModelRuntime, steps: int) -> float:
    """Median milliseconds of a one-token step (B = 1) from a carried state: decoding."""
    token, one = np.array([[2]], np.int64), np.array([1], np.int64)
    state = runtime.initial_state(1)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state = runtime.run_lm(token, one, state, token).state
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def timed_rounds(paths: dict[str, Path], speed_ids: list[int], args,
                 order: Callable[[list[str], int], list[str]]
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every side's scoring rate and step time in every round, the sides in `order(names,
    round)`, after a warm-up (first-call allocations, page faults). Returns (rates, step
    milliseconds), one value per round and side."""
    runtimes = {name: ModelRuntime(path, threads=args.threads) for name, path in paths.items()}
    for runtime in runtimes.values():
        scoring_rate(runtime, speed_ids[: 2 * args.rows + 1], args.rows, args.window)
    rates: dict[str, list[float]] = {name: [] for name in runtimes}
    steps: dict[str, list[float]] = {name: [] for name in runtimes}
    for round_index in range(args.rounds):
        for name in order(list(runtimes), round_index):
            rates[name].append(scoring_rate(runtimes[name], speed_ids, args.rows, args.window))
            steps[name].append(step_ms(runtimes[name], args.steps))
    return rates, steps


def add_timing_flags(parser: argparse.ArgumentParser, results: str) -> None:
    """--dry-run, the rounds' sizes, threads and --out (instead of bench/results/RESULTS)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny random models and one round, to check the script in "
                             "seconds; writes no results unless --out is given")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds in which every side is timed (default 7; 1 with --dry-run)")
    parser.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads of each side (default 2)")
    parser.add_argument("--rows", type=int, default=32,
                        help="scoring: parallel columns of the test stream per call (default 32)")
    parser.add_argument("--window", type=int, default=256,
                        help="scoring: steps per call, the state carried (default 256)")
    parser.add_argument("--speed-tokens", type=int, default=32 * 256 * 4,
                        help="test tokens each side scores per round (default 32768)")
    parser.add_argument("--steps", type=int, default=50,
                        help="one-token steps each side times per round (default 50)")
    parser.add_argument("--ppl-tokens", type=int, default=0,
                        help="test tokens for each side's perplexity (default 0: the whole "
                             "split)")
    parser.add_argument("--out", type=Path,
                        help=f"write the JSON here instead of bench/results/{results} (and "
                             "leave the report alone)")


def check_timing_flags(parser: argparse.ArgumentParser, args) -> None:
    """Refuses impossible sizes; --dry-run shrinks everything to seconds."""
    if args.dry_run:
        args.rounds, args.rows, args.window = 1, 4, 16
        args.speed_tokens, args.steps = 4 * 16 * 2, 5
    if min(args.rounds, args.threads, args.rows, args.window, args.steps) < 1:
        parser.error("--rounds, --threads, --rows, --window and --steps must be >= 1")
    if args.speed_tokens < 2 * args.rows or args.ppl_tokens < 0:
        parser.error("--speed-tokens must be at least 2 x --rows; --ppl-tokens >= 0")

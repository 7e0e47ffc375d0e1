"""What the benchmark scripts share: where results go, a median timer, a language-model
artifact with random weights. bench/report.py saves results and writes the report."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def cpu() -> str:
    """The processor, its cores and last-level cache, as this machine reports them: what a
    result depends on, recorded with it."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    shown = f"{name}, {os.cpu_count()} cores"
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    with contextlib.suppress(OSError):
        if caches:
            size = caches[-1].read_text().strip()
            if size.endswith("K") and size[:-1].isdigit():
                size = f"{int(size[:-1]) // 1024} MB"
            shown += f", {size} last-level cache"
    return shown


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def lm_artifact(model, out: Path, verify: bool = False) -> Path:
    """`model` (a RecurrentLM) exported to the artifact directory `out` (REPO/NAME/VERSION)
    with a vocabulary of placeholder words, as `recur export` exports a run (verified
    against torch with `verify`)."""
    from serving.model.tokenizer import EOS, UNK, Normalization, Vocabulary
    from training.export import export_model

    size = model.embedding.weight.shape[0]
    vocab = Vocabulary([UNK, EOS] + [f"w{i}" for i in range(size - 2)], Normalization())
    return export_model(model, out, vocab, verified=verify)[0]

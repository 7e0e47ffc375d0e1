"""Offline batch scoring: a language model artifact on ONNX Runtime in this process, no
server. Built for Kubernetes Indexed Jobs: each pod scores its shard of an input file list
(`recur score --local MODEL_DIR --file-list LIST --shard $(JOB_COMPLETION_INDEX)/N`).

Scores follow the service's convention (each line read from the state after `<eos>`, its
final `<eos>` scored unless turned off), so a line scores the same here and from Score.
A shard's results are written under temporary names and renamed when complete; a shard
whose summary exists is skipped, so a retried pod never redoes or half-writes work.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.model.runtime import ModelRuntime

READ_BLOCK = 4096  # lines read, sorted by length and batched at a time


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N (i is JOB_COMPLETION_INDEX in an Indexed Job)."""
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"--shard must look like INDEX/COUNT, e.g. 0/4; got {text!r}")
        shard = cls(int(index), int(count))
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard {text}: INDEX must be in [0, COUNT)")
        return shard

    def select(self, files: list[Path]) -> list[Path]:
        """Every COUNT-th file from INDEX on: shards are disjoint and cover the list."""
        return files[self.index :: self.count]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


@dataclass
class Summary:
    shard: str
    files: int = 0
    lines: int = 0
    tokens: int = 0
    unknown: int = 0
    logprob: float = 0.0
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens) if self.tokens else float("nan")

    def to_json(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0}


def read_file_list(path: Path) -> list[Path]:
    """One input path per line (blank lines and # comments skipped); relative paths are
    taken relative to the list's folder."""
    files = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            file = Path(line)
            files.append(file if file.is_absolute() else path.parent / file)
    return files


def score_lines(runtime: ModelRuntime, lines: list[str], add_eos: bool,
                token_budget: int) -> list[tuple[float, int, int]]:
    """(log-probability, tokens scored, unknown words) per line, in the lines' order.
    Lines are batched by length so that padding stays small."""
    vocab = runtime.vocab
    encoded = []
    for line in lines:
        words = vocab.tokenize(line)
        ids = vocab.encode_tokens(words)
        encoded.append((ids + [vocab.eos_id] if add_eos else ids,
                        vocab.unknown_count(words, ids)))
    results: list[tuple[float, int, int]] = [(0.0, 0, unknown) for _, unknown in encoded]
    order = sorted((i for i, (ids, _) in enumerate(encoded) if ids),
                   key=lambda i: len(encoded[i][0]))
    start = 0
    while start < len(order):
        width = len(encoded[order[start]][0])
        end = start + 1
        while end < len(order) and (end - start + 1) * len(encoded[order[end]][0]) <= max(
                token_budget, width):
            end += 1
        batch = [encoded[i][0] for i in order[start:end]]
        for i, logprobs in zip(order[start:end], runtime.score(batch), strict=True):
            results[i] = (float(np.sum(logprobs, dtype=np.float64)), len(logprobs),
                          encoded[i][1])
        start = end
    return results


def _blocks(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8") as handle:
        block: list[str] = []
        for line in handle:
            block.append(line.rstrip("\n"))
            if len(block) == READ_BLOCK:
                yield block
                block = []
        if block:
            yield block


def score_shard(model_dir: str | Path, files: list[Path], shard: Shard, out_dir: str | Path,
                add_eos: bool = True, threads: int = 0, token_budget: int = 16384,
                progress=None) -> dict:
    """Scores this shard's files into OUT/<shard>.jsonl (one record per line) and
    OUT/<shard>.summary.json; returns the summary."""
    out_dir = Path(out_dir)
    summary_path = out_dir / f"{shard.name}.summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text()) | {"skipped": True}
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing[:5])}")
    runtime = ModelRuntime(model_dir, threads=threads)
    if runtime.artifact.task != "lm":
        raise ValueError(f"{model_dir} is a {runtime.artifact.task} model; scoring needs a "
                         "language model")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary(shard.name)
    started = time.perf_counter()
    records = out_dir / f"{shard.name}.jsonl"
    partial = records.with_name(records.name + f".{os.getpid()}.tmp")
    with partial.open("w", encoding="utf-8") as out:
        for file in shard.select(files):
            number = 0
            for block in _blocks(file):
                for (logprob, tokens, unknown) in score_lines(runtime, block, add_eos,
                                                              token_budget):
                    out.write(json.dumps({"file": str(file), "line": number,
                                          "logprob": logprob, "tokens": tokens,
                                          "unknown": unknown}) + "\n")
                    number += 1
                    summary.tokens += tokens
                    summary.unknown += unknown
                    summary.logprob += logprob
                summary.lines += len(block)
                if progress:
                    progress(summary)
            summary.files += 1
    summary.seconds = time.perf_counter() - started
    os.replace(partial, records)
    result = summary.to_json()
    temporary = summary_path.with_name(summary_path.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, summary_path)  # last: its presence means the shard is done
    return result

"""`recur score --local`: in-process scoring of a shard of a file list, as the batch Job
runs it; the same numbers as the server's Score, disjoint shards covering every line, and
retries that skip finished work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serving_helpers import RunningServer

from serving.batch_score import Shard, read_file_list, score_shard

LINES = [["the dog sleeps", "", "the old dogs that the cat sees sleep"],
         ["a cat", "zebra unknownword the"],
         ["the dogs sleep"] * 3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    names = []
    for number, lines in enumerate(LINES):
        (folder / f"part-{number}.txt").write_text("\n".join(lines) + "\n")
        names.append(f"part-{number}.txt")
    (folder / "files.txt").write_text("# inputs\n" + "\n".join(names) + "\n")
    return folder / "files.txt"


def records(out: Path, shard: Shard) -> list[dict]:
    return [json.loads(line) for line in (out / f"{shard.name}.jsonl").read_text().splitlines()]


def test_shards_are_disjoint_and_cover_every_line_with_the_servers_scores(
        model_repository, inputs, tmp_path):
    files = read_file_list(inputs)
    model = model_repository / "demo-lm" / "1"
    results = []
    for index in range(2):
        shard = Shard(index, 2)
        summary = score_shard(model, files, shard, tmp_path)
        shard_records = records(tmp_path, shard)
        assert summary["lines"] == len(shard_records)
        assert summary["tokens"] == sum(r["tokens"] for r in shard_records)
        results += shard_records
    assert sorted((r["file"], r["line"]) for r in results) == sorted(
        (str(files[f]), n) for f, lines in enumerate(LINES) for n in range(len(lines)))
    server = RunningServer(model_repository)
    try:
        for record in results:
            file_number = files.index(Path(record["file"]))
            text = LINES[file_number][record["line"]]
            (expected,) = server.client.score("demo-lm", [text])
            assert record["tokens"] == expected.token_count
            assert record["unknown"] == expected.unknown_count
            assert record["logprob"] == pytest.approx(expected.total_logprob, abs=1e-4)
    finally:
        server.stop()


def test_a_finished_shard_is_skipped_and_no_partial_file_is_left(model_repository, inputs,
                                                                 tmp_path):
    files = read_file_list(inputs)
    model = model_repository / "demo-lm" / "1"
    first = score_shard(model, files, Shard(0, 1), tmp_path, add_eos=False)
    again = score_shard(model, files, Shard(0, 1), tmp_path, add_eos=False)
    assert again == first | {"skipped": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00000-of-00001.jsonl", "shard-00000-of-00001.summary.json"]
    with_eos = score_shard(model, files, Shard(0, 1), tmp_path / "eos")
    assert with_eos["tokens"] == first["tokens"] + sum(len(lines) for lines in LINES)


@pytest.mark.parametrize("text, message", [
    ("2/2", "INDEX must be in [0, COUNT)"), ("1", "must look like INDEX/COUNT"),
    ("a/3", "must look like INDEX/COUNT"), ("-1/3", "must look like INDEX/COUNT")])
def test_bad_shards_are_refused(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        Shard.parse(text)


def test_the_command_line_scores_a_shard_and_explains_bad_input(model_repository, inputs,
                                                                tmp_path):
    model = model_repository / "demo-lm" / "1"
    command = [sys.executable, "-m", "recur", "score", "--local", str(model)]
    done = subprocess.run([*command, "--file-list", str(inputs), "--shard", "1/3",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["shard"] == "shard-00001-of-00003" and summary["files"] == 1
    assert summary["lines"] == len(LINES[1]) and summary["unknown"] == 2
    bad = subprocess.run([*command, "--file-list", str(inputs), "--shard", "3/3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "INDEX must be in [0, COUNT)" in bad.stderr
    tagger = subprocess.run([sys.executable, "-m", "recur", "score", "--local",
                             str(model_repository / "tagger-bi" / "1"), str(inputs.parent /
                             "part-0.txt"), "--out", str(tmp_path / "t")],
                            capture_output=True, text=True, timeout=120)
    assert tagger.returncode == 1 and "scoring needs a language model" in tagger.stderr

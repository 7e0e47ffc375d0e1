"""Open vocabulary: byte-level BPE trained with HuggingFace `tokenizers`, in training, the
artifact and serving; and per-byte figures that compare it with word-level models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import demo_config
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import RunningServer

from serving.model.tokenizer import EOS, UNK, BytePairEncoding, Vocabulary
from training.evaluate import load_run
from training.export import export_run
from training.tasks import make_task
from training.train import train

UNSEEN = "naïve café — 😀 Ωmega\ttabs  and  spaces"


@pytest.fixture(scope="module")
def bpe_vocab(synth_dir) -> Vocabulary:
    lines = (synth_dir / "lm" / "train.txt").read_text().splitlines()[:2000]
    return Vocabulary.from_bpe(BytePairEncoding.train(lines, 400, [UNK, EOS]))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_any_text_round_trips_without_unk(bpe_vocab, text):
    ids = bpe_vocab.encode(text)
    assert bpe_vocab.unk_id not in ids
    assert bpe_vocab.decode(ids) == text
    stream = bpe_vocab.stream_decoder()
    assert "".join(stream.step(i) for i in ids) == text  # streamed pieces add up
    assert b"".join(bpe_vocab.bpe.bytes[i] for i in ids) == text.encode()


def test_the_merges_travel_in_vocab_json(bpe_vocab, tmp_path):
    bpe_vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again.normalization.level == "bpe" and again.tokens == bpe_vocab.tokens
    assert again.encode(UNSEEN) == bpe_vocab.encode(UNSEEN)
    assert json.loads((tmp_path / "vocab.json").read_text())["bpe"]


@pytest.fixture(scope="module")
def small_lm_data(synth_dir, tmp_path_factory):
    """A tenth of the generated corpus: BPE pieces are about four a word, so this trains
    in seconds."""
    root = tmp_path_factory.mktemp("small-lm")
    for split, lines in (("train", 3000), ("valid", 300), ("test", 300)):
        text = (synth_dir / "lm" / f"{split}.txt").read_text().splitlines()[:lines]
        (root / f"{split}.txt").write_text("\n".join(text) + "\n")
    return [f'data.{split}="{root / f"{split}.txt"}"' for split in ("train", "valid", "test")]


@pytest.fixture(scope="module")
def bpe_run(synth_dir, small_lm_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("bpe-lm")
    summary = train(demo_config("demo-lm", synth_dir, *small_lm_data, 'data.level="bpe"',
                                "data.bpe_vocab_size=500", "train.epochs=1"), run)
    return run, summary


def test_a_bpe_model_reports_per_byte_figures_on_the_text_word_models_share(
        bpe_run, synth_dir, small_lm_data):
    run, summary = bpe_run
    valid = summary["valid"]
    text = small_lm_data[1].split("=", 1)[1].strip('"')
    lines = Path(text).read_text(encoding="utf-8").splitlines()
    file_bytes = sum(len(line.encode()) + 1 for line in lines if line.strip())
    # pro rata to the tokens scored: all but each column's first and the tail past them
    assert valid["bytes"] == pytest.approx(file_bytes, rel=1e-2)
    assert valid["nats_per_byte"] == pytest.approx(
        valid["loss"] * valid["tokens"] / valid["bytes"], rel=1e-4)
    word_task = make_task(demo_config("demo-lm", synth_dir, *small_lm_data))
    assert word_task.text_bytes("valid") == make_task(
        demo_config("demo-lm", synth_dir, *small_lm_data, 'data.level="bpe"',
                    "data.bpe_vocab_size=300")).text_bytes("valid") == file_bytes
    _, task, _ = load_run(run, device="cpu")
    assert task.vocab.bpe is not None and 258 < len(task.vocab) <= 500  # merges run out


def test_a_served_bpe_model_reads_any_text_and_streams_pieces_that_join(bpe_run, tmp_path):
    run, _ = bpe_run
    export_run(run, tmp_path / "models" / "bpe-lm" / "1")
    server = RunningServer(tmp_path / "models")
    try:
        scored = server.client.score("bpe-lm", [UNSEEN])[0]
        events = list(server.client.complete("bpe-lm", "the old", seed=3, max_tokens=40,
                                             temperature=1.5))
        greedy = list(server.client.complete("bpe-lm", UNSEEN, max_tokens=20,
                                             temperature=0.0))
    finally:
        server.stop()
    assert scored.unknown_count == 0
    _, task, _ = load_run(run, device="cpu")
    ids = task.vocab.encode(UNSEEN)
    assert [t.id for t in scored.tokens] == ids + [task.vocab.eos_id]
    for stream in (events, greedy):
        pieces = [e.token.text for e in stream if e.token is not None]
        end = stream[-1]
        assert end.finish_reason and "<unk>" not in end.text
        token_ids = [e.token.id for e in stream if e.token is not None]
        assert end.text == "".join(pieces)
        assert task.vocab.decode(token_ids).startswith(end.text)  # but a character cut short


def test_a_sample_streams_whole_characters_and_drops_one_cut_short(bpe_vocab):
    """Scripted ids through the decoding loop's reader: the pieces of a character split
    across tokens arrive with its last byte; a sample ending mid-character streams (and
    ends with) the characters before it."""
    import numpy as np

    from serving.engine.decoding import Sample, Stops
    from serving.model.sampler import SamplingParams, make_rng

    ids = bpe_vocab.encode("a é😀")
    byte_ids = [i for i in ids if len(bpe_vocab.bpe.bytes[i]) == 1 and
                bpe_vocab.bpe.bytes[i][0] >= 0x80]
    assert byte_ids  # the corpus is ASCII: the non-ASCII characters are byte pieces
    sample = Sample(0, make_rng(0), np.zeros((1, 1), np.float32),
                    np.zeros(len(bpe_vocab), np.float32), SamplingParams())
    stops = Stops(frozenset(), ())
    pieces = []
    for token in ids[:-1]:  # the emoji's last byte never comes
        assert stops.check(sample, token, bpe_vocab) is None
        pieces.append(sample.piece)
    assert "".join(pieces) == "a é"
    assert bpe_vocab.decode(ids[:-1]) == "a é\ufffd"


def test_the_openai_echo_of_a_bpe_prompt_is_the_prompt(bpe_run, tmp_path):
    import httpx

    run, _ = bpe_run
    export_run(run, tmp_path / "models" / "bpe-lm" / "1")
    server = RunningServer(tmp_path / "models", http_port=0)
    try:
        with httpx.Client(base_url=server.http_url, timeout=60) as http:
            answer = http.post("/v1/completions", json={
                "model": "bpe-lm", "prompt": UNSEEN, "max_tokens": 0, "echo": True,
                "logprobs": 2}).json()
    finally:
        server.stop()
    choice = answer["choices"][0]
    assert choice["text"] == UNSEEN
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == UNSEEN
    offsets = logprobs["text_offset"]
    assert offsets == [sum(len(t) for t in logprobs["tokens"][:i])
                       for i in range(len(offsets))]
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"][1:])

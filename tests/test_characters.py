"""Character-aware taggers: spellings in the vocabulary, the character CNN, its export and
the tagging RPCs on it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import demo_config
from serving_helpers import RunningServer

from serving.model.runtime import ModelRuntime
from serving.model.tokenizer import (
    CHAR_PAD,
    CHAR_UNK,
    PAD,
    UNK,
    WORD_END,
    WORD_START,
    Normalization,
    Spelling,
    Vocabulary,
)
from training.evaluate import load_run
from training.export import export_run
from training.models.characters import CharCNN
from training.train import train

SUFFIXES = {"ing": "VERB", "ly": "ADV", "ness": "NOUN", "ous": "ADJ"}
STEMS = ["".join(random.Random(i).choices("bcdfghklmnprstvwz", k=3)) + v
         for i, v in enumerate("aeiou" * 40)]


def test_a_spelling_marks_the_word_and_pads_it():
    spelling = Spelling.build(["abc", "cab", "bb"], max_word_length=6)
    assert spelling.characters == ["b", "a", "c"]  # by frequency: b 4, a 2, c 2
    b, a, c = 4, 5, 6
    assert spelling.spell("cab") == [WORD_START, c, a, b, WORD_END, CHAR_PAD]
    assert spelling.spell("abcabc") == [WORD_START, a, b, c, a, WORD_END]  # cut to fit
    assert spelling.spell("axe") == [WORD_START, a, CHAR_UNK, CHAR_UNK, WORD_END, CHAR_PAD]
    vocab = Vocabulary([PAD, UNK, "cab"], Normalization(), spelling)
    again = Vocabulary.from_json(vocab.to_json())
    assert again.spelling == spelling
    rows = again.encode_spelled(["cab", "zzz"], again.encode_tokens(["cab", "zzz"]))
    assert rows[0] == [2, *spelling.spell("cab")]
    assert rows[1][0] == again.unk_id and rows[1][1:] == spelling.spell("zzz")
    with pytest.raises(ValueError, match="no spelling"):
        Vocabulary([PAD, UNK]).encode_spelled(["x"], [1])


def test_the_char_cnn_reads_each_word_alone_and_padding_as_zeros():
    torch.manual_seed(0)
    cnn = CharCNN(10, 4, 6, 3).eval()
    spelling = Spelling([str(i) for i in range(6)], max_word_length=7)
    words = [spelling.spell("012"), spelling.spell("345"), [CHAR_PAD] * 7]
    features = cnn(torch.tensor([words]))
    alone = cnn(torch.tensor([[spelling.spell("345")]]))
    torch.testing.assert_close(features[0, 1], alone[0, 0])
    assert torch.equal(features[0, 2], torch.zeros(6))
    assert not torch.allclose(features[0, 0], features[0, 1])


def _suffix_corpus(path, rng: random.Random, stems: list[str], sentences: int) -> None:
    """Sentences whose tags follow the words' suffixes, in CoNLL columns."""
    lines = []
    for _ in range(sentences):
        for _ in range(rng.randint(3, 8)):
            suffix = rng.choice(list(SUFFIXES))
            lines.append(f"{rng.choice(stems)}{suffix}\t{SUFFIXES[suffix]}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def suffix_data(tmp_path_factory):
    """Training words from 150 stems; validation and test words from 50 others, so every
    test word is unknown and only its spelling tells its tag."""
    root = tmp_path_factory.mktemp("suffixes")
    rng = random.Random(5)
    _suffix_corpus(root / "train.conll", rng, STEMS[:150], 600)
    _suffix_corpus(root / "valid.conll", rng, STEMS[150:], 100)
    _suffix_corpus(root / "test.conll", rng, STEMS[150:], 100)
    return root


def _tagger(suffix_data, synth_dir, out, *overrides):
    paths = [f'data.{s}="{suffix_data / f"{s}.conll"}"' for s in ("train", "valid", "test")]
    config = demo_config("demo-ner", synth_dir, *paths, "data.format=\"columns\"",
                         "train.epochs=4", "model.embedding_size=16", "model.hidden_size=16",
                         *overrides)
    return train(config, out)


@pytest.fixture(scope="module")
def char_tagger(suffix_data, synth_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("char-tagger")
    summary = _tagger(suffix_data, synth_dir, run, "model.char_embedding_size=8",
                      "model.char_filters=24", "data.max_word_length=12")
    return run, summary


def test_unknown_words_are_tagged_from_their_spelling(char_tagger, suffix_data, synth_dir,
                                                      tmp_path):
    _, with_chars = char_tagger
    words_only = _tagger(suffix_data, synth_dir, tmp_path / "words")
    assert with_chars["valid"]["accuracy"] > 0.95
    assert words_only["valid"]["accuracy"] < 0.5  # every word is <unk> to it


def test_a_char_tagger_exports_verified_and_serves_its_spelling(char_tagger, tmp_path):
    run, _ = char_tagger
    metadata = export_run(run, tmp_path / "models" / "suffix-tagger" / "1")
    assert metadata["inputs"] == ["tokens", "lengths", "chars"]
    _, task, _ = load_run(run, device="cpu")
    assert metadata["characters"] == {"embedding_size": 8, "filters": 24, "width": 3,
                                      "characters": len(task.vocab.spelling),
                                      "max_word_length": 12}
    assert metadata["verification"]["outputs"]["tag_logprobs"]["graph_vs_float64"] < 1e-4
    runtime = ModelRuntime(tmp_path / "models" / "suffix-tagger" / "1")
    assert runtime.vocab.spelling is not None and runtime.spelled
    with pytest.raises(ValueError, match="character-aware"):
        runtime.run_encoder(np.zeros((1, 2), np.int64), np.array([2]))
    _, _, model = load_run(run, device="cpu")
    texts = [f"{STEMS[190]}ing {STEMS[191]}ly {STEMS[192]}ness", f"{STEMS[193]}ous"]
    server = RunningServer(tmp_path / "models")
    try:
        results = server.client.tag("suffix-tagger", texts)
    finally:
        server.stop()
    for text, result in zip(texts, results):
        words = text.split()
        rows = task.vocab.encode_spelled(words, task.vocab.encode_tokens(words))
        with torch.no_grad():
            logits, _ = model(torch.tensor([rows]), torch.tensor([len(words)]))
        expected = [task.labels.names[i] for i in logits[0].argmax(-1).tolist()]
        assert [t.token for t in result.tokens] == words
        assert [t.tag for t in result.tokens] == expected
        assert expected == [SUFFIXES[next(s for s in SUFFIXES if w.endswith(s))]
                            for w in words]


def test_an_artifact_whose_spelling_and_graph_disagree_is_refused(char_tagger, tmp_path):
    import json

    from serving.model.artifact import VOCAB_FILE, ArtifactError, load_artifact

    run, _ = char_tagger
    artifact = tmp_path / "models" / "t" / "1"
    export_run(run, artifact)
    vocab = json.loads((artifact / VOCAB_FILE).read_text())
    spelling = vocab.pop("spelling")
    (artifact / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(ArtifactError, match="reads characters but the vocabulary has no"):
        load_artifact(artifact)
    vocab["spelling"] = {**spelling, "max_word_length": 9}
    (artifact / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(ArtifactError, match="max_word_length 9, but metadata says 12"):
        load_artifact(artifact)

    vocab["spelling"] = {**spelling, "characters": spelling["characters"][:-1]}
    (artifact / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(ArtifactError, match="the spelling has characters"):
        load_artifact(artifact)


def test_a_spelling_without_a_character_graph_is_refused(tmp_path):
    import json

    from export_helpers import save_model

    from serving.model.artifact import VOCAB_FILE, ArtifactError, load_artifact
    from training.models.encoders import RecurrentTagger

    torch.manual_seed(0)
    path = save_model(RecurrentTagger(12, 3, 0, "gru", 4, 4), tmp_path / "m" / "t" / "1")
    vocab = json.loads((path / VOCAB_FILE).read_text())
    vocab["spelling"] = {"characters": ["a", "b"], "max_word_length": 5}
    (path / VOCAB_FILE).write_text(json.dumps(vocab))
    with pytest.raises(ArtifactError, match="spells words but the graph reads no characters"):
        load_artifact(path)

from collections import Counter

import pytest

from serving.model.tokenizer import EOS, PAD, UNK, LabelSet, Normalization, Vocabulary


def test_word_normalization_lowercases_and_maps_numbers():
    norm = Normalization("word", lowercase=True, number_token="N")
    assert norm.tokenize("The 3 cats paid $ 1,000.50 in 1990s") == [
        "the", "N", "cats", "paid", "$", "N", "in", "N"]


def test_char_normalization_keeps_every_character():
    norm = Normalization("char")
    assert norm.tokenize("a b\n") == ["a", " ", "b", "\n"]
    assert norm.detokenize(["a", " ", "b"]) == "a b"


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="normalization.level"):
        Normalization("byte")


def test_build_orders_specials_then_by_count_and_applies_limits():
    counts = Counter({"b": 5, "a": 5, "c": 3, "d": 1})
    vocab = Vocabulary.build(counts, [UNK, EOS], Normalization(), min_count=2)
    assert vocab.tokens == [UNK, EOS, "a", "b", "c"]
    capped = Vocabulary.build(counts, [UNK, EOS], Normalization(), max_size=3)
    assert capped.tokens == [UNK, EOS, "a"]


def test_encode_maps_unknown_words_and_appends_eos(tmp_path):
    vocab = Vocabulary([UNK, EOS, "the", "cat"], Normalization(lowercase=True))
    assert vocab.encode("The dog cat", add_eos=True) == [2, 0, 3, 1]
    assert vocab.decode([2, 3]) == "the cat"
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.tokens == vocab.tokens and loaded.normalization == vocab.normalization


def test_vocabulary_without_unk_refuses_unknown_tokens():
    vocab = Vocabulary([PAD, "x"])
    with pytest.raises(KeyError, match="not in a vocabulary"):
        vocab.id("y")


def test_corrupt_vocabulary_file_names_the_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json"):
        Vocabulary.load(path)


def test_label_set_round_trip(tmp_path):
    labels = LabelSet.build(["NOUN", "DET", "NOUN"])
    assert labels.names == ["DET", "NOUN"]
    labels.save(tmp_path / "labels.json")
    assert LabelSet.load(tmp_path / "labels.json").names == labels.names
    with pytest.raises(KeyError, match="unknown label"):
        labels.id("VERB")

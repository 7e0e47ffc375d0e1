"""Every reader, on generated files and on the real corpora (counts from SOURCES.md)."""

from collections import Counter

import pytest

from serving.model.tokenizer import EOS, UNK, Normalization, Vocabulary
from training.data import readers

WORD = Normalization("word")
DATA = readers.data_root()
needs_data = pytest.mark.skipif(not (DATA / "SOURCES.md").exists(),
                                reason=f"real corpora not found at RECUR_DATA={DATA}")


def test_column_and_labelled_readers(tmp_path):
    columns = tmp_path / "ner.conll"
    columns.write_text("alice\tB-PER\nsmith\tI-PER\nruns\tO\n\nbob\tB-PER\n")
    assert readers.read_columns(columns, WORD, 0, 1) == [
        (["alice", "smith", "runs"], ["B-PER", "I-PER", "O"]), (["bob"], ["B-PER"])]
    labelled = tmp_path / "cls.txt"
    labelled.write_text("1 a fine film\n0\tdull , dull\n")
    assert readers.read_labelled(labelled, WORD) == [(["a", "fine", "film"], "1"),
                                                     (["dull", ",", "dull"], "0")]
    labelled.write_text("no-sentence\n")
    with pytest.raises(ValueError, match="cls.txt:1"):
        readers.read_labelled(labelled, WORD)


def test_conllu_skips_multiword_ranges_and_empty_nodes(tmp_path):
    path = tmp_path / "x.conllu"
    path.write_text("# text = don't go\n1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
                    "1\tdo\tdo\tAUX\t_\t_\t_\t_\t_\t_\n2\tn't\tnot\tPART\t_\t_\t_\t_\t_\t_\n"
                    "2.1\tx\tx\tX\t_\t_\t_\t_\t_\t_\n3\tgo\tgo\tVERB\t_\t_\t_\t_\t_\t_\n\n")
    assert readers.read_conllu(path, WORD) == [(["do", "n't", "go"], ["AUX", "PART", "VERB"])]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        readers.read_lines_lm(tmp_path / "nothing.txt", WORD)


@needs_data
def test_penn_treebank_counts():
    train = readers.read_lines_lm("data:ptb/ptb.train.txt", WORD)
    assert sum(len(s) for s in train) == 929_589
    vocab = Vocabulary.build(Counter(t for s in train for t in s), [UNK, EOS], WORD)
    assert len(vocab) == 10_000
    valid = readers.read_lines_lm("data:ptb/ptb.valid.txt", WORD)
    test = readers.read_lines_lm("data:ptb/ptb.test.txt", WORD)
    assert sum(len(s) for s in valid) == 73_760 and sum(len(s) for s in test) == 82_430
    char_valid = readers.read_lines_lm("data:ptb/ptb.char.valid.txt", WORD)
    assert len(char_valid) == 3_370 and "_" in char_valid[0]


@needs_data
def test_ud_english_ewt_counts():
    train = readers.read_conllu("data:ud_english_ewt/en_ewt-ud-train.conllu", WORD)
    assert len(train) == 12_544
    assert sum(len(words) for words, _ in train) == 204_577
    assert len({tag for _, tags in train for tag in tags}) == 17


@needs_data
def test_sst2_counts():
    sizes = [len(readers.read_labelled(f"data:sst2/stsa.binary.{split}", WORD))
             for split in ("train", "dev", "test")]
    assert sizes == [6_920, 872, 1_821]


@needs_data
def test_tiny_shakespeare_characters_and_split():
    norm = Normalization("char")
    whole = readers.read_char_stream("data:tinyshakespeare/input.txt", norm)[0]
    assert len(whole) == 1_115_394 and len(set(whole)) == 65
    parts = [readers.read_char_stream("data:tinyshakespeare/input.txt", norm, split)[0]
             for split in ("train", "valid", "test")]
    assert parts[0] + parts[1] + parts[2] == whole
    assert abs(len(parts[0]) / len(whole) - 0.9) < 1e-5


@needs_data
def test_wnut17_bio_columns():
    train = readers.read_columns("data:wnut17/wnut17train.conll", WORD, 0, 1)
    assert len(train) == 3_394 and sum(len(w) for w, _ in train) == 62_730
    assert len({t for _, tags in train for t in tags}) == 13

from training.metrics import accuracy, entity_f1, entity_spans, is_bio, macro_f1


def test_entity_spans_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER"]
    assert entity_spans(tags) == {(0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC"), (6, 7, "PER")}


def test_entity_f1_counts_whole_spans_only():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["B-PER", "O", "O", "B-LOC"]]  # PER span cut short: wrong
    result = entity_f1(gold, predicted)
    assert result["precision"] == 0.5 and result["recall"] == 0.5 and result["f1"] == 0.5


def test_accuracy_and_macro_f1():
    gold, predicted = [0, 0, 0, 1], [0, 0, 1, 1]
    assert accuracy(gold, predicted) == 0.75
    # class 0: p=1, r=2/3 -> 0.8; class 1: p=0.5, r=1 -> 2/3
    assert abs(macro_f1(gold, predicted) - (0.8 + 2 / 3) / 2) < 1e-12


def test_is_bio():
    assert is_bio(["O", "B-PER", "I-PER"])
    assert not is_bio(["NOUN", "VERB"])


def test_entity_f1_by_type_scores_each_type_alone():
    from training.metrics import entity_f1_by_type

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    by_type = entity_f1_by_type(gold, predicted, ["LOC", "ORG", "PER"])
    assert by_type == {"PER": 1.0, "ORG": 1.0, "LOC": 0.0}
    assert entity_f1(gold, predicted, "LOC") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}

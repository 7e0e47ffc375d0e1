"""Evaluation metrics over plain lists, so they are easy to check by hand."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    return sum(g == p for g, p in zip(gold, predicted)) / max(1, len(gold))


def macro_f1(gold: Sequence, predicted: Sequence) -> float:
    labels = sorted(set(gold) | set(predicted))
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))


def is_bio(tags: Sequence[str]) -> bool:
    return all(t == "O" or t[:2] in ("B-", "I-") for t in tags) and any(t != "O" for t in tags)


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans, conlleval style: an I- tag after O or another type opens a span."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if start is not None and not continues:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return spans


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
              kind: str | None = None) -> dict:
    """Exact-span precision, recall and F1 over all entities, or those of one `kind`."""
    tp = fp = fn = 0
    for g, p in zip(gold, predicted):
        gs, ps = entity_spans(g), entity_spans(p)
        if kind is not None:
            gs = {s for s in gs if s[2] == kind}
            ps = {s for s in ps if s[2] == kind}
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_f1_by_type(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                      kinds: Sequence[str]) -> dict[str, float]:
    """F1 of each entity type, as conlleval reports them (rare types are where a tagger
    that looks good overall fails)."""
    return {kind: entity_f1(gold, predicted, kind)["f1"] for kind in kinds}

"""Batches: parallel columns for language models, length buckets for tagging and classification.

Every batch order is a function of (seed, epoch), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # padded tag positions: never counted in a loss or metric


def columns(ids: Sequence[int], batch_size: int) -> torch.Tensor:
    """Lays a token stream out in B parallel columns: [B, N // B] (the tail is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(f"a stream of {ids.numel()} tokens is too short for {batch_size} columns")
    return ids[: n * batch_size].view(batch_size, n)


def window_schedule(total: int, bptt: int, variable: bool, seed: int, epoch: int) -> list[int]:
    """Window lengths covering `total - 1` prediction steps.

    With `variable`, lengths are drawn around bptt as in AWD-LSTM (bptt, or bptt/2 with
    probability 0.05, then jittered by a normal with sd 5), from a generator seeded by
    (seed, epoch) so the schedule is reproducible.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    lengths, position = [], 0
    while position < total - 1:
        length = bptt
        if variable:
            base = bptt if torch.rand(1, generator=generator).item() >= 0.05 else bptt / 2
            length = max(5, int(torch.normal(base, 5.0, (1,), generator=generator).item()))
        length = min(length, total - 1 - position)
        lengths.append(length)
        position += length
    return lengths


def windows(data: torch.Tensor, lengths: Sequence[int], start: int = 0
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields (window index, inputs [B,k], targets [B,k]) from window `start` on."""
    position = sum(lengths[:start])
    for index in range(start, len(lengths)):
        k = lengths[index]
        yield index, data[:, position : position + k], data[:, position + 1 : position + 1 + k]
        position += k


@dataclass
class PaddedBatch:
    tokens: torch.Tensor  # [B, T] token ids, pad_id past each length
    lengths: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, T] tags (IGNORE_INDEX past each length) or [B] labels


def pad_batch(examples: Sequence[tuple[list[int], list[int] | int]], pad_id: int) -> PaddedBatch:
    lengths = torch.tensor([len(tokens) for tokens, _ in examples], dtype=torch.long)
    width = int(lengths.max())
    first = examples[0][0][0]
    if isinstance(first, list):  # character-aware: [word id, spelling...] per token
        tokens = torch.zeros((len(examples), width, len(first)), dtype=torch.long)
        tokens[..., 0] = pad_id  # and CHAR_PAD (0) for the spelling
    else:
        tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    per_token = isinstance(examples[0][1], list)
    targets = (torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if per_token
               else torch.tensor([t for _, t in examples], dtype=torch.long))
    for row, (ids, target) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if per_token:
            targets[row, : len(ids)] = torch.tensor(target, dtype=torch.long)
    return PaddedBatch(tokens, lengths, targets)


def bucketed_batches(examples: Sequence[tuple[list[int], list[int] | int]], batch_size: int,
                     pad_id: int, shuffle: bool, seed: int = 0,
                     epoch: int = 0) -> list[PaddedBatch]:
    """Groups examples of similar length (little padding), then shuffles the batches.

    Sorting within chunks of 50 batches keeps some randomness in which examples meet.
    """
    order = list(range(len(examples)))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if shuffle:
        order = torch.randperm(len(examples), generator=generator).tolist()
    chunk = batch_size * 50
    grouped = []
    for begin in range(0, len(order), chunk):
        part = sorted(order[begin : begin + chunk], key=lambda i: len(examples[i][0]))
        grouped += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        grouped = [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]
    return [pad_batch([examples[i] for i in group], pad_id) for group in grouped]

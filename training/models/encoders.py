"""Sequence taggers and text classifiers on a (by default bidirectional) recurrent stack.

Unidirectional ones take and return a state, so a stream can be tagged, or a growing
text classified, incrementally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.models.characters import CharCNN
from training.models.recurrence import RecurrentStack, embed_dropping_words, make_dropout

POOLINGS = ("final", "mean", "max")


@dataclass(frozen=True)
class CharOptions:
    """A character CNN beside the word embedding: `characters` ids (the Spelling's size),
    each embedded in `embedding_size`, `filters` features of `width` characters."""

    characters: int
    embedding_size: int = 16
    filters: int = 50
    width: int = 3


class _Encoder(nn.Module):
    def __init__(self, vocab_size: int, pad_id: int, cell: str, embedding_size: int,
                 hidden_size: int, num_layers: int, dropout: float, dropout_input: float,
                 dropout_output: float, variational: bool, bidirectional: bool, learn_h0: bool,
                 weight_drop: float = 0.0, dropout_embedding: float = 0.0,
                 chars: CharOptions | None = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.chars = (None if chars is None else
                      CharCNN(chars.characters, chars.embedding_size, chars.filters, chars.width))
        width = embedding_size + (0 if chars is None else chars.filters)
        self.stack = RecurrentStack(cell, width, hidden_size, num_layers, dropout,
                                    variational, bidirectional, learn_h0, weight_drop)
        self.dropout_embedding = dropout_embedding
        self.dropout_input = make_dropout(dropout_input, variational)
        self.dropout_output = make_dropout(dropout_output, variational)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.stack.initial_state(batch_size)

    def encode(self, tokens, lengths, state):
        """tokens [B, T] word ids, or for a character-aware model [B, T, 1 + L]: each
        token's word id, then its spelling (Vocabulary.encode_spelled)."""
        words = tokens if self.chars is None else tokens[..., 0]
        vectors = embed_dropping_words(self.embedding, words, self.dropout_embedding)
        if self.chars is not None:
            vectors = torch.cat([vectors, self.chars(tokens[..., 1:])], dim=-1)
        out, final = self.stack(self.dropout_input(vectors), state, lengths)
        return self.dropout_output(out), final


class RecurrentTagger(_Encoder):
    def __init__(self, vocab_size: int, num_tags: int, pad_id: int, cell: str,
                 embedding_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, dropout_input: float = 0.0, dropout_output: float = 0.0,
                 variational: bool = False, bidirectional: bool = True, learn_h0: bool = False,
                 weight_drop: float = 0.0, dropout_embedding: float = 0.0,
                 chars: CharOptions | None = None):
        super().__init__(vocab_size, pad_id, cell, embedding_size, hidden_size, num_layers,
                         dropout, dropout_input, dropout_output, variational, bidirectional,
                         learn_h0, weight_drop, dropout_embedding, chars)
        self.output = nn.Linear(self.stack.output_size, num_tags)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                state: torch.Tensor | None = None):
        """-> tag logits [B,T,C], final state(s)."""
        out, final = self.encode(tokens, lengths, state)
        return self.output(out), final


class RecurrentClassifier(_Encoder):
    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, cell: str,
                 embedding_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, dropout_input: float = 0.0, dropout_output: float = 0.0,
                 variational: bool = False, bidirectional: bool = True, pooling: str = "final",
                 learn_h0: bool = False, weight_drop: float = 0.0, dropout_embedding: float = 0.0,
                 chars: CharOptions | None = None):
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__(vocab_size, pad_id, cell, embedding_size, hidden_size, num_layers,
                         dropout, dropout_input, dropout_output, variational, bidirectional,
                         learn_h0, weight_drop, dropout_embedding, chars)
        self.pooling = pooling
        self.output = nn.Linear(self.stack.output_size, num_classes)

    def pool(self, out: torch.Tensor, final, lengths: torch.Tensor | None) -> torch.Tensor:
        hidden = self.stack.hidden_size
        if self.pooling == "final":
            if self.stack.bidirectional:
                forward_final, backward_final = final
                return torch.cat([backward_final[-1, :, :hidden], forward_final[-1, :, :hidden]], 1)
            return final[-1, :, :hidden]
        if lengths is None:
            return out.mean(1) if self.pooling == "mean" else out.max(1).values
        valid = (torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None])
        valid = valid.unsqueeze(-1)
        if self.pooling == "mean":
            return (out * valid).sum(1) / lengths[:, None].clamp(min=1).to(out.dtype)
        return out.masked_fill(~valid, float("-inf")).max(1).values

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                state: torch.Tensor | None = None):
        """-> class logits [B,C], final state(s)."""
        out, final = self.encode(tokens, lengths, state)
        return self.output(self.pool(out, final, lengths)), final

"""Recurrent language model: embedding E, a recurrent stack, output softmax(W_o h_t)."""

from __future__ import annotations

import torch
from torch import nn

from training.models.recurrence import RecurrentStack, make_dropout


class RecurrentLM(nn.Module):
    def __init__(self, vocab_size: int, cell: str, embedding_size: int, hidden_size: int,
                 num_layers: int = 1, dropout: float = 0.0, dropout_input: float = 0.0,
                 dropout_output: float = 0.0, variational: bool = False, tie_weights: bool = False,
                 learn_h0: bool = False):
        super().__init__()
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(f"model.tie_weights needs model.embedding_size == model.hidden_size "
                             f"(got {embedding_size} and {hidden_size})")
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.stack = RecurrentStack(cell, embedding_size, hidden_size, num_layers, dropout,
                                    variational, bidirectional=False, learn_h0=learn_h0)
        self.dropout_input = make_dropout(dropout_input, variational)
        self.dropout_output = make_dropout(dropout_output, variational)
        self.output = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if tie_weights:
            self.output.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.output.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.stack.initial_state(batch_size)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B,T] -> logits [B,T,V], state [L,B,S]."""
        x = self.dropout_input(self.embedding(tokens))
        out, state = self.stack(x, state, lengths)
        return self.output(self.dropout_output(out)), state


class FeedForwardLM(nn.Module):
    """Bengio et al.'s fixed-window neural LM: the previous `window` tokens, embedded and
    concatenated, a tanh hidden layer, a softmax. Its "state" is the last `window` token
    ids, so it trains and evaluates through the same stream code as the recurrent models."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, window: int,
                 dropout: float = 0.0, eos_id: int = 0):
        super().__init__()
        self.window, self.eos_id = window, eos_id
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.hidden = nn.Linear(window * embedding_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, self.window), self.eos_id, dtype=torch.long,
                          device=self.output.weight.device)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if lengths is not None:
            raise ValueError("the feedforward LM reads full columns only")
        if state is None:
            state = self.initial_state(tokens.shape[0])
        history = torch.cat([state, tokens], dim=1)  # [B, window + T]
        contexts = history.unfold(1, self.window, 1)[:, 1:]  # [B, T, window], ends at t
        x = self.embedding(contexts).flatten(2)
        h = self.dropout(torch.tanh(self.hidden(x)))
        return self.output(h), history[:, -self.window:]

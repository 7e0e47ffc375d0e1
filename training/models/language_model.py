"""Recurrent language model: embedding E, a recurrent stack, output softmax(W_o h_t), or
with `adaptive_cutoffs` torch's adaptive softmax (Grave et al. 2017): a head over the
frequent words and one entry per cluster of rarer ones, each cluster its own smaller
softmax through a narrower projection. The vocabulary is ordered by frequency
(Vocabulary.build), which is what the cutoffs split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.models.recurrence import RecurrentStack, embed_dropping_words, make_dropout


class RecurrentLM(nn.Module):
    def __init__(self, vocab_size: int, cell: str, embedding_size: int, hidden_size: int,
                 num_layers: int = 1, dropout: float = 0.0, dropout_input: float = 0.0,
                 dropout_output: float = 0.0, variational: bool = False, tie_weights: bool = False,
                 learn_h0: bool = False, adaptive_cutoffs: Sequence[int] = (),
                 adaptive_div_value: float = 4.0, weight_drop: float = 0.0,
                 dropout_embedding: float = 0.0):
        super().__init__()
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(f"model.tie_weights needs model.embedding_size == model.hidden_size "
                             f"(got {embedding_size} and {hidden_size})")
        cutoffs = list(adaptive_cutoffs)
        if cutoffs and tie_weights:
            raise ValueError("model.adaptive_cutoffs cannot be used with model.tie_weights: the "
                             "adaptive softmax has no [V, H] matrix to share with the embedding")
        if cutoffs and not (cutoffs == sorted(set(cutoffs)) and cutoffs[0] > 0
                            and cutoffs[-1] < vocab_size - 1):
            raise ValueError(f"model.adaptive_cutoffs must increase strictly within 1.."
                             f"{vocab_size - 2} (the vocabulary has {vocab_size} tokens); "
                             f"got {cutoffs}")
        if cutoffs and hidden_size // adaptive_div_value ** len(cutoffs) < 1:
            raise ValueError(f"model.adaptive_div_value {adaptive_div_value:g} leaves the last "
                             f"of {len(cutoffs)} clusters a projection of "
                             f"{hidden_size} // {adaptive_div_value:g}^{len(cutoffs)} = 0 units:"
                             f" use fewer cutoffs or a smaller div_value")
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.stack = RecurrentStack(cell, embedding_size, hidden_size, num_layers, dropout,
                                    variational, bidirectional=False, learn_h0=learn_h0,
                                    weight_drop=weight_drop)
        self.dropout_embedding = dropout_embedding
        self.dropout_input = make_dropout(dropout_input, variational)
        self.dropout_output = make_dropout(dropout_output, variational)
        self.output: nn.Linear | nn.AdaptiveLogSoftmaxWithLoss
        if cutoffs:
            self.output = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs,
                                                        div_value=adaptive_div_value,
                                                        head_bias=True)
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            return
        # this order of construction and initialisation is the random stream every
        # full-softmax run has been trained from
        self.output = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if tie_weights:
            self.output.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.output.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.stack.initial_state(batch_size)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.output, nn.AdaptiveLogSoftmaxWithLoss)

    @property
    def vocab_size(self) -> int:
        return self.output.n_classes if self.adaptive else self.output.weight.shape[0]

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "none", activation_reg: float = 0.0,
                temporal_activation_reg: float = 0.0):
        """tokens [B,T] -> scores [B,T,V] whose softmax is the next-token distribution
        (logits; the adaptive softmax's exact log-probs), state [L,B,S]. With `targets`
        [B,T], instead of the scores the negative log-likelihood of the targets, [B,T] or
        its "mean" or "sum" (`reduction`): the adaptive softmax then computes each
        position's head and its target's cluster alone, which is what makes it fast to
        train. Through forward, so that DistributedDataParallel sees the loss's graph.

        With `activation_reg` or `temporal_activation_reg` (AWD-LSTM's alpha and beta) and
        targets, a third value: the penalty alpha * mean(o^2) on the last layer's dropped
        outputs o plus beta * mean((h_t - h_{t-1})^2) on its undropped ones h, which the
        trainer adds to the loss (and leaves out of the perplexity it logs)."""
        x = self.dropout_input(embed_dropping_words(self.embedding, tokens,
                                                    self.dropout_embedding))
        raw, state = self.stack(x, state, lengths)
        out = self.dropout_output(raw)
        if targets is not None:
            if self.adaptive:
                picked = self.output(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
                nll = _reduce(-picked.output.view(targets.shape), reduction)
            else:
                nll = target_nll(self.output(out), targets, reduction)
            if not (activation_reg or temporal_activation_reg):
                return nll, state
            penalty = activation_reg * out.pow(2).mean()
            if raw.shape[1] > 1:
                penalty = penalty + temporal_activation_reg * (
                    raw[:, 1:] - raw[:, :-1]).pow(2).mean()
            return nll, state, penalty
        if self.adaptive:
            flat = self.output.log_prob(out.reshape(-1, out.shape[-1]))
            return flat.view(*out.shape[:-1], -1), state
        return self.output(out), state


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
                lengths: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """As RecurrentLM's: logits [B,T,V], or with `targets` their negative
        log-likelihood."""
        if lengths is not None:
            raise ValueError("the feedforward LM reads full columns only")
        if state is None:
            state = self.initial_state(tokens.shape[0])
        history = torch.cat([state, tokens], dim=1)  # [B, window + T]
        contexts = history.unfold(1, self.window, 1)[:, 1:]  # [B, T, window], ends at t
        x = self.embedding(contexts).flatten(2)
        h = self.dropout(torch.tanh(self.hidden(x)))
        logits = self.output(h)
        if targets is not None:
            return target_nll(logits, targets, reduction), history[:, -self.window:]
        return logits, history[:, -self.window:]


def target_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """-log softmax(logits [B,T,V]) at targets [B,T]: [B,T] ("none"), or its "mean" or
    "sum", by the fused cross-entropy (the loss the full softmax has always trained on)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll


def _reduce(nll: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return nll
    return nll.mean() if reduction == "mean" else nll.sum()

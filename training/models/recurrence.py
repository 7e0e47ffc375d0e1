"""The recurrent layers: Elman (tanh or ReLU), LSTM and GRU, one implementation.

Each layer computes its input projection for all steps at once, then runs only the
recurrent product inside the time loop. The ONNX export mirrors this layout
(projection before the Loop, recurrence inside), so the two stay easy to compare.

States are packed per layer as [B, S]: S = H for Elman and GRU, 2H for LSTM ([h ; c]).
Explicit lengths: a step past a row's length leaves that row's state unchanged.

Two paths compute the same function: `forward_loop`, the explicit time loop that defines
the math, and (by default) torch's fused kernels on the same weights, which are several
times faster on the CPU and use cuDNN on a GPU. Tests check that they agree.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

CELLS = ("elman_tanh", "elman_relu", "lstm", "gru")
_GATES = {"elman_tanh": 1, "elman_relu": 1, "lstm": 4, "gru": 3}


class RecurrentLayer(nn.Module):
    """Elman: h_t = g(W h_{t-1} + U x_t + b), which has h(h + d + 1) parameters.
    LSTM: gates in PyTorch's order (i, f, g, o). GRU: PyTorch's formulation, where the
    reset gate multiplies (W_hn h + b_hn)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, learn_h0: bool = False,
                 weight_drop: float = 0.0):
        super().__init__()
        if not 0.0 <= weight_drop < 1.0:
            raise ValueError(f"model.weight_drop must be in [0, 1), got {weight_drop}")
        self.weight_drop = weight_drop
        if cell not in CELLS:
            raise ValueError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        gates = _GATES[cell] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))  # U
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))  # W
        self.bias = nn.Parameter(torch.empty(gates))  # b
        self.bias_hn = nn.Parameter(torch.empty(hidden_size)) if cell == "gru" else None
        self.h0 = nn.Parameter(torch.zeros(self.state_size)) if learn_h0 else None
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size if self.cell == "lstm" else self.hidden_size

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name != "h0":
                nn.init.uniform_(p, -bound, bound)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        if self.h0 is not None:
            return self.h0.unsqueeze(0).expand(batch_size, -1)
        return self.weight_hh.new_zeros(batch_size, self.state_size)

    fused = True  # use torch's fused kernels; False runs forward_loop

    def recurrent_weight(self) -> torch.Tensor:
        """W, or in training with `weight_drop` W under DropConnect (AWD-LSTM): one mask
        drawn per call, so every time step of a forward pass shares it, and the fused
        kernel still runs (it takes the dropped matrix as its weight)."""
        if self.training and self.weight_drop > 0.0:
            return F.dropout(self.weight_hh, self.weight_drop, training=True)
        return self.weight_hh

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> outputs [B,T,H] (padded positions unspecified), final state [B,S]."""
        if state is None:
            state = self.initial_state(x.shape[0])
        weight_hh = self.recurrent_weight()
        if not self.fused or (lengths is not None and bool((lengths <= 0).any())):
            return self.forward_loop(x, state, lengths, weight_hh)
        if lengths is None or bool((lengths == x.shape[1]).all()):
            return self._fused(x, None, state, weight_hh)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        data, final = self._fused(packed.data, packed.batch_sizes,
                                  state.index_select(0, packed.sorted_indices), weight_hh)
        out, _ = pad_packed_sequence(
            PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                           packed.unsorted_indices), batch_first=True, total_length=x.shape[1])
        return out, final.index_select(0, packed.unsorted_indices)

    def _fused(self, x: torch.Tensor, batch_sizes: torch.Tensor | None, state: torch.Tensor,
               weight_hh: torch.Tensor):
        """One call of ATen's rnn_tanh / rnn_relu / lstm / gru. Our single bias goes in as
        PyTorch's input bias, its recurrent bias is zero (GRU: only b_hn is recurrent)."""
        zeros = torch.zeros_like(self.bias)
        recurrent_bias = zeros
        if self.cell == "gru":
            recurrent_bias = torch.cat([zeros[: 2 * self.hidden_size], self.bias_hn])
        weights = [self.weight_ih, weight_hh, self.bias, recurrent_bias]
        flags = (True, 1, 0.0, self.training, False)  # biases, layers, dropout, train, bidir
        args = (x,) if batch_sizes is None else (x, batch_sizes)
        tail = flags + ((True,) if batch_sizes is None else ())  # batch_first
        if x.is_cuda:  # cuDNN copies our separate weight tensors into its own buffer each call
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="RNN module weights are not part")
                return self._kernel(args, state, weights, tail)
        return self._kernel(args, state, weights, tail)

    def _kernel(self, args, state, weights, tail):
        if self.cell == "lstm":
            h, c = state.chunk(2, dim=1)
            out, h_n, c_n = torch.lstm(*args, (h[None].contiguous(), c[None].contiguous()),
                                       weights, *tail)
            return out, torch.cat([h_n[0], c_n[0]], dim=1)
        kernel = {"elman_tanh": torch.rnn_tanh, "elman_relu": torch.rnn_relu,
                  "gru": torch.gru}[self.cell]
        out, h_n = kernel(*args, state[None].contiguous(), weights, *tail)
        return out, h_n[0]

    def forward_loop(self, x: torch.Tensor, state: torch.Tensor,
                     lengths: torch.Tensor | None = None,
                     weight_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The definition: input projection for all steps at once, then the recurrence
        (with `weight_hh`, a recurrent matrix other than the layer's own: its
        DropConnect-masked copy)."""
        w = self.weight_hh if weight_hh is None else weight_hh
        batch, steps, _ = x.shape
        projected = torch.addmm(self.bias, x.reshape(-1, self.input_size), self.weight_ih.t())
        projected = projected.view(batch, steps, -1)
        mask = None
        if lengths is not None and bool((lengths < steps).any()):
            mask = (torch.arange(steps, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        step = getattr(self, f"_step_{'elman' if self.cell.startswith('elman') else self.cell}")
        outputs = []
        for t in range(steps):
            new_state, h = step(projected[:, t], state, w)
            if mask is not None:
                new_state = torch.where(mask[:, t], new_state, state)
            state = new_state
            outputs.append(h)
        return torch.stack(outputs, dim=1), state

    def _step_elman(self, projected: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
        pre = torch.addmm(projected, h, w.t())
        h = torch.tanh(pre) if self.cell == "elman_tanh" else torch.relu(pre)
        return h, h

    def _step_lstm(self, projected: torch.Tensor, state: torch.Tensor, w: torch.Tensor):
        h, c = state.chunk(2, dim=1)
        i, f, g, o = torch.addmm(projected, h, w.t()).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=1), h

    def _step_gru(self, projected: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
        x_r, x_z, x_n = projected.chunk(3, dim=1)
        h_r, h_z, h_n = torch.mm(h, w.t()).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * (h_n + self.bias_hn))
        h = (1 - z) * n + z * h
        return h, h


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverses each row's first `length` steps and leaves its padding in place
    (ONNX's ReverseSequence)."""
    batch, steps = x.shape[:2]
    if lengths is None:
        return x.flip(1)
    t = torch.arange(steps, device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index.view(batch, steps, *([1] * (x.dim() - 2))).expand_as(x))


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared by all its time steps."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


def embed_dropping_words(embedding: nn.Embedding, tokens: torch.Tensor, p: float) -> torch.Tensor:
    """Embedding dropout (Gal and Ghahramani 2016, as AWD-LSTM uses it): in training, whole
    words are dropped from the vocabulary for one forward pass, so every occurrence of a
    dropped word reads zeros and the kept ones are scaled by 1 / (1 - p). The mask is
    indexed per token rather than applied to the [V, E] matrix: the same function and
    gradient, without touching the rows no token reads."""
    vectors = embedding(tokens)
    if not embedding.training or p == 0.0:
        return vectors
    keep = vectors.new_empty(embedding.num_embeddings).bernoulli_(1 - p) / (1 - p)
    return vectors * keep[tokens].unsqueeze(-1)


def make_dropout(p: float, variational: bool) -> nn.Module:
    return LockedDropout(p) if variational else nn.Dropout(p)


class RecurrentStack(nn.Module):
    """Stacked layers with dropout between them; optionally bidirectional.

    Unidirectional stacks take and return states [L, B, S], so they can run
    incrementally. A bidirectional stack's output at t is [backward_h_t ; forward_h_t].
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, variational: bool = False, bidirectional: bool = False,
                 learn_h0: bool = False, weight_drop: float = 0.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.layers must be >= 1, got {num_layers}")
        self.cell, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [hidden_size * directions] * (num_layers - 1)
        self.forward_layers = nn.ModuleList(
            RecurrentLayer(cell, d, hidden_size, learn_h0, weight_drop) for d in sizes)
        self.backward_layers = None
        if bidirectional:
            self.backward_layers = nn.ModuleList(
                RecurrentLayer(cell, d, hidden_size, learn_h0, weight_drop) for d in sizes)
        self.between = make_dropout(dropout, variational)

    @property
    def output_size(self) -> int:
        return self.hidden_size * (2 if self.bidirectional else 1)

    @property
    def state_size(self) -> int:
        return self.forward_layers[0].state_size

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.stack([layer.initial_state(batch_size) for layer in self.forward_layers])

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """Returns (outputs [B,T,output_size], final states).

        Final states: [L,B,S] when unidirectional; a pair (forward [L,B,S], backward [L,B,S])
        when bidirectional (the backward one is its state after reading back to position 0).
        """
        if self.bidirectional and state is not None:
            raise ValueError("a bidirectional stack reads whole texts and takes no incoming state")
        finals_fw, finals_bw = [], []
        for i, layer in enumerate(self.forward_layers):
            if i > 0:
                x = self.between(x)
            out_fw, final_fw = layer(x, None if state is None else state[i], lengths)
            finals_fw.append(final_fw)
            if self.backward_layers is not None:
                reversed_in = reverse_within_lengths(x, lengths)
                out_bw, final_bw = self.backward_layers[i](reversed_in, None, lengths)
                finals_bw.append(final_bw)
                x = torch.cat([reverse_within_lengths(out_bw, lengths), out_fw], dim=2)
            else:
                x = out_fw
        if self.backward_layers is None:
            return x, torch.stack(finals_fw)
        return x, (torch.stack(finals_fw), torch.stack(finals_bw))

"""Character-aware word representations (a character CNN, as in Ma and Hovy 2016 and
Kim et al. 2016): each word's characters embedded, one convolution over them, the
maximum over the word's positions, a tanh. Concatenated with the word embedding, it gives
rare and unknown words a representation from their spelling.

A convolution rather than a character BiLSTM: it exports as one ONNX Conv over every word
of a batch at once, with no second recurrence to run per word.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.model.tokenizer import CHAR_PAD


class CharCNN(nn.Module):
    def __init__(self, characters: int, embedding_size: int, filters: int, width: int):
        super().__init__()
        if width < 1 or width % 2 == 0:
            raise ValueError(f"model.char_width must be an odd number >= 1, got {width}")
        self.embedding = nn.Embedding(characters, embedding_size, padding_idx=CHAR_PAD)
        self.conv = nn.Conv1d(embedding_size, filters, width, padding=width // 2)
        self.filters = filters

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars [B, T, L] (CHAR_PAD after each word's end marker) -> [B, T, filters]. A
        padding position of the batch (all L ids CHAR_PAD) reads as zeros."""
        batch, steps, length = chars.shape
        flat = chars.reshape(batch * steps, length)
        x = self.embedding(flat).transpose(1, 2)  # [N, E, L]
        features = self.conv(x)  # [N, F, L]
        present = (flat != CHAR_PAD).unsqueeze(1)  # [N, 1, L]
        features = features.masked_fill(~present, float("-inf")).amax(dim=2)
        features = torch.where(present.any(dim=2), features, torch.zeros_like(features))
        return torch.tanh(features).view(batch, steps, self.filters)

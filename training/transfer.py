"""Transfer from a trained language model (ULMFiT, Howard and Ruder 2018): a tagger or
classifier starts from an LM run's embedding and first recurrent layers, then trains with
discriminative learning rates (each layer group down from the top a factor slower) and
optionally gradual unfreezing (the top group first, one more group every few epochs).

The vocabularies are mapped word by word: a word the LM knows gets its vector (looked up
as the LM's own normalisation spells it), the others keep their fresh initialisation
(model.init_vocabulary first adds the LM's words to the task's vocabulary:
tasks.with_lm_words).
Recurrent layers are copied as far as their shapes agree: the forward direction of a
bidirectional encoder reads like the LM, the backward one has no counterpart and starts
fresh, and from the second layer on a bidirectional encoder's inputs are twice as wide.
A character-aware encoder's first layer also reads the character features: those input
columns start fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from serving.model.tokenizer import Vocabulary
from training import checkpoint
from training.config import Config, ConfigError
from training.tasks import language_model_config, make_task


def transfer_from_lm(model: nn.Module, vocab: Vocabulary, lm_dir: str | Path) -> dict:
    """Copies what fits from the LM run at `lm_dir` into `model` (a RecurrentTagger or
    RecurrentClassifier); -> what was copied, for the run's summary."""
    lm_dir = Path(lm_dir)
    lm_task = make_task(language_model_config(lm_dir), lm_dir)
    lm = lm_task.build_model()
    lm.load_state_dict(checkpoint.load(lm_dir / checkpoint.BEST, "cpu")["model"])
    ours, theirs = model.embedding.weight, lm.embedding.weight
    if ours.shape[1] != theirs.shape[1]:
        raise ConfigError(f"model.init_from: the LM's embedding_size is {theirs.shape[1]}, "
                          f"this model's {ours.shape[1]}: they must agree")
    lm_vocab = lm_task.vocab
    rows, found = [], []
    for i, word in enumerate(vocab.tokens):
        j = lm_vocab.index.get(word)
        if j is None:
            spelled = lm_vocab.normalization.tokenize(word)
            j = lm_vocab.index.get(spelled[0]) if len(spelled) == 1 else None
        if j is not None and i != vocab.pad_id:
            rows.append(i)
            found.append(j)
    layers = 0
    with torch.no_grad():
        if rows:
            ours[torch.tensor(rows)] = theirs[torch.tensor(found)].to(ours.dtype)
        for i, (mine, source) in enumerate(zip(model.stack.forward_layers,
                                                lm.stack.forward_layers)):
            if not _copy_layer(mine, source, widened=i == 0 and model.chars is not None):
                break
            layers += 1
    return {"from": str(lm_dir.resolve()), "words": len(rows), "vocabulary": len(vocab),
            "recurrent_layers": layers}


def _copy_layer(mine: nn.Module, source: nn.Module, widened: bool) -> bool:
    """Copies a recurrent layer's weights when the cells and sizes agree (a learned h0 only
    where both have one). `widened`: the first layer of a character-aware encoder, whose
    input is the word embedding followed by the character features: the LM's input
    weights go to the embedding's columns, the characters' columns stay fresh."""
    if mine.cell != source.cell or mine.hidden_size != source.hidden_size:
        return False
    if mine.input_size != source.input_size and not (
            widened and mine.input_size > source.input_size):
        return False
    mine.weight_ih[:, : source.input_size] = source.weight_ih
    for name in ("weight_hh", "bias", "bias_hn", "h0"):
        ours, theirs = getattr(mine, name), getattr(source, name)
        if ours is not None and theirs is not None:
            ours.copy_(theirs)
    return True


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """ULMFiT's layer groups, bottom first: the embedding, each recurrent layer (both
    directions), the output layer. The character CNN, if any, joins the output layer's
    group: a language model has none to give, so, like the output layer, it starts fresh
    and should train at the full rate from the first epoch, not at the embedding's."""
    groups = [list(model.embedding.parameters())]
    stack = model.stack
    for i, layer in enumerate(stack.forward_layers):
        group = list(layer.parameters())
        if stack.backward_layers is not None:
            group += list(stack.backward_layers[i].parameters())
        groups.append(group)
    groups.append(list(model.output.parameters())
                  + ([] if model.chars is None else list(model.chars.parameters())))
    return groups


def parameter_groups(model: nn.Module, config: Config) -> list[dict] | None:
    """Discriminative learning rates: group g of G (bottom first) trains at
    lr / layer_lr_decay ** (G - 1 - g); the factor is kept as `lr_scale` so that the
    schedule can move the base rate. None when every group has the same rate."""
    decay = config.optimizer.layer_lr_decay
    if decay == 1.0:
        return None
    groups = layer_groups(model)
    covered = {id(p) for g in groups for p in g}
    if len(covered) != len(list(model.parameters())):
        raise ConfigError("optimizer.layer_lr_decay: this model has parameters outside the "
                          "embedding, recurrent and output layers")
    top = len(groups) - 1
    return [{"params": g, "lr_scale": decay ** -(top - i)} for i, g in enumerate(groups)]


def unfreeze_for_epoch(model: nn.Module, every: int, epoch: int) -> int:
    """Gradual unfreezing: in epoch `epoch` (0-based) the top 1 + epoch // every groups
    train and the rest are frozen; -> how many groups train."""
    groups = layer_groups(model)
    trainable = min(len(groups), 1 + epoch // every)
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= len(groups) - trainable)
    return trainable

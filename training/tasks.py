"""The three tasks: what their data is, how a batch's loss is computed, how they are evaluated.

The trainer (train.py) is task-agnostic; everything that differs between language
modelling, tagging and classification lives here.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serving.model.tokenizer import (
    EOS,
    PAD,
    UNK,
    BytePairEncoding,
    LabelSet,
    Normalization,
    Spelling,
    Vocabulary,
)
from training import metrics
from training.config import Config, ConfigError, load_config
from training.data import batching, readers
from training.distributed import World, own_slice
from training.models.encoders import CharOptions, RecurrentClassifier, RecurrentTagger
from training.models.language_model import FeedForwardLM, RecurrentLM
from training.models.ngram import KneserNey

SPLITS = ("train", "valid", "test")


def normalization(config: Config) -> Normalization:
    d = config.data
    return Normalization(d.level, d.lowercase, d.number_token or None)


def _read(config: Config, split: str, vocab: Vocabulary | None = None):
    """A split's examples, tokenized as `vocab` does (a BPE vocabulary: its pieces) or by
    the configured normalisation."""
    d, norm = config.data, normalization(config)
    path = getattr(d, split)
    if not path:
        raise ValueError(f"data.{split} is not set")
    if d.format == "lines":
        return readers.read_lines_lm(path, vocab if vocab is not None else norm, d.encoding,
                                     d.blank_lines)
    if d.format == "chars":
        one_file = d.train == d.valid == d.test
        return readers.read_char_stream(path, norm, split if one_file else None,
                                        encoding=d.encoding)
    if d.format == "conllu":
        return readers.read_conllu(path, norm, d.tag_column if d.tag_column >= 0 else 3,
                                   d.encoding)
    if d.format == "columns":
        return readers.read_columns(path, norm, d.token_column, d.tag_column, d.encoding)
    return readers.read_labelled(path, norm, d.encoding)


class LanguageModelTask:
    """A token stream in B parallel columns, trained by truncated BPTT with the state
    carried across windows and detached; evaluated with the state carried too."""

    metric = "ppl"
    select_by = "ppl"  # what best.pt and the plateau rule follow
    higher_is_better = False

    def __init__(self, config: Config, vocab: Vocabulary | None = None):
        """Reads the training data only to build a vocabulary: with one (a run's), nothing
        is read until a split is asked for."""
        self.config = config
        sentences = {}
        d = config.data
        if vocab is None and d.level == "bpe":
            lines = readers.read_text_lines(d.train, d.encoding)
            vocab = Vocabulary.from_bpe(BytePairEncoding.train(
                (line.lower() if d.lowercase else line for line in lines),
                d.bpe_vocab_size, [UNK, EOS]), d.lowercase)
        elif vocab is None:
            sentences["train"] = _read(config, "train")
            counts = Counter(t for s in sentences["train"] for t in s)
            vocab = Vocabulary.build(counts, [UNK, EOS], normalization(config), d.min_count,
                                     d.max_size or None)
        self.vocab = vocab
        self.labels = None
        self._sentences = sentences
        self.streams: dict[str, list[int]] = {}
        self._text_bytes: dict[str, int] = {}
        self.carry = None  # hidden state carried between training windows (own columns)
        self.eval_limit: int | None = None  # dry runs evaluate on a prefix only
        self.world = World()  # data-parallel training: this rank trains on its own columns

    def stream(self, split: str) -> list[int]:
        if split not in self.streams:
            sentences = (self._sentences.pop(split, None)
                         or _read(self.config, split, self.vocab))
            self.streams[split] = [self.vocab.id(t) for s in sentences for t in s]
        return self.streams[split]

    def build_model(self) -> nn.Module | KneserNey:
        m, v = self.config.model, len(self.vocab)
        if m.type == "kn":
            return KneserNey(m.order, v, m.discount).fit(self.stream("train"))
        if m.type == "ffnn":
            return FeedForwardLM(v, m.embedding_size, m.hidden_size, m.window, m.dropout,
                                 self.vocab.eos_id)
        try:  # the cutoffs are checked against the vocabulary, known only now
            return RecurrentLM(v, m.cell, m.embedding_size, m.hidden_size, m.layers,
                               m.dropout, m.dropout_input, m.dropout_output, m.variational,
                               m.tie_weights, m.learn_h0, m.adaptive_cutoffs,
                               m.adaptive_div_value, m.weight_drop, m.dropout_embedding)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def epoch_batches(self, epoch: int, device: torch.device):
        t = self.config.train
        data = batching.columns(self.stream("train"), t.batch_size)
        data = data[own_slice(self.world, t.batch_size)].to(device)
        schedule = batching.window_schedule(data.shape[1], t.bptt, t.variable_bptt, t.seed, epoch)
        return len(schedule), lambda start: batching.windows(data, schedule, start)

    def start_epoch(self) -> None:
        self.carry = None

    def loss(self, model: nn.Module, batch):
        """-> (objective, mean NLL, tokens read, (correct, counted) or None): the objective
        adds AR/TAR's penalty to the NLL, which alone is logged."""
        inputs, targets = batch
        if self.carry is not None:
            self.carry = self.carry.detach()
        t = self.config.train
        if t.activation_reg or t.temporal_activation_reg:
            nll, self.carry, penalty = model(
                inputs, self.carry, targets=targets, reduction="mean",
                activation_reg=t.activation_reg, temporal_activation_reg=t.temporal_activation_reg)
            return nll + penalty, nll, targets.numel(), None
        nll, self.carry = model(inputs, self.carry, targets=targets, reduction="mean")
        return nll, nll, targets.numel(), None

    @torch.inference_mode()
    def evaluate(self, model, split: str, device: torch.device) -> dict:
        stream = self.stream(split)[: self.eval_limit]
        if isinstance(model, KneserNey):
            logprobs = model.stream_logprobs(stream[1:], stream[:1])
            nll = -sum(logprobs)
            count = len(logprobs)
        else:
            model.eval()
            t = self.config.train
            data = batching.columns(stream, t.eval_batch_size).to(device)
            state, nll, count = None, 0.0, 0
            for _, inputs, targets in batching.windows(
                    data, batching.window_schedule(data.shape[1], t.bptt, False, 0, 0)):
                nll_sum, state = model(inputs, state, targets=targets, reduction="sum")
                nll += nll_sum.item()
                count += targets.numel()
        loss = nll / max(1, count)
        result = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}
        covered = self.text_bytes(split) * count / max(1, len(self.stream(split)))
        result.update(bytes=round(covered), nats_per_byte=nll / max(1.0, covered))
        return result

    def text_bytes(self, split: str) -> int:
        """The UTF-8 bytes of a split's text as its file holds it (each line with its
        newline; blank lines only where they are read as `<eos>`), which every tokenization
        of it shares: a model's NLL over these bytes compares words, characters and BPE
        pieces on one scale. evaluate() counts them pro rata to the tokens it scores."""
        if split not in self._text_bytes:
            d = self.config.data
            path = getattr(d, split)
            if d.format == "lines":
                keep_blank = d.blank_lines == "eos"
                self._text_bytes[split] = sum(
                    len(line.encode()) + 1 for line in readers.read_text_lines(path, d.encoding)
                    if keep_blank or line.strip())
            else:
                sentences = _read(self.config, split)
                self._text_bytes[split] = sum(len(t.encode()) for s in sentences for t in s)
        return self._text_bytes[split]


class _PaddedTask:
    """Tagging and classification: length-bucketed, padded mini-batches with lengths."""

    def __init__(self, config: Config, vocab: Vocabulary | None, labels: LabelSet | None):
        """Reads the training data only to build the vocabulary or the labels: with both (a
        run's), nothing is read until a split is asked for."""
        self.config = config
        self.examples = {}
        if vocab is None or labels is None:
            self.examples["train"] = _read(config, "train")
        if vocab is None:
            counts = Counter(t for words, _ in self.examples["train"] for t in words)
            d = config.data
            vocab = Vocabulary.build(counts, [PAD, UNK], normalization(config), d.min_count,
                                     d.max_size or None)
            if config.model.char_embedding_size:  # every training word's characters
                vocab.spelling = Spelling.build(counts, d.max_word_length)
            if config.model.init_vocabulary:
                vocab = with_lm_words(vocab, config.model.init_from)
        self.vocab = vocab
        self.labels = labels or LabelSet.build(self._all_labels(self.examples["train"]))
        self._encoded: dict[str, list] = {}
        self._class_weights: torch.Tensor | None = None
        self.carry = None  # batches are independent: nothing carried
        self.eval_limit: int | None = None  # dry runs evaluate on a prefix only
        self.world = World()  # data-parallel training: this rank trains on its rows of a batch

    def encoded(self, split: str) -> list:
        if split not in self._encoded:
            raw = self.examples.pop(split, None) or _read(self.config, split)
            self._encoded[split] = [(self._encode_words(words), self._encode_target(target))
                                    for words, target in raw if words]
        return self._encoded[split]

    def _encode_words(self, words: list[str]) -> list:
        ids = self.vocab.encode_tokens(words)
        return ids if self.vocab.spelling is None else self.vocab.encode_spelled(words, ids)

    def char_options(self) -> CharOptions | None:
        m = self.config.model
        if not m.char_embedding_size:
            return None
        if self.vocab.spelling is None:
            raise ConfigError("model.char_embedding_size: this run's vocabulary has no "
                              "spelling (it was trained without characters)")
        return CharOptions(len(self.vocab.spelling), m.char_embedding_size, m.char_filters,
                           m.char_width)

    def epoch_batches(self, epoch: int, device: torch.device):
        t = self.config.train
        batches = batching.bucketed_batches(self.encoded("train"), t.batch_size,
                                            self.vocab.pad_id, True, t.seed, epoch)

        def iterate(start: int):
            for index in range(start, len(batches)):
                b = batches[index]
                rows: slice | torch.Tensor = slice(None)
                if self.world.distributed:
                    if len(b.lengths) < self.world.size:
                        continue  # a tail batch too small to give every rank a row
                    rows = torch.tensor_split(torch.arange(len(b.lengths)),
                                              self.world.size)[self.world.rank]
                yield (index, b.tokens[rows].to(device), b.lengths[rows].to(device),
                       b.targets[rows].to(device))

        return len(batches), iterate

    def start_epoch(self) -> None:
        pass

    def class_weights(self, device: torch.device) -> torch.Tensor | None:
        """train.class_weighting: each label's loss weight from its training count c,
        (N / c) ** power, scaled so that the training examples' mean weight is 1 (the loss,
        a weighted sum over a batch's targets divided by their number, keeps its scale and
        the learning rate its meaning). None when unweighted."""
        power = {"none": 0.0, "inverse_sqrt": 0.5, "inverse": 1.0}[
            self.config.train.class_weighting]
        if power == 0.0:
            return None
        if self._class_weights is None:
            counts = torch.zeros(len(self.labels), dtype=torch.float64)
            for _, target in self.encoded("train"):
                ids = torch.tensor(target if isinstance(target, list) else [target])
                ids = ids[ids != batching.IGNORE_INDEX]
                counts += torch.bincount(ids, minlength=len(self.labels)).double()
            weights = (counts.sum() / counts.clamp(min=1)) ** power
            weights /= (weights * counts).sum() / counts.sum()
            self._class_weights = weights.float()
        return self._class_weights.to(device)

    def loss(self, model: nn.Module, batch):
        """-> (objective, mean NLL, tokens read, (correct, counted) or None): the NLL, which
        is logged, is unweighted, comparable with validation's."""
        tokens, lengths, targets = batch
        logits, _ = model(tokens, lengths)
        weights = self.class_weights(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               weight=weights, ignore_index=batching.IGNORE_INDEX,
                               reduction="mean" if weights is None else "sum")
        correct = (logits.detach().argmax(-1) == targets).sum().item()
        counted = int((targets != batching.IGNORE_INDEX).sum())
        logged = loss
        if weights is not None:  # per target, not per weight: the terms DDP's rescaling counts
            loss = loss / max(1, counted)
            logged = F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1]),
                                     targets.reshape(-1), ignore_index=batching.IGNORE_INDEX)
        return loss, logged, int(lengths.sum()), (correct, counted)

    @torch.inference_mode()
    def predictions(self, model, split: str, device: torch.device):
        model.eval()
        t = self.config.train
        gold, predicted, nll, count = [], [], 0.0, 0
        examples = self.encoded(split)
        if self.eval_limit is not None:
            examples = examples[: max(1, self.eval_limit // 20)]
        for b in batching.bucketed_batches(examples, t.eval_batch_size,
                                           self.vocab.pad_id, False):
            logits, _ = model(b.tokens.to(device), b.lengths.to(device))
            targets = b.targets.to(device)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=batching.IGNORE_INDEX, reduction="sum").item()
            best = logits.argmax(-1).cpu()
            for row in range(len(b.lengths)):
                n = int(b.lengths[row])
                if best.dim() == 2:
                    gold.append(b.targets[row, :n].tolist())
                    predicted.append(best[row, :n].tolist())
                else:
                    gold.append(int(b.targets[row]))
                    predicted.append(int(best[row]))
            count += int(b.lengths.sum()) if best.dim() == 2 else len(b.lengths)
        return gold, predicted, nll / max(1, count)


class TaggingTask(_PaddedTask):
    metric = "accuracy"
    higher_is_better = True

    @property
    def select_by(self) -> str:
        """Entity F1 for BIO tags (a tagger that predicts O everywhere has a high token
        accuracy on rare entities and an F1 of 0), accuracy for the others (POS)."""
        return "entity_f1" if metrics.is_bio(self.labels.names) else "accuracy"

    def _all_labels(self, examples):
        return [tag for _, tags in examples for tag in tags]

    def _encode_target(self, tags):
        # a tag never seen in training can only be an error, never a match
        return [self.labels.index.get(tag, batching.IGNORE_INDEX) for tag in tags]

    def build_model(self) -> nn.Module:
        m = self.config.model
        return RecurrentTagger(len(self.vocab), len(self.labels), self.vocab.pad_id, m.cell,
                               m.embedding_size, m.hidden_size, m.layers, m.dropout,
                               m.dropout_input, m.dropout_output, m.variational, m.bidirectional,
                               m.learn_h0, m.weight_drop, m.dropout_embedding,
                               self.char_options())

    def evaluate(self, model, split: str, device: torch.device) -> dict:
        gold, predicted, loss = self.predictions(model, split, device)
        flat_gold = [t for s in gold for t in s]
        flat_pred = [t for s in predicted for t in s]
        result = {"loss": loss, "accuracy": metrics.accuracy(flat_gold, flat_pred),
                  "tokens": len(flat_gold)}
        if metrics.is_bio(self.labels.names):
            names = self.labels.names
            def named(seqs):
                return [[names[t] if t >= 0 else "?" for t in s] for s in seqs]

            entity = metrics.entity_f1(named(gold), named(predicted))
            result.update({f"entity_{k}": v for k, v in entity.items()})
            kinds = sorted({n[2:] for n in names if n != "O"})
            by_type = metrics.entity_f1_by_type(named(gold), named(predicted), kinds)
            result.update({f"entity_f1_{kind}": v for kind, v in by_type.items()})
        return result


class ClassificationTask(_PaddedTask):
    metric = "accuracy"
    select_by = "accuracy"
    higher_is_better = True

    def _all_labels(self, examples):
        return [label for _, label in examples]

    def _encode_target(self, label):
        return self.labels.id(label)

    def build_model(self) -> nn.Module:
        m = self.config.model
        return RecurrentClassifier(len(self.vocab), len(self.labels), self.vocab.pad_id, m.cell,
                                   m.embedding_size, m.hidden_size, m.layers, m.dropout,
                                   m.dropout_input, m.dropout_output, m.variational,
                                   m.bidirectional, m.pooling, m.learn_h0, m.weight_drop,
                                   m.dropout_embedding, self.char_options())

    def evaluate(self, model, split: str, device: torch.device) -> dict:
        gold, predicted, loss = self.predictions(model, split, device)
        return {"loss": loss, "accuracy": metrics.accuracy(gold, predicted),
                "macro_f1": metrics.macro_f1(gold, predicted), "examples": len(gold)}


def make_task(config: Config, run_dir: Path | None = None):
    """A task; with a run directory, its saved vocabulary and labels are reused."""
    vocab = labels = None
    if run_dir is not None and (run_dir / "vocab.json").exists():
        vocab = Vocabulary.load(run_dir / "vocab.json")
        if (run_dir / "labels.json").exists():
            labels = LabelSet.load(run_dir / "labels.json")
    if config.data.task == "lm":
        return LanguageModelTask(config, vocab)
    if config.data.task == "tag":
        return TaggingTask(config, vocab, labels)
    return ClassificationTask(config, vocab, labels)


def language_model_config(lm_dir: Path) -> Config:
    """The config of the word-level recurrent LM run at `lm_dir`; refused, naming
    model.init_from, when it is not one."""
    if not (lm_dir / "config.toml").exists():
        raise ConfigError(f"model.init_from: {lm_dir} is not a run directory (no config.toml)")
    lm_config = load_config(lm_dir / "config.toml")
    if lm_config.data.task != "lm" or lm_config.model.type != "rnn":
        raise ConfigError(f"model.init_from: {lm_dir} is not a recurrent language model run "
                          f"(data.task '{lm_config.data.task}', model.type "
                          f"'{lm_config.model.type}')")
    if lm_config.data.level != "word":
        raise ConfigError(f"model.init_from: {lm_dir} is a {lm_config.data.level}-level "
                          "language model, whose tokens are not this model's words; start "
                          "from a word-level one")
    return lm_config


def with_lm_words(vocab: Vocabulary, lm_dir: str | Path) -> Vocabulary:
    """`vocab` followed by the LM's words it lacks (model.init_vocabulary), those that its
    own normalisation leaves as they are; the LM's special tokens are not words."""
    lm_dir = Path(lm_dir)
    language_model_config(lm_dir)
    lm_vocab = Vocabulary.load(lm_dir / "vocab.json")
    specials = {UNK, EOS}
    extra = [w for w in lm_vocab.tokens if w not in vocab.index and w not in specials
             and vocab.normalization.tokenize(w) == [w]]
    return Vocabulary(vocab.tokens + extra, vocab.normalization, vocab.spelling)

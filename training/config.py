"""Training configuration: TOML files under training/configs/, overridable with --set.

Every key is declared below with its default; an unknown key or an inconsistent
combination is refused before any data is read, with a message naming the key.
"""

from __future__ import annotations

import tomllib
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.models.encoders import POOLINGS
from training.models.recurrence import CELLS

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("lm", "tag", "classify")
FORMATS = ("lines", "chars", "conllu", "columns", "labelled")
MODEL_TYPES = ("rnn", "ffnn", "kn")
OPTIMIZERS = ("sgd", "adam", "adamw")
CLASS_WEIGHTINGS = ("none", "inverse_sqrt", "inverse")


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    task: str = "lm"
    format: str = "lines"
    train: str = ""
    valid: str = ""
    test: str = ""
    # tokenizer: "word", "char", or "bpe" (byte-level BPE trained on the training split)
    level: str = "word"
    bpe_vocab_size: int = 8000  # level "bpe": pieces, specials included
    lowercase: bool = False
    number_token: str = ""  # "" keeps numbers as they are
    min_count: int = 1
    max_size: int = 0  # 0: no limit
    token_column: int = 0
    tag_column: int = -1  # columns: index of the tag; conllu: 3 = UPOS, 4 = XPOS
    encoding: str = "utf-8"
    max_word_length: int = 20  # character-aware models: a word's spelled length, markers included
    # lines: "skip" blank lines, or read each as an <eos> ("eos", WikiText's convention)
    blank_lines: str = "skip"


@dataclass
class ModelConfig:
    type: str = "rnn"  # rnn, ffnn (feedforward window LM), kn (Kneser-Ney n-gram)
    cell: str = "lstm"
    embedding_size: int = 64
    hidden_size: int = 64
    layers: int = 1
    dropout: float = 0.0  # between stacked layers
    dropout_input: float = 0.0  # on the embeddings
    dropout_output: float = 0.0  # on the last layer's outputs
    variational: bool = False  # locked dropout: one mask per sequence
    # AWD-LSTM's regularisers (0: off): DropConnect on the hidden-to-hidden weights, one
    # mask per forward pass; whole words dropped from the embedding for one forward pass
    weight_drop: float = 0.0
    dropout_embedding: float = 0.0
    tie_weights: bool = False
    # adaptive softmax (language models): the word ids where the head's shortlist and each
    # cluster end, e.g. [2000, 6000] for PTB; [] is the full softmax
    adaptive_cutoffs: list = field(default_factory=list)
    adaptive_div_value: float = 4.0  # each cluster's projection is this much narrower
    learn_h0: bool = False
    # taggers and classifiers: a character CNN beside the word embedding (0: none), its
    # character embedding size, number of filters and width in characters
    char_embedding_size: int = 0
    char_filters: int = 50
    char_width: int = 3
    # taggers and classifiers: a language model's run directory to start from (its
    # embedding, mapped word by word, and the recurrent layers whose shapes agree)
    init_from: str = ""
    # with init_from: the vocabulary also takes the LM's words, so that a word rare or
    # absent in the task's training data reads as the LM's vector instead of <unk>
    init_vocabulary: bool = False
    bidirectional: bool = False
    pooling: str = "final"
    window: int = 5  # ffnn context size
    order: int = 5  # kn n-gram order
    discount: float = 0.0  # kn: one absolute discount, or 0 for modified Kneser-Ney


@dataclass
class TrainConfig:
    seed: int = 1111
    threads: int = 2
    device: str = "cpu"
    epochs: int = 10
    max_minutes: float = 0.0  # 0: no time limit
    max_steps: int = 0  # 0: no step limit (a stopped run resumes with --resume)
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 35
    variable_bptt: bool = False
    clip: float = 0.25  # gradient-norm threshold, 0 disables
    # language models: AWD-LSTM's activation regularisation, alpha * mean(o^2) on the last
    # layer's dropped outputs, and temporal AR, beta * mean((h_t - h_{t-1})^2) (0: off)
    activation_reg: float = 0.0
    temporal_activation_reg: float = 0.0
    # taggers and classifiers: weight each label's loss by its rarity in training, "none",
    # "inverse_sqrt" ((N / count) ** 0.5) or "inverse" (N / count), mean weight 1
    class_weighting: str = "none"
    # ULMFiT's gradual unfreezing: the top layer group trains alone in the first epoch,
    # then one more group every this many epochs (0: all train from the start)
    unfreeze_every: int = 0
    log_every: int = 100  # steps between metric lines
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints, 0: end of epoch only


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 20.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    plateau_factor: float = 0.25  # lr multiplied by this when validation does not improve
    # epochs without improvement tolerated before that; improvement is judged on the task's
    # metric (perplexity; accuracy; entity F1 for BIO tags), which wobbles from epoch to
    # epoch, so the default waits two
    plateau_patience: int = 2
    min_lr: float = 0.0
    decay_after: int = 0  # from this epoch on, multiply lr by decay_factor each epoch (0: off)
    decay_factor: float = 1.0
    # the last K epochs run decayed (lr times decay_factor at each epoch's end), counted
    # from train.epochs or, under train.max_minutes, from the epochs that still fit the
    # budget at the pace so far: the anneal happens however fast the machine is (0: off)
    decay_last: int = 0
    # NT-ASGD (AWD-LSTM): once validation is worse than the best of all epochs but the last
    # `nonmono`, average the weights after every step from then on; validation, best.pt and
    # the export use the average
    nt_asgd: bool = False
    nonmono: int = 5
    # or start averaging at the end of this epoch whatever validation says (stochastic
    # weight averaging's fixed start; 0: off)
    average_after_epoch: int = 0
    # discriminative learning rates (ULMFiT: 2.6): each layer group down from the output
    # trains this factor slower (taggers and classifiers; 1: one rate)
    layer_lr_decay: float = 1.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _apply(config: Config, section: str, key: str, value: Any) -> None:
    target = getattr(config, section, None)
    if target is None or section not in {f.name for f in fields(Config)}:
        raise ConfigError(f"unknown section '{section}' (known: data, model, train, optimizer)")
    declared = {f.name: f for f in fields(target)}
    if key not in declared:
        raise ConfigError(f"unknown key '{section}.{key}'")
    expected = type(getattr(target, key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"'{section}.{key}' must be {expected.__name__}, got {value!r}")
    setattr(target, key, value)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`optimizer.lr=0.5` -> ("optimizer", "lr", 0.5); values are TOML, bare words strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def anchored(config: Config, base: Path) -> Config:
    """The config with its relative data paths made absolute against `base`, so that a
    run's saved config reads the same files wherever it is used from (`data:` paths, under
    RECUR_DATA, stay as they are)."""
    copy = deepcopy(config)
    for split in ("train", "valid", "test"):
        path = getattr(copy.data, split)
        if path and not path.startswith("data:") and not Path(path).is_absolute():
            setattr(copy.data, split, str((base / path).resolve()))
    return copy


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the name of a recipe in training/configs/ (`ptb-lstm`)."""
    path = Path(name)
    if path.exists():
        return path
    recipe = CONFIG_DIR / f"{name}.toml"
    if recipe.exists():
        return recipe
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"no config file {name!r} (recipes: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    config = Config()
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            data = tomllib.loads(resolved.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{resolved}: {error}") from error
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{resolved}: '{section}' must be a [section]")
            for key, value in values.items():
                _apply(config, section, key, value)
    for text in overrides or []:
        _apply(config, *parse_override(text))
    validate(config)
    return config


def validate(config: Config) -> None:
    d, m, t, o = config.data, config.model, config.train, config.optimizer
    checks = [
        (d.task in TASKS, "data.task", f"must be one of {', '.join(TASKS)}"),
        (d.format in FORMATS, "data.format", f"must be one of {', '.join(FORMATS)}"),
        (d.level in ("word", "char", "bpe"), "data.level", "must be 'word', 'char' or 'bpe'"),
        (d.level != "bpe" or (d.task == "lm" and d.format == "lines"), "data.level",
         "'bpe' applies to language models on data.format = 'lines'"),
        (d.level != "bpe" or not d.number_token, "data.number_token",
         "does not apply to data.level = 'bpe' (any text is its pieces)"),
        (d.bpe_vocab_size >= 258, "data.bpe_vocab_size",
         "must be >= 258 (the 256 bytes and <unk>, <eos>)"),
        (bool(d.train), "data.train", "is required"),
        (d.blank_lines in ("skip", "eos"), "data.blank_lines", "must be 'skip' or 'eos'"),
        (d.blank_lines == "skip" or d.format == "lines", "data.blank_lines",
         "applies to data.format = 'lines'"),
        (m.type in MODEL_TYPES, "model.type", f"must be one of {', '.join(MODEL_TYPES)}"),
        (m.cell in CELLS, "model.cell", f"must be one of {', '.join(CELLS)}"),
        (m.pooling in POOLINGS, "model.pooling", f"must be one of {', '.join(POOLINGS)}"),
        (m.type == "rnn" or d.task == "lm", "model.type",
         f"'{m.type}' is a language model; data.task is '{d.task}'"),
        (not (d.task == "lm" and m.bidirectional), "model.bidirectional",
         "a language model predicts the next token and cannot read the future: "
         "set it to false for data.task = 'lm'"),
        (not m.tie_weights or m.embedding_size == m.hidden_size, "model.tie_weights",
         f"needs model.embedding_size == model.hidden_size "
         f"(got {m.embedding_size} and {m.hidden_size})"),
        (not m.tie_weights or d.task == "lm", "model.tie_weights", "applies to language models"),
        (all(type(c) is int for c in m.adaptive_cutoffs)
         and m.adaptive_cutoffs == sorted(set(m.adaptive_cutoffs))
         and all(c > 0 for c in m.adaptive_cutoffs), "model.adaptive_cutoffs",
         f"must be positive word ids in increasing order, got {m.adaptive_cutoffs}"),
        (not m.adaptive_cutoffs or (d.task == "lm" and m.type == "rnn"),
         "model.adaptive_cutoffs", "applies to recurrent language models"),
        (not (m.adaptive_cutoffs and m.tie_weights), "model.adaptive_cutoffs",
         "cannot be used with model.tie_weights (the adaptive softmax has no [V, H] matrix "
         "to share with the embedding)"),
        (m.adaptive_div_value >= 1.0, "model.adaptive_div_value", "must be >= 1"),
        (m.layers >= 1 and m.hidden_size >= 1 and m.embedding_size >= 1, "model.layers",
         "layers, hidden_size and embedding_size must be >= 1"),
        (2 <= m.order <= 5, "model.order", "must be between 2 and 5"),
        (0.0 <= m.discount < 1.0, "model.discount",
         "must be in [0, 1) (0: modified Kneser-Ney, discounts estimated from the counts)"),
        (m.window >= 1, "model.window", "must be >= 1"),
        (all(0.0 <= p < 1.0 for p in (m.dropout, m.dropout_input, m.dropout_output)),
         "model.dropout", "dropout probabilities must be in [0, 1)"),
        (0.0 <= m.weight_drop < 1.0, "model.weight_drop", "must be in [0, 1)"),
        (0.0 <= m.dropout_embedding < 1.0, "model.dropout_embedding", "must be in [0, 1)"),
        (not ((m.weight_drop or m.dropout_embedding) and m.type != "rnn"), "model.weight_drop",
         f"weight_drop and dropout_embedding apply to recurrent models (model.type is "
         f"'{m.type}')"),
        (t.activation_reg >= 0.0 and t.temporal_activation_reg >= 0.0, "train.activation_reg",
         "activation_reg and temporal_activation_reg must be >= 0"),
        (not ((t.activation_reg or t.temporal_activation_reg)
              and not (d.task == "lm" and m.type == "rnn")), "train.activation_reg",
         "activation_reg and temporal_activation_reg apply to recurrent language models"),
        (o.nonmono >= 1, "optimizer.nonmono", "must be >= 1"),
        (o.average_after_epoch >= 0, "optimizer.average_after_epoch", "must be >= 0"),
        (o.layer_lr_decay >= 1.0, "optimizer.layer_lr_decay", "must be >= 1"),
        (o.layer_lr_decay == 1.0 or d.task != "lm", "optimizer.layer_lr_decay",
         "applies to taggers and classifiers"),
        (t.unfreeze_every >= 0, "train.unfreeze_every", "must be >= 0"),
        (m.char_embedding_size >= 0, "model.char_embedding_size", "must be >= 0 (0: off)"),
        (not m.char_embedding_size or d.task != "lm", "model.char_embedding_size",
         "applies to taggers and classifiers"),
        (m.char_filters >= 1, "model.char_filters", "must be >= 1"),
        (m.char_width >= 1 and m.char_width % 2 == 1, "model.char_width",
         "must be an odd number >= 1"),
        (3 <= d.max_word_length <= 64, "data.max_word_length",
         "must be in [3, 64] (a word's start and end markers and its characters)"),
        (not ((o.nt_asgd or o.average_after_epoch) and m.type == "kn"), "optimizer.nt_asgd",
         "nt_asgd and average_after_epoch average trained weights; model.type 'kn' has none"),
        (d.level != "bpe" or (d.min_count == 1 and d.max_size == 0), "data.min_count",
         "min_count and max_size do not apply to data.level = 'bpe' (its size is "
         "data.bpe_vocab_size)"),
        (t.unfreeze_every == 0 or d.task != "lm", "train.unfreeze_every",
         "applies to taggers and classifiers"),
        (not m.init_from or d.task != "lm", "model.init_from",
         "applies to taggers and classifiers (a language model run to start them from)"),
        (not m.init_vocabulary or m.init_from, "model.init_vocabulary",
         "takes the words of model.init_from's language model: set that too"),
        (t.class_weighting in CLASS_WEIGHTINGS, "train.class_weighting",
         f"must be one of {', '.join(CLASS_WEIGHTINGS)}"),
        (t.class_weighting == "none" or d.task != "lm", "train.class_weighting",
         "applies to taggers and classifiers"),
        (t.batch_size >= 1 and t.eval_batch_size >= 1, "train.batch_size", "must be >= 1"),
        (t.bptt >= 1, "train.bptt", "must be >= 1"),
        (t.clip >= 0.0, "train.clip", "must be >= 0"),
        (t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         "must be cpu or cuda[:N]"),
        (o.name in OPTIMIZERS, "optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}"),
        (o.lr > 0.0, "optimizer.lr", "must be > 0"),
        (0.0 < o.plateau_factor <= 1.0, "optimizer.plateau_factor", "must be in (0, 1]"),
        (0.0 < o.decay_factor <= 1.0, "optimizer.decay_factor", "must be in (0, 1]"),
        (o.decay_after >= 0, "optimizer.decay_after", "must be >= 0"),
        (o.decay_last >= 0, "optimizer.decay_last", "must be >= 0"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key} {message}")
    if d.format == "chars" and d.level != "char":
        raise ConfigError("data.level must be 'char' for data.format = 'chars'")
    wanted = {"lm": ("lines", "chars"), "tag": ("conllu", "columns"), "classify": ("labelled",)}
    if d.format not in wanted[d.task]:
        raise ConfigError(f"data.format '{d.format}' does not fit data.task '{d.task}' "
                          f"(use {' or '.join(wanted[d.task])})")

"""What the engine returns: plain values, in columns (one list per field), which is what
both a protobuf builder and a tensor writer want."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class ModelId:
    name: str
    version: int


@dataclass(frozen=True, slots=True)
class Scored:
    """A scored sequence: per token its id, its text and log P(token | what precedes it)
    under the scoring convention."""

    ids: list[int]
    words: list[str]
    logprobs: list[float]
    unknown: int  # words of the input mapped to <unk>
    total_logprob: float
    # if asked for: per token, the most likely tokens at its position, (id, text, log-prob),
    # most likely first
    top: list[list[tuple[int, str, float]]] | None = None

    @property
    def token_count(self) -> int:
        return len(self.ids)

    @property
    def perplexity(self) -> float:
        """exp(-mean log-prob); infinite when that overflows (a near-impossible token)."""
        try:
            return math.exp(-self.total_logprob / len(self.ids))
        except OverflowError:
            return math.inf


@dataclass(frozen=True, slots=True)
class Likelihood:
    """A continuation given its context (lm-evaluation-harness's loglikelihood): the sum of
    its tokens' log-probs, their count, whether each was the most likely token at its
    position (is_greedy), each token's log-prob, and the context's length in tokens."""

    logprob: float
    token_count: int
    is_greedy: bool
    token_logprobs: list[float]
    context_tokens: int
    unknown: int  # words of context and continuation mapped to <unk>


@dataclass(frozen=True, slots=True)
class Tagged:
    """A tagged sequence: per token its text, its most likely tag and that tag's
    log-probability; `tag_logprobs` [T, C] holds every tag's."""

    words: list[str]
    tags: list[str]
    logprobs: list[float]
    tag_logprobs: np.ndarray


@dataclass(frozen=True, slots=True)
class Classified:
    """A class distribution: log-probabilities [C] in the order of `labels`."""

    labels: list[str]
    logprobs: np.ndarray

    @property
    def label(self) -> str:
        return self.labels[int(np.argmax(self.logprobs))]

    def ranked(self) -> list[tuple[str, float]]:
        """(label, probability), most likely first (ties in label order)."""
        order = np.argsort(-self.logprobs, kind="stable")
        return [(self.labels[i], float(np.exp(self.logprobs[i]))) for i in order]


def tagged(words: list[str], logprobs: np.ndarray, labels: list[str]) -> Tagged:
    best = logprobs.argmax(axis=1)
    return Tagged(words, [labels[b] for b in best.tolist()],
                  logprobs[np.arange(len(best)), best].tolist(), logprobs)


@dataclass(slots=True)
class SessionStep:
    """A session after one step: where it is, what the step read (by task) and, where
    state tokens are on, the token that resumes it."""

    session_id: str
    model: ModelId
    position: int
    unknown: int = 0
    scored: Scored | None = None  # language models: the appended tokens' log-probs
    next_tokens: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, lp)
    # language models, if asked for: every next token's log-prob [V] (a copy of the session's)
    next_logprobs: np.ndarray | None = None
    tagged: Tagged | None = None  # unidirectional taggers: the appended tokens' tags
    classified: Classified | None = None  # classifiers: the distribution of the text so far
    state_token: bytes = b""
    opened: bool = False  # this call brought the session here (created or resumed it)
    generation: int = 0  # which incarnation of the id (Engine.end_session)

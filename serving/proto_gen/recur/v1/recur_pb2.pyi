from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "inputs", "add_eos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ADD_EOS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    add_eos: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., add_eos: _Optional[bool] = ...) -> None: ...

class SequenceScore(_message.Message):
    __slots__ = ("tokens", "total_logprob", "token_count", "perplexity", "unknown_count")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    total_logprob: float
    token_count: int
    perplexity: float
    unknown_count: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., total_logprob: _Optional[float] = ..., token_count: _Optional[int] = ..., perplexity: _Optional[float] = ..., unknown_count: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[SequenceScore]
    model: ModelRef
    def __init__(self, scores: _Optional[_Iterable[_Union[SequenceScore, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("id", "model", "inputs", "add_eos")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ADD_EOS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: ModelRef
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    add_eos: bool
    def __init__(self, id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., add_eos: _Optional[bool] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("id", "scores")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    id: str
    scores: _containers.RepeatedCompositeFieldContainer[SequenceScore]
    def __init__(self, id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[SequenceScore, _Mapping]]] = ...) -> None: ...

class LogLikelihoodPair(_message.Message):
    __slots__ = ("context", "continuation")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    context: Input
    continuation: Input
    def __init__(self, context: _Optional[_Union[Input, _Mapping]] = ..., continuation: _Optional[_Union[Input, _Mapping]] = ...) -> None: ...

class LogLikelihoodRequest(_message.Message):
    __slots__ = ("model", "pairs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    pairs: _containers.RepeatedCompositeFieldContainer[LogLikelihoodPair]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., pairs: _Optional[_Iterable[_Union[LogLikelihoodPair, _Mapping]]] = ...) -> None: ...

class LogLikelihood(_message.Message):
    __slots__ = ("logprob", "token_count", "is_greedy", "token_logprobs", "context_token_count", "unknown_count")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    token_count: int
    is_greedy: bool
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    context_token_count: int
    unknown_count: int
    def __init__(self, logprob: _Optional[float] = ..., token_count: _Optional[int] = ..., is_greedy: _Optional[bool] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., context_token_count: _Optional[int] = ..., unknown_count: _Optional[int] = ...) -> None: ...

class LogLikelihoodResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LogLikelihood]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[LogLikelihood, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class LogLikelihoodRollingRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ...) -> None: ...

class RollingLogLikelihood(_message.Message):
    __slots__ = ("logprob", "token_count", "unknown_count")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    token_count: int
    unknown_count: int
    def __init__(self, logprob: _Optional[float] = ..., token_count: _Optional[int] = ..., unknown_count: _Optional[int] = ...) -> None: ...

class LogLikelihoodRollingResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RollingLogLikelihood]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[RollingLogLikelihood, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("model", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "n", "stop", "stop_token_ids", "pack_tokens", "stream_interval_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    prompt: Input
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    n: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pack_tokens: bool
    stream_interval_ms: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., prompt: _Optional[_Union[Input, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., n: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., pack_tokens: _Optional[bool] = ..., stream_interval_ms: _Optional[int] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("index", "token", "finish_reason", "text", "model", "tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token: Token
    finish_reason: FinishReason
    text: str
    model: ModelRef
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, index: _Optional[int] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "prefix", "top_k", "state_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    prefix: Input
    top_k: int
    state_token: bytes
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., prefix: _Optional[_Union[Input, _Mapping]] = ..., top_k: _Optional[int] = ..., state_token: _Optional[bytes] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "input", "top_k", "state_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: Input
    top_k: int
    state_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., top_k: _Optional[int] = ..., state_token: _Optional[bytes] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "top_k")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    top_k: int
    def __init__(self, session_id: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("model", "input", "top_k", "state_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    input: Input
    top_k: int
    state_token: bytes
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., top_k: _Optional[int] = ..., state_token: _Optional[bytes] = ...) -> None: ...

class TaggedToken(_message.Message):
    __slots__ = ("token", "tag", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    tag: str
    logprob: float
    def __init__(self, token: _Optional[str] = ..., tag: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ClassProbability(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("session_id", "model", "position", "tokens", "next_tokens", "tags", "classes", "unknown_count", "state_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelRef
    position: int
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    next_tokens: _containers.RepeatedCompositeFieldContainer[Token]
    tags: _containers.RepeatedCompositeFieldContainer[TaggedToken]
    classes: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    unknown_count: int
    state_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., next_tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., tags: _Optional[_Iterable[_Union[TaggedToken, _Mapping]]] = ..., classes: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ..., unknown_count: _Optional[int] = ..., state_token: _Optional[bytes] = ...) -> None: ...

class TagRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ...) -> None: ...

class TaggedSequence(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TaggedToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TaggedToken, _Mapping]]] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TaggedSequence]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[TaggedSequence, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("label", "classes")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    label: str
    classes: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    def __init__(self, label: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "latest", "task", "cell", "layers", "hidden_size", "bidirectional", "vocab_size", "labels", "ready", "device", "providers", "incremental")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    BIDIRECTIONAL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    latest: bool
    task: str
    cell: str
    layers: int
    hidden_size: int
    bidirectional: bool
    vocab_size: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    device: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    incremental: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., latest: _Optional[bool] = ..., task: _Optional[str] = ..., cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., bidirectional: _Optional[bool] = ..., vocab_size: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., device: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., incremental: _Optional[bool] = ...) -> None: ...

class UnavailableModel(_message.Message):
    __slots__ = ("name", "version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "unavailable")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    unavailable: _containers.RepeatedCompositeFieldContainer[UnavailableModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., unavailable: _Optional[_Iterable[_Union[UnavailableModel, _Mapping]]] = ...) -> None: ...

"""The model runtime: an artifact on ONNX Runtime, no torch.

States stay where the session computes: every call goes through I/O binding, the state
input and output are OrtValues on the session's device (on CUDA they never return to the
host between steps), and only log-probabilities come back to numpy. The same code path
runs on the CPU, where CI tests it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.model.artifact import LM_GREEDY_OUTPUTS, Artifact, load_artifact

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda")


class DeviceUnavailable(RuntimeError):
    pass


@functools.cache
def _load_cuda_libraries() -> str:
    """Loads CUDA and cuDNN before the first CUDA session: onnxruntime-gpu finds them in
    the system paths (CUDA images) or in pip's nvidia-* packages only once they are loaded.
    Returns what failed to load, for the error message; ONNX Runtime prints it instead."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            preload()
        except Exception as error:  # noqa: BLE001 - best effort: the session reports the rest
            print(f"preload_dlls failed: {error}")
    return " ".join(line for line in printed.getvalue().splitlines() if line.startswith("Failed"))


@dataclass
class LMStep:
    token_logprobs: np.ndarray  # [B, T]: log P(targets[b, t] | tokens[b, :t+1], state)
    next_logprobs: np.ndarray  # [B, V]: after each row's last valid token
    state: ort.OrtValue  # [L, B, S] on the session's device
    # [B, T]: the argmax token at each position and its log-prob (bitwise the token_logprobs
    # of that token); None from artifacts exported before the graph had them
    greedy_tokens: np.ndarray | None = None
    greedy_logprobs: np.ndarray | None = None


class ModelRuntime:
    def __init__(self, artifact: Artifact | str | Path, device: str = "cpu", threads: int = 0,
                 allow_cpu_fallback: bool = False, spin: bool = True):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        kind, _, index = device.partition(":")
        if kind not in DEVICES:
            raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
        self.device_id = int(index or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        not_loaded = ""
        if kind == "cuda":
            not_loaded = _load_cuda_libraries()
            # TF32 off: the graph is verified against torch in float32 (within a few times
            # float32's own rounding), which TF32's 10-bit mantissas would break on the
            # [H, V] projection
            providers.insert(0, ("CUDAExecutionProvider",
                                 {"device_id": self.device_id, "use_tf32": "0"}))
        self.session = ort.InferenceSession(str(self.artifact.model_path), options,
                                            providers=providers)
        self.providers = self.session.get_providers()
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.has_greedy = set(LM_GREEDY_OUTPUTS) <= set(self.output_names)
        self.fallback = kind == "cuda" and "CUDAExecutionProvider" not in self.providers
        if self.fallback and not allow_cpu_fallback:
            raise DeviceUnavailable(
                f"{self.artifact.model_path}: device 'cuda' was requested but ONNX Runtime could "
                f"not activate CUDAExecutionProvider (active: {', '.join(self.providers)}; "
                f"available in this build: {', '.join(ort.get_available_providers())}). "
                + (f"{not_loaded} " if not_loaded else "")
                + "Install onnxruntime-gpu with CUDA and cuDNN, or allow the CPU fallback.")
        if self.fallback:
            log.warning("%s: CUDA unavailable, running on the CPU", self.artifact.model_path)
        self.device = "cpu" if kind == "cpu" or self.fallback else "cuda"
        meta = self.artifact.metadata
        self.vocab, self.labels, self.task = self.artifact.vocab, self.artifact.labels, meta["task"]
        self.layers, self.state_size = meta["layers"], meta["state_size"]
        initial = meta.get("initial_state")
        self._initial = (np.zeros((self.layers, self.state_size), np.float32) if initial is None
                         else np.asarray(initial, np.float32))
        # what ONNX Runtime was given to run: calls, and token positions (padding excluded)
        self.calls = self.positions_run = 0

    @property
    def incremental(self) -> bool:
        return self.artifact.incremental

    def close(self) -> None:
        """Releases the ONNX Runtime session (its weights and buffers) now, rather than
        whenever the last reference to this runtime goes; later calls raise."""
        self.session = None

    # -- states ---------------------------------------------------------------------------
    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32),
                                                self.device, self.device_id)

    def initial_state(self, batch: int) -> np.ndarray:
        """The state before any token: zeros, or the learned h0 of each layer."""
        return np.repeat(self._initial[:, None, :], batch, axis=1)

    def start_point(self) -> tuple[np.ndarray, np.ndarray]:
        """A language model's (state [L, S], next-token log-probs [V]) after reading `<eos>`
        from the initial state: where every sentence starts under the scoring convention."""
        eos = np.array([[self.vocab.eos_id]], np.int64)
        step = self.run_lm(eos, np.array([1], np.int64), self.initial_state(1), eos)
        return step.state.numpy()[:, 0], step.next_logprobs[0]

    # -- calls ----------------------------------------------------------------------------
    def _check(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [batch, time] array, got {tokens.shape}")
        if lengths.shape != (tokens.shape[0],):
            raise ValueError(f"lengths must have shape [{tokens.shape[0]}], got {lengths.shape}")
        if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
            raise ValueError(f"lengths must be in [1, {tokens.shape[1]}]")
        vocab = len(self.vocab)
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"tokens must be ids in [0, {vocab})")

    def _run(self, tokens, lengths, state, targets=None, chars=None) -> list:
        session = self.session
        if session is None:
            raise RuntimeError(f"{self.artifact.path}: the runtime was closed")
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, np.int64))
        if chars is not None:
            binding.bind_cpu_input("chars", np.ascontiguousarray(chars, np.int64))
        binding.bind_cpu_input("lengths", np.ascontiguousarray(lengths, np.int64))
        if self.incremental:
            if state is None:
                state = self.initial_state(tokens.shape[0])
            if isinstance(state, np.ndarray):
                expected = (self.layers, tokens.shape[0], self.state_size)
                if state.shape != expected:
                    raise ValueError(f"state must have shape {list(expected)}, got "
                                     f"{list(state.shape)}")
                state = self.to_device(state)
            binding.bind_ortvalue_input("state", state)
        if targets is not None:
            binding.bind_cpu_input("targets", np.ascontiguousarray(targets, np.int64))
        for output in session.get_outputs():
            on_device = output.name == "new_state"
            binding.bind_output(output.name, self.device if on_device else "cpu",
                                self.device_id if on_device else 0)
        session.run_with_iobinding(binding)
        self.calls += 1
        self.positions_run += int(lengths.sum())
        return binding.get_outputs()

    def run_lm(self, tokens: np.ndarray, lengths: np.ndarray,
               state: np.ndarray | ort.OrtValue | None = None,
               targets: np.ndarray | None = None) -> LMStep:
        """One call over [B, T] tokens from `state`. Without targets, token_logprobs scores
        tokens[:, 1:] and holds 0 in the last column (the next token is not known yet)."""
        if self.task != "lm":
            raise ValueError(f"{self.artifact.path} is a {self.task} model, not a language model")
        tokens, lengths = np.asarray(tokens, np.int64), np.asarray(lengths, np.int64)
        self._check(tokens, lengths)
        if targets is None:
            targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
        elif np.asarray(targets).shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {list(tokens.shape)}")
        elif np.asarray(targets).min() < 0 or np.asarray(targets).max() >= len(self.vocab):
            raise ValueError(f"targets must be ids in [0, {len(self.vocab)})")
        out = dict(zip(self.output_names, self._run(tokens, lengths, state, targets)))
        greedy = ((out["greedy_tokens"].numpy(), out["greedy_logprobs"].numpy())
                  if self.has_greedy else (None, None))
        return LMStep(out["token_logprobs"].numpy(), out["next_logprobs"].numpy(),
                      out["new_state"], *greedy)

    def run_encoder(self, tokens: np.ndarray, lengths: np.ndarray,
                    state: np.ndarray | ort.OrtValue | None = None):
        """Tagger: ([B,T,C] tag log-probs, state); classifier: ([B,C] class log-probs, state).
        The state is None for bidirectional models, which read whole texts."""
        if self.task == "lm":
            raise ValueError(f"{self.artifact.path} is a language model; use run_lm")
        if state is not None and not self.incremental:
            raise ValueError("a bidirectional model reads whole texts and takes no state")
        tokens, lengths = np.asarray(tokens, np.int64), np.asarray(lengths, np.int64)
        chars = None
        if self.spelled:
            tokens, chars = self._split_spelling(tokens)
        self._check(tokens, lengths)
        outputs = self._run(tokens, lengths, state, chars=chars)
        return outputs[0].numpy(), (outputs[1] if self.incremental else None)

    @property
    def spelled(self) -> bool:
        """A character-aware encoder: its tokens are [B, T, 1 + L], each a word id and the
        word's character ids (Vocabulary.encode_spelled), fed as "tokens" and "chars"."""
        return "chars" in self.artifact.metadata["inputs"]

    def _split_spelling(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spelling = self.vocab.spelling
        width = 1 + spelling.max_word_length
        if tokens.ndim != 3 or tokens.shape[2] != width:
            raise ValueError(f"a character-aware model's tokens are [batch, time, {width}] "
                             f"(word id, then {width - 1} character ids), got {tokens.shape}")
        chars = tokens[..., 1:]
        if tokens.size and (chars.min() < 0 or chars.max() >= len(spelling)):
            raise ValueError(f"character ids must be in [0, {len(spelling)})")
        return np.ascontiguousarray(tokens[..., 0]), np.ascontiguousarray(chars)

    # -- conveniences over whole sequences -------------------------------------------------
    def score(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each id sequence under the scoring convention
        (read `<eos>` from the initial state first; append `<eos>` to the ids to score it),
        all sequences in one padded batch."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("sequences must be non-empty lists of token ids")
        batch, width = len(sequences), max(len(s) for s in sequences)
        inputs = np.full((batch, width), self.vocab.eos_id, np.int64)
        targets = np.zeros((batch, width), np.int64)
        for row, ids in enumerate(sequences):
            inputs[row, 1 : len(ids)] = ids[:-1]
            targets[row, : len(ids)] = ids
        lengths = np.array([len(s) for s in sequences], np.int64)
        step = self.run_lm(inputs, lengths, self.initial_state(batch), targets)
        return [step.token_logprobs[row, : len(ids)] for row, ids in enumerate(sequences)]

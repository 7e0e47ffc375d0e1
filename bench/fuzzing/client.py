"""The fuzzer's calls and what it counts of them.

Every call goes out as bytes through a generic multicallable (so invalid protobuf and
invalid UTF-8 can be sent too) and its final status is counted per RPC. A Recorder keeps
the counts, the requests in flight (for the monitor to name when the server stalls or
grows), and a few example requests for every check that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from bench.fuzzing.values import describe
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb

FORBIDDEN = {"INTERNAL", "UNKNOWN"}
CODES = {c.name for c in grpc.StatusCode}
EXAMPLES = 6  # example requests kept per failed check (the first ones, of distinct kinds)


@dataclass(frozen=True)
class Rpc:
    name: str  # Service.Method
    path: str
    request: type
    response: type
    client_streaming: bool
    server_streaming: bool


def _rpcs() -> dict[str, Rpc]:
    from google.protobuf import message_factory

    services = [*pb.DESCRIPTOR.services_by_name.values(),
                v2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                health_pb2.DESCRIPTOR.services_by_name["Health"]]
    found = {}
    for service in services:
        for method in service.methods:
            name = f"{service.name}.{method.name}"
            found[name] = Rpc(name, f"/{service.full_name}/{method.name}",
                              message_factory.GetMessageClass(method.input_type),
                              message_factory.GetMessageClass(method.output_type),
                              method.client_streaming, method.server_streaming)
    return found


RPCS = _rpcs()


@dataclass
class Outcome:
    code: str  # "OK" or a grpc.StatusCode name
    details: str = ""
    responses: list[bytes] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    def parsed(self, rpc: str) -> list:
        return [RPCS[rpc].response.FromString(r) for r in self.responses]


class Recorder:
    def __init__(self, normal_timeout_s: float):
        self.normal_timeout_s = normal_timeout_s
        self.requests: Counter[str] = Counter()  # rpc -> calls the fuzzer sent
        self.codes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # ModelStreamInfer answers a failed request in the stream: the code its
        # error_message names, per RPC
        self.stream_errors: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.check_requests: Counter[str] = Counter()  # rpc -> calls the checks made
        self.check_codes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.max_seconds: defaultdict[str, float] = defaultdict(float)
        self.total_seconds: defaultdict[str, float] = defaultdict(float)
        self.unreadable: Counter[str] = Counter()  # rpc -> errors over the metadata limit
        # rpc -> code -> the first (label, details) seen: what each status was about
        self.samples: defaultdict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
        self.failures: Counter[str] = Counter()  # check -> failures
        self.examples: defaultdict[str, list[dict]] = defaultdict(list)
        self._kinds: defaultdict[str, set] = defaultdict(set)
        self.in_flight: dict[int, tuple[str, str, object, float]] = {}
        self._ids = itertools.count()
        self.batch = 0

    def fail(self, check: str, example: dict, kind: str = "") -> None:
        """Counts a failure of `check`; keeps the example if it is one of the first of a
        kind not seen before (kind: what distinguishes examples, e.g. rpc + label)."""
        self.failures[check] += 1
        examples, kinds = self.examples[check], self._kinds[check]
        if len(examples) < EXAMPLES and kind not in kinds:
            kinds.add(kind)
            examples.append({"batch": self.batch, **example})

    def started(self, rpc: str, label: str, message) -> int:
        key = next(self._ids)
        self.in_flight[key] = (rpc, label, message, time.monotonic())
        return key

    def finished(self, key: int) -> None:
        self.in_flight.pop(key, None)

    def running_longer_than(self, seconds: float) -> int:
        """How many requests in flight started more than `seconds` ago."""
        since = time.monotonic() - seconds
        return sum(1 for *_, started in list(self.in_flight.values()) if started < since)

    def snapshot(self, limit: int = 12) -> list[dict]:
        """The requests in flight now, longest running first (read from another thread:
        the dict may change meanwhile)."""
        for _ in range(5):
            try:
                items = list(self.in_flight.values())
                break
            except RuntimeError:
                continue
        else:
            return []
        now = time.monotonic()
        items.sort(key=lambda item: -item[3])  # the latest first: a hung request waits idle
        return [{"rpc": rpc, "label": label[:200], "running_s": round(now - started, 3),
                 "request": describe(message)[:300]}
                for rpc, label, message, started in items[:limit]]

    def record(self, rpc: str, label: str, message, outcome: Outcome, timeout: float,
               check: bool) -> None:
        (self.check_codes if check else self.codes)[rpc][outcome.code] += 1
        (self.check_requests if check else self.requests)[rpc] += 1
        self.max_seconds[rpc] = max(self.max_seconds[rpc], outcome.seconds)
        if not check:
            self.total_seconds[rpc] += outcome.seconds
            if "metadata size exceeds" in outcome.details:
                self.unreadable[rpc] += 1
        if not check and outcome.code not in self.samples[rpc]:
            self.samples[rpc][outcome.code] = (label[:160], outcome.details[:240])
        example = {"rpc": rpc, "label": label, "code": outcome.code,
                   "details": outcome.details[:400], "seconds": round(outcome.seconds, 3)}
        if outcome.code in FORBIDDEN:
            self.fail("statuses", {**example, "request": describe(message)},
                      f"{rpc} {label} {outcome.code}")
        if outcome.code == "DEADLINE_EXCEEDED" and timeout >= self.normal_timeout_s:
            self.fail("hangs", {**example, "request": describe(message)}, f"{rpc} {label}")
        if rpc == "GRPCInferenceService.ModelStreamInfer" and outcome.responses:
            for raw in outcome.responses:
                self.stream_error(rpc, label, message, raw)

    def stream_error(self, rpc: str, label: str, message, raw: bytes) -> None:
        try:
            response = v2.ModelStreamInferResponse.FromString(raw)
        except Exception:
            return
        if not response.error_message:
            return
        code = response.error_message.split(":", 1)[0]
        code = code if code in CODES else "(no code named)"
        self.stream_errors[rpc][code] += 1
        if code in FORBIDDEN:
            self.fail("statuses", {"rpc": rpc, "label": label, "code": f"error_message {code}",
                                   "details": response.error_message[:400],
                                   "request": describe(message)}, f"{rpc} {label} {code}")


def _payload(message) -> bytes:
    return message if isinstance(message, bytes | bytearray) else message.SerializeToString()


class Caller:
    """Calls on one channel, every one counted by the recorder.

    A bidirectional stream sent whole goes through a blocking channel in a thread: a
    grpc.aio client that is still writing when the server ends the stream with an error
    reports INTERNAL ("Internal error from Core") or UNAVAILABLE (RST_STREAM) instead of
    the server's status, which the blocking client reports. Streams driven message by
    message (`stream`) stay on grpc.aio: they write only after the previous answer."""

    def __init__(self, channel: grpc.aio.Channel, recorder: Recorder, timeout_s: float,
                 blocking: grpc.Channel, executor):
        self.channel, self.recorder, self.timeout_s = channel, recorder, timeout_s
        self.blocking, self.executor = blocking, executor
        self._callables: dict[str, object] = {}
        self._blocking_callables: dict[str, object] = {}

    def _whole_stream(self, rpc: Rpc, payloads: list[bytes], timeout: float) -> Outcome:
        method = self._blocking_callables.get(rpc.name)
        if method is None:
            method = self._blocking_callables[rpc.name] = self.blocking.stream_stream(rpc.path)
        outcome = Outcome("OK")
        try:
            outcome.responses = list(method(iter(payloads), timeout=timeout))
        except grpc.RpcError as error:
            outcome.code, outcome.details = error.code().name, error.details() or ""
        return outcome

    def _callable(self, rpc: Rpc):
        made = self._callables.get(rpc.name)
        if made is None:
            kind = {(False, False): self.channel.unary_unary,
                    (False, True): self.channel.unary_stream,
                    (True, True): self.channel.stream_stream}[
                (rpc.client_streaming, rpc.server_streaming)]
            made = self._callables[rpc.name] = kind(rpc.path)
        return made

    async def call(self, name: str, request, label: str, timeout: float | None = None,
                   first_only: bool = False, check: bool = False) -> Outcome:
        """One call: `request` a message or bytes (a list of them for a bidirectional
        stream, all sent). `first_only`: a server stream is cancelled after its first
        message (health Watch streams until cancelled)."""
        rpc = RPCS[name]
        timeout = self.timeout_s if timeout is None else timeout
        recorder = self.recorder
        key = recorder.started(name, label, request)
        started = time.monotonic()
        outcome = Outcome("OK")
        try:
            method = self._callable(rpc)
            if rpc.client_streaming:
                payloads = [_payload(m) for m in request]
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._whole_stream, rpc, payloads, timeout)
            elif rpc.server_streaming:
                call = method(_payload(request), timeout=timeout)
                if first_only:
                    first = await call.read()
                    if first is not grpc.aio.EOF:
                        outcome.responses.append(first)
                    call.cancel()
                else:
                    outcome.responses = [r async for r in call]
            else:
                outcome.responses = [await method(_payload(request), timeout=timeout)]
        except grpc.aio.AioRpcError as error:
            outcome.code, outcome.details = error.code().name, error.details() or ""
        except asyncio.CancelledError:
            if not first_only:
                raise
        finally:
            outcome.seconds = time.monotonic() - started
            recorder.finished(key)
        recorder.record(name, label, request, outcome, timeout, check)
        return outcome

    def stream(self, name: str, label: str, timeout: float | None = None) -> Stream:
        return Stream(self, name, label, self.timeout_s if timeout is None else timeout)


class Stream:
    """A bidirectional call driven message by message: `send` writes one request and
    reads its answer; `close` ends the call and counts its status."""

    def __init__(self, caller: Caller, name: str, label: str, timeout: float):
        self.caller, self.name, self.label, self.timeout = caller, name, label, timeout
        self.call = caller._callable(RPCS[name])(timeout=timeout)
        self.sent: list = []
        self.responses: list[bytes] = []
        self.started = time.monotonic()
        self.outcome: Outcome | None = None

    async def send(self, message) -> bytes | None:
        """The answer to `message`, or None when the call ended instead (see `close`)."""
        recorder = self.caller.recorder
        self.sent.append(message)
        key = recorder.started(self.name, self.label, message)
        try:
            await self.call.write(_payload(message))
            answer = await self.call.read()
        except grpc.aio.AioRpcError:
            return None
        except asyncio.InvalidStateError:  # the call already ended
            return None
        finally:
            recorder.finished(key)
        if answer is grpc.aio.EOF:
            return None
        self.responses.append(answer)
        return answer

    async def close(self) -> Outcome:
        if self.outcome is not None:
            return self.outcome
        outcome = Outcome("OK")
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()
        try:
            while (answer := await self.call.read()) is not grpc.aio.EOF:
                self.responses.append(answer)
        except grpc.aio.AioRpcError:
            pass
        code = await self.call.code()
        outcome.code = code.name if code is not None else "UNKNOWN"
        outcome.details = (await self.call.details()) or ""
        outcome.responses = self.responses
        outcome.seconds = time.monotonic() - self.started
        self.caller.recorder.record(self.name, self.label, self.sent, outcome, self.timeout,
                                    check=False)
        self.outcome = outcome
        return outcome

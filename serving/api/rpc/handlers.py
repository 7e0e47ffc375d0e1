"""The wrapper every gRPC method of the adapters runs in, and request streams that end
when the server shuts down.

`rpc` turns an engine error into its status (with details), counts the request and its
latency with the model it named (a call whose deadline passed counts as
DEADLINE_EXCEEDED, not CANCELLED), and turns anything unexpected into INTERNAL rather than
a bare UNKNOWN: the client gets a short message with an error id, the log has that id with
the traceback (Python's own text stays out of responses). A streaming method's call is
counted as a stream (recur_streams); each of its messages counts as a request where the
method handles it (`message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from serving.api.rpc.status import code_of, to_status
from serving.engine.errors import EngineError, shutting_down
from serving.engine.metrics import Metrics
from serving.engine.stats import RequestScope, request_scope

log = logging.getLogger(__name__)
# A call cancelled this close to its deadline ran out of time: the client's own deadline
# timer may fire, and its cancellation arrive, a little before the server's.
DEADLINE_SLACK_S = 0.02


def rpc(service: str, stream: bool = False):
    """For methods of servicers that hold the server's Metrics as `self.metrics`.
    `stream`: a method with a request stream, whose messages count as requests (`message`)
    and the call as a stream."""

    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            metrics: Metrics = self.metrics
            started, code = time.perf_counter(), "OK"
            scope: RequestScope
            try:
                with request_scope() as scope:
                    return await method(self, request, context)
            except EngineError as error:
                code = code_of(error).name
                await context.abort_with_status(to_status(error))
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = ("DEADLINE_EXCEEDED" if remaining is not None
                        and remaining <= DEADLINE_SLACK_S
                        else "CANCELLED")
                raise
            except grpc.aio.AbortError:
                code = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            except Exception:
                if context.cancelled():  # a write to a client that left: nothing to tell
                    remaining = context.time_remaining()
                    code = ("DEADLINE_EXCEEDED" if remaining is not None
                        and remaining <= DEADLINE_SLACK_S
                            else "CANCELLED")
                    log.debug("%s.%s: the client left", service, name, exc_info=True)
                    return None
                code = "INTERNAL"
                error_id = secrets.token_hex(6)
                log.exception("%s.%s failed (error id %s)", service, name, error_id)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"{service}.{name}: internal error (error id {error_id}; "
                                    "the server's log has the details)")
            finally:
                seconds = time.perf_counter() - started
                if stream:
                    metrics.streams.labels(service, name, code).inc()
                    metrics.stream_seconds.labels(service, name).observe(seconds)
                else:
                    metrics.requests.labels(service, name, code, scope.model).inc()
                    metrics.request_seconds.labels(service, name, scope.model).observe(seconds)

        return handler

    return wrap


@contextlib.contextmanager
def message(metrics: Metrics, service: str, method: str) -> Iterator[RequestScope]:
    """One message of a stream, counted and timed as a request, from here to the end of
    the block (its answer written): OK, or the code of the engine error that ended it."""
    started, code = time.perf_counter(), "OK"
    try:
        with request_scope() as scope:
            yield scope
    except EngineError as error:
        code = code_of(error).name
        raise
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception:
        code = "INTERNAL"
        raise
    finally:
        record(metrics, service, method, code, scope.model, started)


def record(metrics: Metrics, service: str, method: str, code: str, model: str,
           started: float) -> None:
    """A request that ended now, having arrived at `started` (perf_counter)."""
    metrics.requests.labels(service, method, code, model).inc()
    metrics.request_seconds.labels(service, method, model).observe(
        time.perf_counter() - started)


async def until_closing(messages: AsyncIterator, closing: asyncio.Event) -> AsyncIterator:
    """A request stream that ends with UNAVAILABLE when the server's grace period runs out,
    so that a client sees why its stream closed. Its pending read never outlives it: a
    read left waiting when the stream is abandoned is cancelled, and its outcome taken."""
    iterator = messages.__aiter__()
    closed = asyncio.ensure_future(closing.wait())
    following: asyncio.Future | None = None
    try:
        while True:
            following = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait({following, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                raise shutting_down()
            try:
                message = following.result()
            except StopAsyncIteration:
                return
            finally:
                following = None
            yield message
    finally:
        closed.cancel()
        if following is not None:
            following.cancel()
            following.add_done_callback(_outcome_taken)


def _outcome_taken(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()

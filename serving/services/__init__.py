"""The gRPC servicers, one class per service and one method per RPC.

Every RPC goes through `rpc`, which turns a ServiceError into its status (with details),
counts the request and its latency, and turns anything unexpected into INTERNAL with a
message (logged with its traceback) rather than a bare UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable

import grpc

from serving.errors import ServiceError, unavailable
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.repository import LoadedModel

log = logging.getLogger(__name__)


def rpc(service: str):
    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            started, code = time.perf_counter(), "OK"
            try:
                return await method(self, request, context)
            except ServiceError as error:
                code = error.code.name
                await context.abort_with_status(error.to_status())
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            except Exception as error:
                code = "INTERNAL"
                log.exception("%s.%s failed", service, name)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"{service}.{name}: {type(error).__name__}: {error}")
            finally:
                self.metrics.requests.labels(service, name, code).inc()
                self.metrics.request_seconds.labels(service, name).observe(
                    time.perf_counter() - started)

        return handler

    return wrap


async def gather(*awaitables: Awaitable) -> list:
    """Like asyncio.gather, but the first failure cancels the rest (they would only waste
    compute) and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a) for a in awaitables]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]


async def until_closing(messages: AsyncIterator, closing: asyncio.Event) -> AsyncIterator:
    """A request stream that ends with UNAVAILABLE when the server's grace period runs out,
    so that a client sees why its stream closed."""
    iterator = messages.__aiter__()
    closed = asyncio.ensure_future(closing.wait())
    try:
        while True:
            following = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait({following, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                raise shutting_down()
            try:
                yield following.result()
            except StopAsyncIteration:
                return
    finally:
        closed.cancel()


def shutting_down() -> ServiceError:
    return unavailable("the server is shutting down and closed this stream; reconnect (another "
                       "replica will serve) and resume")


def model_ref(model: LoadedModel) -> pb.ModelRef:
    return pb.ModelRef(name=model.name, version=model.version)

"""The one table from broker errors to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from jobbroker.v1 import broker_pb2
from jobbroker_server.domain.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

REASON_KEY = "jobbroker-reason"

STATUS: tuple[tuple[type[BrokerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_of(error: BrokerError) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_pb(error: BrokerError) -> broker_pb2.Error:
    """A refusal of one message of a stream, coded as a unary call would be."""
    code = status_of(error).value[0]
    return broker_pb2.Error(code=code, reason=error.reason, message=str(error))


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: BrokerError) -> NoReturn:
    context.set_trailing_metadata(((REASON_KEY, error.reason),))
    await context.abort(status_of(error), str(error))
    raise AssertionError("abort returned")  # pragma: no cover


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
Ctx = grpc.aio.ServicerContext[Any, Any]


def unary(
    method: Callable[[Self, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Self, Req, Ctx], Awaitable[Resp]]:
    """Turn the BrokerErrors of a unary method into status codes."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: Ctx) -> Resp:
        try:
            return await method(self, request, context)
        except BrokerError as error:
            await abort(context, error)

    return wrapper


def streaming(
    method: Callable[[Self, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Self, Req, Ctx], AsyncIterator[Resp]]:
    """Turn the BrokerErrors of a response-streaming method into status codes."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except BrokerError as error:
            await abort(context, error)

    return wrapper

"""The one table from broker errors to gRPC status codes."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from jobbroker.v1 import broker_pb2
from jobbroker_server.domain.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StorageFull,
    StoreUnavailable,
    Unauthenticated,
)

REASON_KEY = "jobbroker-reason"

STATUS: tuple[tuple[type[BrokerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
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

"""The SDK's exceptions; callers never see a raw grpc.RpcError.

JobBrokerError                   .code (grpc.StatusCode | None), .reason, .message
├── InvalidArgumentError         the broker refused the input; nothing was written
├── JobNotFoundError             no such job
├── FailedPreconditionError      the job's state does not allow it
│   └── LeaseLostError           stale fencing token, or the job no longer runs
├── ResourceExhaustedError       payload or batch over a broker limit, or its disk is full
├── BrokerUnavailableError       the broker, or its database, cannot be reached (retried first)
├── AuthenticationError          no API key, or one the broker does not know (or revoked)
├── PermissionDeniedError        the key's role or queues do not allow the call
├── DeadlineExceededError        also a TimeoutError
├── JobFailedError               the awaited job is dead; .job, .error
└── JobCancelledError            the awaited job was cancelled; .job

Raised by task handlers to steer the retry (not broker errors):

PermanentError                   fail without retry: straight to the dead-letter queue
RetryAfter                       retry no sooner than .delay
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import cast

import grpc

from .types import ErrorInfo, Job

REASON_KEY = "jobbroker-reason"


class JobBrokerError(Exception):
    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class InvalidArgumentError(JobBrokerError, ValueError):
    pass


class JobNotFoundError(JobBrokerError):
    pass


class FailedPreconditionError(JobBrokerError):
    pass


class LeaseLostError(FailedPreconditionError):
    pass


class ResourceExhaustedError(JobBrokerError):
    pass


class BrokerUnavailableError(JobBrokerError):
    pass


class AuthenticationError(JobBrokerError):
    pass


class PermissionDeniedError(JobBrokerError):
    pass


class DeadlineExceededError(JobBrokerError, TimeoutError):
    pass


class JobFailedError(JobBrokerError):
    def __init__(self, job: Job) -> None:
        error = job.last_error
        detail = f"{error.type}: {error.message}" if error else "no error recorded"
        super().__init__(f"job {job.id} is dead ({detail})")
        self.job = job
        self.error: ErrorInfo | None = error


class JobCancelledError(JobBrokerError):
    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


class PermanentError(Exception):
    """Raise from a handler to fail the job without retrying it."""


class RetryAfter(Exception):
    """Raise from a handler to retry the job no sooner than `delay`."""

    def __init__(self, delay: timedelta | float, message: str = "") -> None:
        self.delay = delay if isinstance(delay, timedelta) else timedelta(seconds=delay)
        super().__init__(message or f"retry after {self.delay.total_seconds():g}s")


_BY_REASON: dict[str, type[JobBrokerError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": JobNotFoundError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "ILLEGAL_TRANSITION": FailedPreconditionError,
    "LEASE_LOST": LeaseLostError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "STORAGE_FULL": ResourceExhaustedError,
    "STORE_UNAVAILABLE": BrokerUnavailableError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
}

_BY_CODE: dict[grpc.StatusCode, type[JobBrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: JobNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: BrokerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_stream_error(code: int, reason: str, message: str) -> JobBrokerError:
    """The SDK exception for one refused message of a stream (an `Error` reply)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(status, JobBrokerError)
    return cls(message or status.name, code=status, reason=reason or None)


def from_rpc_error(error: grpc.RpcError) -> JobBrokerError:
    """The SDK exception for a failed call (sync or grpc.aio)."""
    code = error.code()
    reason = _reason(error)
    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code, JobBrokerError)
    message = error.details() or code.name
    return cls(message, code=code, reason=reason)


def _reason(error: grpc.RpcError) -> str | None:
    # Sync errors give a tuple of (key, value) namedtuples (the stubs say otherwise),
    # grpc.aio a Metadata: both iterate as pairs.
    pairs = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    for key, value in pairs:
        if key == REASON_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def stream_error(error: grpc.RpcError) -> JobBrokerError:
    """The error a broken stream ends with.

    When the connection dies under a write, gRPC ends the call with
    INTERNAL ("Internal error from Core"). That status comes from the local
    gRPC core, not the broker (whose errors name a reason): the broker went
    away, and the worker must reconnect rather than stop.
    """
    mapped = from_rpc_error(error)
    if error.code() == grpc.StatusCode.INTERNAL and mapped.reason is None:
        return BrokerUnavailableError(mapped.message, code=error.code())
    return mapped

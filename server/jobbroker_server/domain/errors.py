"""The broker's errors. rpc/errors.py maps each to one gRPC status code.

BrokerError
├── InvalidArgument      bad input; nothing was written
├── NotFound             no such job
├── FailedPrecondition   the job's state does not allow it
│   ├── IllegalTransition
│   ├── KeyReused        an idempotency key sent again with another job
│   └── UniqueKeyTaken   a replay would make a second active job of one unique key
├── ResourceExhausted    payload or batch over a configured limit
│   └── StorageFull      the database's disk is full; nothing was written
├── StoreUnavailable     the database cannot be used now (unreachable,
│                        read-only); safe to retry, the broker reconnects
├── Unauthenticated      no API key, or one the broker does not know (or revoked)
├── PermissionDenied     the key's role or queues do not allow the call
└── Internal             the broker failed; its log says why, the reply does not

A report under a stale lease is not an error here: the stream answers it with
ReportStatus.LEASE_LOST in its Ack, and the SDK raises LeaseLostError.
"""

from __future__ import annotations


class BrokerError(Exception):
    reason = "BROKER_ERROR"


class InvalidArgument(BrokerError):
    reason = "INVALID_ARGUMENT"


class NotFound(BrokerError):
    reason = "NOT_FOUND"


class FailedPrecondition(BrokerError):
    reason = "FAILED_PRECONDITION"


class IllegalTransition(FailedPrecondition):
    reason = "ILLEGAL_TRANSITION"


class KeyReused(FailedPrecondition):
    reason = "IDEMPOTENCY_KEY_REUSED"


class UniqueKeyTaken(FailedPrecondition):
    reason = "UNIQUE_KEY_TAKEN"


class ResourceExhausted(BrokerError):
    reason = "RESOURCE_EXHAUSTED"


class StorageFull(ResourceExhausted):
    reason = "STORAGE_FULL"


class StoreUnavailable(BrokerError):
    reason = "STORE_UNAVAILABLE"


class Unauthenticated(BrokerError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(BrokerError):
    reason = "PERMISSION_DENIED"


class Internal(BrokerError):
    reason = "INTERNAL"


# Errors that say the store itself cannot be used, whatever was asked of it.
STORE_DOWN: tuple[type[BrokerError], ...] = (StorageFull, StoreUnavailable)

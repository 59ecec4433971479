"""Queue settings in the SDK: the request that sets them and the record a
reply becomes (both clients share these)."""

from __future__ import annotations

from datetime import timedelta

from ._convert import (
    duration_from_pb,
    duration_to_pb,
    rate_limit_from_pb,
    rate_limit_to_pb,
    timestamp_from_pb,
)
from ._limits import check_limit, rate_limit_of
from .types import QueueSettings, RateLimit, RetryPolicy
from .v1 import broker_pb2


def set_request(
    name: str,
    max_attempts: int | None,
    retry: RetryPolicy | None,
    timeout: timedelta | None,
    soft_timeout: timedelta | None,
    lost_worker_counts: bool,
    rate: RateLimit | str | None,
    key_rate: RateLimit | str | None,
    key_concurrency: int | None,
) -> broker_pb2.SetQueueRequest:
    request = broker_pb2.SetQueueRequest(name=name)
    _set_limits(request.defaults, rate, key_rate, key_concurrency)
    d = request.defaults
    retry = retry or RetryPolicy()
    d.max_attempts = max_attempts or retry.max_attempts or 0
    d.backoff_factor = retry.backoff_factor or 0.0
    for field, value in (
        ("backoff_base", retry.backoff_base),
        ("backoff_cap", retry.backoff_cap),
        ("timeout", timeout),
        ("soft_timeout", soft_timeout),
    ):
        if value is not None:
            getattr(d, field).CopyFrom(duration_to_pb(value))
    d.lost_worker_counts = lost_worker_counts
    return request


def _set_limits(
    d: broker_pb2.QueueDefaults,
    rate: RateLimit | str | None,
    key_rate: RateLimit | str | None,
    key_concurrency: int | None,
) -> None:
    for field, value in (("rate", rate), ("key_rate", key_rate)):
        limit = rate_limit_of(value, field)
        if limit is not None:
            rate_limit_to_pb(limit, getattr(d, field))
    if key_concurrency is not None:
        d.key_concurrency = check_limit(key_concurrency, "key_concurrency")


def from_pb(pb: broker_pb2.QueueSettings) -> QueueSettings:
    d = pb.defaults
    return QueueSettings(
        name=pb.name,
        paused=pb.paused,
        paused_by=pb.paused_by,
        paused_at=timestamp_from_pb(pb, "paused_at"),
        max_attempts=d.max_attempts or None,
        retry=RetryPolicy(
            max_attempts=d.max_attempts or None,
            backoff_base=duration_from_pb(d, "backoff_base"),
            backoff_factor=d.backoff_factor or None,
            backoff_cap=duration_from_pb(d, "backoff_cap"),
        ),
        timeout=duration_from_pb(d, "timeout"),
        soft_timeout=duration_from_pb(d, "soft_timeout"),
        lost_worker_counts=d.lost_worker_counts if d.HasField("lost_worker_counts") else True,
        rate=rate_limit_from_pb(d, "rate"),
        key_rate=rate_limit_from_pb(d, "key_rate"),
        key_concurrency=d.key_concurrency or None,
    )

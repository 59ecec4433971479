"""Queue settings in the SDK: the request that sets them and the record a
reply becomes (both clients share these)."""

from __future__ import annotations

from datetime import timedelta

from ._convert import duration_from_pb, duration_to_pb, timestamp_from_pb
from .types import QueueSettings, RetryPolicy
from .v1 import broker_pb2


def set_request(
    name: str,
    max_attempts: int | None,
    retry: RetryPolicy | None,
    timeout: timedelta | None,
    soft_timeout: timedelta | None,
    lost_worker_counts: bool,
) -> broker_pb2.SetQueueRequest:
    request = broker_pb2.SetQueueRequest(name=name)
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
    )

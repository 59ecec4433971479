"""The queue methods of the Broker service (settings, pause and resume),
and the per-queue limits a submit is validated with."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc

from jobbroker.v1 import broker_pb2
from jobbroker_server.domain import flow, limits
from jobbroker_server.domain.keys import Caller
from jobbroker_server.domain.queues import QueueDefaults, QueueSettings
from jobbroker_server.rpc import convert
from jobbroker_server.services.queues import Queues

Ctx = grpc.aio.ServicerContext[Any, Any]


def defaults(msg: broker_pb2.QueueDefaults) -> QueueDefaults:
    """Validate a queue's defaults as the same fields of a submit are."""
    return QueueDefaults(
        max_attempts=(msg.max_attempts and limits.max_attempts(msg.max_attempts)) or None,
        backoff_base=convert.optional_duration(msg, "backoff_base", limits.MAX_BACKOFF),
        backoff_factor=(msg.backoff_factor and limits.backoff_factor(msg.backoff_factor)) or None,
        backoff_cap=convert.optional_duration(msg, "backoff_cap", limits.MAX_BACKOFF),
        timeout=convert.optional_duration(msg, "timeout", limits.MAX_TIMEOUT, positive=True),
        soft_timeout=convert.optional_duration(
            msg, "soft_timeout", limits.MAX_TIMEOUT, positive=True
        ),
        lost_worker_counts=msg.lost_worker_counts if msg.HasField("lost_worker_counts") else True,
        rate=_rate(msg, "rate"),
        key_rate=_rate(msg, "key_rate"),
        key_concurrency=(
            msg.key_concurrency and flow.concurrency_limit(msg.key_concurrency, "key_concurrency")
        )
        or None,
    )


def _rate(msg: broker_pb2.QueueDefaults, field: str) -> flow.RateLimit | None:
    if not msg.HasField(field):
        return None
    return convert.rate_limit_from_pb(getattr(msg, field), field)


def limits_for(base: convert.Limits, given: QueueDefaults | None) -> convert.Limits:
    """The limits a submit to a queue is validated with: the queue's defaults
    over the broker's."""
    if given is None:
        return base
    return replace(
        base,
        retry=given.retry(base.retry),
        timeout=given.timeout,
        soft_timeout=given.soft_timeout,
    )


def settings_pb(q: QueueSettings) -> broker_pb2.QueueSettings:
    msg = broker_pb2.QueueSettings(name=q.name, paused=q.paused, paused_by=q.paused_by)
    if q.paused_at is not None:
        convert.set_timestamp(msg.paused_at, q.paused_at)
    if q.updated_at is not None:
        convert.set_timestamp(msg.updated_at, q.updated_at)
    d, out = q.defaults, msg.defaults
    out.max_attempts = d.max_attempts or 0
    out.backoff_factor = d.backoff_factor or 0.0
    for name in ("backoff_base", "backoff_cap", "timeout", "soft_timeout"):
        value = getattr(d, name)
        if value is not None:
            getattr(out, name).CopyFrom(convert.duration(value))
    out.lost_worker_counts = d.lost_worker_counts
    if d.rate is not None:
        out.rate.CopyFrom(convert.rate_limit_pb(d.rate))
    if d.key_rate is not None:
        out.key_rate.CopyFrom(convert.rate_limit_pb(d.key_rate))
    out.key_concurrency = d.key_concurrency or 0
    return msg


class QueueMethods:
    """The Broker service's queue methods, mixed into its servicer."""

    _queues: Queues

    async def ListQueues(
        self, request: broker_pb2.ListQueuesRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListQueuesResponse:
        listed = await self._queues.refresh()
        return broker_pb2.ListQueuesResponse(
            queues=[settings_pb(q) for q in listed if caller.may_use(q.name)]
        )

    async def SetQueue(
        self, request: broker_pb2.SetQueueRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.QueueResponse:
        name = _queue(request.name, caller)
        made = await self._queues.set_defaults(name, defaults(request.defaults))
        return broker_pb2.QueueResponse(queue=settings_pb(made))

    async def PauseQueue(
        self, request: broker_pb2.PauseQueueRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.QueueResponse:
        paused = await self._queues.pause(_queue(request.name, caller), caller.actor)
        return broker_pb2.QueueResponse(queue=settings_pb(paused))

    async def ResumeQueue(
        self, request: broker_pb2.PauseQueueRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.QueueResponse:
        resumed = await self._queues.resume(_queue(request.name, caller), caller.actor)
        return broker_pb2.QueueResponse(queue=settings_pb(resumed))


def _queue(name: str, caller: Caller) -> str:
    checked = limits.name(name, "name")
    caller.check_queue(checked)
    return checked

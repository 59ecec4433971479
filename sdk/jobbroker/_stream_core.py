"""The LeaseStream bookkeeping both stream kinds share, free of any I/O.

It numbers reports, matches Acks to their waiters by seq, tracks the leases
the stream holds (pushed and not yet settled) and applies cancellations. The
sync stream calls it under a lock; the async one from its single loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from jobbroker.v1 import broker_pb2

from ._convert import cancel_reason_from_pb, timestamp_from_pb
from .errors import JobBrokerError
from .lease import AsyncLease, Lease, ReportResult, settled

L = TypeVar("L", Lease, AsyncLease)


class Waiter(Protocol):
    """What waits for one Ack: a concurrent.futures.Future or an asyncio.Future."""

    def set_result(self, result: list[ReportResult], /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def done(self) -> bool: ...


def subscribe_message(
    worker_id: str,
    queues: Sequence[str],
    prefetch: int,
    held: Sequence[Lease | AsyncLease],
    reports_starts: bool,
) -> broker_pb2.WorkerMessage:
    subscribe = broker_pb2.Subscribe(
        worker_id=worker_id,
        queues=list(queues),
        prefetch=prefetch,
        held=[lease._ref() for lease in held],
        reports_starts=reports_starts,
    )
    return broker_pb2.WorkerMessage(subscribe=subscribe)


def flow_message(prefetch: int) -> broker_pb2.WorkerMessage:
    return broker_pb2.WorkerMessage(flow=broker_pb2.Flow(prefetch=prefetch))


class StreamCore(Generic[L]):
    def __init__(self, held: Sequence[L]) -> None:
        self.held: dict[str, L] = {lease.job.id: lease for lease in held}
        self.error: JobBrokerError | None = None
        self._pending: dict[int, tuple[Waiter, broker_pb2.WorkerMessage]] = {}
        self._seq = itertools.count(1)

    def register(self, message: broker_pb2.WorkerMessage, waiter: Waiter) -> int:
        """Give a report its seq and remember who waits for the Ack."""
        if self.error is not None:
            raise self.error
        seq = next(self._seq)
        message.seq = seq
        self._pending[seq] = (waiter, message)
        return seq

    def forget(self, seq: int) -> None:
        self._pending.pop(seq, None)

    def dispatch(
        self, message: broker_pb2.BrokerMessage, make_lease: Callable[[broker_pb2.LeasedJob], L]
    ) -> list[L]:
        """Apply one broker message; returns the leases it pushed."""
        kind = message.WhichOneof("kind")
        if kind == "leased":
            leases = [make_lease(leased) for leased in message.leased.jobs]
            self.held.update((lease.job.id, lease) for lease in leases)
            return leases
        if kind == "ack":
            self._on_ack(message.ack)
        elif kind == "cancel":
            self._on_cancel(message.cancel)
        return []

    def _on_ack(self, ack: broker_pb2.Ack) -> None:
        waiter, sent = self._pending.pop(ack.seq, (None, None))
        if waiter is None or sent is None:
            return  # its caller gave up waiting
        results = list(ack.results)
        for job_id in settled(sent, results):
            self.held.pop(job_id, None)
        if not waiter.done():
            waiter.set_result(results)

    def _on_cancel(self, cancel: broker_pb2.CancelLeases) -> None:
        reason = cancel_reason_from_pb(cancel.reason)
        for ref in cancel.leases:
            lease = self.held.get(ref.job_id)
            if lease is not None and lease.fencing_token == ref.fencing_token:
                lease._mark_cancelled(reason)

    def end(self, error: JobBrokerError) -> None:
        """The stream is over: every report still waiting fails with `error`."""
        self.error = error
        pending, self._pending = self._pending, {}
        for waiter, _ in pending.values():
            if not waiter.done():
                waiter.set_exception(error)


def lost_leases(leases: Sequence[L], results: Sequence[ReportResult]) -> list[L]:
    """After a coalesced heartbeat: the leases the broker no longer honours.

    The others get their new expiry.
    """
    by_id = {result.job_id: result for result in results}
    lost: list[L] = []
    for lease in leases:
        result = by_id.get(lease.job.id)
        if result is None:
            continue
        if result.status in (
            broker_pb2.REPORT_STATUS_LEASE_LOST,
            broker_pb2.REPORT_STATUS_NOT_FOUND,
        ):
            lost.append(lease)
        else:
            lease.expires_at = timestamp_from_pb(result, "lease_expires_at") or lease.expires_at
    return lost

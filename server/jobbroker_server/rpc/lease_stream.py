"""One worker's LeaseStream: reports up, leased jobs, acks and cancellations down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from jobbroker.v1 import broker_pb2
from jobbroker_server.domain import limits
from jobbroker_server.domain.errors import BrokerError, InvalidArgument
from jobbroker_server.domain.keys import Caller
from jobbroker_server.domain.models import (
    Completion,
    Failure,
    LeaseRef,
    ReportResult,
    ReportStatus,
)
from jobbroker_server.rpc import convert
from jobbroker_server.rpc.errors import abort
from jobbroker_server.services.dispatcher import (
    Acked,
    Cancel,
    CancelReason,
    Dispatcher,
    Leased,
    Outgoing,
    Session,
)
from jobbroker_server.services.reports import Reports

log = logging.getLogger(__name__)

MAX_PREFETCH = 10_000

_CANCEL_TO_PB = {
    CancelReason.CANCELLED: broker_pb2.CANCEL_REASON_CANCELLED,
    CancelReason.TIMED_OUT: broker_pb2.CANCEL_REASON_TIMED_OUT,
    CancelReason.LEASE_EXPIRED: broker_pb2.CANCEL_REASON_LEASE_EXPIRED,
}


class LeaseStreams:
    def __init__(self, dispatcher: Dispatcher, reports: Reports, max_result_bytes: int) -> None:
        self._dispatcher = dispatcher
        self._reports = reports
        self._max_result_bytes = max_result_bytes
        # A third of the lease: two heartbeats may be lost before it expires.
        self._heartbeat_interval = convert.duration(dispatcher.lease_duration / 3)

    async def serve(
        self,
        requests: AsyncIterator[broker_pb2.WorkerMessage],
        context: grpc.aio.ServicerContext[Any, Any],
        caller: Caller,
    ) -> AsyncIterator[broker_pb2.BrokerMessage]:
        first = await anext(requests, None)
        if first is None:
            return
        try:
            session, held = self._open(first, caller)
        except BrokerError as error:
            await abort(context, error)
        reader = asyncio.create_task(self._read(session, requests, held))
        out_task: asyncio.Future[Outgoing] | None = None
        try:
            while True:
                out_task = asyncio.ensure_future(session.outbox.get())
                done, _ = await asyncio.wait({out_task, reader}, return_when="FIRST_COMPLETED")
                if out_task in done:
                    yield self._message(out_task.result())
                    continue
                out_task.cancel()
                while not session.outbox.empty():  # acks of the last reports
                    yield self._message(session.outbox.get_nowait())
                reader.result()  # raise what ended the reader, if anything
                return
        finally:
            # Neither task may outlive the call: a pending one is destroyed
            # with the generator, and logged as such.
            for task in (out_task, reader):
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._dispatcher.close(session)

    def _open(
        self, first: broker_pb2.WorkerMessage, caller: Caller
    ) -> tuple[Session, list[LeaseRef]]:
        """A session for the stream, its leases bound to the caller's key; and
        the leases it says it holds from an earlier stream."""
        if first.WhichOneof("kind") != "subscribe":
            raise InvalidArgument("the first message of a LeaseStream must be subscribe")
        sub = first.subscribe
        if not sub.queues or len(sub.queues) > limits.MAX_SUBSCRIBED_QUEUES:
            raise InvalidArgument(
                f"subscribe.queues must name between 1 and {limits.MAX_SUBSCRIBED_QUEUES} "
                f"queues (got {len(sub.queues)})"
            )
        queues = list(dict.fromkeys(limits.name(q, "subscribe.queues[]") for q in sub.queues))
        for queue in queues:
            caller.check_queue(queue)
        if not 1 <= sub.prefetch <= MAX_PREFETCH:
            raise InvalidArgument(
                f"subscribe.prefetch must be between 1 and {MAX_PREFETCH} (got {sub.prefetch})"
            )
        if len(sub.held) > MAX_PREFETCH:
            raise InvalidArgument(f"subscribe.held names at most {MAX_PREFETCH} leases")
        worker_id = limits.name(sub.worker_id, "subscribe.worker_id") if sub.worker_id else ""
        held = [convert.lease_ref(ref, caller.key_id) for ref in sub.held]
        session = self._dispatcher.open(
            worker_id or "anonymous", queues, sub.prefetch, caller.key_id, sub.reports_starts
        )
        return session, held

    async def _read(
        self,
        session: Session,
        requests: AsyncIterator[broker_pb2.WorkerMessage],
        held: list[LeaseRef],
    ) -> None:
        if held:  # the store confirms them, and extends them, before they count as this stream's
            await self._reports.heartbeat(session, held)
        async for msg in requests:
            results = await self._apply(session, msg)
            if msg.seq:
                session.outbox.put_nowait(Acked(msg.seq, results))

    async def _apply(self, session: Session, msg: broker_pb2.WorkerMessage) -> list[ReportResult]:
        self._dispatcher.alive(session)
        try:
            return await self._report(session, msg)
        except InvalidArgument as error:  # this message is refused; the stream goes on
            refused = ReportResult("", ReportStatus.INVALID, str(error))
            return [refused] * max(_items(msg), 1)

    async def _report(self, session: Session, msg: broker_pb2.WorkerMessage) -> list[ReportResult]:
        kind = msg.WhichOneof("kind")
        r = self._reports
        holder = session.holder
        if kind == "heartbeat":
            return await r.heartbeat(
                session, convert.lease_refs(msg.heartbeat.leases, "heartbeat.leases", holder)
            )
        if kind == "complete":
            convert.reports(msg.complete.completions, "complete.completions")
            return await self._complete(session, msg.complete.completions)
        if kind == "fail":
            convert.reports(msg.fail.failures, "fail.failures")
            return await r.fail(session, [convert.failure(f, holder) for f in msg.fail.failures])
        if kind == "release":
            return await r.release(
                session, convert.lease_refs(msg.release.leases, "release.leases", holder)
            )
        if kind == "progress":
            return await r.progress(session, convert.progress(msg.progress, holder))
        if kind == "start":
            return await r.start(
                session, convert.lease_refs(msg.start.leases, "start.leases", holder)
            )
        if kind == "flow":
            self._dispatcher.set_prefetch(session, min(max(msg.flow.prefetch, 0), MAX_PREFETCH))
            return []
        return [ReportResult("", ReportStatus.INVALID, f"unexpected message {kind!r} on a stream")]

    async def _complete(
        self, session: Session, completions: Sequence[broker_pb2.Completion]
    ) -> list[ReportResult]:
        """Completions, but a result over the payload limit fails its job for good
        (its handler would only make it again): each report's result, in order."""
        limit = self._max_result_bytes
        reports = [convert.completion(c, limit, session.holder) for c in completions]
        done = [c for c in reports if isinstance(c, Completion)]
        if len(done) == len(reports):
            return await self._reports.complete(session, done)
        refused = [f for f in reports if isinstance(f, Failure)]
        succeeded = iter(await self._reports.complete(session, done) if done else [])
        failed = iter(await self._reports.fail(session, refused))
        return [next(succeeded if isinstance(c, Completion) else failed) for c in reports]

    def _message(self, out: Outgoing) -> broker_pb2.BrokerMessage:
        if isinstance(out, Leased):
            # Filled in place: a message passed to a constructor is copied.
            message = broker_pb2.BrokerMessage()
            add = message.leased.jobs.add
            for lease in out.leases:
                leased = add(fencing_token=lease.fencing_token)
                convert.job_pb(lease.job, leased.job)
                convert.set_timestamp(leased.lease_expires_at, lease.expires_at)
                leased.heartbeat_interval.CopyFrom(self._heartbeat_interval)
            return message
        if isinstance(out, Acked):
            results = [convert.report_pb(r) for r in out.results]
            return broker_pb2.BrokerMessage(ack=broker_pb2.Ack(seq=out.seq, results=results))
        assert isinstance(out, Cancel)
        refs = [
            broker_pb2.LeaseRef(job_id=r.job_id, fencing_token=r.fencing_token) for r in out.leases
        ]
        return broker_pb2.BrokerMessage(
            cancel=broker_pb2.CancelLeases(leases=refs, reason=_CANCEL_TO_PB[out.reason])
        )


def _items(msg: broker_pb2.WorkerMessage) -> int:
    """How many reports a message carries: each is answered."""
    kind = msg.WhichOneof("kind")
    if kind in ("heartbeat", "release", "start"):
        return len(getattr(msg, kind).leases)
    if kind == "complete":
        return len(msg.complete.completions)
    if kind == "fail":
        return len(msg.fail.failures)
    return 1 if kind == "progress" else 0

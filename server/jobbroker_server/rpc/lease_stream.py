"""One worker's LeaseStream: reports up, leased jobs, acks and cancellations down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from jobbroker.v1 import broker_pb2
from jobbroker_server.domain.errors import BrokerError, InvalidArgument
from jobbroker_server.domain.models import ReportResult, ReportStatus
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
    def __init__(self, dispatcher: Dispatcher, reports: Reports) -> None:
        self._dispatcher = dispatcher
        self._reports = reports
        # A third of the lease: two heartbeats may be lost before it expires.
        self._heartbeat_interval = convert.duration(dispatcher.lease_duration / 3)

    async def serve(
        self,
        requests: AsyncIterator[broker_pb2.WorkerMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[broker_pb2.BrokerMessage]:
        first = await anext(requests, None)
        if first is None:
            return
        try:
            session = self._open(first)
        except BrokerError as error:
            await abort(context, error)
        reader = asyncio.create_task(self._read(session, requests))
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
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._dispatcher.close(session)

    def _open(self, first: broker_pb2.WorkerMessage) -> Session:
        if first.WhichOneof("kind") != "subscribe":
            raise InvalidArgument("the first message of a LeaseStream must be subscribe")
        sub = first.subscribe
        queues = [q for q in sub.queues if q.strip()]
        if not queues or len(queues) != len(sub.queues):
            raise InvalidArgument("subscribe.queues must name at least one queue, none empty")
        if not 1 <= sub.prefetch <= MAX_PREFETCH:
            raise InvalidArgument(
                f"subscribe.prefetch must be between 1 and {MAX_PREFETCH} (got {sub.prefetch})"
            )
        worker_id = sub.worker_id or "anonymous"
        held = [convert.lease_ref(ref) for ref in sub.held]
        return self._dispatcher.open(worker_id, queues, sub.prefetch, held)

    async def _read(
        self, session: Session, requests: AsyncIterator[broker_pb2.WorkerMessage]
    ) -> None:
        async for msg in requests:
            results = await self._apply(session, msg)
            if msg.seq:
                session.outbox.put_nowait(Acked(msg.seq, results))

    async def _apply(self, session: Session, msg: broker_pb2.WorkerMessage) -> list[ReportResult]:
        kind = msg.WhichOneof("kind")
        self._dispatcher.alive(session)
        r = self._reports
        if kind == "heartbeat":
            return await r.heartbeat(session, [convert.lease_ref(x) for x in msg.heartbeat.leases])
        if kind == "complete":
            done = [convert.completion(c) for c in msg.complete.completions]
            return await r.complete(session, done)
        if kind == "fail":
            return await r.fail(session, [convert.failure(f) for f in msg.fail.failures])
        if kind == "release":
            return await r.release(session, [convert.lease_ref(x) for x in msg.release.leases])
        if kind == "progress":
            return await r.progress(session, convert.progress(msg.progress))
        if kind == "flow":
            self._dispatcher.set_prefetch(session, min(msg.flow.prefetch, MAX_PREFETCH))
            return []
        return [ReportResult("", ReportStatus.INVALID, f"unexpected message {kind!r} on a stream")]

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

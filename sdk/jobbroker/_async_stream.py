"""The async LeaseStream: a grpc.aio bidi call, written with write(), read by one task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc

from ._stream_core import StreamCore, flow_message, lost_leases, subscribe_message
from .connection import Metadata
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    DeadlineExceededError,
    JobBrokerError,
    PermissionDeniedError,
    from_rpc_error,
    stream_error,
)
from .lease import AsyncLease, ReportResult, heartbeat_message

_Call = grpc.aio.StreamStreamCall[broker_pb2.WorkerMessage, broker_pb2.BrokerMessage]
Waiter = asyncio.Future[list[ReportResult]]

_LOCAL = (grpc.StatusCode.INTERNAL, None)  # failures of a write that name no broker status

# Reports merged into one message: message kind -> its repeated field.
_BATCHED = {"complete": "completions", "fail": "failures", "start": "leases"}
# Reports due this close together go out in one message: a Start due a few
# milliseconds after the one that woke the flush goes with it.
_MERGE_SLACK = 0.005


def _split(done: asyncio.Future[list[ReportResult]], waiters: list[tuple[Waiter, int]]) -> None:
    """Hand each merged report its own results (one per item, in order); a
    waiter comes with how many items its report carried."""
    if done.cancelled() or done.exception() is not None:
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_exception(error or asyncio.CancelledError())
        return
    results = done.result()
    at = 0
    for waiter, count in waiters:
        if not waiter.done():
            waiter.set_result(results[at : at + count])
        at += count


class AsyncLeaseStream:
    """Leased jobs as they are pushed: `async for lease in stream: ...`.

    The RPC opens on `async with` or on the first iteration. Iteration ends
    when the stream is closed; it raises BrokerUnavailableError when the
    connection breaks.
    """

    def __init__(
        self,
        stub: broker_pb2_grpc.BrokerAsyncStub,
        queues: Sequence[str],
        *,
        prefetch: int,
        worker_id: str,
        report_timeout: float,
        held: Sequence[AsyncLease] = (),
        metadata: Metadata | None = None,
        reports_starts: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self._stub = stub
        self._metadata = metadata
        self._subscribe = subscribe_message(worker_id, queues, prefetch, held, reports_starts)
        self._report_timeout = report_timeout
        self._core = StreamCore[AsyncLease](held)
        for lease in held:
            lease._stream = self
        self._inbox: asyncio.Queue[AsyncLease | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        # Per kind, the reports waiting to go out: waiter -> (when due, message).
        self._batches: dict[str, dict[Waiter, tuple[float, broker_pb2.WorkerMessage]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # kinds with a flush due
        self._flushes: set[asyncio.Future[list[ReportResult]]] = set()
        self._sending: set[str] = set()  # kinds with a merged report awaiting its Ack
        self._call: _Call | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._answered = False  # the broker sent something on it: it was up

    async def open(self) -> None:
        """Start the RPC (once; later calls do nothing). Raises
        AuthenticationError or PermissionDeniedError when the broker refuses
        the key, BrokerUnavailableError when it cannot be reached."""
        if self._call is not None:
            return
        self._call = self._stub.LeaseStream(None, metadata=self._metadata)
        try:
            await self._write(self._subscribe)
        except BrokerUnavailableError as error:
            # INTERNAL, or None for a call already over: maybe a lost refusal.
            refused = await self._refusal() if error.code in _LOCAL else None
            if refused is None:
                raise
            raise refused from error
        self._reader = asyncio.create_task(self._read(self._call), name="jobbroker-lease-reader")
        for lease in self._core.held.values():  # handed over from a broken stream
            lease._resume()

    async def _refusal(self) -> JobBrokerError | None:
        """Why the broker ended the call before the subscribe went out, when
        it refused the key.

        A broker refuses a key as the call starts. When the subscribe's write
        fails before grpc.aio has taken in that status, it puts INTERNAL in
        its place ("Internal error from Core") and the refusal is lost: a
        worker would reconnect for ever with a revoked key. A call nothing is
        written to cannot lose its status so; it ends with the refusal again,
        or with OK when the key is taken."""
        probe = self._stub.LeaseStream(None, metadata=self._metadata)
        try:
            async with asyncio.timeout(self._report_timeout):
                await probe.done_writing()
                async for _ in probe:
                    pass
        except grpc.RpcError as error:
            refused = from_rpc_error(error)
            if isinstance(refused, AuthenticationError | PermissionDeniedError):
                return refused
        except TimeoutError:
            pass
        finally:
            probe.cancel()
        return None

    def __aiter__(self) -> AsyncLeaseStream:
        return self

    async def __anext__(self) -> AsyncLease:
        await self.open()
        lease = await self._inbox.get()
        if lease is None:
            self._inbox.put_nowait(None)  # every later call ends too
            if self._closing or self._core.error is None:
                raise StopAsyncIteration
            raise self._core.error
        return lease

    @property
    def ended(self) -> bool:
        """True once the RPC is over, broken or closed: reports on it fail, and
        its leases are for another stream to take over (`held=`)."""
        return self._core.error is not None

    @property
    def held(self) -> list[AsyncLease]:
        """Leases pushed to this stream and not yet completed, failed or released."""
        return list(self._core.held.values())

    async def set_prefetch(self, prefetch: int) -> None:
        """Change the window; 0 stops leasing, as a worker shutting down does."""
        await self._write(flow_message(prefetch))

    async def heartbeat(self, leases: Sequence[AsyncLease]) -> list[AsyncLease]:
        """One heartbeat for many leases; returns those the broker no longer honours."""
        if not leases:
            return []
        return lost_leases(leases, await self._exchange(heartbeat_message(leases)))

    async def _exchange(self, message: broker_pb2.WorkerMessage) -> list[ReportResult]:
        """Send a report and wait for its Ack. Completions, failures and starts
        made close together travel as one message (and one transaction): see `_flush`."""
        kind = message.WhichOneof("kind")
        if kind in _BATCHED:
            return await self._batched(kind, message, 0.0)
        return await self._exchange_now(message)

    def _schedule(self, message: broker_pb2.WorkerMessage, delay: float) -> Waiter:
        """Send a report of a merged kind in `delay` seconds, unless `_withdraw`
        takes it back first; the future is its results."""
        kind = message.WhichOneof("kind")
        assert kind in _BATCHED, kind
        return self._batched(kind, message, delay)

    def _withdraw(self, kind: str, waiter: Waiter) -> bool:
        """Take back a report `_schedule` made that has not gone out; True if it
        had not. Its future is left pending."""
        batch = self._batches.get(kind)
        return batch is not None and batch.pop(waiter, None) is not None

    def _batched(self, kind: str, message: broker_pb2.WorkerMessage, delay: float) -> Waiter:
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        due = loop.time() + delay
        self._batches.setdefault(kind, {})[waiter] = (due, message)
        if kind not in self._sending:
            self._wake(kind, due)
        return waiter

    def _wake(self, kind: str, due: float) -> None:
        """Have `_flush(kind)` run at `due`, or sooner if it already will."""
        timer = self._timers.get(kind)
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[kind] = asyncio.get_running_loop().call_at(due, self._flush, kind)

    def _flush(self, kind: str) -> None:
        """Send what is due as one message. While it waits for its Ack, later
        reports of its kind gather for the next one: under load a message
        carries what finished during a round trip, at idle it leaves at once.
        Reports not due yet stay, with a flush at the next one's time."""
        self._timers.pop(kind, None)
        batch = self._batches.get(kind)
        if not batch or kind in self._sending:
            return
        limit = asyncio.get_running_loop().time() + _MERGE_SLACK
        due = [(waiter, message) for waiter, (at, message) in batch.items() if at <= limit]
        for waiter, _ in due:
            del batch[waiter]
        if batch:
            if not due:
                self._wake(kind, min(at for at, _ in batch.values()))
                return
        else:
            del self._batches[kind]
        merged = broker_pb2.WorkerMessage()
        items = _BATCHED[kind]
        into = getattr(getattr(merged, kind), items)
        counts = []
        for waiter, message in due:
            carried = getattr(getattr(message, kind), items)
            into.extend(carried)
            counts.append((waiter, len(carried)))
        self._sending.add(kind)
        task = asyncio.ensure_future(self._exchange_now(merged))
        self._flushes.add(task)

        def answered(done: asyncio.Future[list[ReportResult]]) -> None:
            self._flushes.discard(done)
            _split(done, counts)
            self._sending.discard(kind)
            if self._batches.get(kind):  # gathered meanwhile
                self._flush(kind)

        task.add_done_callback(answered)

    async def _exchange_now(self, message: broker_pb2.WorkerMessage) -> list[ReportResult]:
        waiter: asyncio.Future[list[ReportResult]] = asyncio.get_running_loop().create_future()
        seq = self._core.register(message, waiter)
        try:
            await self._write(message)
            async with asyncio.timeout(self._report_timeout):  # wait_for may lose a cancel
                return await waiter
        except TimeoutError:
            raise DeadlineExceededError(f"no ack for report {seq}") from None
        finally:
            self._core.forget(seq)

    async def close(self) -> None:
        """End the RPC: iteration stops, and reports still waiting fail."""
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        else:
            self._finish(JobBrokerError("the lease stream is closed"))

    async def __aenter__(self) -> AsyncLeaseStream:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _write(self, message: broker_pb2.WorkerMessage) -> None:
        if self._call is None:
            raise JobBrokerError("the lease stream is not open")
        async with self._write_lock:
            try:
                await self._call.write(message)
            except grpc.RpcError as error:
                raise self._core.error or stream_error(error) from error
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as error:  # call is over
                raise self._core.error or BrokerUnavailableError(str(error)) from error

    async def _read(self, call: _Call) -> None:
        error: JobBrokerError = BrokerUnavailableError("the broker ended the lease stream")
        try:
            async for message in call:
                self._answered = True
                for lease in self._core.dispatch(message, lambda leased: AsyncLease(self, leased)):
                    self._inbox.put_nowait(lease)
        except grpc.RpcError as rpc_error:
            error = stream_error(rpc_error)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        if self._closing:
            error = JobBrokerError("the lease stream is closed")
        self._finish(error)

    def _finish(self, error: JobBrokerError) -> None:
        self._core.end(error)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        batches, self._batches = self._batches, {}
        for batch in batches.values():
            for waiter in batch:
                if not waiter.done():
                    waiter.set_exception(error)
        self._inbox.put_nowait(None)

"""Submits over one long-lived SubmitGrouped stream per client.

A message on an open stream costs a fraction of a unary call (no new HTTP/2
stream, no headers), and submits from many threads or tasks share it: each
message carries every submit queued while the one before it was being sent,
so under load one message, and one broker transaction, serves many callers.
The broker answers each message in order with a result per job, so results
are matched to callers first in, first out. A broken stream fails its waiting
submits with the stream's error (UNAVAILABLE is then retried by `_calls`,
with the same idempotency key) and the next submit opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, cast

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2

from .connection import Metadata
from .errors import from_stream_error

log = logging.getLogger(__name__)

MESSAGE_JOBS = 256  # the most submits one message carries
MESSAGE_BYTES = 4 * 1024 * 1024  # a message is sent once its jobs encode to this much
# Messages sent and not yet answered. Holding the next message back until an
# answer comes is what lets submits gather: sent at once, each would be a
# message of its own queued in the broker, which then pays a message per job.
MESSAGES_IN_FLIGHT = 2
# How long closing a client waits for its submit reader to end. The reader
# must be gone before the channel closes: one left inside the call it read
# once kept `broker submit` from exiting, in grpc's channel __del__.
CLOSE_WAIT = 5.0


class StreamError(grpc.RpcError):
    """A submit that the stream failed without a status of its own."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _answer(reply: broker_pb2.SubmitResponse) -> broker_pb2.SubmitResponse:
    if reply.HasField("error"):
        e = reply.error
        raise from_stream_error(e.code, e.reason, e.message)
    return reply


def _closed() -> StreamError:
    return StreamError(grpc.StatusCode.UNAVAILABLE, "the submit stream closed")


def _client_closed() -> StreamError:
    """Not retried: the client itself was closed."""
    return StreamError(grpc.StatusCode.CANCELLED, "the client was closed")


def _fail(futures: Iterable[_AioFuture], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


class _Message:
    """The jobs of the next SubmitGrouped message, up to its limits."""

    def __init__(self) -> None:
        self.jobs: list[job_pb2.JobSpec] = []
        self._bytes = 0

    def add(self, spec: job_pb2.JobSpec) -> None:
        self.jobs.append(spec)
        self._bytes += spec.ByteSize()

    @property
    def full(self) -> bool:
        return len(self.jobs) >= MESSAGE_JOBS or self._bytes >= MESSAGE_BYTES

    def request(self) -> broker_pb2.SubmitBatchRequest:
        return broker_pb2.SubmitBatchRequest(jobs=self.jobs)


def _messages(
    specs: queue.SimpleQueue[job_pb2.JobSpec | None], room: threading.Semaphore
) -> Iterator[broker_pb2.SubmitBatchRequest]:
    """Each message takes what is queued by the time it is built; None ends them."""
    while True:
        message = _Message()
        spec = specs.get()
        room.acquire()
        while spec is not None:
            message.add(spec)
            if message.full:
                break
            try:
                spec = specs.get_nowait()
            except queue.Empty:
                break
        if message.jobs:
            yield message.request()
        if spec is None:
            return


if TYPE_CHECKING:  # a SubmitGrouped call: the type is the stubs' alone
    _SyncCall = grpc.CallIterator[broker_pb2.SubmitBatchResponse]


class _SyncStream:
    """One SubmitGrouped call: grpc's thread sends what `_messages` builds, and
    a reader thread of ours hands each answer's results to the waiting callers."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub, metadata: Metadata | None) -> None:
        self._specs: queue.SimpleQueue[job_pb2.JobSpec | None] = queue.SimpleQueue()
        self._waiting: collections.deque[Future[broker_pb2.SubmitResponse]] = collections.deque()
        self._lock = threading.Lock()
        self.broken = False
        self._room = threading.Semaphore(MESSAGES_IN_FLIGHT)
        call = stub.SubmitGrouped(_messages(self._specs, self._room), metadata=metadata)
        self._call: _SyncCall | None = call
        self._reader = threading.Thread(
            target=self._read, args=(call,), name="jobbroker-submits", daemon=True
        )
        self._reader.start()

    def send(self, spec: job_pb2.JobSpec) -> Future[broker_pb2.SubmitResponse]:
        future: Future[broker_pb2.SubmitResponse] = Future()
        with self._lock:
            if self.broken:
                future.set_exception(_closed())
                return future
            self._waiting.append(future)
            self._specs.put(spec)
        return future

    def _read(self, call: _SyncCall) -> None:
        error: grpc.RpcError = _closed()
        try:
            for answer in call:
                with self._lock:
                    futures = [self._waiting.popleft() for _ in answer.results]
                self._room.release()
                for future, reply in zip(futures, answer.results, strict=True):
                    future.set_result(reply)
        except grpc.RpcError as failed:
            error = failed
        except Exception:  # an answer that does not match what was sent
            cast(Callable[[], bool], call.cancel)()
            log.exception("the submit stream broke")
        with self._lock:
            self.broken = True
            waiting, self._waiting = self._waiting, collections.deque()
        self._specs.put(None)  # ends `_messages`, wherever it waits
        self._room.release()
        for future in waiting:
            future.set_exception(error)

    def close(self) -> None:
        """End the call and wait (at most CLOSE_WAIT) for the reader to see it
        end. The call is let go here, while grpc's threads still run: left to
        the interpreter's exit, its finalizer waited on a lock that a daemon
        thread, stopped there in mid-send, held for ever."""
        self._specs.put(None)
        call, self._call = self._call, None
        if call is None:
            return
        cast(Callable[[], bool], call.cancel)()  # the stubs leave cancel untyped
        del call
        if self._reader is not threading.current_thread():
            self._reader.join(CLOSE_WAIT)
            if self._reader.is_alive():
                log.warning("the submit stream's reader did not end within %.0fs", CLOSE_WAIT)


class SubmitPipe:
    """The blocking Client's submits."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub, metadata: Metadata | None) -> None:
        self._stub = stub
        self._metadata = metadata
        self._lock = threading.Lock()
        self._stream: _SyncStream | None = None

    def submit(self, spec: job_pb2.JobSpec, timeout: float) -> broker_pb2.SubmitResponse:
        with self._lock:
            if self._stream is None or self._stream.broken:
                self._stream = _SyncStream(self._stub, self._metadata)
            future = self._stream.send(spec)
        try:
            return _answer(future.result(timeout))
        except TimeoutError:
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "submit timed out") from None

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:  # closed outside the lock: it waits for the reader
            stream.close()


_AioCall = grpc.aio.StreamStreamCall[broker_pb2.SubmitBatchRequest, broker_pb2.SubmitBatchResponse]
_AioFuture = asyncio.Future[broker_pb2.SubmitResponse]


class _AsyncStream:
    """One SubmitGrouped call and the submits sent on it that await their results."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub, metadata: Metadata | None) -> None:
        self._call: _AioCall = stub.SubmitGrouped(None, metadata=metadata)
        self._waiting: collections.deque[_AioFuture] = collections.deque()
        self._room = asyncio.Semaphore(MESSAGES_IN_FLIGHT)
        self.broken = False
        self._reader = asyncio.create_task(self._read())

    async def send(self, queued: collections.deque[tuple[job_pb2.JobSpec, _AioFuture]]) -> None:
        """Once there is room, send what is queued then (up to a message's limits)."""
        await self._room.acquire()
        if self.broken:
            return  # what is queued waits for the next stream
        message, futures = _Message(), []
        while queued and not message.full:
            spec, future = queued.popleft()
            if not future.done():  # else its caller stopped waiting before it was sent
                message.add(spec)
                futures.append(future)
        if not futures:
            self._room.release()
            return
        self._waiting.extend(futures)
        try:
            await self._call.write(message.request())
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            self.broken = True  # the reader fails the rest of `_waiting` as the call ends
            _fail(futures, _closed())

    async def _read(self) -> None:
        error: grpc.RpcError = _closed()
        try:
            async for answer in self._call:
                self._room.release()
                for reply in answer.results:
                    future = self._waiting.popleft()
                    if not future.done():  # the caller stopped waiting
                        future.set_result(reply)
        except grpc.RpcError as failed:
            error = failed
        except Exception:  # an answer that does not match what was sent
            self._call.cancel()
            log.exception("the submit stream broke")
        self.broken = True
        self._room.release()  # wakes a `send` waiting for room, to see the stream broken
        waiting, self._waiting = self._waiting, collections.deque()
        _fail(waiting, error)

    def close(self) -> None:
        self.broken = True
        self._call.cancel()
        self._reader.cancel()
        _fail(self._waiting, _client_closed())


class AsyncSubmitPipe:
    """The AsyncClient's submits: queued by their callers, sent by one writer task
    while any are queued, so a caller that stops waiting never leaves a message
    half sent."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub, metadata: Metadata | None) -> None:
        self._stub = stub
        self._metadata = metadata
        self._queued: collections.deque[tuple[job_pb2.JobSpec, _AioFuture]] = collections.deque()
        self._stream: _AsyncStream | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, spec: job_pb2.JobSpec, wait: float) -> broker_pb2.SubmitResponse:
        if self._closed:
            raise _client_closed()
        future: _AioFuture = asyncio.get_running_loop().create_future()
        self._queued.append((spec, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        try:
            async with asyncio.timeout(wait):
                return _answer(await future)
        except TimeoutError:
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "submit timed out") from None

    async def _write(self) -> None:
        try:
            while self._queued:
                if self._stream is None or self._stream.broken:
                    self._stream = _AsyncStream(self._stub, self._metadata)
                await self._stream.send(self._queued)
        except Exception as error:  # no stream could be opened: the channel is closed
            _fail((future for _, future in self._queued), error)
            self._queued.clear()
        finally:
            self._writer = None

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        queued, self._queued = self._queued, collections.deque()
        _fail((future for _, future in queued), _client_closed())

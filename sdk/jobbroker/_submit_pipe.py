"""Submits over one long-lived SubmitStream per client.

A message on an open stream costs a fraction of a unary call (no new HTTP/2
stream, no headers), and submits from many threads or tasks share it: the
broker answers in order, so replies are matched to callers first in, first out.
A broken stream fails its waiting submits with the stream's error (UNAVAILABLE
is then retried by `_calls`, with the same idempotency key) and the next
submit opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc

from .errors import from_stream_error


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


_CLOSED = StreamError(grpc.StatusCode.UNAVAILABLE, "the submit stream closed")


class _SyncStream:
    def __init__(self, stub: broker_pb2_grpc.BrokerStub) -> None:
        self._requests: queue.SimpleQueue[broker_pb2.SubmitRequest | None] = queue.SimpleQueue()
        self._waiting: collections.deque[Future[broker_pb2.SubmitResponse]] = collections.deque()
        self._lock = threading.Lock()
        self.broken = False
        self._call = stub.SubmitStream(iter(self._requests.get, None))
        threading.Thread(target=self._read, name="jobbroker-submits", daemon=True).start()

    def send(self, request: broker_pb2.SubmitRequest) -> Future[broker_pb2.SubmitResponse]:
        future: Future[broker_pb2.SubmitResponse] = Future()
        with self._lock:
            if self.broken:
                future.set_exception(_CLOSED)
                return future
            self._waiting.append(future)
            self._requests.put(request)
        return future

    def _read(self) -> None:
        error: grpc.RpcError = _CLOSED
        try:
            for reply in self._call:
                with self._lock:
                    future = self._waiting.popleft()
                future.set_result(reply)
        except grpc.RpcError as failed:
            error = failed
        with self._lock:
            self.broken = True
            waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            future.set_exception(error)

    def close(self) -> None:
        self._requests.put(None)
        cast(Callable[[], bool], self._call.cancel)()  # the stubs leave cancel untyped


class SubmitPipe:
    """The blocking Client's submits."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub) -> None:
        self._stub = stub
        self._lock = threading.Lock()
        self._stream: _SyncStream | None = None

    def submit(
        self, request: broker_pb2.SubmitRequest, timeout: float
    ) -> broker_pb2.SubmitResponse:
        with self._lock:
            if self._stream is None or self._stream.broken:
                self._stream = _SyncStream(self._stub)
            future = self._stream.send(request)
        try:
            return _answer(future.result(timeout))
        except TimeoutError:
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "submit timed out") from None

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


_AioCall = grpc.aio.StreamStreamCall[broker_pb2.SubmitRequest, broker_pb2.SubmitResponse]


class AsyncSubmitPipe:
    """The AsyncClient's submits."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub) -> None:
        self._stub = stub
        self._lock = asyncio.Lock()
        self._call: _AioCall | None = None
        self._waiting: collections.deque[asyncio.Future[broker_pb2.SubmitResponse]] = (
            collections.deque()
        )
        self._reader: asyncio.Task[None] | None = None

    async def submit(
        self, request: broker_pb2.SubmitRequest, wait: float
    ) -> broker_pb2.SubmitResponse:
        future: asyncio.Future[broker_pb2.SubmitResponse] = (
            asyncio.get_running_loop().create_future()
        )
        async with self._lock:  # one write at a time, in the order of `_waiting`
            call = self._call
            if call is None:
                call = self._call = self._stub.SubmitStream(None)
                self._reader = asyncio.create_task(self._read(call))
            self._waiting.append(future)
            try:
                await call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                self._waiting.remove(future)
                self._call = None
                raise _CLOSED from None
        try:
            async with asyncio.timeout(wait):
                return _answer(await future)
        except TimeoutError:
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "submit timed out") from None

    async def _read(self, call: _AioCall) -> None:
        error: grpc.RpcError = _CLOSED
        try:
            async for reply in call:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except grpc.RpcError as failed:
            error = failed
        if self._call is call:
            self._call = None
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

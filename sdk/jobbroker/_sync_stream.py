"""The sync LeaseStream: a bidi call fed from a queue.Queue, read by one thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from types import TracebackType
from typing import cast

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc

from ._stream_core import StreamCore, flow_message, lost_leases, subscribe_message
from .connection import Metadata
from .errors import (
    BrokerUnavailableError,
    DeadlineExceededError,
    JobBrokerError,
    stream_error,
)
from .lease import Lease, ReportResult, heartbeat_message


class LeaseStream:
    """Leased jobs as they are pushed: `for lease in stream: ...`.

    Iteration ends when the stream is closed; it raises BrokerUnavailableError
    when the connection breaks. `close()` (or leaving the `with` block) ends the RPC.
    """

    def __init__(
        self,
        stub: broker_pb2_grpc.BrokerStub,
        queues: Sequence[str],
        *,
        prefetch: int,
        worker_id: str,
        report_timeout: float,
        held: Sequence[Lease] = (),
        metadata: Metadata | None = None,
        reports_starts: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self._report_timeout = report_timeout
        self._lock = threading.Lock()
        self._core = StreamCore[Lease](held)
        for lease in held:
            lease._stream = self
        self._requests: queue.Queue[broker_pb2.WorkerMessage | None] = queue.Queue()
        self._inbox: queue.Queue[Lease | None] = queue.Queue()
        self._closing = False
        self._requests.put(subscribe_message(worker_id, queues, prefetch, held, reports_starts))
        self._call = stub.LeaseStream(self._request_iterator(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="jobbroker-lease-reader")
        self._reader.daemon = True
        self._reader.start()

    def __iter__(self) -> Iterator[Lease]:
        return self

    def __next__(self) -> Lease:
        lease = self._inbox.get()
        if lease is None:
            self._inbox.put(None)  # every later call ends too
            if self._closing or self._core.error is None:
                raise StopIteration
            raise self._core.error
        return lease

    @property
    def ended(self) -> bool:
        """True once the RPC is over, broken or closed: reports on it fail, and
        its leases are for another stream to take over (`held=`)."""
        with self._lock:
            return self._core.error is not None

    @property
    def held(self) -> list[Lease]:
        """Leases pushed to this stream and not yet completed, failed or released."""
        with self._lock:
            return list(self._core.held.values())

    def set_prefetch(self, prefetch: int) -> None:
        """Change the window; 0 stops leasing, as a worker shutting down does."""
        self._requests.put(flow_message(prefetch))

    def heartbeat(self, leases: Sequence[Lease]) -> list[Lease]:
        """One heartbeat for many leases; returns those the broker no longer honours."""
        if not leases:
            return []
        return lost_leases(leases, self._exchange(heartbeat_message(leases)))

    def _exchange(self, message: broker_pb2.WorkerMessage) -> list[ReportResult]:
        """Send a report and block until its Ack."""
        waiter: futures.Future[list[ReportResult]] = futures.Future()
        with self._lock:
            seq = self._core.register(message, waiter)
        self._requests.put(message)
        try:
            return waiter.result(timeout=self._report_timeout)
        except futures.TimeoutError:
            with self._lock:
                self._core.forget(seq)
            raise DeadlineExceededError(f"no ack for report {seq}") from None

    def close(self) -> None:
        """End the RPC: iteration stops, and reports still waiting fail."""
        self._closing = True
        self._requests.put(None)
        cast(Callable[[], bool], self._call.cancel)()
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def __enter__(self) -> LeaseStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request_iterator(self) -> Iterator[broker_pb2.WorkerMessage]:
        while (message := self._requests.get()) is not None:
            yield message

    def _read(self) -> None:
        error: JobBrokerError = BrokerUnavailableError("the broker ended the lease stream")
        try:
            for message in self._call:
                with self._lock:
                    pushed = self._core.dispatch(message, lambda leased: Lease(self, leased))
                for lease in pushed:
                    self._inbox.put(lease)
        except grpc.RpcError as rpc_error:
            error = stream_error(rpc_error)
        if self._closing:
            error = JobBrokerError("the lease stream is closed")
        with self._lock:
            self._core.end(error)
        self._requests.put(None)
        self._inbox.put(None)

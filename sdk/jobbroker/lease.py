"""Leases: one attempt of a job held by a worker, and the reports made on it.

A lease reports over the LeaseStream it came from (see `_sync_stream` and
`_async_stream`); each report waits for the broker's Ack and raises the mapped
error. After a reconnect the worker moves its leases onto the new stream.

A leased job is held, not yet running: `start()` says its handler starts, and
its hard timeout counts from then. A Completion or Failure of a lease whose
start the broker did not confirm says how long the handler ran (`run_time`),
and the broker records the start from that.

Every report raises, besides what its docstring names:

- LeaseLostError: the lease is gone (it expired and the job was leased again,
  or it was already completed, failed or released); the job is not yours.
- JobNotFoundError: the broker no longer knows the job.
- DeadlineExceededError: no Ack came within the stream's report timeout.
- BrokerUnavailableError (or the error the stream ended with): the stream is
  broken or closed; hand the lease to a new stream with `held=`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from jobbroker.v1 import broker_pb2

from ._convert import (
    decode_payload,
    duration_from_pb,
    duration_to_pb,
    error_to_pb,
    job_from_pb,
    set_payload,
    timestamp_from_pb,
)
from .errors import (
    InvalidArgumentError,
    JobBrokerError,
    JobNotFoundError,
    LeaseLostError,
)
from .types import CancelReason, ErrorInfo, Job

ReportResult = broker_pb2.ReportResult


class SyncReporter(Protocol):
    def _exchange(self, message: broker_pb2.WorkerMessage) -> list[ReportResult]: ...


class AsyncReporter(Protocol):
    async def _exchange(self, message: broker_pb2.WorkerMessage) -> list[ReportResult]: ...

    def _schedule(
        self, message: broker_pb2.WorkerMessage, delay: float
    ) -> asyncio.Future[list[ReportResult]]: ...

    def _withdraw(self, kind: str, waiter: asyncio.Future[list[ReportResult]]) -> bool: ...

    @property
    def ended(self) -> bool: ...


class _LeaseBase:
    job: Job
    """The leased job, as it was when leased."""
    fencing_token: int
    """This attempt's token: reports under an older one are refused."""
    expires_at: datetime | None
    """When the lease runs out unless heartbeated; each Ack moves it on."""
    heartbeat_interval: timedelta | None
    """How often the broker asks for a heartbeat."""
    cancel_reason: CancelReason | None
    """Why the broker took the job back, once it has."""

    def __init__(
        self,
        job: Job,
        fencing_token: int,
        expires_at: datetime | None,
        heartbeat_interval: timedelta | None,
    ) -> None:
        self.job = job
        self.fencing_token = fencing_token
        self.expires_at = expires_at
        self.heartbeat_interval = heartbeat_interval
        self.cancel_reason = None
        # When the handler began, as far as this process knows (monotonic):
        # on receipt until start() says otherwise; None while a Worker holds
        # the lease unstarted, so that a failure with no handler run says none.
        self._began: float | None = time.monotonic()
        self._ran: float | None = None  # seconds, fixed when a Worker's handler ended
        self._started = False  # the broker confirmed the start: no run_time needed

    def _run_time(self) -> float | None:
        """Seconds the handler ran, for a Completion or Failure; None when the
        broker knows the start already or no handler ran."""
        if self._started or self._began is None:
            return None
        return self._ran if self._ran is not None else time.monotonic() - self._began

    @property
    def cancelled(self) -> bool:
        """True once the broker asked this worker to stop running the job."""
        return self.cancel_reason is not None

    def payload(self) -> Any:
        """The job's payload: a JSON value, or bytes for any other content type."""
        return decode_payload(self.job.payload, self.job.content_type)

    def _ref(self) -> broker_pb2.LeaseRef:
        return broker_pb2.LeaseRef(job_id=self.job.id, fencing_token=self.fencing_token)

    def _apply(self, results: Sequence[ReportResult]) -> None:
        for result in results:
            if result.job_id == self.job.id:
                check_result(result)
                self.expires_at = timestamp_from_pb(result, "lease_expires_at") or self.expires_at

    def __repr__(self) -> str:
        return f"<{type(self).__name__} job={self.job.id} token={self.fencing_token}>"


class Lease(_LeaseBase):
    """A lease from the sync `Client.lease_stream`; every report blocks for its Ack."""

    def __init__(self, stream: SyncReporter, leased: broker_pb2.LeasedJob) -> None:
        super().__init__(*lease_fields(leased))
        self._stream = stream
        self._cancelled = threading.Event()

    def _mark_cancelled(self, reason: CancelReason) -> None:
        self.cancel_reason = reason
        self._cancelled.set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the broker cancels this lease (True) or `timeout` passes (False)."""
        return self._cancelled.wait(timeout)

    def start(self) -> None:
        """Tell the broker this lease's handler starts now: the job moves from
        leased to running, and its hard timeout counts from now. (The `Worker`
        calls it for you.) Raises LeaseLostError if the lease is gone.

        Without it, `complete` and `fail` send the time since the lease was
        received as the handler's run time, the best this lease knows, and the
        broker records the start from that."""
        self._began = time.monotonic()
        self._apply(self._stream._exchange(start_message([self])))
        self._started = True

    def heartbeat(self) -> None:
        """Renew the lease (moving `expires_at` on); raises LeaseLostError if it is gone."""
        self._apply(self._stream._exchange(heartbeat_message([self])))

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the job is (`fraction` within [0, 1], InvalidArgumentError
        otherwise) with an optional message; also renews the lease."""
        self._apply(self._stream._exchange(progress_message(self, fraction, message)))

    def complete(self, result: Any = None) -> None:
        """Finish the job with `result` (JSON, or bytes) and end the lease; raises
        LeaseLostError if the lease is gone, and the result is then dropped.
        Unless `start()` was confirmed, it says the handler ran since the
        lease was received (or since `start()` was called)."""
        self._apply(self._stream._exchange(complete_message(self, result)))

    def fail(
        self,
        error: BaseException | ErrorInfo | str,
        *,
        retryable: bool = True,
        retry_after: timedelta | None = None,
        cancelled: bool = False,
    ) -> None:
        """Fail this attempt and end the lease: the broker retries the job after
        `retry_after` (or its backoff) unless `retryable` is False or attempts
        run out, which dead-letters it; with `cancelled=True` the job ends
        cancelled, not retried. Raises LeaseLostError if the lease is gone.
        Its run time is sent as `complete`'s is."""
        message = fail_message(self, error, retryable, retry_after, cancelled)
        self._apply(self._stream._exchange(message))

    def release(self) -> None:
        """Give the job back unrun and end the lease: it is leased again at once,
        and the attempt does not count against its retries. Raises
        LeaseLostError if the lease is gone."""
        self._apply(self._stream._exchange(release_message([self])))


class AsyncLease(_LeaseBase):
    """A lease from `AsyncClient.lease_stream`; every report awaits its Ack."""

    def __init__(self, stream: AsyncReporter, leased: broker_pb2.LeasedJob) -> None:
        super().__init__(*lease_fields(leased))
        self._stream = stream
        self._cancelled = asyncio.Event()
        self._on_cancel: list[Callable[[], None]] = []
        self._start: asyncio.Future[list[ReportResult]] | None = None  # a Start on its way
        self._on_lost: Callable[[], None] | None = None  # told when a Start finds it gone

    def _mark_cancelled(self, reason: CancelReason) -> None:
        self.cancel_reason = reason
        self._cancelled.set()
        for hook in self._on_cancel:
            hook()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Call `hook` on the event loop when the broker cancels this lease
        (at once if it already has): a callback, where `wait_cancelled` needs a task."""
        if self.cancel_reason is not None:
            hook()
        else:
            self._on_cancel.append(hook)

    async def wait_cancelled(self) -> CancelReason:
        """Wait until the broker cancels this lease, and say why."""
        await self._cancelled.wait()
        assert self.cancel_reason is not None
        return self.cancel_reason

    async def start(self) -> None:
        """Tell the broker this lease's handler starts now: the job moves from
        leased to running, and its hard timeout counts from now. (The `Worker`
        calls it for you.) Raises LeaseLostError if the lease is gone.

        Without it, `complete` and `fail` send the time since the lease was
        received as the handler's run time, the best this lease knows, and the
        broker records the start from that."""
        self._withdraw_start()
        self._began = time.monotonic()
        self._apply(await self._stream._exchange(start_message([self])))
        self._started = True

    # --- what a Worker does with the lease: see _runner.run_job ---

    def _hold(self) -> None:
        """A Worker holds the lease: no handler runs until `_begin`."""
        self._began = None

    def _begin(self, delay: float, on_lost: Callable[[], None]) -> None:
        """The handler starts now: a Start goes out in `delay` seconds, unless
        the attempt ends first (`_end`). `on_lost` is called if the broker
        answers that the lease is gone."""
        self._began = time.monotonic()
        self._on_lost = on_lost
        self._schedule_start(delay)

    def _end(self) -> None:
        """The handler ended (or was given up): its run time is fixed, and a
        Start not yet sent stays unsent (the outcome carries the run time)."""
        if self._began is not None:
            self._ran = time.monotonic() - self._began
        if self._withdraw_start():
            self._on_lost = None

    def _resume(self) -> None:
        """The lease moved to a new stream: a Start the old one did not get
        confirmed goes out on it."""
        if self._began is None or self._ran is not None or self._started:
            return
        if self._start is None or self._start.done():
            self._schedule_start(0.0)

    def _schedule_start(self, delay: float) -> None:
        start = self._stream._schedule(start_message([self]), delay)
        self._start = start
        start.add_done_callback(self._start_answered)

    def _withdraw_start(self) -> bool:
        """Take back a Start that has not gone out; True if there was one."""
        start, self._start = self._start, None
        return start is not None and not start.done() and self._stream._withdraw("start", start)

    def _start_answered(self, done: asyncio.Future[list[ReportResult]]) -> None:
        if self._start is done:
            self._start = None
        if done.cancelled() or done.exception() is not None:
            return  # the stream ended: the next one sends it again (`_resume`)
        on_lost, self._on_lost = self._on_lost, None
        for result in done.result():
            if result.job_id != self.job.id:
                continue
            if result.status in _GONE:
                if on_lost is not None:
                    on_lost()
            elif result.status == broker_pb2.REPORT_STATUS_OK:
                self._started = True

    async def heartbeat(self) -> None:
        """Renew the lease (moving `expires_at` on); raises LeaseLostError if it is gone."""
        self._apply(await self._stream._exchange(heartbeat_message([self])))

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the job is (`fraction` within [0, 1], InvalidArgumentError
        otherwise) with an optional message; also renews the lease."""
        self._apply(await self._stream._exchange(progress_message(self, fraction, message)))

    async def complete(self, result: Any = None) -> None:
        """Finish the job with `result` (JSON, or bytes) and end the lease; raises
        LeaseLostError if the lease is gone, and the result is then dropped.
        Unless `start()` was confirmed, it says the handler ran since the
        lease was received (or since `start()` was called); a Worker's lease
        says how long its handler ran."""
        self._apply(await self._stream._exchange(complete_message(self, result)))

    async def fail(
        self,
        error: BaseException | ErrorInfo | str,
        *,
        retryable: bool = True,
        retry_after: timedelta | None = None,
        cancelled: bool = False,
    ) -> None:
        """Fail this attempt and end the lease: the broker retries the job after
        `retry_after` (or its backoff) unless `retryable` is False or attempts
        run out, which dead-letters it; with `cancelled=True` the job ends
        cancelled, not retried. Raises LeaseLostError if the lease is gone.
        Its run time is sent as `complete`'s is."""
        message = fail_message(self, error, retryable, retry_after, cancelled)
        self._apply(await self._stream._exchange(message))

    async def release(self) -> None:
        """Give the job back unrun and end the lease: it is leased again at once,
        and the attempt does not count against its retries. Raises
        LeaseLostError if the lease is gone."""
        self._apply(await self._stream._exchange(release_message([self])))


# --- the protocol's messages and answers, shared by both streams ---


def lease_fields(
    leased: broker_pb2.LeasedJob,
) -> tuple[Job, int, datetime | None, timedelta | None]:
    return (
        job_from_pb(leased.job),
        leased.fencing_token,
        timestamp_from_pb(leased, "lease_expires_at"),
        duration_from_pb(leased, "heartbeat_interval"),
    )


def start_message(leases: Sequence[_LeaseBase]) -> broker_pb2.WorkerMessage:
    return broker_pb2.WorkerMessage(
        start=broker_pb2.Start(leases=[lease._ref() for lease in leases])
    )


def heartbeat_message(leases: Sequence[_LeaseBase]) -> broker_pb2.WorkerMessage:
    heartbeat = broker_pb2.Heartbeat(leases=[lease._ref() for lease in leases])
    return broker_pb2.WorkerMessage(heartbeat=heartbeat)


def progress_message(lease: _LeaseBase, fraction: float, message: str) -> broker_pb2.WorkerMessage:
    if not 0.0 <= fraction <= 1.0:
        raise InvalidArgumentError(f"progress must be within [0, 1], got {fraction}")
    progress = broker_pb2.Progress(lease=lease._ref(), progress=fraction, message=message)
    return broker_pb2.WorkerMessage(progress=progress)


def complete_message(lease: _LeaseBase, result: Any) -> broker_pb2.WorkerMessage:
    # Filled in place: a message given to a constructor is copied.
    message = broker_pb2.WorkerMessage()
    completion = message.complete.completions.add()
    completion.lease.job_id = lease.job.id
    completion.lease.fencing_token = lease.fencing_token
    set_payload(completion.result, result)
    ran = lease._run_time()
    if ran is not None:
        completion.run_time.FromNanoseconds(round(ran * 1e9))
    return message


def fail_message(
    lease: _LeaseBase,
    error: BaseException | ErrorInfo | str,
    retryable: bool,
    retry_after: timedelta | None,
    cancelled: bool,
) -> broker_pb2.WorkerMessage:
    failure = broker_pb2.Failure(
        lease=lease._ref(),
        error=error_to_pb(error_info(error)),
        permanent=not retryable,
        cancelled=cancelled,
    )
    if retry_after is not None:
        failure.retry_after.CopyFrom(duration_to_pb(retry_after))
    ran = lease._run_time()
    if ran is not None:
        failure.run_time.FromNanoseconds(round(ran * 1e9))
    return broker_pb2.WorkerMessage(fail=broker_pb2.Fail(failures=[failure]))


def release_message(leases: Sequence[_LeaseBase]) -> broker_pb2.WorkerMessage:
    release = broker_pb2.Release(leases=[lease._ref() for lease in leases])
    return broker_pb2.WorkerMessage(release=release)


def error_info(error: BaseException | ErrorInfo | str) -> ErrorInfo:
    if isinstance(error, ErrorInfo):
        return error
    if isinstance(error, str):
        return ErrorInfo(type="Error", message=error)
    return ErrorInfo(
        type=type(error).__qualname__,
        message=str(error),
        traceback="".join(traceback.format_exception(error)),
    )


_GONE = (broker_pb2.REPORT_STATUS_LEASE_LOST, broker_pb2.REPORT_STATUS_NOT_FOUND)

_ERRORS: dict[int, type[JobBrokerError]] = {
    broker_pb2.REPORT_STATUS_LEASE_LOST: LeaseLostError,
    broker_pb2.REPORT_STATUS_NOT_FOUND: JobNotFoundError,
    broker_pb2.REPORT_STATUS_INVALID: InvalidArgumentError,
}


def check_result(result: ReportResult) -> None:
    """Raise the error an Ack's result stands for; OK (or unspecified) passes."""
    if result.status in (broker_pb2.REPORT_STATUS_OK, broker_pb2.REPORT_STATUS_UNSPECIFIED):
        return
    cls = _ERRORS.get(result.status, JobBrokerError)
    reason = broker_pb2.ReportStatus.Name(result.status).removeprefix("REPORT_STATUS_")
    message = result.message or f"job {result.job_id}: {reason.lower()}"
    raise cls(message, reason=reason)


def settled(message: broker_pb2.WorkerMessage, results: Sequence[ReportResult]) -> list[str]:
    """Job ids whose lease this report ended: the stream stops holding them.

    Complete, Fail and Release end a lease unless the broker found the report
    invalid (the lease is still the worker's to settle); any report ends a
    lease the broker says is lost or gone.
    """
    status = {r.job_id: r.status for r in results}
    ending = message.WhichOneof("kind") in ("complete", "fail", "release")
    return [
        ref.job_id
        for ref in report_refs(message)
        if status.get(ref.job_id) in _GONE
        or (ending and status.get(ref.job_id) != broker_pb2.REPORT_STATUS_INVALID)
    ]


def report_refs(message: broker_pb2.WorkerMessage) -> list[broker_pb2.LeaseRef]:
    kind = message.WhichOneof("kind")
    if kind == "complete":
        return [c.lease for c in message.complete.completions]
    if kind == "fail":
        return [f.lease for f in message.fail.failures]
    if kind == "release":
        return list(message.release.leases)
    if kind == "heartbeat":
        return list(message.heartbeat.leases)
    if kind == "progress":
        return [message.progress.lease]
    if kind == "start":
        return list(message.start.leases)
    return []

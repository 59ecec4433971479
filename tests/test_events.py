"""A job's story through the SDK and the CLI: the event log, watch, tail and
explain, against a real broker on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobbroker import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    JobEvent,
    JobNotFoundError,
    JobState,
    Lease,
    RetryPolicy,
)
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.processes import BROKER, Process

from .waiting import wait_for

QUICK_RETRY = RetryPolicy(max_attempts=3, backoff_base=timedelta(milliseconds=50), jitter=0.0)
ONCE = RetryPolicy(max_attempts=1)


def _start(lease: Lease) -> bool:
    """Report that the handler started, where the SDK can (Lease.start);
    True when it did, and the log then has a `started` event of its own."""
    start: Callable[[], None] | None = getattr(lease, "start", None)
    if start is None:
        return False
    start()
    return True


def _reasons(events: Iterable[JobEvent]) -> list[str]:
    return [e.reason for e in events]


def _moves(events: Iterable[JobEvent]) -> list[tuple[JobState | None, JobState]]:
    return [(e.from_state, e.to_state) for e in events]


def _check_chain(events: list[JobEvent], job_id: str, queue: str) -> None:
    """One job's events: seqs strictly growing, times not going back, each
    event leaving the job where the next one finds it."""
    assert all(e.job_id == job_id and e.queue == queue for e in events)
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] > 0, seqs
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))
    for before, after in itertools.pairwise(events):
        assert after.from_state is before.to_state, (before, after)


class Collector:
    """Iterate an event stream in a thread, as a program would, until `stop`
    says so; the test waits on it with a deadline."""

    def __init__(self, stream: Iterator[JobEvent], stop: Callable[[list[JobEvent]], bool]):
        self.events: list[JobEvent] = []
        self.error: BaseException | None = None
        self._stream = stream
        self._stop = stop
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
                if self._stop(self.events):
                    break
        except BaseException as error:  # handed to the test
            self.error = error
        finally:
            close = getattr(self._stream, "close", None)  # the call ends now, not at GC
            if close is not None:
                close()

    def finished(self, timeout: float = 20) -> list[JobEvent]:
        wait_for(lambda: not self._thread.is_alive(), timeout, "the event stream to end")
        if self.error is not None:
            raise self.error
        return self.events


def _ends(job_id: str) -> Callable[[list[JobEvent]], bool]:
    return lambda seen: seen[-1].job_id == job_id and seen[-1].to_state.terminal


# --- the log ---


def test_a_jobs_timeline_from_submit_through_a_retry_to_success(client: Client) -> None:
    handle = client.submit("story", {"n": 1}, queue="story", retry=QUICK_RETRY)
    with client.lease_stream(["story"], prefetch=1, worker_id="worker-a") as stream:
        leases = iter(stream)
        first = next(leases)
        started = _start(first)
        first.progress(0.5, "half way")
        first.fail(ValueError("flaky"), retry_after=timedelta(milliseconds=50))
        second = next(leases)
        _start(second)
        second.complete({"ok": True})
    assert handle.result(timeout=10) == {"ok": True}

    events = handle.events()
    ran = JobState.RUNNING if started else JobState.LEASED
    reasons = _reasons(events)
    assert [r for r in reasons if r != "started"] == [
        "submitted",
        "leased",
        "progress",
        "failed",
        "promoted",
        "leased",
        "succeeded",
    ]
    assert reasons[-3:] == ["leased", "started", "succeeded"]
    if started:
        assert reasons[2] == "started" and reasons.count("started") == 2
    # Without a start, a failure that says how long its handler ran implies one.
    _check_chain(events, handle.id, "story")
    by_reason = {e.reason: e for e in events}  # the last of each
    submitted, progress, failed, promoted = (
        by_reason[r] for r in ("submitted", "progress", "failed", "promoted")
    )
    assert (submitted.from_state, submitted.to_state) == (None, JobState.PENDING)
    assert submitted.actor == "client" and submitted.attempt == 0
    assert progress.to_state is ran and progress.detail["message"] == "half way"
    assert float(progress.detail["progress"]) == 0.5
    assert failed.to_state is JobState.SCHEDULED  # from where the chain says
    assert failed.detail["error_type"] == "ValueError" and failed.detail["error"] == "flaky"
    assert datetime.fromisoformat(failed.detail["run_at"]) > failed.at
    assert promoted.actor == "broker"
    assert {e.actor for e in events if e.reason in ("leased", "started", "succeeded")} == {
        "worker-a"
    }
    assert [e.attempt for e in events if e.reason == "leased"] == [1, 2]
    assert _moves(events)[-1] == (JobState.RUNNING, JobState.SUCCEEDED)

    later = client.job_events(handle.id, after=failed.seq)
    assert later == events[events.index(failed) + 1 :]
    assert client.job_events(handle.id, after=events[-1].seq) == []


def test_job_events_pages_through_a_long_log(client: Client) -> None:
    """Over a thousand progress reports: more than one ListJobEvents page."""
    handle = client.submit("chatty", None, queue="chatty")
    with client.lease_stream(["chatty"], prefetch=1) as stream:
        lease = next(iter(stream))
        for n in range(1005):
            lease.progress(n / 1005)
            if n % 200 == 0:
                lease.heartbeat()  # a progress report does not renew the lease
        lease.complete()
    events = client.job_events(handle.id)
    assert len(events) == 1 + 1 + 1005 + 2  # submitted, leased, progress…, started, succeeded
    _check_chain(events, handle.id, "chatty")
    assert client.job_events(handle.id, after=events[999].seq) == events[1000:]


def test_a_cancelled_pending_job(client: Client) -> None:
    handle = client.submit("never", None, queue="cancel")
    client.cancel(handle.id)
    events = handle.events()
    assert _reasons(events) == ["submitted", "cancelled"]
    assert _moves(events)[1] == (JobState.PENDING, JobState.CANCELLED)
    _check_chain(events, handle.id, "cancel")


def test_a_dead_job_replayed_from_the_dlq(client: Client) -> None:
    handle = client.submit("doomed", None, queue="replay", retry=ONCE)
    with client.lease_stream(["replay"], prefetch=1, worker_id="worker-r") as stream:
        leases = iter(stream)
        next(leases).fail(ValueError("bad input"))
        assert client.dlq_replay([handle.id]) == [handle.id]
        next(leases).complete("fixed")
    assert handle.result(timeout=10) == "fixed"
    events = handle.events()
    reasons = _reasons(events)
    assert reasons[:2] == ["submitted", "leased"]
    assert reasons[-4:] == ["replayed", "leased", "started", "succeeded"]
    dead = events[reasons.index("replayed") - 1]
    assert dead.reason == "dead_lettered" and dead.to_state is JobState.DEAD
    assert dead.detail["error_type"] == "ValueError" and dead.actor == "worker-r"
    replayed = events[reasons.index("replayed")]
    assert (replayed.from_state, replayed.to_state) == (JobState.DEAD, JobState.PENDING)
    assert replayed.actor == "client"
    _check_chain(events, handle.id, "replay")


def test_an_expired_lease(settings: Settings) -> None:
    short = replace(settings, lease_duration=timedelta(milliseconds=400))
    # Backing off long enough to close the frozen worker's stream before the
    # job is pending again: else the broker leases it to that stream again.
    retry = RetryPolicy(max_attempts=2, backoff_base=timedelta(milliseconds=500), jitter=0.0)
    with BrokerThread(short) as broker, Client(broker.target, timeout=10) as client:
        handle = client.submit("stuck", None, queue="expire", retry=retry)
        with client.lease_stream(["expire"], prefetch=1, worker_id="frozen") as stream:
            next(iter(stream))  # and never a heartbeat
            expired = wait_for(
                lambda: [e for e in handle.events() if e.reason == "lease_expired"],
                what="the reaper to expire the lease",
            )[0]
        assert expired.from_state is JobState.LEASED and expired.actor == "broker"
        assert expired.attempt == 1
        with client.lease_stream(["expire"], prefetch=1) as stream:
            next(iter(stream)).complete()
        assert handle.result(timeout=10) is None
        events = handle.events()
        _check_chain(events, handle.id, "expire")
        assert _reasons(events)[-3:] == ["leased", "started", "succeeded"]


def test_unknown_jobs_and_bad_arguments_are_sdk_errors(client: Client) -> None:
    with pytest.raises(JobNotFoundError):
        client.job_events("no-such-job")
    with pytest.raises(JobNotFoundError):
        client.explain("no-such-job")
    with pytest.raises(JobNotFoundError):
        next(iter(client.watch("no-such-job")))
    with pytest.raises(InvalidArgumentError, match="after"):
        client.watch("x", after=-1)
    with pytest.raises(InvalidArgumentError, match="after"):
        client.tail_events(after=-5)


# --- watch ---


def test_a_watch_cut_mid_stream_resumes_from_its_last_seq(client: Client) -> None:
    handle = client.submit("watched", None, queue="watch")
    first = Collector(handle.watch(), lambda seen: len(seen) == 4)
    with client.lease_stream(["watch"], prefetch=1) as stream:
        lease = next(iter(stream))
        for n in range(6):
            lease.progress(n / 6, f"step {n}")
        cut = first.finished()  # broke out after four, with more on the way
        assert len(cut) == 4
        rest = Collector(client.watch(handle.id, after=cut[-1].seq), _ends(handle.id))
        for n in range(6, 9):
            lease.progress(n / 9, f"step {n}")
        lease.complete("done")
    resumed = rest.finished()
    assert resumed[-1].reason == "succeeded"
    assert cut + resumed == client.job_events(handle.id)  # each event once, none missed
    # A watch of a finished job tells its whole story and ends.
    assert list(client.watch(handle.id)) == cut + resumed
    assert list(client.watch(handle.id, after=resumed[-1].seq)) == []


def test_watch_and_tail_reopen_after_the_broker_restarts(settings: Settings) -> None:
    """UNAVAILABLE breaks both streams; each opens again after the last event
    it saw, and the caller sees every event once."""
    settings = replace(settings, lease_duration=timedelta(seconds=15))
    broker = BrokerThread(settings).start()
    settings = replace(settings, port=broker.app.port)
    client = Client(broker.target, timeout=15)
    streams: list[Any] = []
    try:
        after = _marker(client, "elsewhere")
        handle = client.submit("through", None, queue="restart")
        watch = Collector(handle.watch(), _ends(handle.id))
        tail = Collector(client.tail_events(queue="restart", after=after), _ends(handle.id))
        streams.append(client.lease_stream(["restart"], prefetch=1, worker_id="steady"))
        lease = next(iter(streams[0]))
        lease.progress(0.25, "before")
        wait_for(lambda: len(watch.events) == 3 and len(tail.events) == 3, what="three events")

        broker.stop()
        broker = BrokerThread(settings).start()
        client.get_job(handle.id)  # retried until the channel is connected again
        streams.append(client.lease_stream(["restart"], held=streams[0].held, worker_id="steady"))
        lease.progress(0.75, "after")
        lease.complete("through")
        watched, tailed = watch.finished(), tail.finished()
    finally:
        for stream in streams:
            stream.close()
        client.close()
        broker.stop()
    assert _reasons(watched) == [
        "submitted",
        "leased",
        "progress",
        "progress",
        "started",
        "succeeded",
    ]
    _check_chain(watched, handle.id, "restart")
    assert tailed == watched


# --- tail ---


def _marker(client: Client, queue: str) -> int:
    """The seq of a fresh event: a tail opened after it misses nothing later."""
    return client.submit("marker", None, queue=queue).events()[-1].seq


def test_tail_sees_the_jobs_of_two_producers(broker: BrokerThread, client: Client) -> None:
    after = _marker(client, "elsewhere")
    with Client(broker.target, timeout=10) as other:
        tail = Collector(
            client.tail_events(queue="tailed", after=after), lambda seen: len(seen) == 2
        )
        mine = client.submit("mine", None, queue="tailed")
        ignored = other.submit("ignored", None, queue="elsewhere")
        theirs = other.submit("theirs", None, queue="tailed")
        events = tail.finished()
    # Another queue's job, written before theirs, would have come before it.
    assert {e.job_id: e.reason for e in events} == {mine.id: "submitted", theirs.id: "submitted"}
    assert ignored.id not in {e.job_id for e in events}
    assert events[0].seq < events[1].seq


def test_tail_filters_by_task(client: Client) -> None:
    after = _marker(client, "elsewhere")
    tail = Collector(client.tail_events(task="wanted", after=after), lambda seen: len(seen) == 2)
    client.submit("unwanted", None, queue="tasks")
    wanted = client.submit("wanted", None, queue="tasks")
    with client.lease_stream(["tasks"], prefetch=2) as stream:
        for lease in stream:
            if lease.job.id == wanted.id:
                break
    events = tail.finished()
    assert {e.job_id for e in events} == {wanted.id}
    assert _reasons(events) == ["submitted", "leased"]


# --- explain ---


def test_explain_a_delayed_job(client: Client) -> None:
    before = datetime.now(UTC)
    handle = client.submit("later", None, queue="explain", delay=timedelta(minutes=5))
    e = handle.explain()
    assert (e.state, e.reason, e.attempt) == (JobState.SCHEDULED, "scheduled", 0)
    assert e.run_at is not None and e.run_at - before > timedelta(minutes=4)
    assert "delayed until" in e.summary and e.last_error is None


def test_explain_a_retry_backing_off(client: Client) -> None:
    handle = client.submit("flaky", None, queue="backoff", retry=QUICK_RETRY)
    with client.lease_stream(["backoff"], prefetch=1) as stream:
        next(iter(stream)).fail(ValueError("try later"), retry_after=timedelta(minutes=5))
    e = client.explain(handle.id)
    assert (e.state, e.reason, e.attempt) == (JobState.SCHEDULED, "retry_backoff", 1)
    assert e.run_at is not None and e.last_error is not None
    assert e.last_error.type == "ValueError" and e.last_error.message == "try later"
    assert "ValueError: try later" in e.summary


def test_explain_pending_jobs_with_and_without_a_worker(client: Client) -> None:
    alone = client.submit("alone", None, queue="nobody")
    e = client.explain(alone.id)
    assert (e.state, e.reason, e.workers_serving) == (JobState.PENDING, "no_worker", 0)
    assert "no worker" in e.summary and "'nobody'" in e.summary

    held, *waiting = [client.submit("queued", n, queue="busy") for n in range(3)]
    with client.lease_stream(["busy"], prefetch=1, worker_id="only-one") as stream:
        assert next(iter(stream)).job.id == held.id
        urgent = client.submit("urgent", None, queue="busy", priority=10)
        e = client.explain(waiting[-1].id)
        assert (e.state, e.reason) == (JobState.PENDING, "pending")
        assert (e.jobs_ahead, e.workers_serving) == (2, 1)  # the older one and the urgent one
        assert "2 job(s) ahead" in e.summary
        assert client.explain(urgent.id).jobs_ahead == 0

        h = client.explain(held.id)
        assert (h.state, h.reason, h.worker_id, h.attempt) == (
            JobState.LEASED,
            "held",
            "only-one",
            1,
        )
        assert h.since is not None and h.lease_expires_at is not None
        assert h.lease_expires_at > h.since and "handler not started" in h.summary


def test_explain_a_running_job(client: Client) -> None:
    handle = client.submit("busy", None, queue="running", timeout=timedelta(minutes=5))
    with client.lease_stream(["running"], prefetch=1, worker_id="runner") as stream:
        lease = next(iter(stream))
        if not _start(lease):
            pytest.skip("this SDK cannot report a start (Lease.start)")
        e = client.explain(handle.id)
        assert (e.state, e.reason, e.worker_id) == (JobState.RUNNING, "running", "runner")
        assert e.deadline is not None and e.since is not None
        assert e.last_heartbeat is not None and e.lease_expires_at is not None
        lease.complete()


def test_explain_and_log_a_cancel_requested(client: Client) -> None:
    handle = client.submit("stoppable", None, queue="stop")
    with client.lease_stream(["stop"], prefetch=1, worker_id="w-stop") as stream:
        lease = next(iter(stream))
        client.cancel(handle.id)
        assert client.get_job(handle.id).cancel_requested
        e = client.explain(handle.id)
        assert (e.reason, e.cancel_requested, e.worker_id) == ("cancel_requested", True, "w-stop")
        assert e.summary.startswith("cancel requested")
        assert lease.wait_cancelled(timeout=10)
        lease.fail("stopped", cancelled=True)
    events = handle.events()
    reasons = _reasons(events)
    # The failure says how long the handler ran: that implies its start.
    assert reasons[2:] in (
        ["cancel_requested", "cancelled"],
        ["cancel_requested", "started", "cancelled"],
    )
    requested = events[2]
    assert requested.from_state is requested.to_state is JobState.LEASED  # asked, not moved
    assert requested.actor == "client"
    assert events[-1].to_state is JobState.CANCELLED
    _check_chain(events, handle.id, "stop")


def test_explain_a_dead_job(client: Client) -> None:
    handle = client.submit("fatal", None, queue="fatal", retry=ONCE)
    with client.lease_stream(["fatal"], prefetch=1) as stream:
        next(iter(stream)).fail(KeyError("missing"), retryable=False)
    e = client.explain(handle.id)
    assert (e.state, e.reason, e.attempt) == (JobState.DEAD, "finished", 1)
    assert e.finished_at is not None and e.last_error is not None
    assert e.last_error.type == "KeyError" and "KeyError" in e.summary


# --- the async client ---


def test_the_async_client_reads_watches_tails_and_explains(broker: BrokerThread) -> None:
    async def run() -> None:
        async with AsyncClient(broker.target, timeout=10) as client:
            marker = await client.submit("marker", None, queue="elsewhere")
            after = (await marker.events())[-1].seq
            handle = await client.submit("async", None, queue="async")
            assert _reasons(await handle.events()) == ["submitted"]
            assert (await handle.explain()).reason == "no_worker"

            async def follow(events: Any) -> list[JobEvent]:
                seen: list[JobEvent] = []
                async for event in events:
                    seen.append(event)
                    if event.to_state.terminal:
                        return seen
                raise AssertionError("the stream ended before the job did")

            watched = asyncio.create_task(follow(handle.watch()))
            tailed = asyncio.create_task(follow(client.tail_events(queue="async", after=after)))
            async with client.lease_stream(["async"], prefetch=1) as stream:
                async for lease in stream:
                    await lease.progress(0.5)
                    await lease.complete(1)
                    break
            done = await asyncio.wait_for(asyncio.gather(watched, tailed), 20)
            story = await client.job_events(handle.id)
            assert list(done) == [story, story]
            assert _reasons(story)[-2:] == ["started", "succeeded"]
            rest = [e async for e in client.watch(handle.id, after=story[1].seq)]
            assert rest == story[2:]
            with pytest.raises(JobNotFoundError):
                await client.explain("no-such-job")

    asyncio.run(run())


# --- the CLI ---


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=30)


def _line_of(reason: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*\d+\s+\S+\s+.*\b{reason}\b")


def test_cli_job_get_prints_the_timeline(broker: BrokerThread, client: Client) -> None:
    handle = client.submit("shown", None, queue="cli", retry=QUICK_RETRY)
    with client.lease_stream(["cli"], prefetch=1, worker_id="cli-worker") as stream:
        lease = next(iter(stream))
        lease.progress(0.5, "half way")
        lease.complete("ok")
    done = _cli("job", "get", "--target", broker.target, handle.id)
    assert done.returncode == 0, done.stderr
    assert "state:       succeeded" in done.stdout
    timeline = done.stdout.split("timeline:\n", 1)[1].splitlines()
    events = handle.events()
    assert len(timeline) == len(events)
    for line, event in zip(timeline, events, strict=True):
        assert line.split()[0] == str(event.seq) and event.reason in line
        assert f"by {event.actor}" in line
    assert 'progress=0.5 message="half way"' in timeline[2]
    assert "pending -> leased" in timeline[1]


def test_cli_job_explain_prints_the_sentence_and_the_facts(
    broker: BrokerThread, client: Client
) -> None:
    handle = client.submit("unserved", None, queue="lonely")
    done = _cli("job", "explain", "--target", broker.target, handle.id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == client.explain(handle.id).summary
    assert "state:            pending" in lines and "reason:           no_worker" in lines
    assert "workers serving:  0" in lines and "jobs ahead:       0" in lines


def test_cli_job_watch_prints_live_and_exits_by_the_outcome(
    broker: BrokerThread, client: Client
) -> None:
    good = client.submit("good", None, queue="cliwatch")
    watch = Process([*BROKER, "job", "watch", "--target", broker.target, good.id])
    try:
        watch.wait_for_line(_line_of("submitted"))
        with client.lease_stream(["cliwatch"], prefetch=1) as stream:
            lease = next(iter(stream))
            watch.wait_for_line(_line_of("leased"))  # live, before the job ends
            lease.complete()
        assert watch.wait() == 0, watch.output
    finally:
        watch.kill()
    assert "succeeded" in watch.lines[-1]

    bad = client.submit("bad", None, queue="cliwatch", retry=ONCE)
    with client.lease_stream(["cliwatch"], prefetch=1) as stream:
        next(iter(stream)).fail(ValueError("no"))
    done = _cli("job", "watch", "--target", broker.target, bad.id)
    assert done.returncode == 1, done.stderr
    assert "dead_lettered" in done.stdout.splitlines()[-1]
    last = str(bad.events()[-1].seq)
    assert _cli("job", "watch", "--target", broker.target, "--after", last, bad.id).returncode == 1


def test_cli_events_tail_prints_both_producers_and_ends_quietly_on_ctrl_c(
    broker: BrokerThread, client: Client
) -> None:
    after = str(_marker(client, "elsewhere"))
    tail = Process([*BROKER, "events", "tail", "--target", broker.target, "--after", after])
    try:
        with Client(broker.target, timeout=10) as other:
            mine = client.submit("mine", None, queue="tail1")
            theirs = other.submit("theirs", None, queue="tail2")
        for job in (mine, client.get_job(theirs.id)):
            seq = client.job_events(job.id)[0].seq
            line = tail.wait_for_line(re.compile(rf"^\s*{seq}\s+\S+\s+{job.id}\s"))
            assert "submitted" in line.string
        tail.signal(signal.SIGINT)
        assert tail.wait() == 130
    finally:
        tail.kill()
    assert "Traceback" not in tail.output


def test_cli_events_tail_ends_quietly_on_a_closed_pipe(
    broker: BrokerThread, client: Client
) -> None:
    after = str(_marker(client, "piped"))
    proc = subprocess.Popen(
        [*BROKER, "events", "tail", "--target", broker.target, "--after", after],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        client.submit("first", None, queue="piped")
        assert "submitted" in proc.stdout.readline()
        proc.stdout.close()
        client.submit("more", None, queue="piped")  # its line meets the closed pipe
        assert proc.wait(timeout=20) == 141
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

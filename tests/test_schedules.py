"""Schedules through the SDK against a real broker, on SQLite and PostgreSQL.

Catch-up, pause and resume run on a clock the test sets (the broker's
injected clock, and ``Cron.run_once``), with a real stop and start of the
broker across missed ticks; the cross-replica test and one single-broker
test run in real time.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.request import urlopen

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobbroker import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    JobNotFoundError,
    JobState,
    ResourceExhaustedError,
    Worker,
    schedule,
    task,
)
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.config import Settings
from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.models import Payload
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.schedules import TICK_KEY, Fired, JobTemplate, Schedule, timing
from jobbroker_server.store.open import open_migrated
from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST
from tests.processes import start_broker
from tests.test_crash import free_port
from tests.waiting import wait_for

MINUTE = timedelta(minutes=1)


class SetClock:
    """The broker's clock, moved by the test; timers stay monotonic."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return time.monotonic()


def jobs_of(client: Client, queue: str) -> list[tuple[str, str]]:
    """(tick, job id) of each job in ``queue``, in tick order."""
    page = client.list_jobs(queue=queue, page_size=1000)
    return sorted((job.metadata[TICK_KEY], job.id) for job in page.jobs)


def tick(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# --- registration and reading ---


def test_create_is_idempotent_by_name_and_reads_back(client: Client) -> None:
    made = client.create_schedule(
        "nightly-report",
        "reports.build",
        {"kind": "nightly"},
        cron="0  3 * * *",
        timezone="Europe/Berlin",
        queue="reports",
        priority=5,
        max_attempts=2,
        timeout=timedelta(minutes=5),
        metadata={"team": "finance"},
        tags=["nightly"],
    )
    assert made.changed
    s = made.schedule
    assert (s.name, s.cron, s.every, s.timezone, s.task, s.queue) == (
        "nightly-report",
        "0 3 * * *",
        None,
        "Europe/Berlin",
        "reports.build",
        "reports",
    )
    assert s.json() == {"kind": "nightly"} and s.catch_up == "skip" and not s.paused
    assert (s.priority, s.retry.max_attempts, s.timeout) == (5, 2, timedelta(minutes=5))
    assert (s.metadata, s.tags) == ({"team": "finance"}, ("nightly",))
    assert s.next_run_at is not None and s.next_run_at.astimezone(UTC).minute == 0
    assert (s.last_run_at, s.last_job_id, s.last_job_state) == (None, None, None)

    again = client.create_schedule(
        "nightly-report",
        "reports.build",
        {"kind": "nightly"},
        cron="0 3 * * *",
        timezone="Europe/Berlin",
        queue="reports",
        priority=5,
        max_attempts=2,
        timeout=timedelta(minutes=5),
        metadata={"team": "finance"},
        tags=["nightly"],
    )
    assert not again.changed and again.schedule == s
    moved = client.create_schedule(
        "nightly-report", "reports.build", {"kind": "v2"}, cron="0 4 * * *"
    )
    assert moved.changed and moved.schedule.json() == {"kind": "v2"}
    assert moved.schedule.next_run_at != s.next_run_at

    client.create_schedule("every-minute", "ping", every=60)
    assert [x.name for x in client.list_schedules()] == ["every-minute", "nightly-report"]
    assert client.get_schedule("every-minute").every == MINUTE

    assert client.pause_schedule("every-minute").paused
    assert client.get_schedule("every-minute").paused
    # Registering it again (a worker restart, say) keeps it paused.
    assert client.create_schedule("every-minute", "ping", every=60).schedule.paused
    assert not client.resume_schedule("every-minute").paused
    client.delete_schedule("every-minute")
    with pytest.raises(JobNotFoundError, match="no schedule named 'every-minute'"):
        client.get_schedule("every-minute")
    for act in (client.pause_schedule, client.resume_schedule, client.delete_schedule):
        with pytest.raises(JobNotFoundError):
            act("every-minute")


def test_the_async_client_manages_schedules(broker: BrokerThread) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.target, timeout=10) as client:
            made = await client.create_schedule(
                "hourly", "sync.run", [1, 2], cron="0 * * * *", catch_up="latest", paused=True
            )
            assert made.changed and made.schedule.paused and made.schedule.catch_up == "latest"
            assert not (
                await client.create_schedule(
                    "hourly", "sync.run", [1, 2], cron="0 * * * *", catch_up="latest"
                )
            ).changed
            assert [s.name for s in await client.list_schedules()] == ["hourly"]
            assert not (await client.resume_schedule("hourly")).paused
            assert (await client.pause_schedule("hourly")).paused
            assert (await client.get_schedule("hourly")).json() == [1, 2]
            await client.delete_schedule("hourly")
            assert await client.list_schedules() == []
            with pytest.raises(JobNotFoundError):
                await client.get_schedule("hourly")

    asyncio.run(scenario())


def test_bad_schedules_are_refused_up_front(client: Client) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"bad cron expression '61 \* \* \* \*': Bad minute"
    ):
        client.create_schedule("s", "t", cron="61 * * * *")
    with pytest.raises(InvalidArgumentError, match="Wrong number of fields"):
        client.create_schedule("s", "t", cron="every day")
    with pytest.raises(InvalidArgumentError, match="cron is 5000 characters"):
        client.create_schedule("s", "t", cron="*" * 5000)
    with pytest.raises(InvalidArgumentError, match="unknown time zone 'Mars/Olympus'"):
        client.create_schedule("s", "t", cron="0 3 * * *", timezone="Mars/Olympus")
    with pytest.raises(InvalidArgumentError, match="unknown time zone"):
        client.create_schedule("s", "t", cron="0 3 * * *", timezone="../../etc/passwd")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        client.create_schedule("s", "t", cron="0 3 * * *", every=60)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        client.create_schedule("s", "t")
    for every in (0.5, 0, -5, 10**9, timedelta(days=400)):
        with pytest.raises(InvalidArgumentError, match=r"every .*366 days"):
            client.create_schedule("s", "t", every=every)
    for every in (float("nan"), float("inf"), 1e300):
        with pytest.raises(InvalidArgumentError, match="every must be"):
            client.create_schedule("s", "t", every=every)
    with pytest.raises(InvalidArgumentError, match="schedule name is 129 characters"):
        client.create_schedule("n" * 129, "t", every=60)
    with pytest.raises(InvalidArgumentError, match="schedule name must not be empty"):
        client.create_schedule("", "t", every=60)
    with pytest.raises(InvalidArgumentError, match="catch_up must be"):
        client.create_schedule("s", "t", every=60, catch_up="all")  # type: ignore[arg-type]
    with pytest.raises(ResourceExhaustedError, match="payload is"):
        client.create_schedule("s", "t", b"\0" * (FAST.max_payload_bytes + 1), every=60)
    with pytest.raises(
        InvalidArgumentError, match="job: metadata has 65 entries; the limit is 64, with the"
    ):
        client.create_schedule("s", "t", every=60, metadata={f"k{i}": "v" for i in range(63)})
    with pytest.raises(InvalidArgumentError, match=r"job: retry\.max_attempts"):
        client.create_schedule("s", "t", every=60, max_attempts=10_000)
    assert client.list_schedules() == []


def test_a_template_with_its_own_timing_or_key_is_refused(broker: BrokerThread) -> None:
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        for field, value in (("delay", "delay"), ("idempotency_key", "idempotency_key")):
            spec = job_pb2.JobSpec(queue="q", task="t")
            if field == "delay":
                spec.delay.seconds = 5
            else:
                spec.idempotency_key = "mine"
            request = broker_pb2.CreateScheduleRequest(
                schedule=broker_pb2.Schedule(name="s", cron="* * * * *", job=spec)
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSchedule(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert value in refused.value.details()
        no_job = broker_pb2.CreateScheduleRequest(
            schedule=broker_pb2.Schedule(name="s", cron="* * * * *")
        )
        with pytest.raises(grpc.RpcError, match="job must be set"):
            stub.CreateSchedule(no_job, timeout=10)


def test_the_number_of_schedules_is_capped(database: str) -> None:

    async def scenario() -> None:
        store, _ = await open_migrated(database)
        now = datetime.now(UTC)
        every = timing(None, MINUTE, "UTC", now)
        made = JobTemplate("q", "t", Payload(b"null"), 0, RetryPolicy(), None, None)
        try:
            for name in ("a", "b"):
                await store.put_schedule(Schedule(name, every, made), now, max_schedules=2)
            with pytest.raises(ResourceExhausted, match="holds 2 schedules, its limit"):
                await store.put_schedule(Schedule("c", every, made), now, max_schedules=2)
            # Registering one it holds again is no new schedule.
            _, changed = await store.put_schedule(Schedule("a", every, made), now, 2)
            assert not changed
        finally:
            await store.close()

    asyncio.run(scenario())


# --- ticks on a set clock ---

START = datetime(2026, 1, 5, 12, 0, 30, tzinfo=UTC)
FIRST = datetime(2026, 1, 5, 12, 1, tzinfo=UTC)  # the first minute tick after START


@pytest.fixture
def clock() -> SetClock:
    return SetClock(START)


@pytest.fixture
def timed(settings: Settings, clock: SetClock) -> Iterator[BrokerThread]:
    with BrokerThread(settings, clock) as running:
        yield running


def _register_pair(client: Client) -> None:
    for policy in ("skip", "latest"):
        client.create_schedule(
            f"every-minute-{policy}",
            "ping",
            {"policy": policy},
            every=60,
            catch_up=policy,
            queue=policy,
        )


def test_a_broker_down_across_three_ticks_follows_each_catch_up_policy(
    settings: Settings, clock: SetClock
) -> None:
    with BrokerThread(settings, clock) as broker, Client(broker.target, timeout=10) as client:
        _register_pair(client)
        assert {s.next_run_at for s in client.list_schedules()} == {FIRST}
        clock.at = FIRST + timedelta(seconds=1)
        broker.run(broker.app.cron.run_once())
        for policy in ("skip", "latest"):
            assert [t for t, _ in jobs_of(client, policy)] == [tick(FIRST)]
    # Down from here across the ticks of 12:02, 12:03 and 12:04; up at 12:04:30.
    clock.at = FIRST + 3 * MINUTE + timedelta(seconds=30)
    with BrokerThread(settings, clock) as broker, Client(broker.target, timeout=10) as client:
        wait_for(
            lambda: (
                len(jobs_of(client, "latest")) == 2
                and client.get_schedule("every-minute-skip").next_run_at == FIRST + 4 * MINUTE
            ),
            what="the restarted broker's catch-up",
        )
        # skip: none of the missed ticks ran; latest: the most recent one ran once.
        assert [t for t, _ in jobs_of(client, "skip")] == [tick(FIRST)]
        ticks = [t for t, _ in jobs_of(client, "latest")]
        assert ticks == [tick(FIRST), tick(FIRST + 3 * MINUTE)]
        latest = client.get_schedule("every-minute-latest")
        assert latest.next_run_at == FIRST + 4 * MINUTE
        assert latest.last_run_at == FIRST + 3 * MINUTE
        assert latest.last_job_id == jobs_of(client, "latest")[-1][1]
        assert broker.run(broker.app.cron.run_once()) == []  # nothing is due twice
        # Then both go on as scheduled.
        clock.at = FIRST + 4 * MINUTE
        broker.run(broker.app.cron.run_once())
        assert [t for t, _ in jobs_of(client, "skip")][-1] == tick(FIRST + 4 * MINUTE)
        assert [t for t, _ in jobs_of(client, "latest")][-1] == tick(FIRST + 4 * MINUTE)


def test_pause_stops_ticks_and_resume_follows_the_catch_up_policy(
    timed: BrokerThread, clock: SetClock
) -> None:
    with Client(timed.target, timeout=10) as client:
        _register_pair(client)
        clock.at = FIRST
        timed.run(timed.app.cron.run_once())  # or the broker's own loop took them first
        for policy in ("skip", "latest"):
            assert [t for t, _ in jobs_of(client, policy)] == [tick(FIRST)]
        for policy in ("skip", "latest"):
            client.pause_schedule(f"every-minute-{policy}")
        clock.at = FIRST + 2 * MINUTE + timedelta(seconds=5)
        assert timed.run(timed.app.cron.run_once()) == []
        for policy in ("skip", "latest"):
            assert len(jobs_of(client, policy)) == 1
            client.resume_schedule(f"every-minute-{policy}")
        timed.run(timed.app.cron.run_once())
        # skip starts again from the next tick; latest runs the last one missed first.
        assert [t for t, _ in jobs_of(client, "skip")] == [tick(FIRST)]
        assert [t for t, _ in jobs_of(client, "latest")] == [
            tick(FIRST),
            tick(FIRST + 2 * MINUTE),
        ]
        assert client.get_schedule("every-minute-skip").next_run_at == FIRST + 3 * MINUTE
        clock.at = FIRST + 3 * MINUTE
        timed.run(timed.app.cron.run_once())
        assert [t for t, _ in jobs_of(client, "skip")] == [tick(FIRST), tick(FIRST + 3 * MINUTE)]


def test_a_tick_makes_one_job_however_often_it_is_taken(
    timed: BrokerThread, clock: SetClock
) -> None:
    with Client(timed.target, timeout=10) as client:
        client.create_schedule("once", "ping", every=60, queue="once")
        clock.at = FIRST

        async def many() -> list[list[Fired]]:
            return await asyncio.gather(*(timed.app.cron.run_once() for _ in range(8)))

        made = timed.run(many())
        assert sum(len(f) for f in made) <= 1  # the broker's own loop may have taken it
        [(when, job_id)] = jobs_of(client, "once")
        job = client.get_job(job_id)
        assert job.idempotency_key == f"schedule:once:{when}"
        assert job.metadata == {"jobbroker.schedule": "once", "jobbroker.tick": when}
        [submitted] = client.job_events(job_id)
        assert (submitted.reason, submitted.actor) == ("submitted", "schedule:once")


# --- in real time ---


def test_ticks_every_second_in_real_time(client: Client) -> None:
    client.create_schedule("heartbeat", "ping", every=1, queue="beat")
    made = wait_for(lambda: (j := jobs_of(client, "beat")) and len(j) >= 3 and j, timeout=15)
    client.pause_schedule("heartbeat")
    ticks = [datetime.fromisoformat(t) for t, _ in made[:3]]
    assert [b - a for a, b in itertools.pairwise(ticks)] == [timedelta(seconds=1)] * 2
    shown = client.get_schedule("heartbeat")
    assert shown.last_job_id is not None and shown.last_job_state is JobState.PENDING


REPLICA_SECONDS = 20


def submitted(metrics_port: int, queue: str) -> int:
    """Jobs this broker stored in ``queue``, by its /metrics."""
    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jobbroker_jobs_submitted_total" and sample.labels == {
                "queue": queue
            }:
                return int(sample.value)
    return 0


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_two_replicas_make_one_job_per_tick(postgres_schema: str) -> None:
    """Two ``broker serve`` processes on one PostgreSQL schema, in real time."""
    ports = [free_port(), free_port()]
    replicas = [start_broker(postgres_schema, metrics_port=port) for port in ports]
    try:
        with (
            Client(replicas[0][1], timeout=10) as a,
            Client(replicas[1][1], timeout=10) as b,
        ):
            a.create_schedule("every-second", "ping", every=1, queue="replicated")
            again = b.create_schedule("every-second", "ping", every=1, queue="replicated")
            assert not again.changed
            wait_for(
                lambda: len(jobs_of(a, "replicated")) >= REPLICA_SECONDS,
                timeout=REPLICA_SECONDS + 15,
                what=f"{REPLICA_SECONDS} ticks",
            )
            b.pause_schedule("every-second")
            made = jobs_of(b, "replicated")
            shares = [submitted(port, "replicated") for port in ports]
    finally:
        for proc, _ in replicas:
            proc.signal(signal.SIGTERM)
        for proc, _ in replicas:
            proc.wait(30)
    counts = Counter(t for t, _ in made)
    assert max(counts.values()) == 1, f"ticks made twice: {counts.most_common(3)}"
    ticks = [datetime.fromisoformat(t) for t, _ in made]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert set(gaps) == {timedelta(seconds=1)}, f"ticks missed: {gaps}"
    assert sum(shares) == len(made), shares
    print(f"\ntwo replicas: {len(ticks)} ticks, {len(made)} jobs (made {shares[0]} + {shares[1]})")


# --- in code ---


@task(name="schedules.ping", queue="from-code")
def ping(payload: dict[str, int]) -> int:
    return payload["n"]


def test_a_worker_registers_its_schedules_at_start(broker: BrokerThread, client: Client) -> None:
    declared = schedule("ping-every-second", ping, {"n": 7}, every=timedelta(seconds=1))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        schedule("bad", ping, {"n": 1})
    worker = Worker([ping], target=broker.target, schedules=[declared])
    thread = threading.Thread(target=lambda: asyncio.run(worker.run_async()), daemon=True)
    thread.start()
    try:
        done = wait_for(
            lambda: [
                j for j in client.list_jobs(queue="from-code").jobs if j.state is JobState.SUCCEEDED
            ],
            what="a scheduled job run by the worker",
        )
        assert done[0].result_json() == 7
        assert client.get_schedule("ping-every-second").task == "schedules.ping"
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()


# --- DST ---


def test_cron_ticks_follow_the_zone_across_dst() -> None:
    berlin = timing("0 3 * * *", None, "Europe/Berlin", START)
    # 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
    before = berlin.after(datetime(2026, 3, 28, 0, 0, tzinfo=UTC))
    after = berlin.after(before) if before else None
    assert (before, after) == (
        datetime(2026, 3, 28, 2, 0, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
    )
    # 02:30 does not exist on 29 March: it runs once, just after the change.
    skipped = timing("30 2 * * *", None, "Europe/Berlin", START)
    assert skipped.after(datetime(2026, 3, 28, 12, 0, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, 0, tzinfo=UTC
    )
    # 02:30 happens twice on 25 October: it runs once.
    twice = timing("30 2 * * *", None, "Europe/Berlin", START)
    first = twice.after(datetime(2026, 10, 24, 12, 0, tzinfo=UTC))
    assert first == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert first is not None and twice.after(first) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
    assert twice.at_or_before(datetime(2026, 10, 25, 12, 0, tzinfo=UTC)) == first

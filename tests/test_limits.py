"""Flow limits on a real broker, both backends: per-key concurrency and rate
limits, held across real worker processes and, on PostgreSQL, two replicas."""

from __future__ import annotations

import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from jobbroker import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    Job,
    JobRequest,
    JobState,
)
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests import limit_tasks
from tests.processes import BROKER, Process
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def replicas(settings: Settings) -> Iterator[list[BrokerThread]]:
    """Two brokers on one PostgreSQL schema; on SQLite, one broker (its file
    has one writer)."""
    count = 2 if settings.database.startswith("postgresql") else 1
    with BrokerThread(settings) as first:
        if count == 1:
            yield [first]
            return
        with BrokerThread(replace(settings, port=0, metrics_port=0)) as second:
            yield [first, second]


@contextmanager
def _workers(brokers: Sequence[BrokerThread], count: int, concurrency: int) -> Iterator[None]:
    """``count`` worker processes, spread over the brokers; killed on exit."""
    workers = [
        Process(
            [
                *BROKER,
                "worker",
                "tests.limit_tasks",
                "--target",
                brokers[i % len(brokers)].target,
                "--concurrency",
                str(concurrency),
            ],
            cwd=ROOT,
        )
        for i in range(count)
    ]
    try:
        yield
    finally:
        for w in workers:
            w.kill()


def _jobs(client: Client, ids: Sequence[str]) -> list[Job]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(client.get_job, ids))


def _most_at_once(spans: Sequence[tuple[datetime, datetime]]) -> int:
    """The most intervals that overlap at any instant (an end before a start
    at the same instant)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _runs(job: Job) -> list[tuple[datetime, datetime]]:
    return [(a.started_at, a.finished_at) for a in job.history if a.finished_at is not None]


def test_a_concurrency_key_never_has_more_running_than_its_limit(
    replicas: list[BrokerThread],
) -> None:
    with Client(replicas[0].target, timeout=10) as client:
        keys = ["customer:1", "customer:2", "customer:3"]
        handles = client.submit_many(
            [JobRequest(limit_tasks.keyed, {"key": keys[i % 3], "sleep": 0.02}) for i in range(90)]
        )
        with _workers(replicas, 3, concurrency=8):
            wait_for(
                lambda: all(
                    j.state is JobState.SUCCEEDED for j in _jobs(client, [h.id for h in handles])
                ),
                timeout=60,
                what="every keyed job to succeed",
            )
        done = _jobs(client, [h.id for h in handles])
    spans = defaultdict(list)
    for job in done:
        assert job.concurrency_key in keys and job.concurrency_limit == 2
        spans[job.concurrency_key] += _runs(job)
    # Within each key two at a time at most, and two at times: 24 slots of
    # workers, three keys' worth of two.
    assert {key: _most_at_once(s) for key, s in spans.items()} == dict.fromkeys(keys, 2)
    assert _most_at_once([s for key in keys for s in spans[key]]) > 2


def test_one_keys_backlog_does_not_hold_back_the_other_keys(client: Client) -> None:
    big = client.submit_many([JobRequest(limit_tasks.keyed, {"key": "big"}) for _ in range(10_000)])
    small = client.submit_many(
        [JobRequest(limit_tasks.keyed, {"key": f"small:{i % 10}"}) for i in range(100)]
    )
    with client.lease_stream([limit_tasks.KEYED], prefetch=16) as stream:
        ran: list[str] = []
        small_ids = {h.id for h in small}
        left = set(small_ids)
        for lease in stream:
            ran.append(lease.job.id)
            lease.complete(None)
            left.discard(lease.job.id)
            if not left:
                break
    # The ten small keys' 100 jobs all ran after at most a few of the big
    # key's (two at a time, let through as each ends).
    big_ran = len(ran) - len(small_ids)
    assert big_ran < 200, big_ran
    held = client.explain(big[-1].id)
    assert (held.state, held.reason, held.limit, held.limit_key) == (
        JobState.WAITING,
        "limited",
        "concurrency",
        "big",
    )
    assert held.attempt == 0  # held back is not an attempt


def test_a_held_back_job_is_explained_and_let_through_when_a_slot_frees(client: Client) -> None:
    client.set_queue("one-at-a-time", key_concurrency=1)
    first = client.submit("t", 1, queue="one-at-a-time", concurrency_key="acct:7")
    second = client.submit("t", 2, queue="one-at-a-time", concurrency_key="acct:7")
    other = client.submit("t", 3, queue="one-at-a-time", concurrency_key="acct:8")
    with client.lease_stream(["one-at-a-time"], prefetch=8) as stream:
        leases = iter(stream)
        got = {lease.job.id: lease for lease in (next(leases), next(leases))}
        assert set(got) == {first.id, other.id}
        wait_for(
            lambda: client.get_job(second.id).state is JobState.WAITING,
            what="the second job of the key to be held back",
        )
        explained = client.explain(second.id)
        assert explained.reason == "limited"
        assert (explained.limit, explained.limit_key) == ("concurrency", "acct:7")
        assert explained.slot_holders == (first.id,)
        assert "acct:7" in explained.summary and first.id in explained.summary
        assert client.get_job(second.id).attempts == 0
        got[first.id].complete(None)  # frees the slot of acct:7
        let_through = next(leases)
        assert let_through.job.id == second.id
        assert let_through.job.attempts == 1
        for lease in (let_through, got[other.id]):
            lease.complete(None)
    assert [client.get_job(h.id).state for h in (first, second, other)] == [JobState.SUCCEEDED] * 3


def test_a_cancelled_held_back_job_stays_cancelled(client: Client) -> None:
    holder = client.submit("t", None, queue="cancel-held", concurrency_key="k")
    held = client.submit("t", None, queue="cancel-held", concurrency_key="k")
    with client.lease_stream(["cancel-held"], prefetch=4) as stream:
        lease = next(iter(stream))
        assert lease.job.id == holder.id
        wait_for(lambda: client.get_job(held.id).state is JobState.WAITING, what="held back")
        held.cancel()
        lease.complete(None)
    assert client.get_job(held.id).state is JobState.CANCELLED
    assert client.get_job(holder.id).state is JobState.SUCCEEDED


@pytest.mark.timeout(180)
def test_a_queue_rate_holds_across_workers_and_replicas(replicas: list[BrokerThread]) -> None:
    """50 per second over 20 s, three worker processes (on PostgreSQL, on two
    replicas): 1,000 starts, within 2 % plus one burst of 50."""
    with Client(replicas[0].target, timeout=10) as client:
        client.set_queue(limit_tasks.RATED, rate="50/s")
        handles = client.submit_many([JobRequest(limit_tasks.rated, i) for i in range(1_600)])
        with _workers(replicas, 3, concurrency=16):
            first = wait_for(
                lambda: client.get_job(handles[0].id).started_at, timeout=30, what="a start"
            )
            # Started 1,100th or so (FIFO): past the 20 s measured, at 50/s.
            wait_for(
                lambda: client.get_job(handles[1_150].id).finished_at,
                timeout=60,
                what="the 20 s window to pass",
            )
        jobs = _jobs(client, [h.id for h in handles])
    starts = sorted(a.started_at for j in jobs for a in j.history)
    assert starts[0] <= first
    window = [s for s in starts if s < starts[0] + timedelta(seconds=20)]
    assert 980 <= len(window) <= 1_020 + 50, len(window)


def test_a_rate_key_holds_back_its_jobs_and_explains_when_the_next_may_start(
    client: Client,
) -> None:
    jobs = [
        client.submit("t", i, queue="per-key-rate", rate_key="stripe", rate_limit="2/min")
        for i in range(3)
    ]
    free = client.submit("t", None, queue="per-key-rate", rate_key="paypal", rate_limit="2/min")
    with client.lease_stream(["per-key-rate"], prefetch=8) as stream:
        leases = iter(stream)
        got = {next(leases).job.id for _ in range(3)}
        assert got == {jobs[0].id, jobs[1].id, free.id}
        wait_for(lambda: client.get_job(jobs[2].id).state is JobState.WAITING, what="held back")
    explained = client.explain(jobs[2].id)
    assert (explained.reason, explained.limit, explained.limit_key) == ("limited", "rate", "stripe")
    assert explained.next_token_at is not None
    wait = explained.next_token_at - datetime.now(explained.next_token_at.tzinfo)
    assert timedelta(seconds=20) < wait <= timedelta(seconds=31)


def test_a_hostile_queue_rate_is_refused_and_changes_nothing(client: Client) -> None:
    client.set_queue("guarded", rate="5/s")
    for bad in ("0/s", "5/0s", "10000000/s"):
        with pytest.raises(InvalidArgumentError, match="rate"):
            client.set_queue("guarded", rate=bad)
    [kept] = [q for q in client.list_queues() if q.name == "guarded"]
    assert kept.rate is not None and (kept.rate.count, kept.rate.period) == (
        5,
        timedelta(seconds=1),
    )


def test_many_distinct_keys_all_drain(client: Client) -> None:
    handles = client.submit_many(
        [JobRequest("t", i, queue="many-keys", concurrency_key=f"tenant:{i}") for i in range(500)]
    )
    with client.lease_stream(["many-keys"], prefetch=64) as stream:
        for done, lease in enumerate(stream, start=1):
            lease.complete(None)
            if done == len(handles):
                break
    assert {j.state for j in _jobs(client, [h.id for h in handles[::50]])} == {JobState.SUCCEEDED}


def test_a_schedules_ticks_carry_its_limits(client: Client) -> None:
    client.create_schedule(
        "limited-beat", "ping", every=1, queue="limited-beat", concurrency_key="beat"
    )
    made = wait_for(
        lambda: client.list_jobs(queue="limited-beat").jobs, timeout=15, what="a tick's job"
    )
    client.pause_schedule("limited-beat")
    assert (made[0].concurrency_key, made[0].concurrency_limit) == ("beat", 0)


def test_the_cli_sets_shows_and_explains_limits(broker: BrokerThread, client: Client) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BROKER, *args, "--target", broker.target], capture_output=True, text=True, timeout=30
        )

    done = run("queues", "set", "cli-limits", "--rate", "100/s", "--key-concurrency", "1")
    assert done.returncode == 0, done.stderr
    [row] = [line for line in run("queues", "ls").stdout.splitlines() if "cli-limits" in line]
    assert "100" in row
    submitted = [
        run("submit", "t", "{}", "--queue", "cli-limits", "--concurrency-key", "acct:1")
        for _ in range(2)
    ]
    assert all(s.returncode == 0 for s in submitted), [s.stderr for s in submitted]
    with client.lease_stream(["cli-limits"], prefetch=4) as stream:
        first = next(iter(stream))
        [other] = [j for j in client.list_jobs(queue="cli-limits").jobs if j.id != first.job.id]
        wait_for(lambda: client.get_job(other.id).state is JobState.WAITING, what="held back")
        explained = run("job", "explain", other.id)
        assert explained.returncode == 0, explained.stderr
        assert "acct:1" in explained.stdout and first.job.id in explained.stdout
        first.complete(None)
    bad = run("queues", "set", "cli-limits", "--rate", "many/s")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--rate" in bad.stderr


def test_a_rate_keys_backlog_drains_at_its_rate(client: Client) -> None:
    """10 per 200 ms: 150 held-back jobs start in about 2.8 s, each budget let
    through as it comes due, not at the sweep's pace."""
    handles = client.submit_many(
        [
            JobRequest("t", i, queue="rate-backlog", rate_key="api", rate_limit="10/200ms")
            for i in range(150)
        ]
    )
    began = time.monotonic()
    with client.lease_stream(["rate-backlog"], prefetch=32) as stream:
        for done, lease in enumerate(stream, start=1):
            lease.complete(None)
            if done == len(handles):
                break
    took = time.monotonic() - began
    assert 2.0 < took < 6.0, took


def test_a_raised_key_limit_lets_the_held_back_jobs_of_every_key_through(
    client: Client,
) -> None:
    """Sixty keys, each with one job running and two held back: raised to
    three, the sweep lets all 120 through, fifty keys at a time, while the
    first sixty still run."""
    client.set_queue("raised", key_concurrency=1)
    jobs = client.submit_many(
        [JobRequest("t", i, queue="raised", concurrency_key=f"k{i % 60}") for i in range(180)]
    )
    with client.lease_stream(["raised"], prefetch=256) as stream:
        leases = iter(stream)
        first = [next(leases) for _ in range(60)]
        assert len({lease.job.concurrency_key for lease in first}) == 60
        wait_for(
            lambda: all(client.get_job(j.id).state is JobState.WAITING for j in jobs[120:]),
            what="the other jobs held back",
        )
        client.set_queue("raised", key_concurrency=3)
        rest = [next(leases) for _ in range(120)]
        assert {lease.job.id for lease in rest} == {j.id for j in jobs[60:]}
        for lease in first + rest:
            lease.complete(None)


def test_a_spent_queue_rate_or_a_plain_queue_does_not_starve_another_queue(
    client: Client,
) -> None:
    client.set_queue("slow", rate="2/min")
    slow = client.submit_many([JobRequest("t", i, queue="slow") for i in range(20)])
    plain = client.submit_many([JobRequest("t", i, queue="plain-q") for i in range(50)])
    keyed = client.submit_many(
        [JobRequest("t", i, queue="keyed-q", concurrency_key=f"c{i}") for i in range(4)]
    )
    with client.lease_stream(["slow", "plain-q", "keyed-q"], prefetch=16) as stream:
        got = []
        for lease in stream:
            got.append(lease.job.id)
            if {j.id for j in keyed} <= set(got):
                break
    # The slow queue's two starts, and the keyed jobs in the first batches,
    # though the slow queue's and the plain queue's jobs are older.
    assert len(set(got) & {j.id for j in slow}) <= 2
    assert len(got) <= 32
    assert set(got) & {j.id for j in plain}


def test_a_refused_keyed_submit_leaves_its_queue_leased_as_before(client: Client) -> None:
    first = client.submit("t", 1, queue="refused-keyed", idempotency_key="once")
    with pytest.raises(FailedPreconditionError):
        client.submit("t", 2, queue="refused-keyed", idempotency_key="once", concurrency_key="k")
    with client.lease_stream(["refused-keyed"], prefetch=4) as stream:
        lease = next(iter(stream))
        assert lease.job.id == first.id
        lease.complete(None)

"""Queue settings on a real broker, both backends: pause and resume, the
defaults of a queue's jobs, and whether a lost worker's attempt counts."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import timedelta

import pytest

from jobbroker import Client, JobState, PermissionDeniedError
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.processes import BROKER
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_paused_queue_takes_submits_and_leases_nothing_until_resumed(
    client: Client,
) -> None:
    held = [client.submit("work", i, queue="paused-q") for i in range(2)]
    with client.lease_stream(["paused-q", "probe"], prefetch=2) as stream:
        leases = iter(stream)
        first = [next(leases), next(leases)]  # in flight before the pause: they run on
        paused = client.pause_queue("paused-q")
        assert (paused.paused, paused.paused_by) == (True, "client")
        waiting = [client.submit("work", i, queue="paused-q") for i in range(5)]
        for lease in first:
            lease.complete(None)
        # A job of another queue on the same stream: the lease that brings it
        # came after the pause, and took nothing of the paused queue.
        probe = client.submit("probe", None, queue="probe")
        got = next(leases)
        assert got.job.id == probe.id
        got.complete(None)
        assert {client.get_job(h.id).state for h in waiting} == {JobState.PENDING}
        explained = client.explain(waiting[0].id)
        assert explained.reason == "paused"
        assert (
            "client paused" in explained.summary and "queues resume paused-q" in explained.summary
        )
        client.resume_queue("paused-q")
        resumed = set()
        for _ in waiting:
            lease = next(leases)
            resumed.add(lease.job.id)
            lease.complete(None)
        assert resumed == {h.id for h in waiting}
    assert {h.result(timeout=10) for h in held} == {None}


def test_a_pause_survives_a_restart(settings: Settings) -> None:
    with BrokerThread(settings) as broker, Client(broker.target) as client:
        client.pause_queue("kept-paused")
        handle = client.submit("work", None, queue="kept-paused")
    with BrokerThread(settings) as broker, Client(broker.target) as client:
        [listed] = [q for q in client.list_queues() if q.name == "kept-paused"]
        assert listed.paused and listed.paused_at is not None
        with client.lease_stream(["kept-paused", "probe"], prefetch=1) as stream:
            probe = client.submit("probe", None, queue="probe")
            got = next(iter(stream))
            assert got.job.id == probe.id
            got.complete(None)
        assert client.get_job(handle.id).state is JobState.PENDING


def test_a_queues_defaults_apply_when_the_job_and_its_task_say_nothing(client: Client) -> None:
    client.set_queue(
        "defaulted",
        max_attempts=7,
        timeout=timedelta(seconds=90),
        soft_timeout=timedelta(seconds=60),
    )
    plain = client.get_job(client.submit("t", None, queue="defaulted").id)
    assert plain.retry.max_attempts == 7
    assert (plain.timeout, plain.soft_timeout) == (timedelta(seconds=90), timedelta(seconds=60))
    own = client.submit("t", None, queue="defaulted", max_attempts=2, timeout=timedelta(seconds=5))
    mine = client.get_job(own.id)
    assert (mine.retry.max_attempts, mine.timeout) == (2, timedelta(seconds=5))
    other = client.get_job(client.submit("t", None, queue="elsewhere").id)
    assert other.retry.max_attempts == 3  # the broker's default in these tests
    [listed] = [q for q in client.list_queues() if q.name == "defaulted"]
    assert (listed.max_attempts, listed.timeout) == (7, timedelta(seconds=90))


def test_a_queue_chooses_whether_a_lost_workers_attempt_counts(settings: Settings) -> None:
    short = replace(settings, lease_duration=timedelta(milliseconds=400))
    with BrokerThread(short) as broker, Client(broker.target, timeout=10) as client:
        client.set_queue("lost-counts", max_attempts=1)
        client.set_queue("lost-free", max_attempts=1, lost_worker_counts=False)
        counted = client.submit("stuck", None, queue="lost-counts")
        free = client.submit("stuck", None, queue="lost-free")
        for handle, queue in ((counted, "lost-counts"), (free, "lost-free")):
            with client.lease_stream([queue], prefetch=1) as stream:
                next(iter(stream))  # and never a heartbeat: the worker is lost
                wait_for(
                    lambda h=handle: [e for e in h.events() if e.reason == "lease_expired"],
                    what="the lease to expire",
                )
        assert client.get_job(counted.id).state is JobState.DEAD
        [expired] = [e for e in free.events() if e.reason == "lease_expired"]
        assert expired.to_state is JobState.PENDING
        assert client.get_job(free.id).history[0].outcome.value == "lease_expired"


def test_queue_commands(broker: BrokerThread, client: Client) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BROKER, "queues", *args, "--target", broker.target],
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = run("set", "cli-q", "--max-attempts", "5", "--hard-timeout", "30", "--lost-worker-free")
    assert done.returncode == 0, done.stderr
    paused = run("pause", "cli-q")
    assert "paused by client" in paused.stdout
    listed = run("ls").stdout.splitlines()
    [row] = [line for line in listed if line.startswith("cli-q")]
    assert row.split()[1:2] == ["5"] and "30s" in row and " no " in row and "paused" in row
    assert "running" in run("resume", "cli-q").stdout
    bad = run("set", "cli-q", "--hard-timeout", "-1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_only_an_admin_key_steers_queues(settings: Settings) -> None:
    from jobbroker_server.domain.keys import Role as StoredRole

    with BrokerThread(replace(settings, auth=True)) as broker:
        _, producer = broker.run(broker.app.keys.create("p", StoredRole.PRODUCER, ()))
        _, admin = broker.run(broker.app.keys.create("a", StoredRole.ADMIN, ()))
        with Client(broker.target, api_key=producer) as client:
            with pytest.raises(PermissionDeniedError, match="admin"):
                client.pause_queue("guarded")
            assert client.list_queues() == []
        with Client(broker.target, api_key=admin) as client:
            assert client.pause_queue("guarded").paused_by == "a"

"""The ``broker`` CLI as an operator types it, against a real broker."""

from __future__ import annotations

import json
import subprocess

import pytest

from jobbroker import Client, JobState, RetryPolicy
from jobbroker_server.testing import BrokerThread
from tests.processes import BROKER


def _one_line_error(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: error:"), done.stderr
    assert text in lines[0]
    assert "Traceback" not in done.stderr


def test_submit_get_list_cancel(broker: BrokerThread, client: Client) -> None:
    t = broker.target
    done = subprocess.run(
        [*BROKER, "submit", "--target", t, "report.build", '{"month": 11}', "--queue", "reports"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert client.get_job(job_id).json() == {"month": 11}

    shown = subprocess.run(
        [*BROKER, "job", "get", "--target", t, job_id], capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0 and "state:       pending" in shown.stdout

    listed = subprocess.run(
        [*BROKER, "jobs", "ls", "--target", t, "--queue", "reports"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert job_id in listed.stdout

    cancelled = subprocess.run(
        [*BROKER, "job", "cancel", "--target", t, job_id],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert client.get_job(job_id).state is JobState.CANCELLED


def test_dlq_ls_replay_purge(broker: BrokerThread, client: Client) -> None:
    t = broker.target
    once = RetryPolicy(max_attempts=1)
    ids = [client.submit("doomed", i, queue="dlq", retry=once).id for i in range(3)]
    with client.lease_stream(["dlq"], prefetch=3) as stream:
        leases = iter(stream)
        for _ in ids:
            next(leases).fail(ValueError("bad input"))
        listed = subprocess.run(
            [*BROKER, "dlq", "ls", "--target", t], capture_output=True, text=True, timeout=30
        )
        assert all(i in listed.stdout for i in ids), listed.stdout
        replay = subprocess.run(
            [*BROKER, "dlq", "replay", "--target", t, ids[0]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert replay.stdout.strip() == "replayed 1 job(s)"
        next(leases).complete()
    purge = subprocess.run(
        [*BROKER, "dlq", "purge", "--target", t, "--all"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert purge.stdout.strip() == "purged 2 job(s)"
    assert client.get_job(ids[0]).state is JobState.SUCCEEDED
    assert client.dlq_list().jobs == ()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["job", "get", "no-such-id"], "no job with id 'no-such-id'"),
        (["submit", "t", "{not json"], "payload is not valid JSON"),
        (["submit", "t", "--queue", ""], "queue must not be empty"),
        (["dlq", "replay"], "needs job ids or --all"),
    ],
)
def test_bad_input_prints_one_line(broker: BrokerThread, args: list[str], text: str) -> None:
    argv = [*BROKER, *args[:2], "--target", broker.target, *args[2:]]
    if args[0] == "submit":
        argv = [*BROKER, "submit", "--target", broker.target, *args[1:]]
    _one_line_error(subprocess.run(argv, capture_output=True, text=True, timeout=30), text)


def test_unreachable_broker_is_one_line() -> None:
    done = subprocess.run(
        [*BROKER, "job", "get", "--target", "127.0.0.1:1", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    _one_line_error(done, "")


def test_submit_wait_prints_the_result(broker: BrokerThread, client: Client) -> None:
    proc = subprocess.Popen(
        [*BROKER, "submit", "--target", broker.target, "add", "[1, 2]", "--wait", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with client.lease_stream(["default"]) as stream:
        lease = next(iter(stream))
        lease.complete(sum(lease.payload()))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == 3

"""The ``broker`` CLI as an operator types it, against a real broker."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jobbroker import Client, JobRequest, JobState, RetryPolicy
from jobbroker_server.testing import BrokerThread
from tests.processes import BROKER
from tests.waiting import wait_for


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
        (["job", "explain", "no-such-id"], "no job with id 'no-such-id'"),
        (["job", "watch", "no-such-id"], "no job with id 'no-such-id'"),
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


def test_unreachable_broker_is_one_line_that_says_what_to_do() -> None:
    began = time.monotonic()
    done = subprocess.run(
        [*BROKER, "job", "get", "--target", "127.0.0.1:1", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    _one_line_error(done, "no broker answers at 127.0.0.1:1 within 3s")
    assert "`broker serve`" in done.stderr and "--target or BROKER_TARGET" in done.stderr
    assert time.monotonic() - began < 10  # not the SDK's retries for the whole --timeout


def test_a_broker_that_never_answers_is_one_line() -> None:
    """Something listens but never speaks gRPC (a wrong port, a hung host)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        done = subprocess.run(
            [*BROKER, "jobs", "ls", "--target", target, "--timeout", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    _one_line_error(done, f"no broker answers at {target} within 1s")
    assert time.monotonic() - began < 10


def test_a_closed_pipe_ends_the_listing_quietly(broker: BrokerThread, client: Client) -> None:
    """`broker jobs ls | head -1`: far more output than the pipe holds, and
    the reader gone after one line."""
    client.submit_many([JobRequest("listed", i, queue="many") for i in range(1000)])
    proc = subprocess.Popen(
        [*BROKER, "jobs", "ls", "--target", broker.target, "--queue", "many", "--limit", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("ID")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 141, err  # as a command killed by SIGPIPE
    assert err == ""


def test_a_bad_serve_variable_does_not_break_other_commands(broker: BrokerThread) -> None:
    done = subprocess.run(
        [*BROKER, "jobs", "ls", "--target", broker.target],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "BROKER_PORT": "abc", "BROKER_LEASE_SECONDS": "soon"},
    )
    assert done.returncode == 0, done.stderr


def test_a_worker_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('no config file')\n")
    done = subprocess.run(
        [*BROKER, "worker", "broken_tasks", "--target", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    _one_line_error(done, "cannot import 'broken_tasks': RuntimeError: no config file")


def test_closing_a_client_ends_its_submit_reader(broker: BrokerThread) -> None:
    """A reader thread left inside its call once kept `broker submit` from
    exiting (in grpc's channel __del__): close waits for it to end."""
    for _ in range(5):
        with Client(broker.target, timeout=10) as client:
            client.submit("t", None)
            reader = next(t for t in threading.enumerate() if t.name == "jobbroker-submits")
        assert not reader.is_alive()


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


def test_workflow_get_explain_and_cancel(broker: BrokerThread, client: Client) -> None:
    from jobbroker import chain
    from tests.workflow_tasks import process_item

    handle = client.submit(chain(process_item.s(2), process_item.s(), process_item.s()))
    first, second, _ = handle.job_ids

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _broker(*args, "--target", broker.target)

    shown = run("workflow", "get", handle.id)
    assert shown.returncode == 0, shown.stderr
    assert [line.split()[3] for line in shown.stdout.splitlines()[1:]] == [
        "pending",
        "waiting",
        "waiting",
    ]
    explained = run("job", "explain", second)
    assert f"waits on:         {first}  {process_item.name}  pending" in explained.stdout
    assert f"workflow:    {handle.id}" in run("job", "get", second).stdout
    cancelled = run("workflow", "cancel", handle.id)
    assert cancelled.stdout.strip() == "cancelled 3 job(s)"
    assert {step.state for step in handle.status()} == {JobState.CANCELLED}
    _one_line_error(run("workflow", "get", "no-such-workflow"), "no workflow with id")


def _broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=30)


def test_schedules_create_ls_get_pause_resume_delete(broker: BrokerThread, client: Client) -> None:
    t = broker.target
    beat = ["schedules", "create", "--target", t, "beat", "--task", "ping", "--queue", "beats"]
    beat += ["--payload", '{"n": 1}', "--every", "1", "--catch-up", "latest"]
    made = _broker(*beat)
    assert made.returncode == 0, made.stderr
    assert "schedule 'beat' registered" in made.stdout and "every 1s" in made.stdout
    again = _broker(*beat)  # the same registration again
    assert "schedule 'beat' unchanged" in again.stdout, again.stderr
    nightly = _broker(
        "schedules",
        "create",
        "--target",
        t,
        "nightly",
        "--task",
        "report",
        "--cron",
        "0 3 * * *",
        "--timezone",
        "Europe/Berlin",
        "--paused",
    )
    assert nightly.returncode == 0, nightly.stderr

    wait_for(lambda: client.get_schedule("beat").last_job_id, what="the first tick")
    client.pause_schedule("beat")  # so that the listing and the reading below agree
    last = client.get_schedule("beat")
    assert last.next_run_at is not None and last.last_run_at is not None
    listed = _broker("schedules", "ls", "--target", t)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "SCHEDULE", "ZONE", "NEXT", "RUN"]
    assert "LAST JOB (STATE)" in header and header.endswith("PAUSED")
    beat = next(row for row in rows if row.startswith("beat "))
    # Its next and last run, and its last job with that job's state.
    assert "every 1s" in beat and "UTC" in beat and beat.endswith("yes")
    assert last.next_run_at.isoformat(timespec="seconds") in beat
    assert last.last_run_at.isoformat(timespec="seconds") in beat
    assert f"{last.last_job_id} (pending)" in beat, beat
    night = next(row for row in rows if row.startswith("nightly "))
    assert "0 3 * * *" in night and "Europe/Berlin" in night and night.endswith("yes")
    assert " - " in night  # never run

    shown = _broker("schedules", "get", "--target", t, "nightly")
    assert "zone: Europe/Berlin" in shown.stdout and "paused:     yes" in shown.stdout
    resumed = _broker("schedules", "resume", "--target", t, "nightly")
    assert "paused:     no" in resumed.stdout, resumed.stderr
    paused = _broker("schedules", "pause", "--target", t, "nightly")
    assert "paused:     yes" in paused.stdout, paused.stderr
    deleted = _broker("schedules", "delete", "--target", t, "beat")
    assert "deleted schedule 'beat'" in deleted.stdout
    assert [s.name for s in client.list_schedules()] == ["nightly"]


def test_schedule_errors_are_one_line(broker: BrokerThread) -> None:
    t = broker.target
    _one_line_error(
        _broker("schedules", "create", "--target", t, "s", "--task", "x", "--cron", "61 * * * *"),
        "bad cron expression '61 * * * *': Bad minute",
    )
    _one_line_error(
        _broker(
            "schedules",
            "create",
            "--target",
            t,
            "s",
            "--task",
            "x",
            "--cron",
            "* * * * *",
            "--timezone",
            "Nowhere/City",
        ),
        "unknown time zone 'Nowhere/City'",
    )
    _one_line_error(_broker("schedules", "get", "--target", t, "nope"), "no schedule named 'nope'")
    _one_line_error(
        _broker("schedules", "delete", "--target", t, "nope"), "no schedule named 'nope'"
    )
    _one_line_error(
        _broker(
            "schedules",
            "create",
            "--target",
            t,
            "s",
            "--task",
            "x",
            "--every",
            "1",
            "--payload",
            "{oops",
        ),
        "payload is not valid JSON",
    )
    both = _broker(
        "schedules",
        "create",
        "--target",
        t,
        "s",
        "--task",
        "x",
        "--every",
        "1",
        "--cron",
        "* * * * *",
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert "Traceback" not in both.stderr


def test_version_is_one_line_with_the_installed_version() -> None:
    done = _broker("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"broker (jobbroker) {importlib.metadata.version('jobbroker')}"

"""Workflows: chain, group and chord stored whole, released by the broker as
their parents succeed, on a real broker with a real worker, on both backends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from jobbroker import (
    Client,
    JobCancelledError,
    JobFailedError,
    JobState,
    Worker,
    chain,
    chord,
    group,
)
from jobbroker.errors import InvalidArgumentError
from jobbroker_server.domain import workflows
from jobbroker_server.testing import BrokerThread
from tests import workflow_tasks as t
from tests.processes import BROKER, Process, start_broker
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

TASKS = [
    t.extract_data,
    t.transform_data,
    t.load_data,
    t.send_email,
    t.send_sms,
    t.update_analytics,
    t.process_item,
    t.send_completion_notification,
    t.fragile,
    t.total,
    t.describe,
]


@pytest.fixture
def worker(broker: BrokerThread) -> Iterator[Worker]:
    running = Worker(TASKS, target=broker.target, concurrency=8)
    thread = threading.Thread(target=lambda: asyncio.run(running.run_async()), daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(15)


def test_the_seeds_chain_passes_each_result_on(client: Client, worker: Worker) -> None:
    flow = chain(t.extract_data.s(4), t.transform_data.s(), t.load_data.s("warehouse"))
    handle = client.submit(flow)
    assert handle.result(timeout=30) == "loaded 3 rows (123) into warehouse"
    steps = handle.status()
    assert [s.task for s in steps] == [t.extract_data.name, t.transform_data.name, t.load_data.name]
    assert {s.state for s in steps} == {JobState.SUCCEEDED}
    assert [s.job_id for s in steps] == handle.job_ids


def test_the_seeds_group_runs_side_by_side_and_returns_results_in_order(
    client: Client, worker: Worker
) -> None:
    flow = group(
        t.send_email.s("ada@example.com"), t.send_sms.s("+1555"), t.update_analytics.s("signup")
    )
    handle = client.submit(flow)
    assert handle.result(timeout=30) == ["email to ada@example.com", "sms to +1555", 6]


def test_the_seeds_chord_gives_its_callback_every_result_in_order(
    client: Client, worker: Worker
) -> None:
    item_ids = list(range(1, 21))
    flow = chord([t.process_item.s(i) for i in item_ids], t.send_completion_notification.s("b-7"))
    handle = client.submit(flow)
    expected = sum(i * i for i in item_ids)
    assert handle.result(timeout=30) == f"batch b-7: 20 items, sum {expected}"
    callback = client.get_job(handle.job_ids[-1])
    assert callback.json() == {"result": [i * i for i in item_ids], "payload": "b-7"}


def test_flows_nest(client: Client, worker: Worker) -> None:
    # A chain whose middle step is a group, then a chord inside a chain.
    fan = chain(t.extract_data.s(1), group(t.transform_data.s(), t.transform_data.s()))
    assert client.submit(fan).result(timeout=30) == [{"count": 3, "total": 33}] * 2
    inner = chord([t.process_item.s(i) for i in (1, 2, 3)], t.total.s())
    flow = chain(inner, t.process_item.s())
    assert client.submit(flow).result(timeout=30) == 14 * 14


def test_a_waiting_job_is_never_leased_and_explain_names_its_parent(
    broker: BrokerThread, client: Client
) -> None:
    handle = client.submit(chain(t.process_item.s(3), t.process_item.s()))
    first, second = handle.job_ids
    assert client.get_job(second).state is JobState.WAITING
    explained = client.explain(second)
    assert explained.reason == "waiting"
    assert [p.job_id for p in explained.waits_on] == [first]
    assert first in explained.summary
    with client.lease_stream(["items"]) as stream:
        lease = next(iter(stream))
        assert lease.job.id == first  # the waiting one is not offered
        lease.complete(9)
        nxt = next(iter(stream))
        assert nxt.job.id == second
        assert nxt.payload() == 9
        nxt.complete(81)
    assert handle.result(timeout=10) == 81
    events = [e.reason for e in client.job_events(second)]
    assert events[:2] == ["submitted", "parents_done"]


def test_a_dead_step_cancels_the_rest_and_its_replay_resumes_them(
    client: Client, worker: Worker
) -> None:
    t.MENDED.clear()
    flow = chain(t.process_item.s(2), t.fragile.s(-5), t.process_item.s(), t.process_item.s())
    handle = client.submit(flow)
    with pytest.raises(JobFailedError) as raised:
        handle.result(timeout=30)
    failing = handle.job_ids[1]
    assert raised.value.job.id == failing
    after = [client.get_job(i) for i in handle.job_ids[2:]]
    assert [j.state for j in after] == [JobState.CANCELLED, JobState.CANCELLED]
    story = client.job_events(handle.job_ids[2])
    assert story[-1].reason == "parent_failed"
    assert story[-1].detail["parent"] == failing
    explained = client.explain(handle.job_ids[2])
    assert explained.reason == "parent_failed"
    assert explained.waits_on[0].job_id == failing
    t.MENDED.append(True)
    assert client.dlq_replay(job_ids=[failing]) == [failing]
    assert handle.result(timeout=30) == 625
    reasons = [e.reason for e in client.job_events(handle.job_ids[3])]
    assert reasons == [
        "submitted",
        "parent_failed",
        "resumed",
        "parents_done",
        "leased",
        "started",
        "succeeded",
    ] or reasons == ["submitted", "parent_failed", "resumed", "parents_done", "leased", "succeeded"]


def test_a_chord_told_to_run_on_failure_gets_each_members_outcome(
    client: Client, worker: Worker
) -> None:
    t.MENDED.clear()
    flow = chord([t.fragile.s(1), t.fragile.s(-1)], t.describe.s(), on_failure="run")
    outcomes = client.submit(flow).result(timeout=30)
    assert outcomes == [
        {"state": "succeeded", "result": 1},
        {"state": "dead", "error": {"type": "PermanentError", "message": "cannot take -1"}},
    ]


def test_cancel_cancels_every_job_not_ended(broker: BrokerThread, client: Client) -> None:
    handle = client.submit(chord([t.process_item.s(i) for i in range(5)], t.total.s()))
    assert handle.cancel() == 6
    assert {s.state for s in handle.status()} == {JobState.CANCELLED}
    assert handle.cancel() == 0


def test_malformed_workflows_are_refused_and_store_nothing(client: Client) -> None:
    from jobbroker.v1 import broker_pb2, job_pb2

    stub = client._stub  # the raw wire, for what the SDK would never send
    spec = job_pb2.JobSpec(queue="q", task="x")
    ahead = job_pb2.JobSpec(queue="q", task="x", needs=job_pb2.Needs(parents=[1]))
    bad_shape = job_pb2.JobSpec(
        queue="q", task="x", needs=job_pb2.Needs(parents=[0], input="[0,5]")
    )
    for jobs, message in [
        ([spec, ahead], "a job waits only on jobs before it"),
        ([spec, bad_shape], "only lists and numbers of parents"),
        ([job_pb2.JobSpec(queue="q", task="x", needs=job_pb2.Needs(input="0"))], "need parents"),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitWorkflow(broker_pb2.SubmitWorkflowRequest(workflow_id="w1", jobs=jobs))
        assert message in str(raised.value)
    assert client.list_jobs(queue="q").jobs == ()
    with pytest.raises(InvalidArgumentError):
        chain()


def test_a_chord_of_a_thousand_runs_its_body_once_after_the_last_member(
    client: Client, worker: Worker
) -> None:
    members = [t.process_item.s(i) for i in range(1000)]
    handle = client.submit(chord(members, t.total.s()))
    assert handle.result(timeout=60) == sum(i * i for i in range(1000))
    *member_ids, body_id = handle.job_ids
    body = client.get_job(body_id)
    assert body.json() == [i * i for i in range(1000)]  # every result, in order
    assert [a.outcome.value for a in body.history] == ["succeeded"]
    last_member_end = max(_finished(client, job_id) for job_id in member_ids)
    assert body.started_at is not None and body.started_at >= last_member_end
    assert [e.reason for e in client.job_events(body_id)].count("parents_done") == 1


def _finished(client: Client, job_id: str) -> datetime:
    at = client.get_job(job_id).finished_at
    assert at is not None
    return at


@pytest.mark.timeout(120)
def test_a_chain_whose_worker_is_killed_mid_step_finishes_each_step_once(
    tmp_path: Path,
) -> None:
    broker, target = start_broker(str(tmp_path / "broker.db"), "--lease-seconds", "2")
    log = tmp_path / "steps.log"
    worker_args = [*BROKER, "worker", "tests.workflow_tasks", "--target", target]
    first = Process([*worker_args, "--queue", "wf-crash"])
    try:
        with Client(target, timeout=30) as client:
            flow = chain(*[t.crash_step.s(str(log)) for _ in range(3)])
            handle = client.submit(flow)
            middle = handle.job_ids[1]
            wait_for(lambda: log.exists() and f"start {middle}" in log.read_text(), 30, "step 2")
            first.kill()  # SIGKILL, mid step
            second = Process([*worker_args, "--queue", "wf-crash"])
            try:
                assert handle.result(timeout=60) == 3
            finally:
                second.kill()
            for job_id in handle.job_ids:
                outcomes = [a.outcome.value for a in client.get_job(job_id).history]
                assert outcomes.count("succeeded") == 1, (job_id, outcomes)
            assert "lease_expired" in [a.outcome.value for a in client.get_job(middle).history]
            done = [line for line in log.read_text().splitlines() if line.startswith("done")]
            assert sorted(done) == sorted(f"done {job_id}" for job_id in handle.job_ids)
    finally:
        first.kill()
        broker.kill()


SAMPLE = """
from jobbroker import Piped, chain, chord, task


@task
def extract(source_id: int) -> list[int]:
    return [source_id]


@task
def transform(rows: list[int]) -> dict[str, int]:
    return {"n": len(rows)}


@task
def load(job: Piped[dict[str, int], str]) -> bool:
    return job["result"]["n"] > 0 and bool(job["payload"])


@task
def item(i: int) -> float:
    return i / 2


@task
def notify(job: Piped[list[float], str]) -> str:
    return job["payload"]


ok = chain(extract.s(1), transform.s(), load.s("warehouse"))
ok_chord = chord([item.s(i) for i in range(3)], notify.s("batch"))
"""

MISMATCHED = """
bad = chain(extract.s(1), load.s("warehouse"))  # load wants transform's dict
bad_chord = chord([item.s(i) for i in range(3)], transform.s())  # list[float] is not list[int]
"""


@pytest.mark.timeout(120)
def test_mypy_accepts_a_typed_chain_and_rejects_mismatched_steps(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(SAMPLE)
    bad.write_text(SAMPLE + MISMATCHED)
    sdk = Path(__file__).resolve().parent.parent / "sdk"
    args = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent"]
    env = {**os.environ, "MYPYPATH": str(sdk)}
    passed = subprocess.run([*args, str(good)], capture_output=True, text=True, env=env)
    assert passed.returncode == 0, passed.stdout
    failed = subprocess.run([*args, str(bad)], capture_output=True, text=True, env=env)
    assert failed.returncode == 1, failed.stdout
    lines = [line for line in failed.stdout.splitlines() if "error:" in line]
    source = bad.read_text().splitlines()
    expected = [str(source.index(line) + 1) for line in source if line.startswith("bad")]
    assert [line.split(":")[1] for line in lines] == expected, failed.stdout


def test_a_body_whose_input_would_be_too_large_is_cancelled_saying_so(
    client: Client, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workflows, "MAX_INPUT_BYTES", 20)  # the broker runs in this process
    handle = client.submit(chord([t.process_item.s(i) for i in range(10, 30)], t.total.s()))
    with pytest.raises(JobCancelledError):
        handle.result(timeout=30)
    body = client.get_job(handle.job_ids[-1])
    assert body.last_error is not None and body.last_error.type == "InputTooLarge"
    assert "a job's input holds at most 20" in body.last_error.message


def test_a_body_two_dead_members_cancelled_waits_again_only_when_both_are_replayed(
    client: Client, worker: Worker
) -> None:
    t.MENDED.clear()
    handle = client.submit(chord([t.fragile.s(-1), t.fragile.s(-2), t.fragile.s(3)], t.total.s()))
    with pytest.raises(JobFailedError):
        handle.result(timeout=30)
    first, second, _, body = handle.job_ids
    wait_for(lambda: client.get_job(second).state is JobState.DEAD, 10, "both members dead")
    assert client.get_job(body).state is JobState.CANCELLED
    t.MENDED.append(True)
    client.dlq_replay(job_ids=[first])
    wait_for(lambda: client.get_job(first).state is JobState.SUCCEEDED, 10, "the replayed one")
    assert client.get_job(body).state is JobState.CANCELLED  # the other still holds it
    assert client.explain(body).waits_on[0].job_id == second
    client.dlq_replay(job_ids=[second])
    assert handle.result(timeout=30) == 6


def test_a_cancelled_workflow_stays_cancelled_when_its_dead_step_is_replayed(
    client: Client, worker: Worker
) -> None:
    t.MENDED.clear()
    handle = client.submit(chain(t.fragile.s(-7), t.process_item.s()))
    with pytest.raises(JobFailedError):
        handle.result(timeout=30)
    assert handle.cancel() == 0  # nothing left to cancel, but the workflow is given up
    t.MENDED.append(True)
    client.dlq_replay(job_ids=[handle.job_ids[0]])
    wait_for(lambda: client.get_job(handle.job_ids[0]).state is JobState.SUCCEEDED, 10, "replay")
    assert client.get_job(handle.job_ids[1]).state is JobState.CANCELLED


def test_a_user_cancel_of_a_waiting_job_is_not_a_parents_failure(client: Client) -> None:
    handle = client.submit(chain(t.process_item.s(1), t.process_item.s()))
    client.cancel(handle.job_ids[1])
    explained = client.explain(handle.job_ids[1])
    assert (explained.reason, explained.waits_on) == ("finished", ())


def test_workflow_refusals(client: Client) -> None:
    from jobbroker.v1 import broker_pb2, job_pb2

    stub = client._stub
    spec = job_pb2.JobSpec(queue="q", task="x")
    twice = job_pb2.JobSpec(queue="q", task="x", needs=job_pb2.Needs(parents=[0], input="[0,0]"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitWorkflow(broker_pb2.SubmitWorkflowRequest(workflow_id="w", jobs=[spec, twice]))
    assert "names parent 0 twice" in str(raised.value.details())
    with pytest.raises(grpc.RpcError) as raised:
        stub.Submit(broker_pb2.SubmitRequest(job=twice))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "SubmitWorkflow" in str(raised.value.details())
    stub.SubmitWorkflow(broker_pb2.SubmitWorkflowRequest(workflow_id="taken", jobs=[spec]))
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitWorkflow(broker_pb2.SubmitWorkflowRequest(workflow_id="taken", jobs=[spec]))
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "taken by another workflow" in str(raised.value.details())
    assert len(client.list_jobs(workflow_id="taken").jobs) == 1
    with pytest.raises(InvalidArgumentError, match="takes the workflow alone"):
        client.submit(chain(t.process_item.s(1)), queue="elsewhere")  # type: ignore[call-overload]

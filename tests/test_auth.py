"""API keys and roles on a real broker started with auth on.

The role table here is written apart from the broker's (rpc/auth.py) so that
it pins the policy: each method of the Broker service must have a row, and
each role is tried on each method.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.config import Settings
from jobbroker_server.domain.keys import Role
from jobbroker_server.testing import BrokerThread

from .conftest import FAST
from .waiting import wait_for

pytestmark = pytest.mark.timeout(60)

AUTH_ERRORS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class Keys:
    """A broker with auth on, and a key of each role (made in-process)."""

    broker: BrokerThread
    texts: dict[str, str]
    ids: dict[str, str]

    def make(self, name: str, role: Role, queues: tuple[str, ...] = ()) -> str:
        key, text = self.broker.run(self.broker.app.keys.create(name, role, queues))
        self.ids[name] = key.id
        return text

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.texts[name]}"),)


@pytest.fixture
def keys(settings: Settings) -> Iterator[Keys]:
    with BrokerThread(replace(settings, auth=True)) as broker:
        made = Keys(broker, {}, {})
        for role in Role:
            made.texts[role.value] = made.make(role.value, role)
        yield made


@pytest.fixture
def stub(keys: Keys) -> Iterator[broker_pb2_grpc.BrokerStub]:
    with grpc.insecure_channel(keys.broker.target) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)


def _spec(queue: str = "q") -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(queue=queue, task="t")
    spec.payload.data = json.dumps({"card": "4111 1111 1111 1111"}).encode()
    return spec


def _subscribe(queue: str = "q") -> broker_pb2.WorkerMessage:
    return broker_pb2.WorkerMessage(
        subscribe=broker_pb2.Subscribe(worker_id="w", queues=[queue], prefetch=1)
    )


MISSING = "01a00000-0000-7000-8000-000000000000"


def _by_name(method: str, kind: Any) -> Callable[[broker_pb2_grpc.BrokerStub, Any], object]:
    """A call of a schedule method that names a schedule that does not exist."""
    return lambda s, m: getattr(s, method)(kind(name="no-such-schedule"), metadata=m)


# Each method: the roles that may call it, and one call of it (stub, metadata).
Call = Callable[[broker_pb2_grpc.BrokerStub, Any], object]
_PRODUCE = {"producer", "admin"}
TABLE: dict[str, tuple[set[str], Call]] = {
    "Submit": (_PRODUCE, lambda s, m: s.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=m)),
    "SubmitBatch": (
        _PRODUCE,
        lambda s, m: s.SubmitBatch(broker_pb2.SubmitBatchRequest(jobs=[_spec()]), metadata=m),
    ),
    "SubmitGrouped": (
        _PRODUCE,
        lambda s, m: list(
            s.SubmitGrouped(iter([broker_pb2.SubmitBatchRequest(jobs=[_spec()])]), metadata=m)
        ),
    ),
    "GetJob": (
        _PRODUCE,
        lambda s, m: s.GetJob(broker_pb2.GetJobRequest(job_id=MISSING), metadata=m),
    ),
    "WaitJob": (
        _PRODUCE,
        lambda s, m: list(s.WaitJob(broker_pb2.WaitJobRequest(job_id=MISSING), metadata=m)),
    ),
    "CancelJob": (
        _PRODUCE,
        lambda s, m: s.CancelJob(broker_pb2.CancelJobRequest(job_id=MISSING), metadata=m),
    ),
    "ListJobEvents": (
        _PRODUCE,
        lambda s, m: s.ListJobEvents(broker_pb2.ListJobEventsRequest(job_id=MISSING), metadata=m),
    ),
    "WatchJob": (
        _PRODUCE,
        lambda s, m: list(s.WatchJob(broker_pb2.WatchJobRequest(job_id=MISSING), metadata=m)),
    ),
    "TailEvents": (
        _PRODUCE,
        lambda s, m: list(s.TailEvents(broker_pb2.TailEventsRequest(), metadata=m, timeout=1)),
    ),
    "ExplainJob": (
        _PRODUCE,
        lambda s, m: s.ExplainJob(broker_pb2.ExplainJobRequest(job_id=MISSING), metadata=m),
    ),
    "ListJobs": (_PRODUCE, lambda s, m: s.ListJobs(broker_pb2.ListJobsRequest(), metadata=m)),
    "LeaseStream": (
        {"worker", "admin"},
        lambda s, m: list(s.LeaseStream(iter([_subscribe()]), metadata=m, timeout=1)),
    ),
    "ListDeadJobs": (
        {"admin"},
        lambda s, m: s.ListDeadJobs(broker_pb2.ListDeadJobsRequest(), metadata=m),
    ),
    "ReplayDeadJobs": (
        {"admin"},
        lambda s, m: s.ReplayDeadJobs(broker_pb2.ReplayDeadJobsRequest(all=True), metadata=m),
    ),
    "PurgeDeadJobs": (
        {"admin"},
        lambda s, m: s.PurgeDeadJobs(broker_pb2.PurgeDeadJobsRequest(all=True), metadata=m),
    ),
    "CreateApiKey": (
        {"admin"},
        lambda s, m: s.CreateApiKey(
            broker_pb2.CreateApiKeyRequest(name=f"k-{id(m)}", role=broker_pb2.ROLE_PRODUCER),
            metadata=m,
        ),
    ),
    "ListApiKeys": (
        {"admin"},
        lambda s, m: s.ListApiKeys(broker_pb2.ListApiKeysRequest(), metadata=m),
    ),
    "RevokeApiKey": (
        {"admin"},
        lambda s, m: s.RevokeApiKey(broker_pb2.RevokeApiKeyRequest(key="nobody"), metadata=m),
    ),
    "CreateSchedule": (
        _PRODUCE,
        lambda s, m: s.CreateSchedule(
            broker_pb2.CreateScheduleRequest(
                schedule=broker_pb2.Schedule(name="nightly", cron="0 3 * * *", job=_spec())
            ),
            metadata=m,
        ),
    ),
    "SubmitWorkflow": (
        _PRODUCE,
        lambda s, m: s.SubmitWorkflow(
            broker_pb2.SubmitWorkflowRequest(workflow_id=str(uuid.uuid4()), jobs=[_spec()]),
            metadata=m,
        ),
    ),
    "CancelWorkflow": (
        _PRODUCE,
        lambda s, m: s.CancelWorkflow(
            broker_pb2.CancelWorkflowRequest(workflow_id="none"), metadata=m
        ),
    ),
    "ListQueues": (
        _PRODUCE,
        lambda s, m: s.ListQueues(broker_pb2.ListQueuesRequest(), metadata=m),
    ),
    "SetQueue": (
        {"admin"},
        lambda s, m: s.SetQueue(broker_pb2.SetQueueRequest(name="q"), metadata=m),
    ),
    "PauseQueue": (
        {"admin"},
        lambda s, m: s.PauseQueue(broker_pb2.PauseQueueRequest(name="q"), metadata=m),
    ),
    "ResumeQueue": (
        {"admin"},
        lambda s, m: s.ResumeQueue(broker_pb2.PauseQueueRequest(name="q"), metadata=m),
    ),
    "ListSchedules": (
        _PRODUCE,
        lambda s, m: s.ListSchedules(broker_pb2.ListSchedulesRequest(), metadata=m),
    ),
    **{
        name: (_PRODUCE, _by_name(name, kind))
        for name, kind in (
            ("GetSchedule", broker_pb2.GetScheduleRequest),
            ("PauseSchedule", broker_pb2.PauseScheduleRequest),
            ("ResumeSchedule", broker_pb2.ResumeScheduleRequest),
            ("DeleteSchedule", broker_pb2.DeleteScheduleRequest),
        )
    },
}


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_every_method_of_the_service_has_a_row_in_this_table() -> None:
    methods = {m.name for m in broker_pb2.DESCRIPTOR.services_by_name["Broker"].methods}
    assert methods == set(TABLE), "a method was added or removed: give it its roles here"


@pytest.mark.parametrize("method", sorted(TABLE))
def test_each_role_is_allowed_or_refused_per_method(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub, method: str
) -> None:
    allowed, call = TABLE[method]
    assert _code(lambda: call(stub, ())) is grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer jbk_0000000000000000_wrong"),)
    assert _code(lambda: call(stub, bad)) is grpc.StatusCode.UNAUTHENTICATED
    for role in Role:
        code = _code(lambda: call(stub, keys.metadata(role.value)))  # noqa: B023
        if role.value in allowed:
            assert code not in AUTH_ERRORS, (method, role, code)
        else:
            assert code is grpc.StatusCode.PERMISSION_DENIED, (method, role, code)


def test_a_wrong_role_is_told_which_role_the_method_takes(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=keys.metadata("worker"))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "worker role" in str(refused.value.details())
    assert "producer or admin" in str(refused.value.details())


def test_an_admin_key_creates_lists_and_revokes_keys_and_the_secret_is_not_kept(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    admin = keys.metadata("admin")
    made = stub.CreateApiKey(
        broker_pb2.CreateApiKeyRequest(name="ci", role=broker_pb2.ROLE_PRODUCER, queues=["q"]),
        metadata=admin,
    )
    assert made.secret.startswith(f"jbk_{made.key.id}_") and made.key.queues == ["q"]
    listed = stub.ListApiKeys(broker_pb2.ListApiKeysRequest(), metadata=admin)
    assert "ci" in [k.name for k in listed.keys]
    assert made.secret not in str(listed) and "secret" not in str(listed)
    with pytest.raises(grpc.RpcError) as taken:
        stub.CreateApiKey(
            broker_pb2.CreateApiKeyRequest(name="ci", role=broker_pb2.ROLE_WORKER), metadata=admin
        )
    assert taken.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    ci = (("authorization", f"Bearer {made.secret}"),)
    stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=ci)
    revoked = stub.RevokeApiKey(broker_pb2.RevokeApiKeyRequest(key="ci"), metadata=admin)
    assert revoked.key.HasField("revoked_at")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=ci)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    everything = stub.ListApiKeys(
        broker_pb2.ListApiKeysRequest(include_revoked=True), metadata=admin
    )
    assert "ci" in [k.name for k in everything.keys]
    now_valid = stub.ListApiKeys(broker_pb2.ListApiKeysRequest(), metadata=admin)
    assert "ci" not in [k.name for k in now_valid.keys]


def test_a_key_limited_to_a_queue_is_refused_on_others(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    keys.texts["team-a"] = keys.make("team-a", Role.PRODUCER, ("a",))
    keys.texts["worker-a"] = keys.make("worker-a", Role.WORKER, ("a",))
    keys.texts["admin-a"] = keys.make("admin-a", Role.ADMIN, ("a",))
    mine = keys.metadata("team-a")
    theirs = stub.Submit(broker_pb2.SubmitRequest(job=_spec("b")), metadata=keys.metadata("admin"))
    ours = stub.Submit(broker_pb2.SubmitRequest(job=_spec("a")), metadata=mine)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Submit(broker_pb2.SubmitRequest(job=_spec("b")), metadata=mine)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'a'" in str(refused.value.details())
    # Another queue's job does not exist for it: not read, waited on or cancelled.
    for call in (
        lambda: stub.GetJob(broker_pb2.GetJobRequest(job_id=theirs.job_id), metadata=mine),
        lambda: list(stub.WaitJob(broker_pb2.WaitJobRequest(job_id=theirs.job_id), metadata=mine)),
        lambda: stub.CancelJob(broker_pb2.CancelJobRequest(job_id=theirs.job_id), metadata=mine),
    ):
        assert _code(call) is grpc.StatusCode.NOT_FOUND
    admin = keys.metadata("admin")
    job = stub.GetJob(broker_pb2.GetJobRequest(job_id=theirs.job_id), metadata=admin).job
    assert job.state == job_pb2.JOB_STATE_PENDING  # the refused cancel changed nothing
    got = stub.GetJob(broker_pb2.GetJobRequest(job_id=ours.job_id), metadata=mine)
    assert got.job.queue == "a"
    # Listing names the queue, or is refused.
    assert _code(lambda: stub.ListJobs(broker_pb2.ListJobsRequest(), metadata=mine)) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    listed = stub.ListJobs(broker_pb2.ListJobsRequest(queue="a"), metadata=mine)
    assert [j.id for j in listed.jobs] == [ours.job_id]
    # Batch and grouped submits refuse the job of another queue.
    batch = broker_pb2.SubmitBatchRequest(jobs=[_spec("a"), _spec("b")])
    assert _code(lambda: stub.SubmitBatch(batch, metadata=mine)) is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    [answer] = list(stub.SubmitGrouped(iter([batch]), metadata=mine))
    assert answer.results[0].job_id and not answer.results[0].HasField("error")
    assert answer.results[1].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    # A worker key of queue a cannot lease queue b.
    leasing = stub.LeaseStream(iter([_subscribe("b")]), metadata=keys.metadata("worker-a"))
    assert _code(lambda: list(leasing)) is grpc.StatusCode.PERMISSION_DENIED
    # An admin limited to a queue cannot make itself a key for every queue.
    create = broker_pb2.CreateApiKeyRequest(name="escalate", role=broker_pb2.ROLE_ADMIN)
    assert _code(lambda: stub.CreateApiKey(create, metadata=keys.metadata("admin-a"))) is (
        grpc.StatusCode.PERMISSION_DENIED
    )


class RawStream:
    """A LeaseStream spoken message by message, as a hostile client would."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub, metadata: Any, **subscribe: Any) -> None:
        self._out: queue.Queue[broker_pb2.WorkerMessage | None] = queue.Queue()
        self._out.put(
            broker_pb2.WorkerMessage(
                subscribe=broker_pb2.Subscribe(**{"worker_id": "w", "prefetch": 1, **subscribe})
            )
        )
        self._call = stub.LeaseStream(iter(self._out.get, None), metadata=metadata, timeout=30)

    def send(self, **kind: Any) -> None:
        self._out.put(broker_pb2.WorkerMessage(**kind))

    def next(self) -> broker_pb2.BrokerMessage:
        return next(self._call)

    def leased(self) -> broker_pb2.LeasedJob:
        while (message := self.next()).WhichOneof("kind") != "leased":
            pass
        [job] = message.leased.jobs
        return job

    def ack(self, seq: int) -> broker_pb2.Ack:
        while (message := self.next()).WhichOneof("kind") != "ack" or message.ack.seq != seq:
            pass
        return message.ack

    def code(self) -> grpc.StatusCode:
        """How the stream ended (read until it does)."""
        return _code(lambda: [None for _ in self._call])

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()


def _complete(job_id: str, token: int) -> broker_pb2.Complete:
    ref = broker_pb2.LeaseRef(job_id=job_id, fencing_token=token)
    result = job_pb2.Payload(data=b'"forged"')
    return broker_pb2.Complete(completions=[broker_pb2.Completion(lease=ref, result=result)])


def test_a_lease_of_another_key_is_refused_even_with_its_fencing_token(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    keys.texts["other-team"] = keys.make("other-team", Role.WORKER)
    admin = keys.metadata("admin")
    submitted = stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=admin)
    holder = RawStream(stub, keys.metadata("worker"), queues=["q"])
    stranger = RawStream(stub, keys.metadata("other-team"), queues=["idle"])
    try:
        lease = holder.leased()
        token = lease.fencing_token
        ref = broker_pb2.LeaseRef(job_id=submitted.job_id, fencing_token=token)
        stranger.send(seq=1, complete=_complete(submitted.job_id, token))
        stranger.send(seq=2, fail=broker_pb2.Fail(failures=[broker_pb2.Failure(lease=ref)]))
        stranger.send(seq=3, heartbeat=broker_pb2.Heartbeat(leases=[ref]))
        stranger.send(seq=4, release=broker_pb2.Release(leases=[ref]))
        for seq in (1, 2, 3, 4):
            [result] = stranger.ack(seq).results
            assert result.status == broker_pb2.REPORT_STATUS_LEASE_LOST, seq
            assert str(token) not in result.message  # the refusal gives nothing away
        job = stub.GetJob(broker_pb2.GetJobRequest(job_id=submitted.job_id), metadata=admin).job
        assert job.state == job_pb2.JOB_STATE_LEASED and job.attempts == 1
        holder.send(seq=9, complete=_complete(submitted.job_id, token))
        [done] = holder.ack(9).results
        assert done.status == broker_pb2.REPORT_STATUS_OK
    finally:
        holder.close()
        stranger.close()


def test_a_stream_naming_another_keys_lease_as_held_does_not_take_it_over(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    keys.texts["other-team"] = keys.make("other-team", Role.WORKER)
    admin = keys.metadata("admin")
    submitted = stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=admin)
    holder = RawStream(stub, keys.metadata("worker"), queues=["q"])
    stranger = None
    try:
        token = holder.leased().fencing_token
        ref = broker_pb2.LeaseRef(job_id=submitted.job_id, fencing_token=token)
        stranger = RawStream(stub, keys.metadata("other-team"), queues=["idle"], held=[ref])
        stranger.send(seq=1, flow=broker_pb2.Flow(prefetch=1))
        stranger.ack(1)
        # A cancel still reaches the stream that holds the job, not the one that named it.
        stub.CancelJob(broker_pb2.CancelJobRequest(job_id=submitted.job_id), metadata=admin)
        while (message := holder.next()).WhichOneof("kind") != "cancel":
            pass
        assert [r.job_id for r in message.cancel.leases] == [submitted.job_id]
    finally:
        holder.close()
        if stranger is not None:
            stranger.close()


def test_the_same_key_reconnecting_reports_the_leases_it_held(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    admin = keys.metadata("admin")
    submitted = stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=admin)
    first = RawStream(stub, keys.metadata("worker"), queues=["q"])
    token = first.leased().fencing_token
    first.close()
    ref = broker_pb2.LeaseRef(job_id=submitted.job_id, fencing_token=token)
    again = RawStream(stub, keys.metadata("worker"), queues=["q"], held=[ref])
    try:
        again.send(seq=1, complete=_complete(submitted.job_id, token))
        [done] = again.ack(1).results
        assert done.status == broker_pb2.REPORT_STATUS_OK
    finally:
        again.close()


def test_fencing_tokens_are_not_a_count_anyone_can_guess(broker: BrokerThread, client: Any) -> None:
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        for _ in range(20):
            stub.Submit(broker_pb2.SubmitRequest(job=_spec()))
        stream = RawStream(stub, (), queues=["q"], prefetch=20)
        try:
            tokens = set()
            while len(tokens) < 20:
                tokens.update(j.fencing_token for j in stream.next().leased.jobs)
        finally:
            stream.close()
    assert len(tokens) == 20 and min(tokens) > 1000  # each a first lease: once 1


def test_a_revoked_key_is_refused_at_once_and_its_open_streams_end(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    admin = keys.metadata("admin")
    submitted = stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=admin)
    worker = RawStream(stub, keys.metadata("worker"), queues=["q"])
    waiting = stub.WaitJob(
        broker_pb2.WaitJobRequest(job_id=submitted.job_id),
        metadata=keys.metadata("producer"),
        timeout=30,
    )
    try:
        worker.leased()
        next(waiting)
        for name in ("worker", "producer"):
            stub.RevokeApiKey(broker_pb2.RevokeApiKeyRequest(key=keys.ids[name]), metadata=admin)
        assert worker.code() is grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: list(waiting)) is grpc.StatusCode.UNAUTHENTICATED
        again = RawStream(stub, keys.metadata("worker"), queues=["q"])
        assert again.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        worker.close()
        waiting.cancel()


@pytest.mark.postgres
def test_a_key_revoked_on_one_replica_ends_streams_on_another(
    postgres_schema: str,
) -> None:
    settings = replace(FAST, database=postgres_schema, auth=True)
    with BrokerThread(settings) as one, BrokerThread(settings) as other:
        admin_key, admin_text = one.run(one.app.keys.create("admin", Role.ADMIN, ()))
        _, worker_text = one.run(one.app.keys.create("w", Role.WORKER, ()))
        with grpc.insecure_channel(other.target) as near, grpc.insecure_channel(one.target) as far:
            stream_there = broker_pb2_grpc.BrokerStub(near)
            presented = (("authorization", f"Bearer {worker_text}"),)
            # The other replica learns of the new key within its refresh.
            wait_for(
                lambda: (
                    _code(lambda: list(stream_there.LeaseStream(iter(()), metadata=presented)))
                    is grpc.StatusCode.OK
                ),
                what="the other replica to take the new key",
            )
            stream = RawStream(stream_there, presented, queues=["q"])
            stream.send(seq=1, flow=broker_pb2.Flow(prefetch=1))
            stream.ack(1)
            broker_pb2_grpc.BrokerStub(far).RevokeApiKey(
                broker_pb2.RevokeApiKeyRequest(key="w"),
                metadata=(("authorization", f"Bearer {admin_text}"),),
            )
            assert stream.code() is grpc.StatusCode.UNAUTHENTICATED
            stream.close()
    assert admin_key.role is Role.ADMIN


@pytest.mark.parametrize(
    ("request_fields", "text"),
    [
        ({"name": "", "role": broker_pb2.ROLE_WORKER}, "name"),
        ({"name": "a\0b", "role": broker_pb2.ROLE_WORKER}, "name"),
        ({"name": "x" * 201, "role": broker_pb2.ROLE_WORKER}, "name"),
        ({"name": "ok", "role": broker_pb2.ROLE_UNSPECIFIED}, "role"),
        ({"name": "ok", "role": 99}, "role"),
        ({"name": "ok", "role": broker_pb2.ROLE_WORKER, "queues": ["q"] * 101}, "100 queues"),
        ({"name": "ok", "role": broker_pb2.ROLE_WORKER, "queues": ["bad\nname"]}, "queues"),
    ],
)
def test_a_bad_key_request_is_refused_and_makes_no_key(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub, request_fields: dict[str, Any], text: str
) -> None:
    admin = keys.metadata("admin")
    before = stub.ListApiKeys(broker_pb2.ListApiKeysRequest(), metadata=admin).keys
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateApiKey(broker_pb2.CreateApiKeyRequest(**request_fields), metadata=admin)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert text in str(refused.value.details())
    assert stub.ListApiKeys(broker_pb2.ListApiKeysRequest(), metadata=admin).keys == before
    with pytest.raises(grpc.RpcError) as unnamed:
        stub.RevokeApiKey(broker_pb2.RevokeApiKeyRequest(key=""), metadata=admin)
    assert unnamed.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_malformed_authorization_is_unauthenticated_with_what_to_send(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    for value in ("Basic abc", "Bearer", "Bearer " + "x" * 4000, keys.texts["admin"]):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListJobs(broker_pb2.ListJobsRequest(), metadata=(("authorization", value),))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer <key>" in str(refused.value.details())


def test_a_jobs_story_names_the_key_that_submitted_and_cancelled_it(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    producer = keys.metadata("producer")
    submitted = stub.Submit(broker_pb2.SubmitRequest(job=_spec()), metadata=producer)
    admin = keys.metadata("admin")
    stub.CancelJob(broker_pb2.CancelJobRequest(job_id=submitted.job_id), metadata=admin)
    request = broker_pb2.ListJobEventsRequest(job_id=submitted.job_id)
    story = stub.ListJobEvents(request, metadata=producer).events
    assert [(e.reason, e.actor) for e in story] == [
        ("submitted", "producer"),
        ("cancelled", "admin"),
    ]


def test_a_key_limited_to_a_queue_manages_only_its_queues_schedules(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    team_a = (("authorization", f"Bearer {keys.make('sched-a', Role.PRODUCER, ('a',))}"),)

    def create(name: str, queue: str, metadata: Any) -> broker_pb2.CreateScheduleResponse:
        schedule = broker_pb2.Schedule(name=name, cron="0 3 * * *", job=_spec(queue))
        request = broker_pb2.CreateScheduleRequest(schedule=schedule)
        reply: broker_pb2.CreateScheduleResponse = stub.CreateSchedule(request, metadata=metadata)
        return reply

    create("of-b", "b", keys.metadata("admin"))
    assert create("of-a", "a", team_a).changed
    with pytest.raises(grpc.RpcError) as refused:
        create("elsewhere", "b", team_a)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as taken:
        create("of-b", "a", team_a)  # another queue's schedule, taken over
    assert taken.value.code() is grpc.StatusCode.PERMISSION_DENIED
    listed = stub.ListSchedules(broker_pb2.ListSchedulesRequest(), metadata=team_a)
    assert [s.name for s in listed.schedules] == ["of-a"]
    for method, kind in (
        ("GetSchedule", broker_pb2.GetScheduleRequest),
        ("PauseSchedule", broker_pb2.PauseScheduleRequest),
        ("DeleteSchedule", broker_pb2.DeleteScheduleRequest),
    ):
        with pytest.raises(grpc.RpcError) as hidden:
            getattr(stub, method)(kind(name="of-b"), metadata=team_a)
        assert hidden.value.code() is grpc.StatusCode.NOT_FOUND, method
    admin = stub.ListSchedules(broker_pb2.ListSchedulesRequest(), metadata=keys.metadata("admin"))
    assert [s.name for s in admin.schedules] == ["of-a", "of-b"]


def test_a_key_limited_to_queues_sees_its_workflows_jobs_in_them(
    keys: Keys, stub: broker_pb2_grpc.BrokerStub
) -> None:
    keys.texts["team-a"] = keys.make("team-a", Role.PRODUCER, ("a",))
    mine = keys.metadata("team-a")
    flow = broker_pb2.SubmitWorkflowRequest(
        workflow_id="wf-a",
        jobs=[_spec("a"), job_pb2.JobSpec(queue="a", task="t", needs=job_pb2.Needs(parents=[0]))],
    )
    made = stub.SubmitWorkflow(flow, metadata=mine)
    listed = stub.ListJobs(broker_pb2.ListJobsRequest(workflow_id="wf-a"), metadata=mine)
    assert [j.id for j in listed.jobs] == [r.job_id for r in made.results]
    other = broker_pb2.SubmitWorkflowRequest(workflow_id="wf-b", jobs=[_spec("b")])
    stub.SubmitWorkflow(other, metadata=keys.metadata("admin"))
    hidden = stub.ListJobs(broker_pb2.ListJobsRequest(workflow_id="wf-b"), metadata=mine)
    assert list(hidden.jobs) == []  # another queue's jobs do not exist for it

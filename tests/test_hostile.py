"""Hostile and careless clients: each request is refused up front, or handled,
and never touches another client's jobs. A real broker on both backends."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from prometheus_client import generate_latest

from jobbroker import Client, JobState
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.waiting import wait_for

SECONDS_MAX = 315_537_897_599  # Duration's and Timestamp's own maximum


@pytest.fixture
def stub(broker: BrokerThread) -> Iterator[broker_pb2_grpc.BrokerStub]:
    with grpc.insecure_channel(broker.target) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)


def _spec(**fields: object) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(queue="q", task="t", **fields)  # type: ignore[arg-type]


def _retry(**fields: object) -> job_pb2.JobSpec:
    return _spec(retry=job_pb2.RetryPolicy(**fields))  # type: ignore[arg-type]


def _rate(count: int, period: duration_pb2.Duration) -> job_pb2.JobSpec:
    return _spec(rate_key="k", rate_limit=job_pb2.RateLimit(count=count, period=period))


HOSTILE = {
    "timeout past datetime": (_spec(timeout=duration_pb2.Duration(seconds=SECONDS_MAX)), "timeout"),
    "soft timeout of years": (
        _spec(soft_timeout=duration_pb2.Duration(seconds=10**9)),
        "soft_timeout",
    ),
    "delay at Duration's max": (_spec(delay=duration_pb2.Duration(seconds=SECONDS_MAX)), "delay"),
    "run_at at Timestamp's max": (
        _spec(run_at=timestamp_pb2.Timestamp(seconds=SECONDS_MAX)),
        "run_at",
    ),
    "run_at with bad nanos": (
        _spec(run_at=timestamp_pb2.Timestamp(seconds=10, nanos=-5)),
        "run_at",
    ),
    "backoff base of millennia": (
        _retry(backoff_base=duration_pb2.Duration(seconds=SECONDS_MAX)),
        "retry.backoff_base",
    ),
    "backoff cap of millennia": (
        _retry(backoff_cap=duration_pb2.Duration(seconds=10**11)),
        "retry.backoff_cap",
    ),
    "NaN backoff factor": (_retry(backoff_factor=math.nan), "retry.backoff_factor"),
    "infinite backoff factor": (_retry(backoff_factor=math.inf), "retry.backoff_factor"),
    "huge backoff factor": (_retry(backoff_factor=1e300), "retry.backoff_factor"),
    "NaN jitter": (_retry(jitter=math.nan), "retry.jitter"),
    "a million attempts": (_retry(max_attempts=1_000_000), "retry.max_attempts"),
    "NUL in a queue": (job_pb2.JobSpec(queue="q\0", task="t"), "queue"),
    "NUL in a task": (job_pb2.JobSpec(queue="q", task="t\0x"), "task"),
    "NUL in a key": (_spec(idempotency_key="k\0"), "idempotency_key"),
    "NUL in metadata": (_spec(metadata={"k": "v\0"}), "metadata"),
    "NUL in a tag": (_spec(tags=["a\0"]), "tag"),
    "NUL in a content type": (_spec(payload=job_pb2.Payload(content_type="a\0")), "content_type"),
    "a long content type": (
        _spec(payload=job_pb2.Payload(content_type="x" * 101)),
        "content_type",
    ),
    "too many metadata entries": (
        _spec(metadata={str(i): "v" for i in range(65)}),
        "metadata has 65 entries",
    ),
    "a huge metadata value": (_spec(metadata={"k": "v" * 100_000}), "metadata['k']"),
    "metadata of 20,000 characters": (
        _spec(metadata={f"k{i}": "v" * 4000 for i in range(5)}),
        "metadata holds 20010 characters",
    ),
    "too many tags": (_spec(tags=[f"t{i}" for i in range(65)]), "tags has 65"),
    "a queue of 10,000 characters": (job_pb2.JobSpec(queue="q" * 10_000, task="t"), "queue"),
    "a concurrency limit of a billion": (
        _spec(concurrency_key="k", concurrency_limit=10**9),
        "concurrency_limit",
    ),
    "NUL in a concurrency key": (_spec(concurrency_key="k\0"), "concurrency_key"),
    "a rate key of 10,000 characters": (_spec(rate_key="r" * 10_000), "rate_key"),
    "a rate of none per second": (_rate(0, duration_pb2.Duration(seconds=1)), "rate_limit"),
    "a rate over no time": (_rate(5, duration_pb2.Duration()), "rate_limit.period"),
    "a rate over millennia": (
        _rate(5, duration_pb2.Duration(seconds=SECONDS_MAX)),
        "rate_limit.period",
    ),
    "a rate of a billion": (_rate(10**9, duration_pb2.Duration(seconds=1)), "rate_limit"),
    "a rate finer than a microsecond": (
        _rate(1_000_000, duration_pb2.Duration(nanos=1_000_000)),
        "microsecond",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_submit_is_refused_and_touches_nothing(
    stub: broker_pb2_grpc.BrokerStub, client: Client, case: str
) -> None:
    spec, named = HOSTILE[case]
    kept = client.submit("keep", {"n": 1}, queue="q")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Submit(broker_pb2.SubmitRequest(job=spec), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert named in caught.value.details()  # type: ignore[attr-defined]
    # The queue still leases and the kept job runs.
    with client.lease_stream(["q"]) as stream:
        lease = next(iter(stream))
        assert lease.job.id == kept.id
        lease.complete("done")
    assert kept.result(timeout=5) == "done"
    assert [j.id for j in client.list_jobs().jobs] == [kept.id]


def test_hostile_submits_do_not_fail_valid_ones_sharing_their_group_commit(
    broker: BrokerThread,
) -> None:
    """Valid and refused jobs arrive at once, over many streams: every valid
    one is stored, every refused one gets its own error."""
    errors: list[str] = []
    stored: list[str] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            requests = [
                broker_pb2.SubmitBatchRequest(jobs=[_spec(), HOSTILE["NaN backoff factor"][0]])
                for _ in range(20)
            ]
            for answer in stub.SubmitGrouped(iter(requests), timeout=20):
                good, bad = answer.results
                with lock:
                    stored.append(good.job_id)
                    errors.append(bad.error.message)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(stored) == 160 and all(stored)
    assert len(errors) == 160 and all("backoff_factor" in e for e in errors)
    with Client(broker.target) as client:
        assert len(client.list_jobs(page_size=1000).jobs) == 160


def _subscribe(**fields: object) -> broker_pb2.WorkerMessage:
    return broker_pb2.WorkerMessage(subscribe=broker_pb2.Subscribe(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("subscribe", "named"),
    [
        (_subscribe(queues=[f"q{i}" for i in range(101)], prefetch=1), "between 1 and 100 queues"),
        (_subscribe(queues=["q\0"], prefetch=1), "subscribe.queues[]"),
        (_subscribe(queues=["q"], prefetch=10_001), "prefetch must be between 1 and 10000"),
        (_subscribe(queues=["q"], prefetch=1, worker_id="w" * 500), "worker_id"),
    ],
)
def test_hostile_subscribe_is_refused(
    stub: broker_pb2_grpc.BrokerStub, subscribe: broker_pb2.WorkerMessage, named: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.LeaseStream(iter([subscribe]), timeout=5))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert named in caught.value.details()  # type: ignore[attr-defined]


def test_forged_reports_are_answered_and_the_stream_goes_on(
    stub: broker_pb2_grpc.BrokerStub, client: Client
) -> None:
    victim = client.submit("t", None, queue="victim")
    with client.lease_stream(["victim"]) as held:
        lease = next(iter(held))
        ref = broker_pb2.LeaseRef(job_id=victim.id, fencing_token=lease.fencing_token + 1)
        nul = broker_pb2.LeaseRef(job_id="x\0", fencing_token=1)
        messages = [
            _subscribe(queues=["idle"], prefetch=1),
            broker_pb2.WorkerMessage(seq=1, heartbeat=broker_pb2.Heartbeat(leases=[nul, ref])),
            broker_pb2.WorkerMessage(
                seq=2, complete=broker_pb2.Complete(completions=[broker_pb2.Completion(lease=ref)])
            ),
            broker_pb2.WorkerMessage(
                seq=3,
                progress=broker_pb2.Progress(
                    lease=broker_pb2.LeaseRef(job_id=victim.id), progress=math.nan
                ),
            ),
            broker_pb2.WorkerMessage(
                seq=4,
                fail=broker_pb2.Fail(
                    failures=[
                        broker_pb2.Failure(
                            lease=ref,
                            retry_after=duration_pb2.Duration(seconds=SECONDS_MAX),
                            error=job_pb2.ErrorInfo(message="\0" * 10_000),
                        )
                    ]
                ),
            ),
        ]
        acks = [m.ack for m in stub.LeaseStream(iter(messages), timeout=5) if m.HasField("ack")]
        assert [a.seq for a in acks] == [1, 2, 3, 4]
        invalid = broker_pb2.REPORT_STATUS_INVALID
        lost = broker_pb2.REPORT_STATUS_LEASE_LOST
        assert [r.status for r in acks[0].results] == [invalid, invalid]  # the NUL refuses both
        assert [r.status for r in acks[1].results] == [lost]
        assert [r.status for r in acks[2].results] == [invalid]
        assert "progress" in acks[2].results[0].message
        assert [r.status for r in acks[3].results] == [lost]
        lease.complete("mine")  # the holder's lease is untouched
    assert victim.result(timeout=5) == "mine"


def test_malformed_bytes_are_invalid_argument_and_logged_once(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(broker.target) as channel:
        for method in ("Submit", "GetJob", "ListJobs", "CancelJob"):
            call = channel.unary_unary(f"/jobbroker.v1.Broker/{method}")
            with pytest.raises(grpc.RpcError, match=r"not a valid jobbroker\.v1\."):
                call(b"\xff\xff\xff", timeout=5)
            for garbage in (b"\x0a\x05ab", b"\x12\x03\xff\xfe\xfd", b"\x0a\x03\xc3\x28a"):
                with pytest.raises(grpc.RpcError) as caught:
                    call(garbage, timeout=5)
                code = caught.value.code()  # type: ignore[attr-defined]
                assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, garbage)
                assert caught.value.details()  # type: ignore[attr-defined]
        stream = channel.stream_stream("/jobbroker.v1.Broker/LeaseStream")
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([b"\xff\xff"]), timeout=5))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "Traceback" not in caplog.text
    with Client(broker.target) as client:
        assert client.submit("t", None, queue="q").id


@pytest.fixture
def capped(settings: Settings) -> Iterator[BrokerThread]:
    small = replace(settings, max_lease_streams=3, max_watch_streams=2, max_metric_queues=5)
    with BrokerThread(small) as running:
        yield running


def test_open_streams_are_capped(capped: BrokerThread) -> None:
    with Client(capped.target) as client, grpc.insecure_channel(capped.target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        streams = [client.lease_stream(["q"]) for _ in range(3)]
        for s in streams:
            s.__enter__()
        wait_for(lambda: _open_streams(capped) == 3, what="three streams open")
        try:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.LeaseStream(iter([_subscribe(queues=["q"], prefetch=1)]), timeout=5))
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "--max-lease-streams" in caught.value.details()  # type: ignore[attr-defined]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        # Closed streams free their places.
        with client.lease_stream(["q"]) as again:
            client.submit("t", None, queue="q")
            next(iter(again)).complete()

        jobs = [client.submit("t", None, queue="w") for _ in range(3)]
        waits = [stub.WaitJob(broker_pb2.WaitJobRequest(job_id=j.id), timeout=10) for j in jobs[:2]]
        for w in waits:
            next(w)  # each is open and has sent the job's state
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.WaitJob(broker_pb2.WaitJobRequest(job_id=jobs[2].id), timeout=5))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        for w in waits:
            w.cancel()


def test_many_queue_names_keep_metric_labels_bounded(capped: BrokerThread) -> None:
    with Client(capped.target) as client:
        for i in range(20):
            client.submit("t", None, queue=f"made-up-{i:02}")
    exposed = generate_latest(capped.app.metrics.registry).decode()
    prefix = "jobbroker_jobs_submitted_total{"
    submitted = [line for line in exposed.splitlines() if line.startswith(prefix)]
    assert len(submitted) == 6  # five queues of their own, and the rest together
    assert 'jobbroker_jobs_submitted_total{queue="_other"} 15.0' in exposed


def test_large_payloads_reach_a_worker_in_messages_it_accepts(settings: Settings) -> None:
    big = replace(settings, max_payload_bytes=1024 * 1024)
    with BrokerThread(big) as running, Client(running.target) as client:
        handles = [client.submit("t", "x" * (1024 * 1024 - 10), queue="big") for _ in range(24)]
        with client.lease_stream(["big"], prefetch=100) as stream:
            leases = iter(stream)
            for _ in handles:
                next(leases).complete(None)
        for h in handles:
            assert h.result(timeout=10) is None
        assert all(client.get_job(h.id).attempts == 1 for h in handles)


def test_a_result_over_the_limit_dead_letters_its_job(settings: Settings) -> None:
    small = replace(settings, max_payload_bytes=1000)
    with BrokerThread(small) as running, Client(running.target) as client:
        handle = client.submit("t", None, queue="q")
        with client.lease_stream(["q"]) as stream:
            next(iter(stream)).complete("r" * 2000)
        job = wait_for(
            lambda: (j := client.get_job(handle.id)).state is JobState.DEAD and j,
            what="the job dead-lettered",
        )
        assert job.last_error is not None and job.last_error.type == "ResultTooLarge"
        assert "2002 bytes" in job.last_error.message


def test_a_closed_lease_stream_leaves_no_task_behind(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(broker.target) as client:
        for _ in range(10):
            with client.lease_stream(["idle"]):
                pass
        wait_for(lambda: _open_streams(broker) == 0, what="streams closed")
        broker.run(_collect())
    assert "Task was destroyed but it is pending" not in caplog.text


async def _collect() -> None:
    import gc

    gc.collect()


def _open_streams(broker: BrokerThread) -> float | None:
    return broker.app.metrics.registry.get_sample_value("jobbroker_worker_streams")

"""Bad requests get a clear status, the broker stays up, and the store is unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest

from jobbroker import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    JobNotFoundError,
    ResourceExhaustedError,
)
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread


@pytest.fixture
def small(settings: Settings) -> Iterator[BrokerThread]:
    with BrokerThread(replace(settings, max_payload_bytes=1000)) as running:
        yield running


@pytest.fixture
def stub(small: BrokerThread) -> Iterator[broker_pb2_grpc.BrokerStub]:
    with grpc.insecure_channel(small.target) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)


def _count(client: Client) -> int:
    return len(client.list_jobs(page_size=1000).jobs)


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        (job_pb2.JobSpec(queue="", task="t"), "INVALID_ARGUMENT", "queue must not be empty"),
        (job_pb2.JobSpec(queue="q", task=" "), "INVALID_ARGUMENT", "task must not be empty"),
        (
            job_pb2.JobSpec(queue="q", task="t", delay={"seconds": -5}),
            "INVALID_ARGUMENT",
            "delay must not be negative",
        ),
        (
            job_pb2.JobSpec(queue="q", task="t", delay={"seconds": 9000 * 365 * 86400}),
            "INVALID_ARGUMENT",
            "delay is 283824000000s; the limit is 315360000s (3650 days)",
        ),
        (
            job_pb2.JobSpec(queue="q", task="t", payload=job_pb2.Payload(data=b"x" * 1001)),
            "RESOURCE_EXHAUSTED",
            "payload is 1001 bytes; this broker accepts at most 1000",
        ),
        (
            job_pb2.JobSpec(queue="q", task="t", retry=job_pb2.RetryPolicy(jitter=2)),
            "INVALID_ARGUMENT",
            "retry.jitter must be between 0 and 1",
        ),
    ],
)
def test_server_refuses_bad_submits(
    stub: broker_pb2_grpc.BrokerStub,
    small: BrokerThread,
    spec: job_pb2.JobSpec,
    code: str,
    message: str,
) -> None:
    stub.Submit(broker_pb2.SubmitRequest(job=job_pb2.JobSpec(queue="q", task="keep")))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Submit(broker_pb2.SubmitRequest(job=spec), timeout=5)
    error = caught.value
    assert error.code().name == code  # type: ignore[attr-defined]
    assert message in error.details()  # type: ignore[attr-defined]
    with Client(small.target) as client:
        jobs = client.list_jobs().jobs
        assert [j.task for j in jobs] == ["keep"]  # nothing else was stored


def test_bad_batch_stores_nothing_and_names_the_culprit(
    stub: broker_pb2_grpc.BrokerStub, small: BrokerThread
) -> None:
    good = job_pb2.JobSpec(queue="q", task="t")
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitBatch(
            broker_pb2.SubmitBatchRequest(jobs=[good, good, job_pb2.JobSpec(queue="q")]), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "jobs[2]: task must not be empty" in caught.value.details()  # type: ignore[attr-defined]
    with Client(small.target) as client:
        assert _count(client) == 0


def test_sdk_raises_typed_errors(small: BrokerThread) -> None:
    with Client(small.target) as client:
        kept = client.submit("t", {"keep": True}, queue="q")
        with pytest.raises(InvalidArgumentError, match="queue"):
            client.submit("t", None, queue="")
        with pytest.raises(InvalidArgumentError, match="delay"):
            client.submit("t", None, queue="q", delay=timedelta(seconds=-1))
        with pytest.raises(ResourceExhaustedError, match="at most 1000"):
            client.submit("t", "x" * 2000, queue="q")
        with pytest.raises(JobNotFoundError, match="no job with id 'missing'"):
            client.get_job("missing")
        with pytest.raises(JobNotFoundError):
            client.cancel("missing")
        client.cancel(kept.id)
        with pytest.raises(FailedPreconditionError, match="cancelled job cannot become cancelled"):
            client.cancel(kept.id)
        assert _count(client) == 1
        assert client.get_job(kept.id).json() == {"keep": True}


def test_lease_stream_must_subscribe_first(stub: broker_pb2_grpc.BrokerStub) -> None:
    heartbeat = broker_pb2.WorkerMessage(heartbeat=broker_pb2.Heartbeat())
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.LeaseStream(iter([heartbeat]), timeout=5))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "first message" in caught.value.details()  # type: ignore[attr-defined]
    bad = broker_pb2.WorkerMessage(subscribe=broker_pb2.Subscribe(queues=["q"], prefetch=0))
    with pytest.raises(grpc.RpcError, match="prefetch must be between 1"):
        list(stub.LeaseStream(iter([bad]), timeout=5))

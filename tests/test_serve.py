"""``broker serve`` as a real process: health, reflection, metrics, shutdown."""

from __future__ import annotations

import re
import signal
import socket
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobbroker import Client, JobState
from tests.processes import start_broker
from tests.waiting import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_reports_health_reflection_and_metrics(database: str) -> None:
    metrics_port = _free_port()
    proc, target = start_broker(database, metrics_port=metrics_port)
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="jobbroker.v1.Broker"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            [answer] = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for s in answer.list_services_response.service}
            assert "jobbroker.v1.Broker" in names
        with Client(target) as client:
            handle = client.submit("noop", None, queue="metered")
            with client.lease_stream(["metered"]) as stream:
                next(iter(stream)).complete()
            assert handle.result(timeout=5) is None
            client.submit("noop", None, queue="metered")  # waits: no stream now

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        def sampled() -> str:
            text = scrape()
            return text if 'jobbroker_queue_depth{queue="metered"' in text else ""

        text = wait_for(sampled, what="the queue depth gauge")
        assert 'jobbroker_jobs_submitted_total{queue="metered"} 2.0' in text
        assert 'jobbroker_jobs_leased_total{queue="metered"} 1.0' in text
        assert 'jobbroker_jobs_succeeded_total{queue="metered"} 1.0' in text
        assert 'jobbroker_submit_to_start_seconds_count{queue="metered"} 1.0' in text
        assert 'jobbroker_job_run_seconds_count{queue="metered"} 1.0' in text
        assert re.search(r'jobbroker_queue_depth\{queue="metered",state="pending"\} 1.0', text)
        assert 'state="succeeded"' not in text  # finished jobs are counted, not sampled
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output


def test_sigterm_stops_cleanly_and_restart_keeps_every_job(database: str) -> None:
    proc, target = start_broker(database)
    with Client(target) as client:
        ids = [client.submit("keep", i, queue="durable").id for i in range(20)]
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    assert "jobbroker stopped" in proc.output

    proc, target = start_broker(database)
    try:
        with Client(target) as client:
            kept = client.list_jobs(queue="durable", page_size=100).jobs
            assert [j.id for j in kept] == ids
            assert all(j.state is JobState.PENDING for j in kept)
    finally:
        proc.signal(signal.SIGINT)
        assert proc.wait() == 0, proc.output

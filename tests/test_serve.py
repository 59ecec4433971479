"""``broker serve`` as a real process: health, reflection, metrics, shutdown,
refusals to start, and health that follows the store."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobbroker import Client, JobState
from jobbroker_server.clock import SystemClock
from jobbroker_server.services.health import StoreHealth
from jobbroker_server.store import open_store
from tests.pgproxy import CuttableProxy
from tests.processes import BROKER, start_broker
from tests.waiting import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SECRET = "4111-1111-1111-1111"


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
            client.cancel(client.submit("noop", None, queue="metered").id)
            # What jobs carry never reaches /metrics: only queue names and counts.
            client.submit(
                "noop",
                {"card": SECRET},
                queue="carried",
                metadata={"token": SECRET},
                tags=[SECRET],
                idempotency_key=SECRET,
            )
            with client.lease_stream(["carried"]) as stream:
                next(iter(stream)).fail(RuntimeError(SECRET), retryable=False)

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        def sampled() -> str:
            text = scrape()
            return text if 'jobbroker_queue_depth{queue="metered"' in text else ""

        text = wait_for(sampled, what="the queue depth gauge")
        assert 'jobbroker_jobs_submitted_total{queue="metered"} 3.0' in text
        # Every kind of transition is counted by queue, cancellations among them.
        for reason, n in (("submitted", 3), ("leased", 1), ("succeeded", 1), ("cancelled", 1)):
            line = f'jobbroker_job_transitions_total{{queue="metered",reason="{reason}"}} {n}.0'
            assert line in text, line
        assert 'jobbroker_jobs_leased_total{queue="metered"} 1.0' in text
        assert 'jobbroker_jobs_succeeded_total{queue="metered"} 1.0' in text
        assert 'jobbroker_submit_to_start_seconds_count{queue="metered"} 1.0' in text
        assert 'jobbroker_job_run_seconds_count{queue="metered"} 1.0' in text
        assert re.search(r'jobbroker_queue_depth\{queue="metered",state="pending"\} 1.0', text)
        assert 'state="succeeded"' not in text  # finished jobs are counted, not sampled
        dead = 'jobbroker_jobs_dead_lettered_total{queue="carried"} 1.0'
        text = wait_for(lambda: t if dead in (t := scrape()) else "", what="the dead job")
        assert SECRET not in text
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output


def test_the_metrics_endpoint_can_be_bound_apart(tmp_path: Path) -> None:
    metrics_port = _free_port()
    database = str(tmp_path / "broker.db")
    proc, target = start_broker(database, "--metrics-host", "127.0.0.2", metrics_port=metrics_port)
    try:
        url = f"http://127.0.0.2:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"jobbroker_jobs_submitted_total" in response.read()
        with pytest.raises(urllib.error.URLError, match="refused"):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        with Client(target) as client:  # the gRPC port is where it was
            assert client.list_jobs().jobs == ()
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


# --- one broker per port, one per file; start-up failures are one line ---


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `broker serve` expecting it to refuse to start."""
    return subprocess.run(
        [*BROKER, "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def _one_line(done: subprocess.CompletedProcess[str], *texts: str) -> str:
    """The refusal: exit 1, one line on stderr naming ``texts``, nothing bound."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: error:"), lines
    for text in texts:
        assert text in lines[0], lines[0]
    assert "listening" not in done.stdout + done.stderr
    return lines[0]


def test_a_second_broker_on_a_busy_port_fails_to_start(tmp_path: Path) -> None:
    """gRPC's default SO_REUSEPORT would let the second share the port and take
    half the calls into a database of its own; the metrics port is checked too."""
    first, target = start_broker(str(tmp_path / "a.db"))
    port = target.rsplit(":", 1)[1]
    try:
        busy = _serve("--port", port, "--metrics-port", "0", "--database", str(tmp_path / "b.db"))
        _one_line(busy, f"127.0.0.1:{port}", "in use", "--port (BROKER_PORT)")
        metrics = _serve(
            "--port", "0", "--metrics-port", port, "--database", str(tmp_path / "c.db")
        )
        _one_line(metrics, f"127.0.0.1:{port}", "in use", "--metrics-port (BROKER_METRICS_PORT)")
        with Client(target, timeout=5) as client:  # the first one still serves
            assert client.list_jobs().jobs == ()
    finally:
        first.signal(signal.SIGTERM)
        assert first.wait() == 0, first.output


def test_a_second_broker_on_the_same_sqlite_file_fails_naming_the_holder(tmp_path: Path) -> None:
    database = str(tmp_path / "broker.db")
    first, target = start_broker(database)
    holder = f"in use by broker pid {first.proc.pid} on {socket.gethostname()}"
    try:
        _one_line(_serve("--port", "0", "--metrics-port", "0", "--database", database), holder)
        # Through another name of the same file, too.
        os.symlink(database, tmp_path / "alias.db")
        alias = str(tmp_path / "alias.db")
        _one_line(_serve("--port", "0", "--metrics-port", "0", "--database", alias), holder)
        # migrate would change the schema under the running broker: refused alike.
        migrate = subprocess.run(
            [*BROKER, "migrate", "--database", database], capture_output=True, text=True, timeout=30
        )
        _one_line(migrate, holder)
        with Client(target, timeout=5) as client:
            client.submit("kept", None)
    finally:
        first.signal(signal.SIGTERM)
        assert first.wait() == 0, first.output
    # The lock goes with its holder: the file opens again at once.
    again, target = start_broker(database)
    try:
        with Client(target, timeout=5) as client:
            assert [j.task for j in client.list_jobs().jobs] == ["kept"]
    finally:
        again.kill()  # even a killed broker leaves no lock behind
    migrated = subprocess.run(
        [*BROKER, "migrate", "--database", database], capture_output=True, text=True, timeout=30
    )
    assert migrated.returncode == 0, migrated.stderr


@pytest.mark.parametrize(
    ("args", "env", "texts"),
    [
        ([], {"BROKER_PORT": "abc"}, ["BROKER_PORT='abc' is not a whole number"]),
        (["--port", "70000"], {}, ["--port (BROKER_PORT) must be a port from 0 to 65535"]),
        (["--lease-seconds", "-1"], {}, ["--lease-seconds (BROKER_LEASE_SECONDS) must be more"]),
        ([], {"BROKER_RETENTION_SECONDS": "nan"}, ["BROKER_RETENTION_SECONDS='nan' is not"]),
        (["--max-payload-bytes", "0"], {}, ["--max-payload-bytes"]),
        (["--max-payload-bytes", str(33 << 20)], {}, ["--max-payload-bytes", "33554432"]),
        (["--host", "no-such-host.invalid"], {}, ["no-such-host.invalid", "--host (BROKER_HOST)"]),
        (
            ["--host", "0.0.0.0"],
            {},
            ["0.0.0.0 is reachable from other machines", "--auth (BROKER_AUTH)", "--insecure"],
        ),
        ([], {"BROKER_AUTH": "maybe"}, ["BROKER_AUTH='maybe' is not true or false"]),
        (["--tls-cert", "{tmp}/cert.pem"], {}, ["--tls-cert (BROKER_TLS_CERT) and --tls-key"]),
        (["--tls-client-ca", "{tmp}/ca.pem"], {}, ["--tls-client-ca", "give --tls-cert"]),
        (
            ["--tls-cert", "{tmp}/none.pem", "--tls-key", "{tmp}/none.pem"],
            {},
            ["--tls-cert (BROKER_TLS_CERT) '{tmp}/none.pem': No such file or directory"],
        ),
        (
            ["--database", "{tmp}/no/such/dir/broker.db"],
            {},
            ["cannot open database", "the directory {tmp}/no/such/dir does not exist"],
        ),
        (
            ["--database", "postgresql://jobs:secret@127.0.0.1:1/jobs"],
            {},
            ["cannot open database postgresql://jobs:***@127.0.0.1:1/jobs"],
        ),
    ],
)
def test_a_start_up_failure_is_one_line_naming_the_thing(
    tmp_path: Path, args: list[str], env: dict[str, str], texts: list[str]
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    database = [] if "--database" in args else ["--database", str(tmp_path / "broker.db")]
    port = [] if "BROKER_PORT" in env else ["--port", "0"]
    done = _serve(*port, "--metrics-port", "0", *database, *args, env=env)
    line = _one_line(done, *(t.replace("{tmp}", str(tmp_path)) for t in texts))
    assert "secret" not in line


# --- health tells the truth ---


def _health(target: str) -> set[int]:
    """The broker's health statuses, for "" and for the Broker service."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", "jobbroker.v1.Broker")
        }


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_health(target: str, status: int, timeout: float = 15) -> None:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    wait_for(lambda: _health(target) == {status}, timeout=timeout, what=f"health {name}")


def test_health_probe_reports_each_change_once_and_outwaits_a_hung_write(tmp_path: Path) -> None:
    """run_once on a real store: a write held up by another process's lock
    turns health off after the probe's timeout, without a second write piling
    up behind it; the write's end turns it back on. One call per change."""
    path = tmp_path / "broker.db"
    changes: list[bool] = []

    async def record(serving: bool) -> None:
        changes.append(serving)

    async def scenario() -> list[bool]:
        store = open_store(str(path))
        await store.migrate()
        probe = StoreHealth(store, SystemClock(), record, timeout=timedelta(milliseconds=200))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            seen = [await probe.run_once()]
            other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a hung database would
            seen += [await probe.run_once(), await probe.run_once()]
            other.execute("COMMIT")
            deadline = time.monotonic() + 10
            while not await probe.run_once():  # the held write ends, then a new one passes
                assert time.monotonic() < deadline, "health never came back"
                await asyncio.sleep(0.05)
            seen.append(True)
            return seen
        finally:
            other.close()
            await store.close()

    assert asyncio.run(scenario()) == [True, False, False, True]
    assert changes == [False, True]


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")


def _write_until_full(path: Path) -> None:
    block = b"\0" * (1024 * 1024)
    with path.open("wb") as f:
        while True:
            f.write(block)
            f.flush()


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    with pytest.raises(OSError, match="No space left") as full:
        _write_until_full(filler)
    assert full.value.errno == errno.ENOSPC
    return filler


def _health_follows(
    database: str, harm: Callable[[], object], heal: Callable[[], object], heal_within: float
) -> str:
    """A broker on ``database`` is SERVING, NOT_SERVING once ``harm`` has run,
    SERVING again after ``heal`` and takes a submit, staying up throughout and
    logging each change once; return its output."""
    proc, target = start_broker(database)
    try:
        _wait_health(target, SERVING)
        harm()
        _wait_health(target, NOT_SERVING)
        assert proc.proc.poll() is None, proc.output
        heal()
        _wait_health(target, SERVING, timeout=heal_within)
        with Client(target, timeout=10) as client:
            client.submit("after", None)
        assert proc.proc.poll() is None, proc.output
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output
    assert proc.output.count("health is NOT_SERVING") == 1, proc.output
    assert proc.output.count("health is SERVING") == 1, proc.output
    return proc.output


def test_health_is_not_serving_while_the_sqlite_disk_is_full(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "32m")
    try:
        filler = disk / "filler"
        output = _health_follows(
            str(disk / "broker.db"), lambda: _fill(disk), filler.unlink, heal_within=15
        )
        assert "disk is full" in output
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


@pytest.mark.postgres
def test_health_is_not_serving_while_postgres_is_cut_off(postgres_schema: str) -> None:
    proxy = CuttableProxy("127.0.0.1:" + str(urlsplit(postgres_schema).port or 5432))
    try:
        _health_follows(proxy.dsn(postgres_schema), proxy.cut, proxy.restore, heal_within=30)
    finally:
        proxy.close()

"""Faults of the store are weathered, not passed on.

A real ``broker serve`` and a real ``broker worker`` process: the broker's
PostgreSQL connections are cut for 10 s during a drain, and the disk under its
SQLite file fills up. Callers hear UNAVAILABLE or RESOURCE_EXHAUSTED in the
broker's own words, the worker stays up and reports what it held once the
store is back, and nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import sqlalchemy.exc

from jobbroker import (
    BrokerUnavailableError,
    Client,
    DeadlineExceededError,
    JobRequest,
    JobState,
    ResourceExhaustedError,
    Worker,
)
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.domain.errors import StorageFull, StoreUnavailable
from jobbroker_server.store import faults
from jobbroker_server.testing import BrokerThread
from tests import crash_tasks
from tests.conftest import FAST
from tests.listing import all_jobs
from tests.pgproxy import CuttableProxy
from tests.processes import BROKER, Process, start_broker
from tests.waiting import wait_for

BROKE = "lease stream broke"  # the worker's log line for each failed stream
DRIVER_WORDS = re.compile(r"SELECT|INSERT|UPDATE|sqlalchemy|asyncpg|sqlite3|\[SQL", re.IGNORECASE)


# --- helpers ---


def runs(log: Path) -> Counter[str]:
    """How many times each job's handler ran to its end (crash_tasks.record)."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


class Procs:
    """The processes a test starts; a failed wait shows what they printed."""

    def __init__(self) -> None:
        self.named: dict[str, Process] = {}

    def add(self, name: str, proc: Process) -> Process:
        self.named[name] = proc
        return proc

    def worker(self, target: str, concurrency: int = 4) -> Process:
        args = ["worker", "tests.crash_tasks", "--target", target]
        return self.add("worker", Process([*BROKER, *args, "--concurrency", str(concurrency)]))

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_for(check, timeout=timeout, what=what)
        except AssertionError as error:
            shown = [f"--- {name}:\n{p.output[-5000:]}" for name, p in self.named.items()]
            raise AssertionError("\n".join([str(error), *shown])) from None

    def alive(self, name: str) -> None:
        proc = self.named[name]
        assert proc.proc.poll() is None, f"the {name} exited:\n{proc.output[-5000:]}"


@pytest.fixture
def procs() -> Iterator[Procs]:
    running = Procs()
    yield running
    for proc in running.named.values():
        proc.kill()


def _all_ran_and_succeeded(
    procs: Procs, client: Client, log: Path, acked: list[str], *, since: float
) -> float:
    """Wait until every acknowledged job ran and succeeded; return how long
    after ``since`` the last one ran. The run log first: a listing of every
    job, polled, would slow the drain."""
    procs.wait_for(lambda: runs(log).keys() >= set(acked), 60, "every job to run")
    resumed = time.monotonic() - since
    procs.wait_for(
        lambda: all_jobs(client, "crash", [JobState.SUCCEEDED]).keys() >= set(acked),
        10,
        "every acknowledged job to succeed",
    )
    return resumed


def submit_spec(log: Path) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(queue="crash", task=crash_tasks.record.name)
    spec.payload.data = f'"{log}"'.encode()
    spec.payload.content_type = "application/json"
    spec.idempotency_key = str(uuid.uuid4())
    return spec


def raw_submit(target: str, spec: job_pb2.JobSpec) -> grpc.RpcError:
    """A Submit straight over gRPC, no SDK retry; the error it ended with."""
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        try:
            stub.Submit(broker_pb2.SubmitRequest(job=spec), timeout=20)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the submit was accepted")


def reason_of(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "jobbroker-reason":
            return str(value)
    return None


# --- PostgreSQL cut off for 10 s ---

OUTAGE = 10.0


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_postgres_cut_for_10s_during_a_drain(
    postgres_schema: str, tmp_path: Path, procs: Procs
) -> None:
    upstream = urlsplit(postgres_schema)
    proxy = CuttableProxy(f"{upstream.hostname or '127.0.0.1'}:{upstream.port or 5432}")
    try:
        broker, target = start_broker(proxy.dsn(postgres_schema))
        procs.add("broker", broker)
        log = tmp_path / "runs.log"
        with Client(target, timeout=30) as client:
            acked = [
                h.id for h in client.submit_many([JobRequest(crash_tasks.record, str(log))] * 2000)
            ]
            procs.worker(target)
            procs.wait_for(lambda: sum(runs(log).values()) >= 300, 60, "the drain to get going")

            proxy.cut()
            cut_at = time.monotonic()
            # Straight over gRPC: UNAVAILABLE, the broker's reason, our words.
            refused = raw_submit(target, submit_spec(log))
            assert refused.code() is grpc.StatusCode.UNAVAILABLE, refused
            assert reason_of(refused) == "STORE_UNAVAILABLE"
            assert "database cannot be reached" in (refused.details() or "")
            assert not DRIVER_WORDS.search(refused.details() or ""), refused.details()
            # Through the SDK: retried within its deadline, stored once the store is back.
            late: list[tuple[str, float]] = []
            submitter = threading.Thread(
                target=lambda: late.append(
                    (client.submit(crash_tasks.record, str(log)).id, time.monotonic())
                )
            )
            submitter.start()
            # A wait for the job drained last outlasts the cut too.
            last: list[JobState] = []
            waiter = threading.Thread(
                target=lambda: last.extend(j.state for j in client.wait_job(acked[-1], timeout=90))
            )
            waiter.start()
            procs.wait_for(lambda: BROKE in procs.named["worker"].output, OUTAGE, "a broken stream")
            ran_during = sum(runs(log).values())
            procs.wait_for(lambda: time.monotonic() - cut_at >= OUTAGE, OUTAGE + 5, "the outage")
            procs.alive("worker")
            proxy.restore()
            restored_at = time.monotonic()

            submitter.join(30)
            assert late, "the submit made during the outage failed"
            assert late[0][1] >= restored_at
            acked.append(late[0][0])
            resumed = _all_ran_and_succeeded(procs, client, log, acked, since=restored_at)
            waiter.join(30)
            assert last and last[-1] is JobState.SUCCEEDED, last
        procs.alive("worker")
        faults = broker.output.count("database fault")
        reconnects = procs.named["worker"].output.count(BROKE)
        print(
            f"\nPostgreSQL cut for {OUTAGE:.0f}s: {len(acked)} jobs acknowledged, all "
            f"succeeded ({len(runs(log))} ran, {sum(runs(log).values()) - len(runs(log))} "
            f"more than once); {ran_during} had run when the worker's stream broke; all ran "
            f"{resumed:.1f}s after the restore; {reconnects} failed worker streams; "
            f"{faults} fault lines and {broker.output.count('Traceback')} tracebacks in the "
            f"broker's log"
        )
        assert faults <= 6, "the broker logged a line per failed request"
    finally:
        proxy.close()


# --- SQLite on a full disk ---


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own, unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {detail}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=10)


def fill(path: Path) -> int:
    """Write ``path`` until the disk is full, to its last block; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    written += f.write(b"\0" * size) or 0
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    return written


@pytest.mark.timeout(90)
def test_sqlite_full_disk(small_disk: Path, tmp_path: Path, procs: Procs) -> None:
    broker, target = start_broker(str(small_disk / "broker.db"))
    procs.add("broker", broker)
    log = tmp_path / "runs.log"
    filler = small_disk / "filler"
    with Client(target, timeout=10) as client:
        acked = [
            h.id for h in client.submit_many([JobRequest(crash_tasks.record, str(log))] * 1000)
        ]
        procs.worker(target, concurrency=2)
        procs.wait_for(lambda: sum(runs(log).values()) >= 100, 60, "the drain to get going")
        filled = fill(filler)

        # Submits until one needs space: from then on, RESOURCE_EXHAUSTED.
        # Ballast, in a queue nobody serves, makes the database grow.
        ballast: list[str] = []
        refusal: ResourceExhaustedError | None = None
        for _ in range(400):
            try:
                handle = client.submit("ballast", b"x" * 50_000, queue="ballast")
            except ResourceExhaustedError as error:
                refusal = error
                break
            ballast.append(handle.id)
        assert refusal is not None, "a full disk took 400 more submits"
        assert "disk is full" in refusal.message, refusal.message
        # Large, so that the few pages a failed transaction gives back cannot hold it.
        spec = job_pb2.JobSpec(queue="ballast", task="ballast", idempotency_key=str(uuid.uuid4()))
        spec.payload.data = b"x" * 500_000
        raw = raw_submit(target, spec)
        assert raw.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, raw
        assert reason_of(raw) == "STORAGE_FULL"
        assert not DRIVER_WORDS.search(raw.details() or ""), raw.details()
        # Reads go on; the worker's reports fail and it keeps trying.
        assert client.get_job(acked[0]).state is JobState.SUCCEEDED
        worker = procs.named["worker"]
        # It hears of it, and tries again, and again: the disk stays full.
        procs.wait_for(lambda: worker.output.count(BROKE) >= 3, 30, "three failed streams")
        procs.alive("worker")

        filler.unlink()
        freed_at = time.monotonic()
        acked.append(client.submit(crash_tasks.record, str(log)).id)
        resumed = _all_ran_and_succeeded(procs, client, log, acked, since=freed_at)
        assert all_jobs(client, "ballast").keys() == set(ballast)
    procs.alive("worker")
    print(
        f"\nSQLite disk full ({filled} bytes of filler): {len(acked)} jobs acknowledged, all "
        f"succeeded, and {len(ballast)} ballast jobs stored before the disk was full; "
        f"all ran {resumed:.1f}s after space was freed; "
        f"{worker.output.count(BROKE)} failed worker streams; "
        f"{broker.output.count('database fault')} fault lines and "
        f"{broker.output.count('Traceback')} tracebacks in the broker's log"
    )


# --- the SDK ---


def test_a_message_over_grpcs_default_4_mib_is_received(tmp_path: Path) -> None:
    """The SDK takes what the broker may send: a job of 6 MiB comes back whole,
    by get_job and on a worker's lease stream."""
    settings = replace(FAST, database=str(tmp_path / "broker.db"), max_payload_bytes=8 << 20)
    big = b"\x01" * (6 << 20)
    with BrokerThread(settings) as broker, Client(broker.target, timeout=20) as client:
        handle = client.submit("big", big, queue="big")
        assert client.get_job(handle.id).payload == big
        with client.lease_stream(["big"], prefetch=1) as stream:
            lease = next(iter(stream))
            assert lease.payload() == big
            lease.complete()
        assert handle.status() is JobState.SUCCEEDED


@pytest.mark.timeout(10)
def test_a_worker_refuses_an_empty_queue_name_before_connecting() -> None:
    worker = Worker(target="127.0.0.1:1", queues=["default", " "])
    with pytest.raises(ValueError, match="queue names must not be empty"):
        asyncio.run(worker.run_async())


@pytest.mark.timeout(30)
def test_a_call_to_a_broker_that_is_away_is_retried_within_its_deadline(tmp_path: Path) -> None:
    """UNAVAILABLE is retried until the call's deadline, then raised."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=3) as client:
        began = time.monotonic()
        with pytest.raises((BrokerUnavailableError, DeadlineExceededError)):
            client.get_job("0190d8a4-0000-7000-8000-000000000000")
        took = time.monotonic() - began
    assert 1.9 <= took <= 4.0, took


# --- telling faults from errors ---


def _sqlite_error(uri: str, sql: str) -> sqlite3.Error:
    """The driver's own error for ``sql`` on the database at ``uri``."""
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            conn.execute(sql)
        finally:
            conn.close()
    except sqlite3.Error as error:
        return error
    raise AssertionError(f"{sql} did not fail")


def test_driver_errors_that_mean_the_store_is_away_are_told_apart(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "f.db").execute("CREATE TABLE t (x)").connection.close()
    read_only = _sqlite_error(f"file:{tmp_path / 'f.db'}?mode=ro", "INSERT INTO t VALUES (1)")
    assert isinstance(faults.translate(read_only), StoreUnavailable)
    assert "read-only" in str(faults.translate(read_only))
    wrapped = sqlalchemy.exc.OperationalError("INSERT INTO t VALUES (?)", (1,), read_only)
    assert isinstance(faults.translate(wrapped), StoreUnavailable)
    cannot_open = _sqlite_error(f"file:{tmp_path / 'none' / 'f.db'}", "SELECT 1")
    assert isinstance(faults.translate(cannot_open), StoreUnavailable)
    refused = ConnectionRefusedError(111, "Connect call failed")
    assert isinstance(faults.translate(refused), StoreUnavailable)
    # A request's own error is left to the caller's handling.
    no_table = _sqlite_error(f"file:{tmp_path / 'f.db'}", "SELECT * FROM missing")
    assert faults.translate(no_table) is None
    assert faults.translate(ValueError("bad")) is None
    assert faults.translate(StorageFull("x")) is None  # already ours


def test_a_fault_is_logged_once_per_kind_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = faults.FaultLog(every=60)
    error = sqlalchemy.exc.OperationalError("SELECT secret FROM t", {}, ConnectionResetError())
    with caplog.at_level("WARNING", logger=faults.log.name):
        for _ in range(100):
            log.report(StoreUnavailable(faults.UNREACHABLE), error)
        log.report(StorageFull(faults.DISK_FULL), error)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "ConnectionResetError" in lines[0] and "secret" not in lines[0]

"""Many broker replicas on one PostgreSQL schema, as real processes.

Three ``broker serve`` processes share one schema; producer threads, each
with its own Client, and three ``broker worker`` processes are spread over
them. Each Client and worker is given every replica's address, its own
replica first (``ipv4:A,B,C``): grpc's pick_first connects to the first
address that answers, so they spread while all replicas live and fail over
when one dies. What the tests check comes from the database itself (the
``jobs`` and ``attempts`` tables, read with asyncpg) and from the run log the
handlers append to.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from jobbroker import BrokerUnavailableError, Client, DeadlineExceededError, JobRequest, chord
from jobbroker.v1 import broker_pb2, broker_pb2_grpc
from tests import replica_tasks
from tests import workflow_tasks as wf
from tests.processes import BROKER, Process, start_broker
from tests.waiting import wait_for

JOBS = 20_000  # submitted by the first test, in all
KILL_JOBS = 10_000  # submitted by the replica-kill test
REPLICAS = 3
WORKERS = 3
PRODUCERS = 3
BATCH = 500  # jobs per submit_many
SINGLES = 10  # single submits after each batch
CONCURRENCY = 8  # handlers per worker process
BACKLOG = 4_000  # producers wait while this many submitted jobs have not run
LEASE_SECONDS = 3
BROKE = "lease stream broke"  # the worker's log line for a failed stream or reconnect
ROOT = Path(__file__).resolve().parent.parent


def runs(log: Path) -> int:
    """How many handler runs the run log holds (its lines have one size)."""
    try:
        return log.stat().st_size // replica_tasks.LINE_BYTES
    except FileNotFoundError:
        return 0


def run_lines(log: Path, offset: int = 0) -> list[tuple[str, int]]:
    """(job id, pid) of each run in the log, from a byte offset on."""
    with log.open("rb") as f:
        f.seek(offset)
        return [
            (job, int(pid))
            for job, pid in (line.split() for line in f.read().decode().splitlines())
        ]


class Database:
    """A blocking asyncpg connection to the schema the replicas share."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema")
        plain = urlunsplit(parts._replace(query=urlencode(query)))
        self._runner = asyncio.Runner()
        self._conn = self._runner.run(
            asyncpg.connect(plain, timeout=10, server_settings={"search_path": schema})
        )

    def fetch(self, sql: str, *args: object) -> list[Any]:
        return list(self._runner.run(self._conn.fetch(sql, *args)))

    def value(self, sql: str, *args: object) -> Any:
        return self._runner.run(self._conn.fetchval(sql, *args))

    def close(self) -> None:
        self._runner.run(self._conn.close())
        self._runner.close()

    def succeeded(self) -> int:
        return int(self.value("SELECT count(*) FROM jobs WHERE state = 'succeeded'"))


class Cluster:
    """The replicas and workers a test starts; waits that time out show their output."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.procs: list[Process] = []
        self.names: list[str] = []  # what each of procs is, for failure messages
        self.replicas: list[Process] = []
        self.ports: list[str] = []
        self.workers: list[Process] = []

    def start(self) -> None:
        """REPLICAS replicas, then WORKERS workers; worker i connects to replica
        i % REPLICAS first."""
        self.start_replicas(REPLICAS)
        for i in range(WORKERS):
            self.start_worker(i % REPLICAS)

    def start_replicas(self, count: int) -> None:
        # The first creates the schema; the others find it there.
        for _ in range(count):
            proc, target = start_broker(self.database, "--lease-seconds", str(LEASE_SECONDS))
            self.procs.append(proc)
            self.names.append(f"replica {len(self.replicas)} on {target}")
            self.replicas.append(proc)
            self.ports.append(target.rsplit(":", 1)[1])

    def target(self, first: int) -> str:
        """Every replica's address, replica ``first`` first: where pick_first connects."""
        ports = self.ports[first:] + self.ports[:first]
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)

    def start_worker(self, first: int, tasks: str = "tests.replica_tasks") -> Process:
        args = ["worker", tasks, "--target", self.target(first)]
        proc = Process([*BROKER, *args, "--concurrency", str(CONCURRENCY)], cwd=ROOT)
        self.procs.append(proc)
        self.names.append(f"worker {len(self.workers)} to {self.target(first)}")
        self.workers.append(proc)
        return proc

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_for(check, timeout=timeout, what=what)
        except AssertionError as error:
            named = zip(self.names, self.procs, strict=True)
            shown = [f"--- {name}:\n{proc.output[-3000:]}" for name, proc in named]
            raise AssertionError("\n".join([str(error), *shown])) from None


@pytest.fixture
def cluster(postgres_schema: str) -> Iterator[Cluster]:
    running = Cluster(postgres_schema)
    yield running
    for proc in running.procs:
        proc.kill()  # before the schema is dropped


@pytest.fixture
def db(postgres_schema: str) -> Iterator[Database]:
    database = Database(postgres_schema)
    yield database
    database.close()


class Producer:
    """Submits ``count`` jobs from its own thread: batches, then a few single submits.

    Every job carries its own idempotency key, so a call that failed while a
    replica died is repeated as it was and cannot store a job twice; an id
    counts once its submit returned. Producers wait while ``ahead()`` says
    they are ``BACKLOG`` jobs ahead of the workers, so producing and running
    overlap for the whole test.
    """

    def __init__(self, target: str, log: Path, count: int, ahead: Callable[[], int]) -> None:
        self.acked: list[str] = []
        self.retried = 0
        self.error: BaseException | None = None
        self._target, self._log, self._count, self._ahead = target, log, count, ahead
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "a producer is stuck"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            with Client(self._target, timeout=10) as client:
                while len(self.acked) < self._count:
                    wait_for(lambda: self._ahead() < BACKLOG, timeout=120, what="workers")
                    self._batch(client, min(BATCH, self._count - len(self.acked)))
                    for _ in range(min(SINGLES, self._count - len(self.acked))):
                        self._single(client)
        except BaseException as error:
            self.error = error

    def _request(self) -> JobRequest:
        key = str(uuid.uuid4())
        return JobRequest(replica_tasks.record, str(self._log), idempotency_key=key)

    def _batch(self, client: Client, size: int) -> None:
        requests = [self._request() for _ in range(size)]
        handles = self._retrying(lambda: client.submit_many(requests))
        self.acked.extend(h.id for h in handles)

    def _single(self, client: Client) -> None:
        request = self._request()
        key = request.idempotency_key
        handle = self._retrying(
            lambda: client.submit(replica_tasks.record, str(self._log), idempotency_key=key)
        )
        self.acked.append(handle.id)

    def _retrying(self, call: Callable[[], Any]) -> Any:
        while True:
            try:
                return call()
            except (BrokerUnavailableError, DeadlineExceededError):
                self.retried += 1  # the SDK's own retries ran out while a replica died
                time.sleep(0.05)


def start_producers(cluster: Cluster, log: Path, jobs: int) -> list[Producer]:
    producers: list[Producer] = []

    def ahead() -> int:
        return sum(len(p.acked) for p in producers) - runs(log)

    shares = [jobs // PRODUCERS + (i < jobs % PRODUCERS) for i in range(PRODUCERS)]
    for i, share in enumerate(shares):
        producers.append(Producer(cluster.target(i % REPLICAS), log, share, ahead))
    for producer in producers:
        producer.start()
    return producers


def acknowledged(producers: list[Producer]) -> set[str]:
    for producer in producers:
        producer.join(60)
        assert producer.error is None, repr(producer.error)
    acked = [job_id for p in producers for job_id in p.acked]
    assert len(set(acked)) == len(acked), "one id acknowledged for two submits"
    return set(acked)


def check_attempts(db: Database, acked: set[str]) -> dict[str, int]:
    """Assert the delivery promise on the tables; return attempt figures."""
    stored = {row["id"] for row in db.fetch("SELECT id FROM jobs")}
    assert not acked - stored, f"acknowledged but not stored: {sorted(acked - stored)[:5]}"
    assert not stored - acked, f"stored but never acknowledged: {sorted(stored - acked)[:5]}"
    states = dict(db.fetch("SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"succeeded": len(acked)}, states

    not_once = db.fetch(
        """SELECT j.id, count(a.job_id) FILTER (WHERE a.outcome = 'succeeded') AS ok
           FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id
           GROUP BY j.id HAVING count(a.job_id) FILTER (WHERE a.outcome = 'succeeded') <> 1"""
    )
    assert not not_once, f"jobs without exactly one succeeded attempt: {not_once[:5]}"

    # Sorted by start, an attempt must end before the next one starts: then
    # no two of a job's attempts were ever leased at the same time.
    overlapping = db.fetch(
        """SELECT * FROM (
             SELECT job_id, fencing_token, started_at, finished_at,
                    lag(fencing_token) OVER w AS prev_token,
                    lag(finished_at) OVER w AS prev_finished
             FROM attempts WINDOW w AS (PARTITION BY job_id ORDER BY started_at, fencing_token)
           ) s
           WHERE finished_at IS NULL OR finished_at < started_at
              OR (prev_token IS NOT NULL AND prev_finished > started_at)"""
    )
    assert not overlapping, f"attempts open or overlapping: {overlapping[:5]}"
    reused = db.fetch(
        """SELECT job_id FROM attempts GROUP BY job_id
           HAVING count(DISTINCT fencing_token) <> count(*) OR count(DISTINCT number) <> count(*)"""
    )
    assert not reused, f"a fencing token or attempt number used twice: {reused[:5]}"

    figures = {
        f"attempts {outcome}": n
        for outcome, n in db.fetch(
            "SELECT outcome, count(*) FROM attempts GROUP BY outcome ORDER BY outcome"
        )
    }
    figures["attempts per job max"] = db.value(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM attempts GROUP BY job_id) s"
    )
    return figures


def succeeded_by_worker(db: Database) -> Counter[int]:
    """Succeeded attempts per worker pid (the worker id is host-pid-random)."""
    rows = db.fetch(
        "SELECT worker_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY worker_id"
    )
    return Counter({int(worker_id.rsplit("-", 2)[-2]): n for worker_id, n in rows})


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_replicas_share_one_database(cluster: Cluster, db: Database, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    cluster.start()

    started = time.monotonic()
    producers = start_producers(cluster, log, JOBS)
    cluster.wait_for(lambda: all(p.done for p in producers), 240, "the producers to finish")
    acked = acknowledged(producers)
    assert len(acked) == JOBS
    cluster.wait_for(lambda: db.succeeded() >= JOBS, 240, "every job to succeed")
    wall = time.monotonic() - started

    figures = check_attempts(db, acked)
    ran = Counter(job for job, _ in run_lines(log))
    assert set(ran) == acked, "a job succeeded without running, or an unknown job ran"
    by_worker = succeeded_by_worker(db)
    pids = sorted(w.proc.pid for w in cluster.workers)
    assert sorted(by_worker) == pids and min(by_worker.values()) > 0, (by_worker, pids)
    print(
        f"\nreplicas: {JOBS} jobs, {REPLICAS} replicas, {WORKERS} workers x {CONCURRENCY}, "
        f"{PRODUCERS} producers (submit_many x{BATCH} + {SINGLES} submits per batch), "
        f"wall {wall:.1f} s, {JOBS / wall:.0f} jobs/s; "
        f"{', '.join(f'{k} {v}' for k, v in figures.items())}; "
        f"succeeded per worker {sorted(by_worker.values())}; "
        f"jobs run more than once {sum(1 for n in ran.values() if n > 1)}"
    )


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_killed_replica_loses_no_job(cluster: Cluster, db: Database, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    cluster.start()

    started = time.monotonic()
    producers = start_producers(cluster, log, KILL_JOBS)
    # Mid-run: a third of the jobs have run, producers are still submitting.
    cluster.wait_for(lambda: runs(log) >= KILL_JOBS // 3, 120, "a third of the jobs to run")
    victim, orphan = cluster.replicas[0], cluster.workers[0]  # worker 0 connects to replica 0
    killed_offset = runs(log) * replica_tasks.LINE_BYTES  # what ran before the kill, at least
    victim.kill()
    killed_at = datetime.now(UTC)  # a lease that starts after this was made by another replica
    assert not all(p.done for p in producers), "the producers finished before the kill"

    cluster.wait_for(lambda: BROKE in orphan.output, 60, "the worker to notice the kill")
    cluster.wait_for(lambda: all(p.done for p in producers), 240, "the producers to finish")
    acked = acknowledged(producers)
    assert len(acked) == KILL_JOBS
    cluster.wait_for(lambda: db.succeeded() >= len(acked), 240, "every job to succeed")
    wall = time.monotonic() - started

    figures = check_attempts(db, acked)
    assert set(Counter(job for job, _ in run_lines(log))) == acked
    after = Counter(pid for _, pid in run_lines(log, killed_offset))
    assert after[orphan.proc.pid] > 0, f"the killed replica's worker ran nothing after: {after}"
    # Leased after the kill, so by a replica that is still alive.
    leased_after = db.value(
        "SELECT count(*) FROM attempts WHERE worker_id LIKE $1 AND started_at > $2",
        f"%-{orphan.proc.pid}-%",
        killed_at,
    )
    assert leased_after > 0, "the killed replica's worker leased nothing from another replica"
    carried = db.value(  # leased from the killed replica, reported through another
        """SELECT count(*) FROM attempts WHERE worker_id LIKE $1 AND started_at < $2
           AND finished_at > $2 AND outcome = 'succeeded'""",
        f"%-{orphan.proc.pid}-%",
        killed_at,
    )
    assert all(w.proc.poll() is None for w in cluster.workers), orphan.output[-3000:]
    print(
        f"\nreplica kill: {len(acked)} jobs, {REPLICAS} replicas (one killed after "
        f"{killed_offset // replica_tasks.LINE_BYTES} runs), {WORKERS} workers, wall {wall:.1f} s; "
        f"{', '.join(f'{k} {v}' for k, v in figures.items())}; "
        f"the killed replica's worker: {after[orphan.proc.pid]} runs and {leased_after} leases "
        f"after the kill, {carried} leases carried across it, "
        f"{orphan.output.count(BROKE)} failed connections; "
        f"producer calls repeated {sum(p.retried for p in producers)}"
    )


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_watch_and_a_tail_on_one_replica_see_what_another_wrote(cluster: Cluster) -> None:
    """Events written through replica A reach a WatchJob and a TailEvents
    served by replica B (each replica polls the shared log)."""
    cluster.start_replicas(2)
    on_a = f"127.0.0.1:{cluster.ports[0]}"
    on_b = f"127.0.0.1:{cluster.ports[1]}"
    with grpc.insecure_channel(on_b) as channel, Client(on_a, timeout=10) as producer:
        stub = broker_pb2_grpc.BrokerStub(channel)
        first = producer.submit(replica_tasks.record, "-", queue="watched")
        tail = stub.TailEvents(broker_pb2.TailEventsRequest(queue="watched"), timeout=60)
        watch = stub.WatchJob(broker_pb2.WatchJobRequest(job_id=first.id), timeout=60)
        assert next(watch).reason == "submitted"  # from the log, written through A
        with Client(on_b, timeout=10) as other:  # a second producer, on B
            second = other.submit(replica_tasks.record, "-", queue="watched")
        with producer.lease_stream(["watched"], prefetch=2) as stream:
            for lease in itertools.islice(stream, 2):
                lease.complete(None)
        reasons = [event.reason for event in watch]  # ends at the terminal event
        assert reasons[0] == "leased" and reasons[-1] == "succeeded", reasons
        seen: dict[str, list[str]] = {}
        for event in tail:
            seen.setdefault(event.job_id, []).append(event.reason)
            if sum(r.count("succeeded") for r in seen.values()) == 2:
                break
        tail.cancel()
    assert second.id in seen and "submitted" in seen[second.id]
    assert seen[first.id][-1] == "succeeded"


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_parents_ending_on_different_replicas_release_their_child_once(
    cluster: Cluster, db: Database
) -> None:
    """Chords whose members are completed by workers on different replicas:
    each body is released exactly once, by whichever transaction counted its
    last parent down, and runs once."""
    cluster.start_replicas(REPLICAS)
    for i in range(WORKERS):
        cluster.start_worker(i % REPLICAS, tasks="tests.workflow_tasks")
    with Client(cluster.target(0), timeout=30) as client:
        flows = [chord([wf.process_item.s(i) for i in range(10)], wf.total.s()) for _ in range(60)]
        handles = [client.submit(flow) for flow in flows]
        for handle in handles:
            assert handle.result(timeout=120) == 285
    bodies = {handle.job_ids[-1] for handle in handles}
    released = db.fetch(
        "SELECT job_id, count(*) FROM job_events WHERE reason = 'parents_done' GROUP BY job_id"
    )
    assert dict(released) == dict.fromkeys(bodies, 1)
    once = db.fetch(
        """SELECT a.job_id FROM attempts a WHERE a.outcome = 'succeeded'
           GROUP BY a.job_id HAVING count(*) <> 1"""
    )
    assert not once, once[:5]
    spread = db.value(
        """SELECT count(*) FROM (
             SELECT j.workflow_id FROM jobs j JOIN attempts a ON a.job_id = j.id
             WHERE a.outcome = 'succeeded' AND j.id <> ALL($1::text[])
             GROUP BY j.workflow_id HAVING count(DISTINCT a.worker_id) > 1) s""",
        list(bodies),
    )
    assert spread > 0, "no chord had members completed through two replicas"


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_pause_through_one_replica_holds_on_another(cluster: Cluster) -> None:
    cluster.start_replicas(2)
    on_a = f"127.0.0.1:{cluster.ports[0]}"
    on_b = f"127.0.0.1:{cluster.ports[1]}"
    with Client(on_a, timeout=10) as a, Client(on_b, timeout=10) as b:
        a.pause_queue("held")
        handle = a.submit(replica_tasks.record, "-", queue="held")
        with b.lease_stream(["held", "probe"], prefetch=1) as stream:
            leases = iter(stream)
            probe = b.submit(replica_tasks.record, "-", queue="probe")
            got = next(leases)  # leased after the pause, on B: the held job is not
            assert got.job.id == probe.id
            got.complete(None)
            assert b.explain(handle.id).reason == "paused"
            a.resume_queue("held")
            got = next(leases)  # B's streams look within its poll interval
            assert got.job.id == handle.id
            got.complete(None)

"""The delivery promise under real crashes, SQLite backend.

Every job whose submit was acknowledged ends in exactly one terminal state;
it runs at least once; an outcome reported under a stale lease never
overwrites the current one. Brokers and workers are real processes, killed
with SIGKILL or frozen with SIGSTOP at moments the tests pick from progress,
never from the clock.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import signal
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobbroker import (
    AttemptOutcome,
    BrokerUnavailableError,
    Client,
    DeadlineExceededError,
    Job,
    JobRequest,
    JobState,
)
from tests import crash_tasks
from tests.listing import all_jobs
from tests.processes import BROKER, LISTENING, Process, start_broker
from tests.waiting import wait_for

LEASE_EXPIRED, RELEASED = AttemptOutcome.LEASE_EXPIRED, AttemptOutcome.RELEASED
SUCCEEDED = AttemptOutcome.SUCCEEDED
BROKE = "lease stream broke"  # the worker's log line for a failed stream or reconnect
TERMINAL = [JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED]


class Spawned:
    """The processes a test starts; waits that time out show what they printed."""

    def __init__(self) -> None:
        self.procs: list[Process] = []
        self._names: list[str] = []

    def broker(self, database: str, port: int, *extra: str) -> Process:
        """``broker serve`` on a given port, so that workers find it again after a restart."""
        args = ["serve", "--port", str(port), "--database", database, "--metrics-port", "0"]
        proc = self.add(Process([*BROKER, *args, *extra]), f"broker on port {port}")
        proc.wait_for_line(LISTENING, timeout=30)
        return proc

    def worker(self, target: str, concurrency: int, prefetch: int | None = None) -> Process:
        args = ["worker", "tests.crash_tasks", "--target", target]
        args += ["--concurrency", str(concurrency), "--prefetch", str(prefetch or 4 * concurrency)]
        return self.add(Process([*BROKER, *args]), "worker")

    def add(self, proc: Process, name: str) -> Process:
        self.procs.append(proc)
        self._names.append(f"{name} (pid {proc.proc.pid})")
        return proc

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_for(check, timeout=timeout, what=what)
        except AssertionError as error:
            shown = [
                f"--- {name}:\n{proc.output[-6000:]}"
                for name, proc in zip(self._names, self.procs, strict=True)
            ]
            raise AssertionError("\n".join([str(error), *shown])) from None


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    running = Spawned()
    yield running
    for proc in running.procs:
        proc.kill()  # SIGKILL also ends a stopped process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def runs(log: Path) -> Counter[str]:
    """How many times each job's handler ran to its end, from the run log."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


def trail(job: Job) -> list[tuple[int, AttemptOutcome | None]]:
    return [(int(a.worker_id.rsplit("-", 2)[-2]), a.outcome) for a in job.history]


@pytest.mark.timeout(120)
def test_killed_worker_loses_no_job(tmp_path: Path, spawned: Spawned) -> None:
    broker, target = start_broker(str(tmp_path / "broker.db"), "--lease-seconds", "2")
    spawned.add(broker, "broker")
    log = tmp_path / "runs.log"
    with Client(target, timeout=30) as client:
        handles = client.submit_many([JobRequest(crash_tasks.record, str(log)) for _ in range(200)])
        ids = {h.id for h in handles}
        first = spawned.worker(target, concurrency=4)
        spawned.wait_for(lambda: sum(runs(log).values()) >= 30, 60, "the worker to get going")
        first.kill()
        # Nothing else leases: what is held now was leased to the killed worker
        # (leased; jobs this short end before their Start would go out).
        in_flight = all_jobs(client, "crash", [JobState.LEASED, JobState.RUNNING])
        assert in_flight, "the worker was killed between jobs; nothing to recover"
        assert len(all_jobs(client, "crash", [JobState.SUCCEEDED])) < len(ids)

        second = spawned.worker(target, concurrency=4)
        spawned.wait_for(
            lambda: len(all_jobs(client, "crash", TERMINAL)) == len(ids), 90, "every job to end"
        )
        jobs = {job_id: client.get_job(job_id) for job_id in ids}
    assert {job.state for job in jobs.values()} == {JobState.SUCCEEDED}
    assert not ids - set(runs(log)), "a job succeeded without running"
    a, b = first.proc.pid, second.proc.pid
    done_by_a, done_by_b = [(a, SUCCEEDED)], [(b, SUCCEEDED)]
    expired, released = [(a, LEASE_EXPIRED), *done_by_b], [(a, RELEASED), *done_by_b]
    trails = {job_id: trail(job) for job_id, job in jobs.items()}
    for job_id, steps in trails.items():
        if job_id in in_flight:
            # Run by the killed worker and again by the other after its lease
            # expired; or given back by the broker, which leased it for the
            # dying stream; or finished by a report already on the wire.
            assert steps in (expired, released, done_by_a), (steps, a, b)
        else:
            # A lease made after the snapshot, for a stream the broker had
            # not yet seen die, is given back or expires in the same way.
            assert steps in (done_by_a, done_by_b, released, expired), (steps, a, b)
    assert expired in trails.values(), "no job was running when the worker died"


class Producer:
    """Submits from its own thread; an id counts once its submit returned.

    A submit that fails while the broker is down was never acknowledged; it
    is tried again with the same idempotency key until it is. It stays at
    most ``backlog`` jobs ahead of the worker, so the test ends in seconds.
    """

    def __init__(self, target: str, log: Path, backlog: int = 300) -> None:
        self.acked: list[str] = []
        self.retried = 0
        self.duplicates = 0  # stored by a submit whose answer the crash swallowed
        self.error: BaseException | None = None
        self._target = target
        self._log = log
        self._backlog = backlog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the producer is stuck"

    def _run(self) -> None:
        try:
            with Client(self._target, timeout=5) as client:
                while not self._stop.is_set():
                    if len(self.acked) - sum(runs(self._log).values()) >= self._backlog:
                        self._stop.wait(0.05)  # let the worker catch up
                        continue
                    self._submit(client, str(uuid.uuid4()))
        except BaseException as error:
            self.error = error

    def _submit(self, client: Client, key: str) -> None:
        while not self._stop.is_set():
            try:
                handle = client.submit(crash_tasks.record, str(self._log), idempotency_key=key)
            except (BrokerUnavailableError, DeadlineExceededError):
                self.retried += 1
                self._stop.wait(0.05)  # the broker is down; it is being restarted
                continue
            self.acked.append(handle.id)
            self.duplicates += handle.duplicate
            return


@pytest.mark.timeout(240)
def test_killed_broker_loses_no_acknowledged_job(tmp_path: Path, spawned: Spawned) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    database, port, log = str(tmp_path / "broker.db"), free_port(), tmp_path / "runs.log"
    target = f"127.0.0.1:{port}"
    flags = ("--lease-seconds", "4")
    broker = spawned.broker(database, port, *flags)
    worker = spawned.worker(target, concurrency=4)

    def crash(broker: Process, outage: int, reconnected: bool, producer: Producer) -> Process:
        """Kill the broker at a random moment, after some more submits and,
        unless ``reconnected``, now and then before the worker has reconnected;
        restart it once the worker has failed ``outage`` times to reach it."""
        acked = len(producer.acked) + rng.randint(20, 150)
        # Five more runs than the worker's four slots: it leased from this broker.
        ran = sum(runs(log).values()) + rng.choice([5, 20, 60] if reconnected else [0, 0, 5, 60])
        spawned.wait_for(
            lambda: len(producer.acked) >= acked and sum(runs(log).values()) >= ran,
            60,
            f"{acked} submits and {ran} runs",
        )
        broke = worker.output.count(BROKE) + outage
        broker.kill()
        spawned.wait_for(lambda: worker.output.count(BROKE) >= broke, 60, "the worker to notice")
        return spawned.broker(database, port, *flags)

    # One outage outlives the leases (4 s), so the restarted broker reaps them
    # and refuses the worker's late reports. The worker reconnects before and
    # after that one: it gives up after eight failures in a row.
    outages = rng.sample([0, 0, 1, 4], k=4)
    with Producer(target, log) as producer:
        for before, outage in itertools.pairwise([0, *outages]):
            broker = crash(broker, outage, max(before, outage) > 1, producer)
        acked = len(producer.acked)
        spawned.wait_for(lambda: len(producer.acked) >= acked + 100, 60, "the last submits")
    assert producer.error is None, repr(producer.error)
    acked_ids = set(producer.acked)
    assert len(acked_ids) == len(producer.acked), "one acknowledgement for two submits"

    jobs: dict[str, Job] = {}
    with Client(target, timeout=30) as client:

        def settled() -> bool:
            jobs.clear()
            jobs.update(all_jobs(client, "crash"))
            return all(i in jobs and jobs[i].state.terminal for i in acked_ids)

        with contextlib.suppress(AssertionError):  # the figures below say what is left
            wait_for(settled, timeout=120, what="every acknowledged job to end")

    missing = acked_ids - set(jobs)
    stuck = {i for i in acked_ids - missing if not jobs[i].state.terminal}
    ran = runs(log)
    states = Counter(jobs[i].state.value for i in acked_ids - missing)
    print(
        f"\nbroker crash test (seed {seed}): {len(acked_ids)} acknowledged jobs, "
        f"{len(outages)} broker kills, {len(missing) + len(stuck)} lost "
        f"({len(missing)} missing, {len(stuck)} not ended); end states {dict(states)}; "
        f"{sum(1 for i in acked_ids if ran[i] > 1)} jobs ran more than once; "
        f"{producer.retried} submits retried by the producer "
        f"({producer.duplicates} found already stored); "
        f"{worker.output.count(BROKE)} failed worker connections; "
        f"{len(set(jobs) - acked_ids)} stored jobs never acknowledged"
    )
    assert not missing, f"acknowledged but not stored: {sorted(missing)[:5]}"
    assert worker.proc.poll() is None, "the worker is gone:\n" + worker.output[-6000:]
    assert not stuck, f"not ended: {[(i, jobs[i].state) for i in sorted(stuck)[:5]]}"
    assert states == {"succeeded": len(acked_ids)}
    assert not acked_ids - set(ran), "a job succeeded without running"


@pytest.mark.timeout(120)
def test_frozen_workers_late_outcome_is_refused(tmp_path: Path, spawned: Spawned) -> None:
    broker, target = start_broker(str(tmp_path / "broker.db"), "--lease-seconds", "2")
    spawned.add(broker, "broker")
    # Default window: once its lease expires the broker leases nothing more to
    # the frozen worker until it shows life, so the retry goes to the other.
    frozen = spawned.worker(target, concurrency=1)
    with Client(target, timeout=30) as client:
        handle = client.submit(crash_tasks.linger, str(tmp_path))
        marker = tmp_path / f"started-{frozen.proc.pid}"
        spawned.wait_for(marker.exists, 60, "the first worker to start the job")
        frozen.proc.send_signal(signal.SIGSTOP)  # mid-handler: no heartbeats, no report

        thawed = spawned.worker(target, concurrency=1)
        spawned.wait_for(
            lambda: handle.status() is JobState.SUCCEEDED, 60, "the second worker to run the job"
        )
        assert client.get_job(handle.id).result_json() == {"pid": thawed.proc.pid}

        frozen.proc.send_signal(signal.SIGCONT)
        # Its heartbeat, its report of the cancelled attempt or its completion,
        # whichever reaches the broker first, is refused, and the worker says so.
        refused = re.compile(
            rf"lost the lease on job {handle.id}|job {handle.id}: outcome not recorded"
        )
        frozen.wait_for_line(refused, timeout=60)
        assert frozen.proc.poll() is None, frozen.output

        job = client.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED
    assert job.result_json() == {"pid": thawed.proc.pid}
    assert trail(job) == [(frozen.proc.pid, LEASE_EXPIRED), (thawed.proc.pid, SUCCEEDED)]

"""Benchmark a real broker: `.venv/bin/python scripts/bench.py [--runs 3] [--json out.json]`.

Starts real `broker serve` and `broker worker bench_tasks` processes, measures the
workloads below against a fresh broker and database each, and prints one table:
median, min and max over --runs, the target, and the ratio to a gRPC "wall"
(an empty grpcio server measured in the same run, so a slow machine shows as a
slow wall rather than as a regression).

  W1   one thread, client.submit one by one
  W1c  16 threads sharing one Client, submit one by one
  W1b  one thread, client.submit_many in batches of 500
  W2   queued jobs drained by one `broker worker` at its defaults
  W2k  W2 with every job under one of 100 concurrency keys, 4 of each at once
  W3   50 jobs/s to an idle worker: submit -> handler start latency
  W4   16 submitting threads and one worker together: completed jobs/s, p99 latency
  MEM  broker RSS over a long W4-style run with --retention-seconds 5 (once, not per run)

Every throughput run stops early after --budget seconds; the job counts used are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bench_tasks
import grpc

from jobbroker import Client, Job, JobRequest, chord

HERE = Path(__file__).resolve().parent
BROKER = [sys.executable, "-m", "jobbroker_server"]
QUEUE = "bench"  # bench_tasks.QUEUE
NOOP = "bench_tasks.noop"
STAMP = "bench_tasks.stamp"
THREADS = 16
STAMP_EVERY = 20  # W4: one job in this many records its latency
MEMORY_BACKLOG = 5_000  # MEM: the producer waits while this many jobs are unfinished
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")
WALL_SERVICE = "bench.Wall"


@dataclass(frozen=True)
class Sizes:
    w1_jobs: int = 20_000
    w1c_jobs: int = 20_000
    w1b_jobs: int = 100_000
    batch: int = 500
    w2_jobs: int = 20_000
    w3_rate: float = 50.0
    w3_seconds: float = 10.0
    w4_seconds: float = 60.0
    wf_members: int = 10_000
    memory_jobs: int = 1_000_000
    memory_seconds: float = 90.0
    wall_calls: int = 3_000
    budget: float = 15.0  # seconds one run of a throughput workload may take


QUICK = Sizes(
    w1_jobs=300,
    w1c_jobs=320,
    w1b_jobs=2_000,
    w2_jobs=300,
    w3_seconds=2.0,
    w4_seconds=3.0,
    wf_members=300,
    memory_jobs=3_000,
    memory_seconds=10.0,
    wall_calls=300,
    budget=20.0,
)


# --- figures and results ---


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    unit: str
    target: float | None  # None: a wall, no target
    higher_is_better: bool = True
    wall: str | None = None  # the wall figure this one is compared with


RTT = "wall.rtt"  # the stream pair round trip in ms, derived from wall.pairs
SPECS = (
    Spec("wall.unary", "wall: unary calls one after another", "calls/s", None),
    Spec("wall.unary16", "wall: unary calls, 16 threads", "calls/s", None),
    Spec("wall.pairs", "wall: stream request/response pairs", "pairs/s", None),
    Spec("wall.pipelined", "wall: stream messages pipelined", "msgs/s", None),
    Spec("W1", "W1  submit one by one", "jobs/s", 2_500, wall="wall.pairs"),
    Spec("W1c", "W1c submit, 16 threads", "jobs/s", 6_000, wall="wall.unary16"),
    Spec("W1b", "W1b submit_many x500", "jobs/s", 50_000, wall="wall.pipelined"),
    Spec("W2", "W2  drain by one worker", "jobs/s", 15_000, wall="wall.pipelined"),
    # Half of W2's target: every job under a concurrency key (100 keys, 4 each).
    Spec("W2k", "W2k drain, 100 concurrency keys", "jobs/s", 7_500, wall="wall.pipelined"),
    Spec("W3.p50", "W3  submit->start p50 @50/s", "ms", 1.5, False, RTT),
    Spec("W3.p99", "W3  submit->start p99 @50/s", "ms", 5.0, False, RTT),
    Spec("W4", "W4  steady completed", "jobs/s", 5_000, wall="wall.pipelined"),
    Spec("W4.p99", "W4  submit->start p99", "ms", 50.0, False, RTT),
    # Half of W1b's target: a workflow's jobs carry their links.
    Spec("WF", "WF  chord of 10,000 submitted", "jobs/s", 25_000),
    Spec("WF.start", "WF  body start after last member", "ms", 50.0, False),
    Spec("MEM.growth", "MEM broker RSS growth", "%", 10.0, False),
    Spec("MEM.max", "MEM broker RSS max", "MB", 200.0, False),
)
WORKLOAD_KEYS = [spec.key for spec in SPECS]


@dataclass
class Results:
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, value: float, note: str = "") -> None:
        self.values.setdefault(key, []).append(value)
        if note:
            self.notes.setdefault(key, []).append(note)

    def median(self, key: str) -> float | None:
        found = self.values.get(key)
        if key == RTT:
            pairs = self.median("wall.pairs")
            return 1000.0 / pairs if pairs else None
        return statistics.median(found) if found else None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- processes ---


class Proc:
    """A child process whose output a thread collects, so it never blocks on a pipe."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        paths = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := pattern.search(line):
                    return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise RuntimeError(f"no line matching {pattern.pattern!r} in:\n{''.join(self.lines)}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Broker:
    proc: Proc
    target: str
    metrics_url: str

    def metrics(self) -> dict[str, float]:
        """Each metric's value, summed over its labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                name = name.split("{", 1)[0]
                sums[name] = sums.get(name, 0.0) + float(value)
        return sums

    def succeeded(self) -> int:
        return int(self.metrics().get("jobbroker_jobs_succeeded_total", 0))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.proc.pid}/status").read_text()
        kb = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(kb.group(1)) / 1024 if kb else 0.0


class Databases:
    """A fresh database for each broker: a SQLite file, or a PostgreSQL schema."""

    def __init__(self, dsn: str | None, directory: Path) -> None:
        self.dsn = dsn
        self.directory = directory

    @contextmanager
    def fresh(self) -> Iterator[str]:
        name = f"bench_{uuid.uuid4().hex[:12]}"
        if self.dsn is None:
            path = self.directory / f"{name}.db"
            yield str(path)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        asyncio.run(_pg_execute(self.dsn, f"CREATE SCHEMA {name}"))
        try:
            yield f"{self.dsn}{'&' if '?' in self.dsn else '?'}schema={name}"
        finally:
            asyncio.run(_pg_execute(self.dsn, f"DROP SCHEMA {name} CASCADE"))


async def _pg_execute(dsn: str, sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]  # only needed with --database

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


AUTH = False
# With --auth: the admin key every client and worker of the run presents.
API_KEY: str | None = None


def connect(target: str) -> Client:
    return Client(target, api_key=API_KEY)


def _admin_key(database: str) -> str:
    made = subprocess.run(
        [*BROKER, "keys", "create", "bench", "--role", "admin", "--database", database],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return made.stdout.strip()


@contextmanager
def broker(databases: Databases, *extra: str) -> Iterator[Broker]:
    """A `broker serve` process on a fresh database, stopped on exit; with
    --auth, keys required and a fresh admin key in API_KEY."""
    global API_KEY
    with databases.fresh() as database:
        metrics_port = free_port()
        flags = ["--port", "0", "--database", database, "--metrics-port", str(metrics_port)]
        if AUTH:
            API_KEY = _admin_key(database)
            os.environ["BROKER_API_KEY"] = API_KEY  # for the worker processes
            flags.append("--auth")
        proc = Proc([*BROKER, "serve", *flags, "--shutdown-grace-seconds", "2", *extra])
        try:
            port = proc.wait_for_line(LISTENING).group(1)
            yield Broker(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            proc.stop()


@contextmanager
def worker(b: Broker) -> Iterator[Proc]:
    """A `broker worker bench_tasks` process at its default settings, stopped on exit."""
    proc = Proc([*BROKER, "worker", "bench_tasks", "--target", b.target], cwd=HERE)
    try:
        yield proc
    finally:
        proc.stop()


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for_stream(b: Broker, w: Proc) -> None:
    def connected() -> bool:
        if w.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{''.join(w.lines)}")
        return b.metrics().get("jobbroker_worker_streams", 0) >= 1

    if not wait_until(connected, 30):
        raise RuntimeError(f"worker stream not connected:\n{''.join(w.lines)}")


def list_all(client: Client, task: str | None = None) -> list[Job]:
    jobs: list[Job] = []
    token: str | None = None
    while True:
        page = client.list_jobs(queue=QUEUE, task=task, page_size=1000, page_token=token)
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def noop_requests(n: int) -> list[JobRequest]:
    return [JobRequest(NOOP, None, queue=QUEUE) for _ in range(n)]


def keyed_requests(first: int, n: int, keys: int) -> list[JobRequest]:
    """No-op jobs, job i under concurrency key i % keys."""
    return [
        JobRequest(
            NOOP,
            None,
            queue=QUEUE,
            concurrency_key=f"k{i % keys}",
            concurrency_limit=KEY_LIMIT,
        )
        for i in range(first, first + n)
    ]


# --- the empty gRPC server the walls are measured against ---


async def _wall_serve() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def echo(
        requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> Any:  # an async generator of bytes
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(
        WALL_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"wall listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


@contextmanager
def wall_server() -> Iterator[str]:
    proc = Proc([sys.executable, str(Path(__file__).resolve()), "--wall-server"])
    try:
        yield f"127.0.0.1:{proc.wait_for_line(LISTENING).group(1)}"
    finally:
        proc.stop(5)


def _unary_rate(target: str, threads: int, calls: int) -> float:
    channels = [grpc.insecure_channel(target) for _ in range(threads)]
    stubs = [ch.unary_unary(f"/{WALL_SERVICE}/Unary", None, None) for ch in channels]
    for stub in stubs:
        stub(b"", timeout=10)  # connect before timing
    start = threading.Barrier(threads + 1)

    def run(stub: grpc.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        start.wait()
        for _ in range(calls // threads):
            stub(b"", timeout=10)

    pool = [threading.Thread(target=run, args=(stub,)) for stub in stubs]
    for t in pool:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    for ch in channels:
        ch.close()
    return (calls // threads) * threads / elapsed


def _stream_rates(target: str, calls: int) -> tuple[float, float]:
    """(request/response pairs per second one after another, messages/s pipelined)."""
    with grpc.insecure_channel(target) as channel:
        echo = channel.stream_stream(f"/{WALL_SERVICE}/Echo", None, None)
        outbox: queue.Queue[bytes | None] = queue.Queue()
        replies = iter(echo(iter(outbox.get, None), timeout=60))
        outbox.put(b"")
        next(replies)
        began = time.perf_counter()
        for _ in range(calls):
            outbox.put(b"")
            next(replies)
        pairs = calls / (time.perf_counter() - began)
        outbox.put(None)
        began = time.perf_counter()
        count = sum(1 for _ in echo(iter([b""] * (calls * 4)), timeout=60))
        pipelined = count / (time.perf_counter() - began)
    return pairs, pipelined


def measure_walls(results: Results, sizes: Sizes) -> None:
    with wall_server() as target:
        results.add("wall.unary", _unary_rate(target, 1, sizes.wall_calls))
        results.add("wall.unary16", _unary_rate(target, THREADS, sizes.wall_calls * 2))
        pairs, pipelined = _stream_rates(target, sizes.wall_calls)
        results.add("wall.pairs", pairs)
        results.add("wall.pipelined", pipelined)


# --- workloads ---


def submit_threads(
    target: str, threads: int, per_thread: int, seconds: float, stamp_every: int = 0
) -> tuple[int, float]:
    """Threads sharing one Client (as an app's threads would) submit one by one;
    returns (jobs, seconds taken).

    With `stamp_every`, every so many jobs of a thread is a stamp job carrying its
    submit time, so latency can be sampled afterwards; the others are no-ops.
    """
    start = threading.Barrier(threads + 1)

    def run(client: Client) -> int:
        start.wait()
        deadline = time.monotonic() + seconds
        n = 0
        while n < per_thread and time.monotonic() < deadline:
            if stamp_every and n % stamp_every == stamp_every - 1:
                client.submit(STAMP, time.time(), queue=QUEUE)
            else:
                client.submit(NOOP, None, queue=QUEUE)
            n += 1
        return n

    with connect(target) as client, _pool(threads) as pool:
        client.submit(NOOP, None, queue=QUEUE)  # connect before timing
        futures = [pool.submit(run, client) for _ in range(threads)]
        start.wait()
        began = time.perf_counter()
        total = sum(f.result() for f in futures)
        return total, time.perf_counter() - began


def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="bench")


def run_w1(results: Results, dbs: Databases, sizes: Sizes) -> None:
    with broker(dbs) as b, connect(b.target) as client:
        client.submit(NOOP, None, queue=QUEUE)  # connect before timing
        deadline = time.monotonic() + sizes.budget
        began = time.perf_counter()
        n = 0
        while n < sizes.w1_jobs and time.monotonic() < deadline:
            client.submit(NOOP, None, queue=QUEUE)
            n += 1
        results.add("W1", n / (time.perf_counter() - began), f"{n:,} jobs")


def run_w1c(results: Results, dbs: Databases, sizes: Sizes) -> None:
    with broker(dbs) as b:
        n, elapsed = submit_threads(b.target, THREADS, sizes.w1c_jobs // THREADS, sizes.budget)
        results.add("W1c", n / elapsed, f"{n:,} jobs")


def run_w1b(results: Results, dbs: Databases, sizes: Sizes) -> None:
    batch = noop_requests(sizes.batch)
    with broker(dbs) as b, connect(b.target) as client:
        client.submit_many(batch[:1])  # connect before timing
        deadline = time.monotonic() + sizes.budget
        began = time.perf_counter()
        n = 0
        while n < sizes.w1b_jobs and time.monotonic() < deadline:
            client.submit_many(batch)
            n += len(batch)
        results.add("W1b", n / (time.perf_counter() - began), f"{n:,} jobs")


def run_w2(results: Results, dbs: Databases, sizes: Sizes, keys: int = 0) -> None:
    """Queue the jobs first, then time from the first job's start to the last
    one's finish; with ``keys``, each job under one of that many concurrency
    keys, KEY_LIMIT of each at once."""
    key = "W2k" if keys else "W2"
    with broker(dbs) as b, connect(b.target) as client:
        for done in range(0, sizes.w2_jobs, sizes.batch):
            n = min(sizes.batch, sizes.w2_jobs - done)
            if keys:
                client.submit_many(keyed_requests(done, n, keys))
            else:
                client.submit_many(noop_requests(n))
        with worker(b):
            # The budget plus time for the worker process to start.
            wait_until(lambda: b.succeeded() >= sizes.w2_jobs, sizes.budget + 5, 0.1)
        jobs = [j for j in list_all(client) if j.started_at and j.finished_at]
    if not jobs:
        raise RuntimeError(f"{key}: no job finished")
    first = min(j.started_at.timestamp() for j in jobs if j.started_at)
    last = max(j.finished_at.timestamp() for j in jobs if j.finished_at)
    results.add(key, len(jobs) / (last - first), f"{len(jobs):,} of {sizes.w2_jobs:,} jobs")


KEYS, KEY_LIMIT = 100, 4  # W2k


def run_w2k(results: Results, dbs: Databases, sizes: Sizes) -> None:
    run_w2(results, dbs, sizes, keys=KEYS)


def run_wf(results: Results, dbs: Databases, sizes: Sizes) -> None:
    """A chord of no-op members: its submit in one call, and how soon its
    body starts after the last member's end."""
    members = [bench_tasks.noop.s(None) for _ in range(sizes.wf_members)]
    flow = chord(members, bench_tasks.gather.s())
    with broker(dbs) as b, connect(b.target) as client:
        client.submit_many(noop_requests(1))  # connect before timing
        began = time.perf_counter()
        handle = client.submit(flow)
        elapsed = time.perf_counter() - began
        results.add("WF", len(handle.job_ids) / elapsed, f"{sizes.wf_members:,} members")
        with worker(b):
            if handle.result(timeout=sizes.budget + 30) != sizes.wf_members:
                raise RuntimeError("WF: the body did not get every member's result")
        body = client.get_job(handle.job_ids[-1])
        ends = [j.finished_at for j in list_all(client, NOOP) if j.finished_at]
    if body.started_at is None or not ends:
        raise RuntimeError("WF: no start or end recorded")
    after = (body.started_at - max(ends)).total_seconds() * 1000
    results.add("WF.start", after, "body start - last member end")


def stamp_latencies(jobs: list[Job], since: float = 0.0) -> tuple[list[float], int]:
    """Submit -> handler start in ms of stamp jobs submitted at or after `since`.

    A job not started yet counts with its age so far, so a stuck worker shows.
    Returns (latencies, how many were unfinished).
    """
    now = time.time()
    latencies: list[float] = []
    unfinished = 0
    for job in jobs:
        submitted = float(job.json())
        if submitted < since:
            continue
        if job.result is None:
            unfinished += 1
        started = float(job.result_json()) if job.result is not None else now
        latencies.append((started - submitted) * 1000)
    return latencies, unfinished


def _latency_note(latencies: list[float], unfinished: int) -> str:
    note = f"{len(latencies):,} samples"
    return note + (f", {unfinished} unfinished counted at their age" if unfinished else "")


def run_w3(results: Results, dbs: Databases, sizes: Sizes) -> None:
    with broker(dbs) as b, connect(b.target) as client, worker(b) as w:
        wait_for_stream(b, w)
        client.submit(NOOP, None, queue=QUEUE)  # one job through before timing
        wait_until(lambda: b.succeeded() >= 1, 10)
        n = int(sizes.w3_rate * sizes.w3_seconds)
        began = time.monotonic()
        for i in range(n):
            pause = began + i / sizes.w3_rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            client.submit(STAMP, time.time(), queue=QUEUE)
        wait_until(lambda: b.succeeded() >= n + 1, 30)
        latencies, unfinished = stamp_latencies(list_all(client, task=STAMP))
    note = _latency_note(latencies, unfinished)
    results.add("W3.p50", percentile(latencies, 50), note)
    results.add("W3.p99", percentile(latencies, 99), note)


def run_w4(results: Results, dbs: Databases, sizes: Sizes) -> None:
    """Producer and worker together; throughput over the last 90% of the window."""
    seconds = sizes.w4_seconds
    with broker(dbs) as b, connect(b.target) as client, worker(b) as w:
        wait_for_stream(b, w)
        with _pool(1) as pool:
            producer = pool.submit(submit_threads, b.target, THREADS, 10**9, seconds, STAMP_EVERY)
            began = time.monotonic()
            time.sleep(seconds * 0.1)
            since, done0, t0 = time.time(), b.succeeded(), time.monotonic()
            time.sleep(max(0.0, began + seconds - time.monotonic()))
            done1, t1 = b.succeeded(), time.monotonic()
            submitted, _ = producer.result()
        backlog = submitted + THREADS - done1
        # A backlog left after this counts at its age in the latency samples.
        wait_until(lambda: b.succeeded() >= submitted + THREADS, 5, 0.1)
        latencies, unfinished = stamp_latencies(list_all(client, task=STAMP), since)
    results.add("W4", (done1 - done0) / (t1 - t0), f"{submitted:,} jobs, backlog {backlog:,}")
    results.add("W4.p99", percentile(latencies, 99), _latency_note(latencies, unfinished))


@dataclass(frozen=True)
class RssSample:
    completed: int
    mb: float


def _memory_producer(target: str, stop: threading.Event, completed: list[int]) -> int:
    """Submit batches of 100 while fewer than MEMORY_BACKLOG jobs are unfinished."""
    batch = noop_requests(100)
    submitted = 0
    with connect(target) as client:
        while not stop.is_set():
            if submitted - completed[0] >= MEMORY_BACKLOG:
                time.sleep(0.02)
                continue
            client.submit_many(batch)
            submitted += len(batch)
    return submitted


def _sample_rss(
    b: Broker, sizes: Sizes, samples: list[RssSample], completed: list[int], producer: Future[int]
) -> None:
    """Every 0.25 s, until enough jobs completed or time is up."""
    deadline = time.monotonic() + sizes.memory_seconds
    while completed[0] < sizes.memory_jobs and time.monotonic() < deadline:
        if producer.done():
            producer.result()  # raises what stopped it
        time.sleep(0.25)
        completed[0] = b.succeeded()
        samples.append(RssSample(completed[0], b.rss_mb()))


def run_memory(results: Results, dbs: Databases, sizes: Sizes) -> None:
    samples: list[RssSample] = []
    with broker(dbs, "--retention-seconds", "5") as b, worker(b) as w:
        wait_for_stream(b, w)
        stop, completed = threading.Event(), [0]
        with _pool(1) as pool:
            producer = pool.submit(_memory_producer, b.target, stop, completed)
            try:
                _sample_rss(b, sizes, samples, completed, producer)
            finally:
                stop.set()
            producer.result()
    final = samples[-1]
    first = next(s for s in samples if s.completed >= final.completed / 5)
    growth = (final.mb - first.mb) / first.mb * 100
    note = (
        f"{first.mb:.1f} MB at {first.completed:,} -> {final.mb:.1f} MB at {final.completed:,} jobs"
    )
    results.add("MEM.growth", growth, note)
    results.add("MEM.max", max(s.mb for s in samples), f"{len(samples)} samples")


# --- report ---


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:,.2f}"
    if unit in ("%", "MB"):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def _target_text(spec: Spec) -> str:
    if spec.target is None:
        return ""
    return ("≥ " if spec.higher_is_better else "≤ ") + fmt(spec.target, spec.unit)


def _meets(spec: Spec, value: float | None) -> bool | None:
    if spec.target is None or value is None:
        return None
    return value >= spec.target if spec.higher_is_better else value <= spec.target


def _ratio(results: Results, spec: Spec) -> tuple[float | None, str]:
    value, wall = results.median(spec.key), results.median(spec.wall) if spec.wall else None
    if value is None or not wall or spec.wall is None:
        return None, ""
    name = "stream RTT" if spec.wall == RTT else spec.wall.removeprefix("wall.")
    return value / wall, f"{value / wall:.3f} x {name}"


def table(results: Results) -> str:
    head = f"{'figure':38} {'unit':8} {'median':>10} {'min':>10} {'max':>10}  {'target':>9}"
    lines = [head + "       vs wall (median / wall median)", "-" * 118]
    for spec in SPECS:
        values = results.values.get(spec.key, [])
        median = results.median(spec.key)
        low, high = (min(values), max(values)) if values else (None, None)
        meets = {True: "ok", False: "MISS", None: ""}[_meets(spec, median)]
        lines.append(
            f"{spec.label:38} {spec.unit:8} {fmt(median, spec.unit):>10} "
            f"{fmt(low, spec.unit):>10} {fmt(high, spec.unit):>10}  "
            f"{_target_text(spec):>9} {meets:4}  {_ratio(results, spec)[1]}"
        )
    lines.append("")
    lines.append(f"stream RTT = 1000 / wall pairs/s = {fmt(results.median(RTT), 'ms')} ms")
    for key, notes in results.notes.items():
        lines.append(f"{key:11} {'; '.join(notes)}")
    lines.extend(f"ERROR {error}" for error in results.errors)
    return "\n".join(lines)


def to_json(results: Results, args: argparse.Namespace, sizes: Sizes, elapsed: float) -> Any:
    figures: dict[str, Any] = {}
    for spec in SPECS:
        values = results.values.get(spec.key, [])
        if not values:
            continue
        figures[spec.key] = {
            "label": spec.label,
            "unit": spec.unit,
            "values": values,
            "median": results.median(spec.key),
            "min": min(values),
            "max": max(values),
            "target": spec.target,
            "higher_is_better": spec.higher_is_better,
            "meets_target": _meets(spec, results.median(spec.key)),
            "wall": spec.wall,
            "ratio_to_wall": _ratio(results, spec)[0],
            "notes": results.notes.get(spec.key, []),
        }
    return {
        "runs": args.runs,
        "quick": args.quick,
        "database": "postgresql" if args.database else "sqlite",
        "elapsed_seconds": round(elapsed, 1),
        "sizes": asdict(sizes),
        "figures": figures,
        "errors": results.errors,
    }


# --- main ---


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def attempt(results: Results, name: str, body: Callable[[], None]) -> None:
    """Run one workload; an error is recorded and the others still run."""
    began = time.monotonic()
    try:
        body()
    except Exception as exc:
        results.errors.append(f"{name}: {exc!r}")
        traceback.print_exc()
    log(f"{name} took {time.monotonic() - began:.1f}s")


def run_all(
    results: Results, dbs: Databases, sizes: Sizes, runs: int, only: set[str] | None = None
) -> None:
    workloads: list[tuple[str, Callable[[Results, Databases, Sizes], None]]] = [
        ("W1", run_w1),
        ("W1c", run_w1c),
        ("W1b", run_w1b),
        ("W2", run_w2),
        ("W2k", run_w2k),
        ("W3", run_w3),
        ("W4", run_w4),
        ("WF", run_wf),
    ]
    for run in range(1, runs + 1):
        attempt(results, f"run {run} walls", lambda: measure_walls(results, sizes))
        for name, body in workloads:
            if only is None or name in only:
                attempt(results, f"run {run} {name}", functools.partial(body, results, dbs, sizes))
    if only is None or "MEM" in only:
        attempt(results, "MEM (once)", lambda: run_memory(results, dbs, sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs per workload (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--database", help="a postgresql:// DSN (default: SQLite in a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a few hundred jobs per workload")
    parser.add_argument("--memory-jobs", type=int, help="MEM: stop at this many completed jobs")
    parser.add_argument("--memory-seconds", type=float, help="MEM: stop after this long")
    parser.add_argument("--budget", type=float, help="seconds one throughput run may take")
    parser.add_argument(
        "--only", help="comma-separated workloads to run, e.g. W2,W3 (default: all, and MEM)"
    )
    parser.add_argument(
        "--auth", action="store_true", help="brokers require API keys; clients present one"
    )
    parser.add_argument("--wall-server", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    overrides = {
        "memory_jobs": args.memory_jobs,
        "memory_seconds": args.memory_seconds,
        "budget": args.budget,
    }
    return replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wall_server:
        asyncio.run(_wall_serve())
        return 0
    global AUTH
    AUTH = args.auth
    sizes = sizes_for(args)
    results = Results()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jobbroker-bench-") as directory:
        only = set(args.only.split(",")) if args.only else None
        run_all(results, Databases(args.database, Path(directory)), sizes, args.runs, only)
    elapsed = time.monotonic() - began
    print(table(results))
    print(f"\n{args.runs} run(s) in {elapsed:.0f}s; sizes: {asdict(sizes)}")
    if args.json:
        args.json.write_text(json.dumps(to_json(results, args, sizes, elapsed), indent=2) + "\n")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())

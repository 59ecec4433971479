"""Hostile and malformed requests of every Broker RPC against a live ``broker serve``.

Hypothesis builds requests from the generated wire types with hostile values
(NaN, infinities, huge and negative numbers and durations, timestamps at and
past the edges of their range, NUL bytes and huge strings in every string
field, huge maps and lists, many distinct queue names, unknown enum values),
sends raw bytes through identity serializers, and drives LeaseStreams with
hostile subscribes, reports for leases that do not exist and forged fencing
tokens. After each batch of requests the broker must be alive and SERVING, have
answered only documented status codes with a message a person can read (no SQL,
no traceback, a ``jobbroker-reason``), keep its store intact
(``tests/integrity.py``), and still serve well-behaved clients: a job submitted
before the batch is intact and can be leased and completed, jobs submitted
meanwhile by a bystander were all stored, and a worker on queues that hostile
jobs share still gets its jobs.

It runs on a SQLite file and on a PostgreSQL schema, bounded by time:
JOBBROKER_FUZZ_SECONDS (default 60) shared by the four tests, in rounds of
Hypothesis examples, 85 % of it on SQLite and 20 % more on PostgreSQL (see
SHARES); set it higher for a longer run. ``pytest -s`` shows the request
count and the codes seen, per RPC and per backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.request import urlopen

import grpc
import pytest
from google.protobuf import duration_pb2, text_format, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jobbroker import Client, JobState, LeaseLostError
from jobbroker.connection import CHANNEL_OPTIONS  # what the SDK accepts: the fuzz is no stricter
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from tests import integrity
from tests.conftest import _execute as execute_sql
from tests.conftest import postgres_dsn
from tests.processes import Process, start_broker
from tests.test_crash import free_port

BUDGET = float(os.environ.get("JOBBROKER_FUZZ_SECONDS", "60"))
ROUND = 10  # examples per Hypothesis round; rounds run until a test's share of BUDGET is spent
TIMEOUT = 20.0  # the client's own deadline per call: DEADLINE_EXCEEDED is ours
LEASE_SECONDS = 2  # fuzzed streams abandon leases; the reaper must take them back soon
REAPED_WITHIN = timedelta(seconds=30)
MAX_TRACEBACKS = 3  # in the broker's log, per test, whatever the number of requests
METRIC_QUEUES = 50  # --max-metric-queues: the fuzz names thousands
MAX_PAYLOAD = 2**20  # the broker's default --max-payload-bytes, for payloads and results
# Of BUDGET, what each backend's run takes: PostgreSQL's is shorter, for CI's time.
SHARES = {"sqlite": 0.85, "postgres": 0.2}

SERVICE = "jobbroker.v1.Broker"
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
REPORT_STATUSES = frozenset(
    {
        broker_pb2.REPORT_STATUS_OK,
        broker_pb2.REPORT_STATUS_LEASE_LOST,
        broker_pb2.REPORT_STATUS_NOT_FOUND,
        broker_pb2.REPORT_STATUS_INVALID,
    }
)
# What a reply must never show: SQL, a driver, a traceback, a class repr.
LEAK = re.compile(
    r"Traceback|File \"|<class '|\[SQL:|sqlalche|sqlite3\.|asyncpg|psycopg|IntegrityError"
    r"|\b(SELECT|INSERT|UPDATE|DELETE)\b.*\b(FROM|INTO|SET|WHERE)\b"
)

# The well-behaved clients' queues. Hypothesis cannot generate these names.
GOOD_QUEUE = f"known-good-{uuid.uuid4().hex}"
BYSTANDER_QUEUE = f"bystander-{uuid.uuid4().hex}"
# Hostile submits go to both; hostile streams lease only from SHARED, a
# well-behaved worker only from VICTIM.
SHARED, VICTIM = "fz-shared", "fz-victim"


# --- what was sent and seen ---


@dataclass
class Tally:
    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)  # each call's final status
    items: Counter[str] = field(default_factory=Counter)  # per-job errors, per-report statuses
    methods: Counter[str] = field(default_factory=Counter)  # requests per RPC
    job_ids: list[str] = field(default_factory=list)  # ids of jobs the fuzz stored

    def line(self, title: str) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in self.codes.most_common())
        items = ", ".join(f"{k} {v}" for k, v in self.items.most_common())
        methods = ", ".join(f"{k} {v}" for k, v in sorted(self.methods.items()))
        return f"{title}: {self.requests} requests ({methods}); codes {codes}; in replies {items}"


STORED: list[str] = []  # ids of jobs the fuzz stored on the broker under test


def describe(message: Any) -> str:
    """A request shown short enough to read: long runs folded, the whole cut."""
    if isinstance(message, list):
        return "[" + "; ".join(describe(m) for m in message) + "]"
    if isinstance(message, bytes):
        text = repr(message)
    elif isinstance(message, Message):
        text = f"{type(message).__name__}({text_format.MessageToString(message, as_one_line=True)})"
    else:
        text = repr(message)
    text = re.sub(r"(.{1,4}?)\1{15,}", lambda m: f"[{m.group(1)!r}x{len(m.group(0))}]", text)
    return text if len(text) <= 1500 else text[:1500] + "..."


class Lazy:
    """Text made only when an assertion's message is shown."""

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()


def check_text(where: str, text: str, request: Any) -> None:
    assert text.strip(), f"{where}: an empty message, for {describe(request)}"
    assert not LEAK.search(text), (
        f"{where}: the reply leaks {text[:500]!r}, for {describe(request)}"
    )


class Fuzzer:
    """Sends requests and checks every answer as it comes."""

    def __init__(self, channel: grpc.Channel, tally: Tally, live: Live) -> None:
        self.live = live
        self.channel = channel
        self.stub = broker_pb2_grpc.BrokerStub(channel)
        self.tally = tally

    def _count(self, code: grpc.StatusCode) -> None:
        for tally in (self.tally, self.live.tally):
            tally.codes[code.name] += 1

    def _item(self, name: str) -> None:
        for tally in (self.tally, self.live.tally):
            tally.items[name] += 1

    def sent(self, method: str) -> None:
        for tally in (self.tally, self.live.tally):
            tally.requests += 1
            tally.methods[method] += 1

    def ok(self) -> None:
        self._count(grpc.StatusCode.OK)

    def refused(self, what: str, error: grpc.RpcError, request: Any) -> None:
        code = error.code()
        self._count(code)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # the client's own timeout
        details = error.details() or ""
        assert code in DOCUMENTED, (
            f"{what}: {code.name} {details[:500]!r}, for {describe(request)}\n"
            f"the broker's log ends:\n{self.live.proc.output[-3000:]}"
        )
        check_text(f"{what} ({code.name})", details, request)
        reasons = dict(error.trailing_metadata() or ())
        assert reasons.get("jobbroker-reason"), (
            f"{what}: {code.name} {details[:300]!r} without a jobbroker-reason, "
            f"for {describe(request)}"
        )

    def unary(self, name: str, request: Message) -> Any:
        self.sent(name)
        try:
            reply = getattr(self.stub, name)(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            self.refused(name, error, request)
            return None
        self.ok()
        return reply

    def submitted(self, where: str, result: broker_pb2.SubmitResponse, request: Any) -> None:
        if result.HasField("error"):
            code = CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
            self._item(f"{where} {code.name}")
            assert code in DOCUMENTED - {grpc.StatusCode.OK}, (
                f"{where}: a job refused with {code.name} {result.error.message[:300]!r}, "
                f"for {describe(request)}"
            )
            check_text(f"{where} error", result.error.message, request)
            assert result.error.reason, f"{where}: a refusal without a reason"
        else:
            assert result.job_id, f"{where}: a stored job without an id, for {describe(request)}"
            self.tally.job_ids.append(result.job_id)

    def report(self, result: broker_pb2.ReportResult, request: Any) -> None:
        name = (
            broker_pb2.ReportStatus.Name(result.status) if result.status in REPORT_STATUSES else ""
        )
        self._item(name or f"report status {result.status}")
        assert result.status in REPORT_STATUSES, (
            f"report status {result.status}, {describe(request)}"
        )
        if result.status != broker_pb2.REPORT_STATUS_OK:
            check_text(f"a {name} report", result.message, request)


CODES = {code.value[0]: code for code in grpc.StatusCode}


# --- hostile values ---


def rare(common: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``common``, now and then ``hostile``."""
    return st.one_of(common, common, common, hostile)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


HUGE_TEXT = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "\x00", "é", "\U0001f4a5", " "]),
    st.sampled_from([199, 200, 201, 1000, 4097, 70_000, 300_000]),
)
ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\t\n\r", "\u200b", "\ufeff", "\U0001f4a5", "%s%n{}", "../x"]
)
# Any code point but a lone surrogate, which protobuf refuses before sending.
TEXT = st.one_of(st.text(max_size=12), ODD_TEXT, HUGE_TEXT)
SHORT = st.one_of(st.text(max_size=12), ODD_TEXT)
TAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)

EDGE_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**32 - 1, 2**63, 2**64 - 1)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from(EDGE_INTS[:5]))
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
EDGE_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 0.5, 1.0, 2.0, 1e9)
DOUBLE = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))

# Durations: past the 10,000 years protobuf allows, a day past ten years, far
# past what ``now +`` holds, the int64 edges; nanos out of range or of the other sign.
EDGE_SECONDS = (0, 1, -1, 86_400 * 3651, 10**10, 10**11, 315_576_000_000, 315_576_000_001)
EDGE_SECONDS += (-315_576_000_000, 2**63 - 1, -(2**63))
EDGE_NANOS = (0, 1, -1, 999_999_999, -999_999_999, 10**9, 2**31 - 1, -(2**31))
NANOS = st.one_of(st.sampled_from(EDGE_NANOS), st.integers(-(2**31), 2**31 - 1))
SECONDS = st.one_of(st.integers(-(10**6), 10**6), st.sampled_from(EDGE_SECONDS))
DURATION = st.builds(duration_pb2.Duration, seconds=SECONDS, nanos=NANOS)
TAME_DURATION = st.builds(
    duration_pb2.Duration, seconds=st.integers(0, 30), nanos=st.integers(0, 999_999_999)
)
# Timestamps: the first and last second of years 1 and 9999 and one past
# each, the int64 edges, around now.
NOW = int(time.time())
EDGE_EPOCH = (-62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800, 0, -1)
EDGE_EPOCH += (2**63 - 1, -(2**63), NOW, NOW + 3600, NOW - 3600)
EPOCH_SECONDS = st.one_of(st.sampled_from(EDGE_EPOCH), st.integers(-(2**63), 2**63 - 1))
TIMESTAMP = st.builds(timestamp_pb2.Timestamp, seconds=EPOCH_SECONDS, nanos=NANOS)

# Many distinct names: each draw names a queue never seen before.
MANY = st.builds(lambda: f"fz-many-{uuid.uuid4().hex[:12]}")
HUGE_MAP = st.builds(
    lambda n, value: {f"k{i}": value for i in range(n)}, st.sampled_from([65, 1000, 20_000]), SHORT
)
HUGE_LIST = st.builds(lambda n, item: [item] * n, st.sampled_from([65, 1000, 20_000]), SHORT)
PAYLOAD_SIZES = st.sampled_from([2**20 - 1, 2**20, 2**20 + 1, 3 * 2**20])
HUGE_DATA = st.builds(lambda n: b"\0" * n, PAYLOAD_SIZES)


@st.composite
def retry_policies(draw: st.DrawFn) -> job_pb2.RetryPolicy:
    policy = job_pb2.RetryPolicy(max_attempts=draw(UINT32), backoff_factor=draw(DOUBLE))
    for name in ("backoff_base", "backoff_cap"):
        if (value := draw(maybe(DURATION))) is not None:
            getattr(policy, name).CopyFrom(value)
    if (jitter := draw(maybe(DOUBLE))) is not None:
        policy.jitter = jitter
    return policy


TAME_RETRY = st.builds(
    lambda attempts: job_pb2.RetryPolicy(
        max_attempts=attempts,
        backoff_base=duration_pb2.Duration(nanos=10_000_000),
        backoff_factor=2.0,
        backoff_cap=duration_pb2.Duration(seconds=1),
        jitter=0.1,
    ),
    st.integers(1, 4),
)

# Each field of a JobSpec: (a tame value, a hostile one). A spec is mostly
# tame with one hostile field, so each hostile value is tried on its own
# rather than hidden behind another that is refused first.
SPEC_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "queue": (st.sampled_from([SHARED, VICTIM]), st.one_of(TEXT, MANY)),
    "task": (st.just("fuzz.task"), TEXT),
    "priority": (st.integers(-5, 5), INT32),
    "idempotency_key": (
        st.one_of(st.just(""), st.builds(lambda: uuid.uuid4().hex)),
        st.one_of(st.sampled_from(["k1", "k2"]), TEXT),
    ),
    "unique_key": (
        st.one_of(st.just(""), st.builds(lambda: uuid.uuid4().hex)),
        st.one_of(st.sampled_from(["u1", "u2"]), TEXT),
    ),
    "metadata": (
        st.dictionaries(TAME, TAME, max_size=2),
        st.one_of(st.dictionaries(SHORT, SHORT, min_size=1, max_size=4), HUGE_MAP),
    ),
    "tags": (st.lists(TAME, max_size=2), st.one_of(st.lists(SHORT, min_size=1), HUGE_LIST)),
    "payload.data": (st.binary(max_size=40), HUGE_DATA),
    "payload.content_type": (st.sampled_from(["", "application/json"]), TEXT),
    "run_at": (st.none(), TIMESTAMP),
    "delay": (st.none(), DURATION),
    "timeout": (maybe(TAME_DURATION.filter(lambda d: d.seconds or d.nanos)), DURATION),
    "soft_timeout": (maybe(TAME_DURATION.filter(lambda d: d.seconds or d.nanos)), DURATION),
    "retry": (maybe(TAME_RETRY), retry_policies()),
}


@st.composite
def job_specs(
    draw: st.DrawFn,
    queue: str | None = None,
    modes: tuple[str, ...] = ("one", "one", "one", "some", "none"),
) -> job_pb2.JobSpec:
    """A spec tame but for one hostile field ("one"), several ("some") or none."""
    mode = draw(st.sampled_from(modes))
    hostile = draw(st.sampled_from(sorted(SPEC_FIELDS)))
    spec = job_pb2.JobSpec()
    for name, (tame, bad) in SPEC_FIELDS.items():
        wild = name == hostile if mode == "one" else mode == "some" and draw(st.booleans())
        value = draw(bad if wild else tame)
        if value is None:
            continue
        if name in ("metadata",):
            spec.metadata.update(value)
        elif name == "tags":
            spec.tags.extend(value)
        elif name.startswith("payload."):
            setattr(spec.payload, name.removeprefix("payload."), value)
        elif isinstance(value, Message):
            getattr(spec, name).CopyFrom(value)
        else:
            setattr(spec, name, value)
    if queue is not None:
        spec.queue = queue
    return spec


SPECS = st.lists(job_specs(), max_size=6)
# Small valid jobs in bulk: hundreds of new queues at once, or one job more
# than a batch may hold.
BULK = st.builds(
    lambda n, distinct: [
        job_pb2.JobSpec(queue=f"fz-bulk-{prefix}-{i}" if distinct else "fz-bulk", task="t")
        for prefix in [uuid.uuid4().hex[:12]]
        for i in range(n)
    ],
    st.sampled_from([300, 10_001]),
    st.booleans(),
)


# --- the well-behaved clients ---


class Bystander:
    """Submits good jobs through the SDK, one at a time, for as long as the module
    runs: every submit must be acknowledged, whatever the fuzz sends meanwhile."""

    def __init__(self, target: str) -> None:
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.slowest = 0.0  # seconds, the longest a submit took
        self._client = Client(target, timeout=TIMEOUT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for n in itertools.count():
            if self._stop.wait(0.02):
                return
            start = time.monotonic()
            try:
                handle = self._client.submit("fuzz.bystander", {"n": n}, queue=BYSTANDER_QUEUE)
            except Exception as error:
                self.errors.append(error)
            else:
                self.acked.append(handle.id)
            self.slowest = max(self.slowest, time.monotonic() - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT + 5)
        self._client.close()


@dataclass
class Live:
    """The broker under fuzz and its well-behaved clients."""

    proc: Process
    target: str
    database: str
    client: Client
    bystander: Bystander
    health: health_pb2_grpc.HealthStub
    metrics: str  # host:port of its /metrics
    share: float  # of BUDGET this backend's tests take
    batches: int = 0
    tally: Tally = field(default_factory=Tally)

    def tracebacks(self) -> int:
        """Tracebacks in the broker's log, a chained exception counted once."""
        out = self.proc.output
        chained = out.count("The above exception was") + out.count("During handling of the above")
        return out.count("Traceback (most recent call last)") - chained


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    backend: str = request.param
    with store_for(backend, tmp_path_factory) as database:
        metrics_port = free_port()
        proc, target = start_broker(
            database,
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--max-metric-queues",
            str(METRIC_QUEUES),
            metrics_port=metrics_port,
        )
        channel = grpc.insecure_channel(target, CHANNEL_OPTIONS)
        client = Client(target, timeout=TIMEOUT)
        bystander = Bystander(target)
        running = Live(
            proc,
            target,
            database,
            client,
            bystander,
            health_pb2_grpc.HealthStub(channel),
            f"127.0.0.1:{metrics_port}",
            SHARES[backend],
        )
        STORED.clear()
        try:
            yield running
        finally:
            bystander.stop()
            lost = integrity.missing(database, bystander.acked) if bystander.acked else set()
            client.close()
            channel.close()
            proc.kill()
            print("\n" + running.tally.line(f"fuzz on {backend}, {running.batches} batches"))
            print(
                f"fuzz on {backend}: {len(bystander.acked)} bystander submits acknowledged, "
                f"{len(lost)} not stored (the slowest in {bystander.slowest:.2f} s); "
                f"{running.tracebacks()} tracebacks in the broker's log"
            )
        assert not lost, f"acknowledged bystander jobs not stored: {sorted(lost)[:5]}"


@contextlib.contextmanager
def store_for(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SQLite file, or a fresh schema of the test PostgreSQL."""
    if backend == "sqlite":
        yield str(tmp_path_factory.mktemp("fuzz") / "broker.db")
        return
    dsn = postgres_dsn()
    schema = f"fuzz_{uuid.uuid4().hex[:12]}"
    asyncio.run(execute_sql(dsn, f"CREATE SCHEMA {schema}"))
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    finally:
        asyncio.run(execute_sql(dsn, f"DROP SCHEMA {schema} CASCADE"))


def metric_queues(metrics: str) -> set[str]:
    """The queue labels /metrics shows (it must answer, and in time)."""
    with urlopen(f"http://{metrics}/metrics", timeout=TIMEOUT) as reply:
        text = reply.read().decode()
    return set(re.findall(r'queue="((?:[^"\\]|\\.)*)"', text))


def next_lease(stream: Any, timeout: float) -> Any:
    """The stream's next lease, or None after ``timeout`` seconds."""
    pool = futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(next, iter(stream), None).result(timeout)
    except futures.TimeoutError:
        return None
    finally:
        pool.shutdown(wait=False)


def lease_until(client: Client, queues: list[str], wanted: set[str], what: str) -> None:
    """Lease and complete everything on ``queues`` until every job of ``wanted`` was leased."""
    deadline = time.monotonic() + 30
    with client.lease_stream(queues, prefetch=32) as stream:
        while wanted:
            lease = next_lease(stream, max(deadline - time.monotonic(), 0.1))
            assert lease is not None, f"{what}: {sorted(wanted)} not leased in 30 s"
            try:
                lease.complete({"ok": True})
            except LeaseLostError:
                # A fuzzed job the fuzz cancelled meanwhile: never one of ours.
                assert lease.job.id not in wanted, f"{what}: lost the lease of {lease.job.id}"
            wanted.discard(lease.job.id)


class Batch:
    """One batch of fuzz, between checks that everyone else is still served."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.tracebacks = live.tracebacks()
        client = live.client
        self.good = client.submit("fuzz.good", {"known": "good"}, queue=GOOD_QUEUE, priority=5)
        self.victim = client.submit("fuzz.victim", {"v": 1}, queue=VICTIM)

    def check(self) -> None:
        live = self.live
        assert live.proc.proc.poll() is None, "the broker died:\n" + live.proc.output[-4000:]
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        status = live.health.Check(request, timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, f"health says {status}"
        failed, live.bystander.errors[:] = list(live.bystander.errors), []
        assert not failed, f"a bystander's submit failed: {failed!r}"
        integrity.assert_intact(live.database, reaped_within=REAPED_WITHIN)
        queues = metric_queues(live.metrics)
        assert len(queues) <= METRIC_QUEUES + 1, f"{len(queues)} queue labels in /metrics"
        job = live.client.get_job(self.good.id)
        seen = (job.state, job.queue, job.task, job.attempts, job.priority, job.payload)
        assert seen == (JobState.PENDING, GOOD_QUEUE, "fuzz.good", 0, 5, b'{"known":"good"}'), job
        lease_until(live.client, [GOOD_QUEUE], {self.good.id}, "the known good job")
        assert live.client.get_job(self.good.id).state is JobState.SUCCEEDED
        lease_until(live.client, [VICTIM], {self.victim.id}, "a good job on a fuzzed queue")
        wrote = live.tracebacks() - self.tracebacks
        assert wrote <= MAX_TRACEBACKS, f"{wrote} tracebacks logged:\n{live.proc.output[-6000:]}"
        live.batches += 1


def fuzz_for(
    fuzz: Fuzzer, share: float, strategy: st.SearchStrategy[Any], send: Callable[[Any], None]
) -> None:
    """Batches from ``strategy`` until this test's share of BUDGET is spent.

    Hypothesis runs rounds of examples; once the time is up the remaining
    examples of the round do nothing, so a round ends at once.
    """
    deadline = time.monotonic() + BUDGET * share * fuzz.live.share

    @settings(
        max_examples=ROUND,
        deadline=None,
        database=None,  # no example store in the working tree
        phases=[Phase.explicit, Phase.generate],  # shrinking replays against a changed broker
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def batch(drawn: Any) -> None:
        if time.monotonic() > deadline:
            return
        checks = Batch(fuzz.live)
        send(drawn)
        checks.check()

    batch()
    while time.monotonic() < deadline:
        batch()


@pytest.fixture
def fuzz(live: Live) -> Iterator[Fuzzer]:
    channel = grpc.insecure_channel(live.target, CHANNEL_OPTIONS)
    yield Fuzzer(channel, Tally(), live)
    channel.close()


# --- submits ---


def _submit(fuzz: Fuzzer, kind: str, specs: list[job_pb2.JobSpec]) -> None:
    if kind == "submit":
        request: Any = (
            broker_pb2.SubmitRequest(job=specs[0]) if specs else broker_pb2.SubmitRequest()
        )
        if (reply := fuzz.unary("Submit", request)) is not None:
            fuzz.tally.job_ids.append(reply.job_id)
    elif kind == "batch":
        request = broker_pb2.SubmitBatchRequest(jobs=specs)
        if (reply := fuzz.unary("SubmitBatch", request)) is not None:
            assert len(reply.results) == len(specs), describe(request)
            fuzz.tally.job_ids.extend(r.job_id for r in reply.results)
    else:
        # Two messages on one stream; bulk in one, so its size is what was drawn.
        parts = 2 if len(specs) < 100 else 1
        messages = [broker_pb2.SubmitBatchRequest(jobs=specs[i::parts]) for i in range(parts)]
        fuzz.sent("SubmitGrouped")
        try:
            answers = list(fuzz.stub.SubmitGrouped(iter(messages), timeout=TIMEOUT))
        except grpc.RpcError as error:
            fuzz.refused("SubmitGrouped", error, messages)
            return
        fuzz.ok()
        assert len(answers) == len(messages), describe(messages)
        for message, answer in zip(messages, answers, strict=True):
            assert len(answer.results) == len(message.jobs), describe(message)
            for result in answer.results:
                fuzz.submitted("SubmitGrouped", result, message)


SUBMITS = st.lists(
    st.tuples(st.sampled_from(["submit", "batch", "grouped"]), st.one_of(*[SPECS] * 7, BULK)),
    min_size=1,
    max_size=10,
)


@pytest.mark.timeout(BUDGET + 300)
def test_fuzz_submits(fuzz: Fuzzer) -> None:
    def send(calls: list[tuple[str, list[job_pb2.JobSpec]]]) -> None:
        for kind, specs in calls:
            _submit(fuzz, kind, specs)

    fuzz_for(fuzz, 0.3, SUBMITS, send)
    STORED.extend(fuzz.tally.job_ids)
    print("\n" + fuzz.tally.line("fuzz submits"))


# --- reads and operators ---


def stored_id(n: int) -> str:
    """The id of a job the fuzz stored, picked by ``n``; never a well-behaved client's."""
    return STORED[n % len(STORED)] if STORED else str(uuid.uuid4())


def unknown_ids(n: int) -> list[str]:
    """``n`` ids of jobs that do not exist, shaped like real ones."""
    prefix = str(uuid.uuid4())[:-6]
    return [f"{prefix}{i:06x}" for i in range(n)]


STORED_ID = st.builds(stored_id, st.integers(0, 2**32))
JOB_ID = st.one_of(STORED_ID, STORED_ID, TEXT, st.builds(lambda: str(uuid.uuid4())))


STATES = st.lists(
    st.one_of(st.sampled_from(sorted(job_pb2.JobState.values())), st.integers(-(2**31), 2**31 - 1)),
    max_size=4,
)


def read_requests() -> st.SearchStrategy[tuple[str, Message]]:
    job_id = JOB_ID
    job_ids = rare(
        st.lists(job_id, max_size=4),
        st.builds(unknown_ids, st.sampled_from([1000, 10_001])),
    )
    queue_ = st.one_of(st.sampled_from(["", SHARED, VICTIM]), TEXT)
    token = st.one_of(st.just(""), job_id, TEXT)
    by_id = [
        st.tuples(st.just(name), st.builds(kind, job_id=job_id))
        for name, kind in (
            ("GetJob", broker_pb2.GetJobRequest),
            ("WaitJob", broker_pb2.WaitJobRequest),
            ("CancelJob", broker_pb2.CancelJobRequest),
            ("ExplainJob", broker_pb2.ExplainJobRequest),
        )
    ]
    seq = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), UINT64)
    events = [
        st.tuples(
            st.just("ListJobEvents"),
            st.builds(
                broker_pb2.ListJobEventsRequest, job_id=job_id, after_seq=seq, page_size=UINT32
            ),
        ),
        st.tuples(
            st.just("WatchJob"),
            st.builds(broker_pb2.WatchJobRequest, job_id=job_id, after_seq=seq),
        ),
        st.tuples(
            st.just("TailEvents"),
            st.builds(
                broker_pb2.TailEventsRequest,
                after_seq=st.one_of(st.just(1), seq),
                queue=queue_,
                task=st.one_of(st.just(""), TEXT),
            ),
        ),
    ]
    dead = [
        st.tuples(st.just(name), st.builds(kind, queue=queue_, job_ids=job_ids, all=st.booleans()))
        for name, kind in (
            ("ReplayDeadJobs", broker_pb2.ReplayDeadJobsRequest),
            ("PurgeDeadJobs", broker_pb2.PurgeDeadJobsRequest),
        )
    ]
    listings = [
        st.tuples(
            st.just("ListJobs"),
            st.builds(
                broker_pb2.ListJobsRequest,
                queue=queue_,
                states=STATES,
                task=st.one_of(st.just(""), TEXT),
                page_size=UINT32,
                page_token=token,
            ),
        ),
        st.tuples(
            st.just("ListDeadJobs"),
            st.builds(
                broker_pb2.ListDeadJobsRequest, queue=queue_, page_size=UINT32, page_token=token
            ),
        ),
    ]
    return st.one_of(*by_id, *events, *dead, *listings, *schedule_requests())


CRON = st.one_of(
    st.sampled_from(
        ["* * * * *", "0 3 * * *", "*/5 * * * * *", "0 0 30 2 *", "61 * * * *", "L L L L L", ""]
    ),
    TEXT,
)
ZONE = st.one_of(
    st.sampled_from(["", "UTC", "Europe/Berlin", "Nope/Zone", "../etc/passwd", "/etc/localtime"]),
    TEXT,
)
SCHEDULE_NAME = st.one_of(st.sampled_from(["fz-schedule", ""]), TAME, TEXT)


@st.composite
def schedules(draw: st.DrawFn) -> broker_pb2.Schedule:
    """A registration tame but for what was drawn hostile: its name, timing,
    zone, catch-up or job (of the queues the hostile streams lease)."""
    msg = broker_pb2.Schedule(
        name=draw(SCHEDULE_NAME),
        timezone=draw(ZONE),
        catch_up=draw(st.one_of(st.sampled_from([0, 1, 2]), INT32)),
        paused=draw(st.booleans()),
    )
    timing = draw(st.sampled_from(["cron", "every", "both", "none"]))
    if timing in ("cron", "both"):
        msg.cron = draw(CRON)
    if timing in ("every", "both"):
        msg.every.CopyFrom(draw(st.one_of(DURATION, TAME_DURATION)))
    if draw(st.integers(0, 9)):
        msg.job.CopyFrom(draw(job_specs(queue=SHARED)))
    return msg


def schedule_requests() -> list[st.SearchStrategy[tuple[str, Message]]]:
    name = SCHEDULE_NAME
    return [
        st.tuples(
            st.just("CreateSchedule"),
            st.builds(broker_pb2.CreateScheduleRequest, schedule=schedules()),
        ),
        st.tuples(
            st.just("ListSchedules"),
            st.builds(broker_pb2.ListSchedulesRequest, page_size=UINT32, page_token=TEXT),
        ),
        *(
            st.tuples(st.just(rpc), st.builds(kind, name=name))
            for rpc, kind in (
                ("GetSchedule", broker_pb2.GetScheduleRequest),
                ("PauseSchedule", broker_pb2.PauseScheduleRequest),
                ("ResumeSchedule", broker_pb2.ResumeScheduleRequest),
                ("DeleteSchedule", broker_pb2.DeleteScheduleRequest),
            )
        ),
    ]


# A stream that may have nothing to send yet (a tail from now, a quiet job)
# is given this long for its first message.
FIRST_MESSAGE = 3.0
STREAMS = ("WaitJob", "WatchJob", "TailEvents")


def first_message(fuzz: Fuzzer, name: str, request: Message) -> None:
    """The first message, then hang up: a job that is not terminal, or the
    broker's event log, is followed for ever."""
    fuzz.sent(name)
    call = getattr(fuzz.stub, name)(request, timeout=FIRST_MESSAGE)
    try:
        message = next(call, None)
        if message is not None and name == "WaitJob":
            assert message.job.id == request.job_id, describe(request)
        if message is not None and name == "WatchJob":
            assert message.job_id == request.job_id, describe(request)
            assert message.seq > request.after_seq, describe(request)
    except grpc.RpcError as error:
        fuzz.refused(name, error, request)
        return
    finally:
        call.cancel()
    fuzz.ok()


@pytest.mark.timeout(BUDGET + 300)
def test_fuzz_reads_and_operators(fuzz: Fuzzer) -> None:
    def send(calls: list[tuple[str, Message]]) -> None:
        for name, request in calls:
            if name in STREAMS:
                first_message(fuzz, name, request)
            else:
                fuzz.unary(name, request)

    fuzz_for(fuzz, 0.15, st.lists(read_requests(), min_size=1, max_size=25), send)
    print("\n" + fuzz.tally.line("fuzz reads and operators"))


# --- lease streams ---

# A forged fencing token for a lease the stream holds: an older one, one far
# ahead, none, the largest. None of them can be current.
FORGERIES: tuple[Callable[[int], int], ...] = (
    lambda token: token - 1,
    lambda token: token + 1000,
    lambda token: 0,
    lambda token: 2**64 - 1,
)
PREFETCH = st.one_of(st.sampled_from([0, 10_000, 10_001, 2**31, 2**32 - 1]), UINT32)
MANY_QUEUES = st.builds(lambda n: [f"fz-many-{i}" for i in range(n)], st.sampled_from([101, 5000]))
# Each field of a Subscribe, (tame, hostile) as SPEC_FIELDS. Hostile streams
# never name VICTIM: a well-behaved worker leases there.
SUBSCRIBE_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "worker_id": (st.just("fuzz-worker"), TEXT),
    "queues": (
        st.just([SHARED]),
        st.one_of(st.lists(st.one_of(TEXT, MANY), max_size=4), MANY_QUEUES).filter(
            lambda queues: VICTIM not in queues
        ),
    ),
    "prefetch": (st.integers(1, 8), PREFETCH),
}


class Conversation:
    """One LeaseStream, message by message; a thread collects the broker's side."""

    def __init__(self, fuzz: Fuzzer) -> None:
        self.sent: list[broker_pb2.WorkerMessage] = []
        self.answers: list[broker_pb2.BrokerMessage] = []
        self.leases: dict[str, int] = {}
        self.error: grpc.RpcError | None = None
        self._requests: queue.Queue[broker_pb2.WorkerMessage | None] = queue.Queue()
        self._call = fuzz.stub.LeaseStream(iter(self._requests.get, None), timeout=TIMEOUT)
        self._done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.answers.append(message)
                for leased in message.leased.jobs:
                    self.leases[leased.job.id] = leased.fencing_token
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._done.set()

    def send(self, message: broker_pb2.WorkerMessage) -> None:
        self.sent.append(message)
        self._requests.put(message)

    def wait_for_leases(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.leases and not self._done.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    def finish(self) -> bool:
        """Half-close; True when the broker then ended the stream by itself."""
        self._requests.put(None)
        if self._done.wait(TIMEOUT):
            return True
        self._call.cancel()
        self._done.wait(5)
        return False


Ref = tuple[broker_pb2.LeaseRef, bool]  # and whether its token is forged


# How a ref is made: which kind, and the values it may take. Drawn from one
# fixed strategy and turned into a ref by ``make_ref``, so that what the
# stream holds changes the ref, not the draws.
# An unknown job's id: mostly well formed, so that one bad id does not get
# every other ref of its message refused with it.
UNKNOWN_ID = rare(st.builds(lambda: str(uuid.uuid4())), TEXT)
REF_PLAN = st.tuples(
    st.sampled_from(["unknown", "stored", "held", "held", "held", "forged", "forged"]),
    UNKNOWN_ID,
    st.integers(0, 2**32),
    rare(st.integers(0, 2**20), UINT64),
    st.sampled_from(FORGERIES),
)
FLOOD = 10_001  # refs in one message: one more than the broker takes
# Now and then a flood of one ref, which a stream must refuse without ending.
REF_PLANS = st.one_of(
    *[st.lists(REF_PLAN, min_size=1, max_size=4)] * 30,
    st.builds(lambda plan: (plan, FLOOD), REF_PLAN),
)


def make_refs(plans: Any, held: dict[str, int]) -> list[Ref]:
    if isinstance(plans, tuple):  # a flood, of one small ref: 10,000 huge ids would not fit
        plan, n = plans
        ref, fake = make_ref(plan, held)
        ref.job_id = ref.job_id[:64]
        return [(ref, fake)] * n
    return [make_ref(plan, held) for plan in plans]


def make_ref(plan: tuple[str, str, int, int, Callable[[int], int]], held: dict[str, int]) -> Ref:
    """An unknown job's ref, a fuzzed job's with any token, or one of the
    stream's own leases with its token or a forged one."""
    kind, text, n, token, forge = plan
    if kind in ("held", "forged") and held:
        job_id, real = sorted(held.items())[n % len(held)]
        if kind == "held":
            return broker_pb2.LeaseRef(job_id=job_id, fencing_token=real), False
        return broker_pb2.LeaseRef(job_id=job_id, fencing_token=forge(real) % 2**64), True
    job_id = stored_id(n) if kind == "stored" else text
    return broker_pb2.LeaseRef(job_id=job_id, fencing_token=token), False


@st.composite
def subscribes(draw: st.DrawFn) -> broker_pb2.WorkerMessage:
    hostile = draw(st.sampled_from([None, None, "held", *SUBSCRIBE_FIELDS]))
    subscribe = broker_pb2.Subscribe()
    for name, (tame, bad) in SUBSCRIBE_FIELDS.items():
        value = draw(bad if name == hostile else tame)
        if name == "queues":
            subscribe.queues.extend(value)
        else:
            setattr(subscribe, name, value)
    if hostile == "held":
        plans = draw(st.lists(REF_PLAN, max_size=3))
        subscribe.held.extend(make_ref(plan, {})[0] for plan in plans)
    return broker_pb2.WorkerMessage(seq=draw(UINT64), subscribe=subscribe)


KINDS = [
    "heartbeat",
    "start",
    "progress",
    "complete",
    "fail",
    "release",
    "flow",
    "subscribe",
    "empty",
]
RefPlans = Any  # a list of REF_PLAN draws, (one plan, FLOOD), or HONEST
HONEST: list[Any] = []  # a report on every lease the stream holds, each under its token


@dataclass
class Report:
    """A message after the subscribe, drawn whole before the stream opens; its
    refs are made when it is sent, from what the stream then holds."""

    message: broker_pb2.WorkerMessage
    plans: RefPlans = ()
    # complete and fail: the items drawn (up to 4); a flood repeats the last, slimmed.
    items: list[Any] = field(default_factory=list)

    def fill(self, held: dict[str, int]) -> tuple[broker_pb2.WorkerMessage, list[bool]]:
        """The message with its refs, and for each ref whether it is forged."""
        msg = broker_pb2.WorkerMessage()
        msg.CopyFrom(self.message)
        if self.plans is HONEST:  # every lease the stream holds, under its own token
            refs = [
                (broker_pb2.LeaseRef(job_id=i, fencing_token=t), False) for i, t in held.items()
            ]
        else:
            refs = make_refs(self.plans, held) if self.plans else []
        if not refs and self.plans:
            refs = [(broker_pb2.LeaseRef(job_id=str(uuid.uuid4()), fencing_token=1), False)]
        kind = msg.WhichOneof("kind")
        if kind in ("heartbeat", "release", "start"):
            getattr(msg, kind).leases.extend(ref for ref, _ in refs)
        elif kind == "progress":
            msg.progress.lease.CopyFrom(refs[0][0])
        elif kind in ("complete", "fail"):
            repeated = slim(self.items[-1])
            field_ = msg.complete.completions if kind == "complete" else msg.fail.failures
            for i, (ref, _) in enumerate(refs):
                item = field_.add()
                item.CopyFrom(self.items[i] if i < len(self.items) else repeated)
                item.lease.CopyFrom(ref)
        return msg, [fake for _, fake in refs]


@st.composite
def completions(draw: st.DrawFn) -> broker_pb2.Completion:
    done = broker_pb2.Completion()
    if draw(st.booleans()):
        done.result.data = draw(rare(st.binary(max_size=40), HUGE_DATA))
        done.result.content_type = draw(rare(st.just(""), TEXT))
    if (ran := draw(maybe(rare(TAME_DURATION, DURATION)))) is not None:
        done.run_time.CopyFrom(ran)  # how long the handler ran, by the worker's word
    return done


@st.composite
def failures(draw: st.DrawFn) -> broker_pb2.Failure:
    failure = broker_pb2.Failure(permanent=draw(st.booleans()), cancelled=draw(st.booleans()))
    failure.error.type = draw(rare(TAME, TEXT))
    failure.error.message = draw(rare(TAME, TEXT))
    failure.error.traceback = draw(rare(TAME, TEXT))
    if (after := draw(maybe(rare(TAME_DURATION, DURATION)))) is not None:
        failure.retry_after.CopyFrom(after)
    if (ran := draw(maybe(rare(TAME_DURATION, DURATION)))) is not None:
        failure.run_time.CopyFrom(ran)
    return failure


@st.composite
def reports(draw: st.DrawFn) -> Report:
    kind = draw(st.sampled_from(KINDS))
    report = Report(broker_pb2.WorkerMessage(seq=draw(UINT64)))
    msg = report.message
    if kind in ("heartbeat", "start", "release", "complete", "fail"):
        getattr(msg, kind).SetInParent()
        report.plans = draw(st.one_of(REF_PLANS, st.just(HONEST)))
        count = FLOOD if isinstance(report.plans, tuple) else len(report.plans) or 4
        if kind in ("complete", "fail"):
            items = st.lists(completions() if kind == "complete" else failures(), min_size=1)
            report.items = draw(items.map(lambda found: found[: min(count, 4)]))
    elif kind == "progress":
        report.plans = [draw(REF_PLAN)]
        msg.progress.progress = draw(rare(st.floats(0, 1), DOUBLE))
        msg.progress.message = draw(rare(TAME, TEXT))
    elif kind == "flow":
        msg.flow.prefetch = draw(rare(st.integers(0, 8), PREFETCH))
    elif kind == "subscribe":
        msg.subscribe.CopyFrom(draw(subscribes()).subscribe)
    return report


def slim(report: Any) -> Any:
    """What a flood of 10,000 reports repeats: the report drawn, unless it is
    large (10,000 copies of a 3 MiB result would fill the memory)."""
    return report if report.ByteSize() <= 1024 else type(report)()


FIRST = rare(subscribes(), st.builds(lambda: broker_pb2.WorkerMessage()))
# A stream: its first message and what follows.
CONVERSATION = st.tuples(FIRST, st.lists(reports(), max_size=8))


def converse(fuzz: Fuzzer, first: broker_pb2.WorkerMessage, then: list[Report]) -> None:
    talk = Conversation(fuzz)
    fuzz.sent("LeaseStream")
    talk.send(first)
    if first.subscribe.queues == [SHARED] and first.subscribe.prefetch > 0:
        talk.wait_for_leases(0.15)
    followups: list[tuple[broker_pb2.WorkerMessage, list[bool]]] = []
    seqs: set[int] = set()
    for report in then:
        msg, forged = report.fill(dict(talk.leases))
        if msg.seq in seqs:
            msg.seq = 0  # one Ack per seq, so that results can be told apart
        seqs.add(msg.seq)
        followups.append((msg, forged))
        talk.send(msg)
    ended = talk.finish()
    assert ended, f"the stream did not end after the worker half-closed: {describe(talk.sent)}"
    if talk.error is not None:
        fuzz.refused("LeaseStream", talk.error, talk.sent)
        return
    fuzz.ok()
    check_answers(fuzz, talk, first, followups)


def check_answers(
    fuzz: Fuzzer,
    talk: Conversation,
    first: broker_pb2.WorkerMessage,
    followups: list[tuple[broker_pb2.WorkerMessage, list[bool]]],
) -> None:
    shown = Lazy(lambda: describe(talk.sent))
    assert first.WhichOneof("kind") == "subscribe", f"a stream without subscribe ended OK: {shown}"
    acks = {a.ack.seq: a.ack for a in talk.answers if a.WhichOneof("kind") == "ack"}
    queues = set(first.subscribe.queues)
    for answer in talk.answers:
        for leased in answer.leased.jobs:
            assert leased.job.queue in queues, f"leased from a queue not subscribed: {shown}"
            assert leased.job.state == job_pb2.JOB_STATE_LEASED, describe(leased)
            assert leased.fencing_token >= 1, describe(leased)
        if answer.WhichOneof("kind") == "cancel":
            assert answer.cancel.reason in broker_pb2.CancelReason.values(), describe(answer)
    for msg, forged in followups:
        if not msg.seq:
            continue
        assert msg.seq in acks, f"no Ack for {describe(msg)} on a stream that ended OK: {shown}"
        results = acks[msg.seq].results
        for result in results:
            fuzz.report(result, msg)
        if len(results) == len(forged):
            for result, fake in zip(results, forged, strict=True):
                honoured = fake and result.status == broker_pb2.REPORT_STATUS_OK
                assert not honoured, f"a forged fencing token was honoured: {describe(msg)}"
        if msg.WhichOneof("kind") == "complete" and len(results) == len(msg.complete.completions):
            check_completed(fuzz, msg.complete.completions, results)


def check_completed(fuzz: Fuzzer, done: Any, results: Any) -> None:
    """A completion answered OK stored its result, or dead-lettered a job
    whose result was over the payload limit."""
    for completion, result in zip(done, results, strict=True):
        if result.status != broker_pb2.REPORT_STATUS_OK:
            continue
        job = fuzz.live.client.get_job(completion.lease.job_id)
        shown = Lazy(lambda c=completion, j=job: f"{describe(c)} left {j!r}"[:2000])
        if len(completion.result.data) > MAX_PAYLOAD:
            assert job.state is JobState.DEAD, shown
            continue
        assert job.state is JobState.SUCCEEDED, shown
        if completion.HasField("result"):
            assert job.result == completion.result.data, shown


LEASE_BATCHES = st.tuples(
    # Mostly tame jobs, so that streams hold real leases to report on.
    st.lists(job_specs(queue=SHARED, modes=("none", "none", "one")), min_size=2, max_size=6),
    st.lists(CONVERSATION, min_size=1, max_size=5),
)


@pytest.mark.timeout(BUDGET + 300)
def test_fuzz_lease_streams(fuzz: Fuzzer) -> None:
    def send(drawn: tuple[list[job_pb2.JobSpec], list[tuple[Any, list[Report]]]]) -> None:
        specs, streams = drawn
        _submit(fuzz, "grouped", specs)  # something to lease: each job stored or refused alone
        for first, then in streams:
            converse(fuzz, first, then)

    fuzz_for(fuzz, 0.3, LEASE_BATCHES, send)
    print("\n" + fuzz.tally.line("fuzz lease streams"))


# --- raw bytes ---

METHODS = {m.name: m for m in broker_pb2.DESCRIPTOR.services_by_name["Broker"].methods}
# A valid request of each method, to mutate: bytes that nearly parse reach
# further than noise.
_SPEC = job_pb2.JobSpec(queue=SHARED, task="t")
TEMPLATES: dict[str, Message] = {
    "Submit": broker_pb2.SubmitRequest(job=_SPEC),
    "SubmitBatch": broker_pb2.SubmitBatchRequest(jobs=[_SPEC]),
    "SubmitGrouped": broker_pb2.SubmitBatchRequest(jobs=[_SPEC]),
    "GetJob": broker_pb2.GetJobRequest(job_id=str(uuid.uuid4())),
    "WaitJob": broker_pb2.WaitJobRequest(job_id=str(uuid.uuid4())),
    "CancelJob": broker_pb2.CancelJobRequest(job_id=str(uuid.uuid4())),
    "ListJobs": broker_pb2.ListJobsRequest(queue=SHARED, states=[1, 2], page_size=5),
    "LeaseStream": broker_pb2.WorkerMessage(
        seq=1, subscribe=broker_pb2.Subscribe(queues=[SHARED], prefetch=1)
    ),
    "ListDeadJobs": broker_pb2.ListDeadJobsRequest(queue=SHARED, page_size=5),
    "ReplayDeadJobs": broker_pb2.ReplayDeadJobsRequest(job_ids=[str(uuid.uuid4())]),
    "PurgeDeadJobs": broker_pb2.PurgeDeadJobsRequest(job_ids=[str(uuid.uuid4())]),
    "CreateApiKey": broker_pb2.CreateApiKeyRequest(
        name="fz-key", role=broker_pb2.ROLE_WORKER, queues=[SHARED]
    ),
    "ListApiKeys": broker_pb2.ListApiKeysRequest(include_revoked=True),
    "ListJobEvents": broker_pb2.ListJobEventsRequest(job_id=str(uuid.uuid4()), page_size=5),
    "WatchJob": broker_pb2.WatchJobRequest(job_id=str(uuid.uuid4()), after_seq=1),
    "TailEvents": broker_pb2.TailEventsRequest(after_seq=1, queue=SHARED),
    "ExplainJob": broker_pb2.ExplainJobRequest(job_id=str(uuid.uuid4())),
    "RevokeApiKey": broker_pb2.RevokeApiKeyRequest(key="fz-key"),
    "SubmitWorkflow": broker_pb2.SubmitWorkflowRequest(
        workflow_id="fz-workflow",
        jobs=[
            _SPEC,
            job_pb2.JobSpec(
                queue=SHARED,
                task="t",
                needs=job_pb2.Needs(parents=[0], input="[0]", with_payload=True),
            ),
        ],
    ),
    "CancelWorkflow": broker_pb2.CancelWorkflowRequest(workflow_id="fz-workflow"),
    "CreateSchedule": broker_pb2.CreateScheduleRequest(
        schedule=broker_pb2.Schedule(name="fz-raw", cron="0 3 * * *", job=_SPEC)
    ),
    "ListSchedules": broker_pb2.ListSchedulesRequest(page_size=5),
    "GetSchedule": broker_pb2.GetScheduleRequest(name="fz-raw"),
    "PauseSchedule": broker_pb2.PauseScheduleRequest(name="fz-raw"),
    "ResumeSchedule": broker_pb2.ResumeScheduleRequest(name="fz-raw"),
    "DeleteSchedule": broker_pb2.DeleteScheduleRequest(name="fz-raw"),
    "ListQueues": broker_pb2.ListQueuesRequest(),
    "SetQueue": broker_pb2.SetQueueRequest(
        name="fz-queue",
        defaults=broker_pb2.QueueDefaults(max_attempts=3, backoff_factor=2.0),
    ),
    "PauseQueue": broker_pb2.PauseQueueRequest(name="fz-queue"),
    "ResumeQueue": broker_pb2.PauseQueueRequest(name="fz-queue"),
}
assert set(TEMPLATES) == set(METHODS), "a Broker RPC without a fuzz template"


@st.composite
def mutated(draw: st.DrawFn, template: bytes) -> bytes:
    data = bytearray(template)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "varint"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del data[at:]
        else:  # a length or a value that claims far more than follows
            data[at:at] = b"\xff\xff\xff\xff\x0f"
    return bytes(data)


def raw_bodies(name: str) -> st.SearchStrategy[bytes]:
    template = TEMPLATES[name].SerializeToString()
    return st.one_of(
        st.binary(max_size=64), mutated(template), mutated(template), st.just(b"\n" * 3000)
    )


RAW = st.lists(
    st.sampled_from(sorted(TEMPLATES)).flatmap(
        lambda name: st.tuples(st.just(name), st.lists(raw_bodies(name), min_size=1, max_size=3))
    ),
    min_size=1,
    max_size=40,
)


def send_raw(fuzz: Fuzzer, name: str, bodies: list[bytes]) -> None:
    """Bytes as they are, through identity serializers."""
    method, path = METHODS[name], f"/{SERVICE}/{name}"
    fuzz.sent(f"{name} (raw)")
    try:
        if method.client_streaming:
            for _ in fuzz.channel.stream_stream(path)(iter(bodies), timeout=TIMEOUT):
                pass
        elif method.server_streaming:
            call = fuzz.channel.unary_stream(path)(bodies[0], timeout=FIRST_MESSAGE)
            try:
                next(call, None)
            finally:
                call.cancel()
        else:
            fuzz.channel.unary_unary(path)(bodies[0], timeout=TIMEOUT)
    except grpc.RpcError as error:
        fuzz.refused(f"{name} (raw bytes)", error, bodies)
        return
    fuzz.ok()


@pytest.mark.timeout(BUDGET + 300)
def test_fuzz_raw_bytes(fuzz: Fuzzer) -> None:
    def send(calls: list[tuple[str, list[bytes]]]) -> None:
        for name, bodies in calls:
            send_raw(fuzz, name, bodies)

    fuzz_for(fuzz, 0.25, RAW, send)
    print("\n" + fuzz.tally.line("fuzz raw bytes"))


# --- what the fuzz found ---


def lease_stream_answers(live: Live, messages: list[broker_pb2.WorkerMessage]) -> list[Any]:
    """Send ``messages`` on one LeaseStream; the broker's answers, then its final status."""
    with grpc.insecure_channel(live.target, CHANNEL_OPTIONS) as channel:
        call = broker_pb2_grpc.BrokerStub(channel).LeaseStream(iter(messages), timeout=TIMEOUT)
        answers: list[Any] = []
        try:
            answers.extend(call)
        except grpc.RpcError as error:
            answers.append(error.code())
        else:
            answers.append(grpc.StatusCode.OK)
        return answers


def test_progress_with_a_token_past_int64_is_refused_not_fatal(live: Live) -> None:
    """The fuzz found a Progress report with a fencing token of 2**63 or more (a
    valid uint64) ending the whole stream with INTERNAL: the store could not
    bind the token. It must be answered, and the stream go on."""
    job_id = live.client.submit("fuzz.task", None, queue=f"fz-{uuid.uuid4().hex}").id
    ref = broker_pb2.LeaseRef(job_id=job_id, fencing_token=2**64 - 1)
    answers = lease_stream_answers(
        live,
        [
            broker_pb2.WorkerMessage(subscribe=broker_pb2.Subscribe(queues=[SHARED], prefetch=1)),
            broker_pb2.WorkerMessage(seq=1, progress=broker_pb2.Progress(lease=ref, progress=0.5)),
        ],
    )
    assert answers[-1] is grpc.StatusCode.OK, answers
    [ack] = [a.ack for a in answers[:-1] if a.WhichOneof("kind") == "ack"]
    # Refused as a bad report, or answered as a lost lease: either way the stream goes on.
    refused = {broker_pb2.REPORT_STATUS_LEASE_LOST, broker_pb2.REPORT_STATUS_INVALID}
    assert len(ack.results) == 1 and ack.results[0].status in refused, ack

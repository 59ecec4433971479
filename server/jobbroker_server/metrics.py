"""Every Prometheus metric of the broker. Seconds as the unit; labels bounded
to queue and state, never a job id, and to ``max_queues`` queues: the first
that many queues seen get labels of their own, every later one shares
OTHER_QUEUES, so a client that makes up queue names cannot grow /metrics."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import Reason, Transition

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RUN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


OTHER_QUEUES = "_other"
# The ends of an attempt that count as failed (unless the job ends cancelled).
_FAILURES = frozenset({Reason.FAILED, Reason.DEAD_LETTERED, Reason.TIMED_OUT, Reason.LEASE_EXPIRED})


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_queues: int = 1000) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_queues = max_queues
        self._queues: set[str] = set()
        r = self.registry
        self.submitted = Counter(
            "jobbroker_jobs_submitted", "Jobs stored by submit", ["queue"], registry=r
        )
        self.leased = Counter("jobbroker_jobs_leased", "Attempts started", ["queue"], registry=r)
        self.succeeded = Counter(
            "jobbroker_jobs_succeeded", "Jobs that succeeded", ["queue"], registry=r
        )
        self.failed = Counter(
            "jobbroker_jobs_failed",
            "Attempts that failed (error, timeout or expired lease)",
            ["queue"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "jobbroker_jobs_dead_lettered",
            "Jobs moved to the dead-letter queue",
            ["queue"],
            registry=r,
        )
        self.transitions = Counter(
            "jobbroker_job_transitions",
            "Job state changes by reason (submitted, leased, started, cancelled...)",
            ["queue", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "jobbroker_queue_depth", "Jobs per queue and state", ["queue", "state"], registry=r
        )
        self.run_seconds = Histogram(
            "jobbroker_job_run_seconds",
            "Time from lease to the attempt's report",
            ["queue"],
            buckets=_RUN_BUCKETS,
            registry=r,
        )
        self.start_latency_seconds = Histogram(
            "jobbroker_submit_to_start_seconds",
            "Time from a job becoming runnable to its lease",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.streams = Gauge("jobbroker_worker_streams", "Open LeaseStreams", registry=r)

    def queue_label(self, queue: str | None) -> str:
        """The label a queue's samples go under (None: queues not named apart)."""
        if queue is None:
            return OTHER_QUEUES
        if queue in self._queues:
            return queue
        if len(self._queues) < self.max_queues:
            self._queues.add(queue)
            return queue
        return OTHER_QUEUES

    def count(self, counter: Counter, queues: Iterable[str]) -> None:
        """One increment per queue for a batch, not one label lookup per job."""
        for queue, n in Tally(queues).items():
            counter.labels(self.queue_label(queue)).inc(n)

    def observe(self, histogram: Histogram, samples: Iterable[tuple[str, float]]) -> None:
        """Observe each (queue, value), looking a queue's label up once per batch."""
        children: dict[str, Histogram] = {}
        for queue, value in samples:
            child = children.get(queue)
            if child is None:
                child = children[queue] = histogram.labels(self.queue_label(queue))
            child.observe(value)

    def on_moved(self, moved: Sequence[Transition]) -> None:
        """Count one operation's transitions, by reason and by the counter each
        feeds, a label looked up once per queue and kind."""
        for (queue, reason, target), n in Tally(
            (t.queue, t.reason, t.target) for t in moved
        ).items():
            label = self.queue_label(queue)
            if reason is not Reason.PROGRESS:
                self.transitions.labels(label, reason.value).inc(n)
            for counter in self._counters(reason, target):
                counter.labels(label).inc(n)

    def _counters(self, reason: Reason, target: JobState | None) -> list[Counter]:
        if reason is Reason.SUBMITTED:
            return [self.submitted]
        if reason is Reason.LEASED:
            return [self.leased]
        if reason is Reason.SUCCEEDED:
            return [self.succeeded]
        if reason not in _FAILURES or target is JobState.CANCELLED:
            return []
        return [self.failed, self.dead_lettered] if target is JobState.DEAD else [self.failed]

    def set_depths(self, depths: Mapping[tuple[str | None, JobState], int]) -> None:
        """Replace the depth gauge's samples; queues past the cap are summed."""
        summed: Tally[tuple[str, str]] = Tally()
        for (queue, state), n in depths.items():
            summed[(self.queue_label(queue), state.value)] += n
        self.queue_depth.clear()
        for (label, state_label), n in summed.items():
            self.queue_depth.labels(label, state_label).set(n)

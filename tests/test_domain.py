"""The pure rules: the transition table, the retry policy, wire conversions."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from jobbroker import _convert as sdk_convert
from jobbroker.v1 import job_pb2
from jobbroker_server.domain import states
from jobbroker_server.domain.errors import IllegalTransition
from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.retry import RetryPolicy, after_failure
from jobbroker_server.domain.states import TRANSITIONS, JobState, allowed
from jobbroker_server.domain.transitions import SHAPES, Reason, Transition
from jobbroker_server.domain.transitions import check as check_transition
from jobbroker_server.rpc import convert

ALLOWED = {
    ("scheduled", "pending"),
    ("scheduled", "cancelled"),
    ("pending", "leased"),
    ("pending", "cancelled"),
    ("pending", "waiting"),  # held back by a flow limit
    ("leased", "running"),
    ("leased", "dead"),
    ("leased", "cancelled"),
    ("leased", "pending"),
    ("leased", "scheduled"),
    ("running", "succeeded"),
    ("running", "dead"),
    ("running", "cancelled"),
    ("running", "pending"),
    ("running", "scheduled"),
    ("dead", "pending"),
    ("waiting", "pending"),
    ("waiting", "scheduled"),
    ("waiting", "cancelled"),
    ("cancelled", "waiting"),
}


@pytest.mark.parametrize("src", list(JobState))
@pytest.mark.parametrize("dst", list(JobState))
def test_transition_table_is_the_documented_one(src: JobState, dst: JobState) -> None:
    expected = (src.value, dst.value) in ALLOWED
    assert states.allowed(src, dst) is expected
    if expected:
        assert states.check(src, dst) is dst
    else:
        with pytest.raises(IllegalTransition, match=f"a {src} job cannot become {dst}"):
            states.check(src, dst)


def test_terminal_states_have_no_way_out_but_replay_and_resume() -> None:
    assert {s for s in JobState if s.terminal} == {"succeeded", "dead", "cancelled"}
    assert states.sources(JobState.PENDING) == {"scheduled", "leased", "running", "dead", "waiting"}
    assert states.TRANSITIONS[JobState.CANCELLED] == {JobState.WAITING}
    assert states.TRANSITIONS[JobState.SUCCEEDED] == set()


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(
        max_attempts=10,
        backoff_base=timedelta(seconds=1),
        backoff_factor=2,
        backoff_cap=timedelta(seconds=5),
        jitter=0,
    )
    delays = [policy.delay(n).total_seconds() for n in range(1, 6)]
    assert delays == [1, 2, 4, 5, 5]


def test_jitter_spreads_within_its_fraction() -> None:
    policy = RetryPolicy(backoff_base=timedelta(seconds=10), jitter=0.2)
    rng = random.Random(7)
    seen = [policy.delay(1, rng).total_seconds() for _ in range(200)]
    assert all(8 <= d <= 12 for d in seen)
    assert max(seen) - min(seen) > 2  # it does spread


def test_after_failure_dead_when_exhausted_or_permanent() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0)
    assert after_failure(attempts=1, policy=policy, permanent=False, retry_after=None) == (
        timedelta(seconds=1)
    )
    assert after_failure(attempts=3, policy=policy, permanent=False, retry_after=None) is None
    assert after_failure(attempts=1, policy=policy, permanent=True, retry_after=None) is None
    wait = timedelta(seconds=42)
    assert after_failure(attempts=1, policy=policy, permanent=False, retry_after=wait) == wait


def test_job_ids_sort_in_creation_order() -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    assert all(i[14] == "7" for i in ids)  # UUID version 7


@pytest.mark.parametrize(
    "instant",
    [
        datetime(2026, 11, 24, 7, 30, 1, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_wire_timestamps_match_protobufs_own_conversion(instant: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(instant)
    assert convert.timestamp(instant) == expected
    assert convert.timestamp(instant).ToDatetime(tzinfo=UTC) == instant
    # and the SDK reads it back as protobuf would
    job = job_pb2.Job(created_at=expected)
    assert sdk_convert.timestamp_from_pb(job, "created_at") == expected.ToDatetime(tzinfo=UTC)


@pytest.mark.parametrize(
    "span", [timedelta(0), timedelta(days=2, microseconds=7), timedelta(seconds=-1.5)]
)
def test_wire_durations_match_protobufs_own_conversion(span: timedelta) -> None:
    expected = duration_pb2.Duration()
    expected.FromTimedelta(span)
    assert convert.duration(span) == expected
    job = job_pb2.Job(timeout=expected)
    assert sdk_convert.duration_from_pb(job, "timeout") == expected.ToTimedelta() == span


def test_every_reason_moves_only_along_the_state_table() -> None:
    for reason, shapes in SHAPES.items():
        for source, target in shapes:
            if source is not None and target is not None and source is not target:
                assert allowed(source, target), (reason, source, target)
    # Only the reasons that are lines of the story, not moves, stay put.
    stays = {r for r, shapes in SHAPES.items() if any(s is t for s, t in shapes)}
    assert stays == {Reason.CANCEL_REQUESTED, Reason.PROGRESS}


def test_every_edge_of_the_state_table_has_a_reason() -> None:
    named = {shape for shapes in SHAPES.values() for shape in shapes}
    for source, targets in TRANSITIONS.items():
        for target in targets:
            assert (source, target) in named, f"{source} -> {target} has no reason"


@pytest.mark.parametrize(
    ("reason", "source", "target", "ok"),
    [
        (Reason.SUBMITTED, None, JobState.PENDING, True),
        (Reason.SUBMITTED, JobState.PENDING, JobState.RUNNING, False),
        (Reason.LEASED, JobState.PENDING, JobState.LEASED, True),
        (Reason.LEASED, JobState.PENDING, JobState.RUNNING, False),
        (Reason.LEASED, JobState.SCHEDULED, JobState.LEASED, False),
        (Reason.STARTED, JobState.LEASED, JobState.RUNNING, True),
        (Reason.SUCCEEDED, JobState.LEASED, JobState.SUCCEEDED, False),
        (Reason.FAILED, JobState.LEASED, JobState.PENDING, True),
        (Reason.TIMED_OUT, JobState.PENDING, JobState.SCHEDULED, False),
        (Reason.CANCEL_REQUESTED, JobState.RUNNING, JobState.RUNNING, True),
        (Reason.CANCEL_REQUESTED, JobState.PENDING, JobState.PENDING, False),
        (Reason.FAILED, JobState.RUNNING, JobState.SCHEDULED, True),
        (Reason.FAILED, JobState.RUNNING, JobState.DEAD, False),
        (Reason.DEAD_LETTERED, JobState.RUNNING, JobState.DEAD, True),
        (Reason.LEASE_EXPIRED, JobState.RUNNING, JobState.CANCELLED, True),
        (Reason.CANCELLED, JobState.SUCCEEDED, JobState.CANCELLED, False),
        (Reason.REPLAYED, JobState.DEAD, JobState.PENDING, True),
        (Reason.PURGED, JobState.DEAD, None, True),
        (Reason.PURGED, JobState.PENDING, None, False),
        (Reason.EXPIRED, JobState.SUCCEEDED, None, True),
        (Reason.EXPIRED, JobState.DEAD, None, False),
    ],
)
def test_a_transition_is_checked_against_its_reason(
    reason: Reason, source: JobState | None, target: JobState | None, ok: bool
) -> None:
    moved = Transition("j1", "q", source, target, reason, attempt=1)
    if ok:
        assert check_transition(moved) is moved
    else:
        with pytest.raises(IllegalTransition, match=f"job j1: {reason} cannot take it"):
            check_transition(moved)


def test_a_released_input_splices_json_results_and_wraps_anything_else() -> None:
    from jobbroker_server.domain.models import Payload
    from jobbroker_server.domain.workflows import released_input, result_slot

    own = Payload(b'"b-1"', "application/json")
    slots = [
        result_slot(b"[1,2]", "application/json"),
        result_slot(b"1,2", "application/json"),  # not JSON, whatever it says
        result_slot(None, None),
    ]
    made = released_input([0, [1, 2]], True, own, slots)
    assert json.loads(made.data) == {
        "result": [[1, 2], [{"content_type": "application/json", "base64": "MSwy"}, None]],
        "payload": "b-1",
    }

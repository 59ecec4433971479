"""Concurrency and rate limits on the client side: RateLimit and its short
form, what a submit and its task's declaration put in the JobSpec (key
functions, checks before anything is sent), and how a job, an explanation and
a queue's settings read them back. No broker: these are the SDK's own rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobbroker import (
    Explanation,
    InvalidArgumentError,
    JobRequest,
    JobState,
    Piped,
    QueueSettings,
    RateLimit,
    RetryPolicy,
    chain,
    task,
)
from jobbroker import _convert as sdk_convert
from jobbroker import queues as sdk_queues
from jobbroker._calls import build_spec
from jobbroker.v1 import broker_pb2, job_pb2
from jobbroker.workflow import workflow_request
from jobbroker_server import cli, cli_queues

pytestmark = pytest.mark.timeout(30)

SECOND = timedelta(seconds=1)


@task(
    queue="calls",
    concurrency_key=lambda p: f"customer:{p['customer']}",
    concurrency_limit=2,
    rate_key="partner-api",
    rate_limit="10/s",
)
def call_partner(payload: dict[str, str]) -> int:
    return len(payload)


@task(queue="calls", concurrency_limit=3, rate_limit=RateLimit(5, SECOND))
def limits_without_keys(payload: int) -> int:
    return payload


def _fails(payload: Any) -> str:
    raise AssertionError("the task's key function ran although the submit gave the key")


@task(concurrency_key=_fails, rate_key=_fails)
def keyed_by_submit(payload: int) -> int:
    return payload


@task(concurrency_key=lambda p: p.get("customer"))
def sometimes_keyed(payload: dict[str, str]) -> int:
    return len(payload)


def _rate(spec: job_pb2.JobSpec) -> RateLimit | None:
    return sdk_convert.rate_limit_from_pb(spec, "rate_limit")


# --- RateLimit ---


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/s", 100, SECOND),
        ("1000/min", 1000, timedelta(minutes=1)),
        ("5/h", 5, timedelta(hours=1)),
        ("10/2s", 10, 2 * SECOND),
        ("1/d", 1, timedelta(days=1)),
        ("3/1.5min", 3, timedelta(seconds=90)),
        ("20/500ms", 20, timedelta(milliseconds=500)),
        (" 7 / 2 Hours ", 7, timedelta(hours=2)),
        ("4/second", 4, SECOND),
        ("4/sec", 4, SECOND),
        ("4/m", 4, timedelta(minutes=1)),
        ("4/minute", 4, timedelta(minutes=1)),
        ("4/hour", 4, timedelta(hours=1)),
        ("4/day", 4, timedelta(days=1)),
        ("1000000/7d", 1_000_000, timedelta(days=7)),
    ],
)
def test_a_rate_is_read_from_its_short_form(text: str, count: int, period: timedelta) -> None:
    rate = RateLimit.parse(text)
    assert rate == RateLimit(count, period)
    assert RateLimit.parse(str(rate)) == rate  # what the CLI prints reads back


def test_a_rate_prints_in_the_unit_that_fits() -> None:
    assert [str(RateLimit.parse(t)) for t in ("100/s", "10/2s", "60/60s", "5/120min", "1/24h")] == [
        "100/s",
        "10/2s",
        "60/min",
        "5/2h",
        "1/d",
    ]
    assert str(RateLimit(3, timedelta(milliseconds=250))) == "3/0.25s"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("100", "is not a rate: give count/period such as '100/s'"),
        ("100/", "is not a rate: give"),
        ("/s", "is not a rate: give"),
        ("100/fortnight", "is not a rate: give"),
        ("1.5/s", "is not a rate: give"),
        ("-1/s", "is not a rate: give"),
        ("10/-2s", "is not a rate: give"),
        ("0/s", "its count is a whole number from 1 to 1,000,000"),
        ("1000001/s", "its count is a whole number from 1 to 1,000,000"),
        ("10/0s", "its period is from 1 ms to 7 days"),
        ("1/0.5ms", "its period is from 1 ms to 7 days"),
        ("1/8d", "its period is from 1 ms to 7 days"),
        ("1/99999999999999999999999d", "its period is from 1 ms to 7 days"),
    ],
)
def test_a_bad_rate_says_what_a_rate_looks_like(text: str, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"^{text!r}") as refused:
        RateLimit.parse(text)
    assert says in str(refused.value)
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("count", "period", "says"),
    [
        (0, SECOND, "count is a whole number of at least 1, not 0"),
        (True, SECOND, "not True"),
        (2.5, SECOND, "not 2.5"),
        (1, timedelta(0), "period is a timedelta over 0"),
        (1, -SECOND, "period is a timedelta over 0"),
        (1, 1.0, "period is a timedelta over 0, not 1.0"),
    ],
)
def test_a_rate_limit_needs_a_count_and_a_period(count: Any, period: Any, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        RateLimit(count, period)


# --- what a submit sends ---


def test_the_submits_keys_and_limits_go_into_the_spec() -> None:
    spec = build_spec(
        JobRequest(
            "report.build",
            {"month": 11},
            concurrency_key="tenant:acme",
            concurrency_limit=4,
            rate_key="smtp",
            rate_limit="100/min",
        )
    )
    assert (spec.concurrency_key, spec.concurrency_limit, spec.rate_key) == (
        "tenant:acme",
        4,
        "smtp",
    )
    assert _rate(spec) == RateLimit(100, timedelta(minutes=1))
    spec = build_spec(
        JobRequest("report.build", None, rate_key="smtp", rate_limit=RateLimit(3, SECOND))
    )
    assert _rate(spec) == RateLimit(3, SECOND)


def test_a_job_without_limits_sends_none() -> None:
    spec = build_spec(JobRequest("report.build", {"month": 11}))
    assert (spec.concurrency_key, spec.concurrency_limit, spec.rate_key) == ("", 0, "")
    assert not spec.HasField("rate_limit")


def test_a_key_without_a_limit_leaves_it_to_the_queue() -> None:
    spec = build_spec(JobRequest("report.build", None, concurrency_key="k", rate_key="r"))
    assert (spec.concurrency_key, spec.concurrency_limit, spec.rate_key) == ("k", 0, "r")
    assert not spec.HasField("rate_limit")  # the queue's key_rate, else no limit


def test_a_tasks_key_function_computes_the_key_from_the_payload() -> None:
    spec = build_spec(JobRequest(call_partner, {"customer": "acme"}))
    assert (spec.queue, spec.concurrency_key, spec.concurrency_limit) == (
        "calls",
        "customer:acme",
        2,
    )
    assert spec.rate_key == "partner-api" and _rate(spec) == RateLimit(10, SECOND)


def test_the_submits_options_win_over_the_tasks() -> None:
    spec = build_spec(
        JobRequest(
            call_partner,
            {"customer": "acme"},
            concurrency_key="customer:globex",
            concurrency_limit=7,
            rate_limit="1/s",
        )
    )
    assert (spec.concurrency_key, spec.concurrency_limit) == ("customer:globex", 7)
    assert (spec.rate_key, _rate(spec)) == ("partner-api", RateLimit(1, SECOND))
    spec = build_spec(JobRequest(keyed_by_submit, 1, concurrency_key="c", rate_key="r"))
    assert (spec.concurrency_key, spec.rate_key) == ("c", "r")  # _fails never ran


def test_a_key_function_that_returns_none_leaves_the_job_unkeyed() -> None:
    assert build_spec(JobRequest(sometimes_keyed, {})).concurrency_key == ""
    assert build_spec(JobRequest(sometimes_keyed, {"customer": "x"})).concurrency_key == "x"


def test_a_tasks_limit_without_a_key_limits_nothing() -> None:
    spec = build_spec(JobRequest(limits_without_keys, 1))
    assert (spec.concurrency_key, spec.concurrency_limit, spec.rate_key) == ("", 0, "")
    assert not spec.HasField("rate_limit")
    spec = build_spec(JobRequest(limits_without_keys, 1, concurrency_key="k", rate_key="r"))
    assert (spec.concurrency_limit, _rate(spec)) == (3, RateLimit(5, SECOND))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"concurrency_key": ""}, "concurrency_key is a non-empty string of at most 200"),
        ({"concurrency_key": "k" * 201}, "not 201 characters"),
        ({"concurrency_key": 42}, "concurrency_key is a non-empty string"),
        ({"rate_key": ""}, "rate_key is a non-empty string"),
        ({"concurrency_key": "k", "concurrency_limit": 0}, "from 1 to 1,000,000, not 0"),
        ({"concurrency_key": "k", "concurrency_limit": 1_000_001}, "not 1000001"),
        ({"concurrency_key": "k", "concurrency_limit": True}, "not True"),
        ({"concurrency_key": "k", "concurrency_limit": "3"}, "not '3'"),
        ({"concurrency_limit": 3}, "concurrency_limit limits the jobs of one concurrency_key"),
        ({"rate_limit": "3/s"}, "rate_limit limits the jobs of one rate_key"),
        ({"rate_key": "r", "rate_limit": "3/fortnight"}, "rate_limit: '3/fortnight' is not a rate"),
        ({"rate_key": "r", "rate_limit": "0/s"}, "its count is a whole number"),
        (
            {"rate_key": "r", "rate_limit": RateLimit(1, timedelta(days=30))},
            "rate_limit 1/30d is out of bounds: its period is from 1 ms to 7 days",
        ),
        ({"rate_key": "r", "rate_limit": 100}, "rate_limit takes a RateLimit or a string"),
    ],
)
def test_bad_limits_are_refused_before_anything_is_sent(options: Any, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        build_spec(JobRequest("report.build", None, **options))


def test_a_key_function_that_fails_names_the_task() -> None:
    with pytest.raises(InvalidArgumentError, match=r"function of task .*call_partner.* KeyError"):
        build_spec(JobRequest(call_partner, {"name": "no customer"}))

    @task(concurrency_key=lambda p: p)
    def echo(payload: Any) -> None: ...

    with pytest.raises(InvalidArgumentError, match=r"the concurrency_key task .*echo.* computed"):
        build_spec(JobRequest(echo, 42))
    with pytest.raises(InvalidArgumentError, match="computed is a non-empty string"):
        build_spec(JobRequest(echo, ""))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"concurrency_key": 5}, "concurrency_key .a str, or a function of the payload."),
        ({"rate_key": ""}, "rate_key .a str, or a function of the payload. is a non-empty"),
        ({"concurrency_limit": 0}, "concurrency_limit is a whole number"),
        ({"rate_limit": "often"}, "rate_limit: 'often' is not a rate"),
    ],
)
def test_a_bad_declaration_is_refused_where_it_is_written(options: Any, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        task(**options)


def test_a_workflows_steps_carry_their_keys() -> None:
    @task(concurrency_key=lambda p: f"doc:{p['doc']}", rate_key="ocr", rate_limit="2/s")
    def ocr(payload: dict[str, int]) -> str:
        return ""

    @task
    def summarize(text: str) -> str:
        return text

    request, _ = workflow_request(
        chain(ocr.s({"doc": 7}), summarize.s(concurrency_key="summaries", concurrency_limit=1))
    )
    first, second = request.jobs
    assert (first.concurrency_key, first.rate_key, _rate(first)) == (
        "doc:7",
        "ocr",
        RateLimit(2, SECOND),
    )
    assert (second.concurrency_key, second.concurrency_limit) == ("summaries", 1)
    assert list(second.needs.parents) == [0]


def test_a_piped_first_steps_key_function_gets_its_own_payload() -> None:
    @task(concurrency_key=lambda p: f"doc:{p['doc']}")
    def merge(payload: Piped[str, dict[str, int]]) -> str:
        return payload["result"]

    request, _ = workflow_request(chain(merge.s({"doc": 3})))
    [job] = request.jobs
    assert job.concurrency_key == "doc:3"
    assert sdk_convert.decode_payload(job.payload.data, job.payload.content_type) == {
        "result": None,
        "payload": {"doc": 3},
    }


# --- what comes back ---


def test_a_job_reads_back_its_keys_and_limits() -> None:
    pb = job_pb2.Job(
        id="j",
        state=job_pb2.JOB_STATE_WAITING,
        concurrency_key="customer:acme",
        concurrency_limit=2,
        rate_key="partner-api",
    )
    sdk_convert.rate_limit_to_pb(RateLimit(10, 2 * SECOND), pb.rate_limit)
    job = sdk_convert.job_from_pb(pb)
    assert (job.concurrency_key, job.concurrency_limit, job.rate_key) == (
        "customer:acme",
        2,
        "partner-api",
    )
    assert job.rate_limit == RateLimit(10, 2 * SECOND)
    plain = sdk_convert.job_from_pb(job_pb2.Job(id="k", state=job_pb2.JOB_STATE_PENDING))
    assert (plain.concurrency_key, plain.concurrency_limit, plain.rate_key) == ("", 0, "")
    assert plain.rate_limit is None


def test_an_explanation_says_which_limit_holds_a_job_back() -> None:
    at = datetime(2026, 12, 2, 16, 47, 3, tzinfo=UTC)
    pb = broker_pb2.ExplainJobResponse(
        state=job_pb2.JOB_STATE_WAITING,
        summary="held back by concurrency key 'customer:acme' (2 of 2 slots taken)",
        reason="limited",
        limit="concurrency",
        limit_key="customer:acme",
        slot_holders=["a", "b"],
    )
    pb.next_token_at.FromDatetime(at)
    e = sdk_convert.explanation_from_pb(pb)
    assert (e.state, e.reason, e.limit, e.limit_key) == (
        JobState.WAITING,
        "limited",
        "concurrency",
        "customer:acme",
    )
    assert (e.next_token_at, e.slot_holders) == (at, ("a", "b"))
    plain = sdk_convert.explanation_from_pb(
        broker_pb2.ExplainJobResponse(state=job_pb2.JOB_STATE_PENDING, reason="pending")
    )
    assert (plain.limit, plain.limit_key, plain.next_token_at, plain.slot_holders) == (
        "",
        "",
        None,
        (),
    )


def _settings(request: broker_pb2.SetQueueRequest) -> QueueSettings:
    """What the broker would answer, had it stored the request's defaults."""
    return sdk_queues.from_pb(
        broker_pb2.QueueSettings(name=request.name, defaults=request.defaults)
    )


def test_a_queues_limits_go_through_its_defaults_and_back() -> None:
    request = sdk_queues.set_request(
        "calls", 5, None, None, None, True, "100/s", RateLimit(10, 2 * SECOND), 4
    )
    assert request.defaults.key_concurrency == 4
    q = _settings(request)
    assert (q.rate, q.key_rate, q.key_concurrency) == (
        RateLimit(100, SECOND),
        RateLimit(10, 2 * SECOND),
        4,
    )
    assert q.max_attempts == 5
    cleared = _settings(
        sdk_queues.set_request("calls", None, None, None, None, True, None, None, None)
    )
    assert (cleared.rate, cleared.key_rate, cleared.key_concurrency) == (None, None, None)


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        (("10/fortnight", None, None), "rate: '10/fortnight' is not a rate"),
        ((None, "0/s", None), "key_rate: '0/s' is not a rate"),
        ((None, None, 0), "key_concurrency is a whole number from 1 to 1,000,000, not 0"),
    ],
)
def test_bad_queue_limits_are_refused(limits: tuple[Any, Any, Any], says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        sdk_queues.set_request("calls", None, None, None, None, True, *limits)


# --- the CLI ---


def test_the_cli_shows_a_limited_jobs_explanation(capsys: pytest.CaptureFixture[str]) -> None:
    at = datetime(2026, 12, 2, 16, 47, 3, tzinfo=UTC)
    cli._show_explanation(
        Explanation(
            state=JobState.WAITING,
            summary="held back: concurrency key 'Customer:ACME' has no free slot",
            reason="limited",
            attempt=0,
            run_at=None,
            jobs_ahead=0,
            workers_serving=0,
            worker_id="",
            since=None,
            last_heartbeat=None,
            lease_expires_at=None,
            deadline=None,
            cancel_requested=False,
            finished_at=None,
            last_error=None,
            limit="concurrency",
            limit_key="Customer:ACME",
            next_token_at=at,
            slot_holders=("job-a", "job-b"),
        )
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:] == [
        "limit:            concurrency",
        "limit key:        Customer:ACME",
        "next start at:    2026-12-02T16:47:03.000+00:00",
        "slot held by:     job-a",
        "slot held by:     job-b",
    ]


def test_the_queue_table_shows_the_limits(capsys: pytest.CaptureFixture[str]) -> None:
    q = QueueSettings(
        name="calls",
        paused=False,
        paused_by="",
        paused_at=None,
        max_attempts=None,
        retry=RetryPolicy(),
        timeout=None,
        soft_timeout=None,
        lost_worker_counts=True,
        rate=RateLimit(100, SECOND),
        key_rate=RateLimit(10, 2 * SECOND),
        key_concurrency=4,
    )
    cli_queues._table([q])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-6:] == ["RATE", "KEY", "RATE", "KEY", "CONC", "STATE"]
    assert row.split()[-4:] == ["100/s", "10/2s", "4", "running"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["submit", "t", "--rate-limit", "5/x"], "argument --rate-limit: '5/x' is not a rate"),
        (["submit", "t", "--concurrency-limit", "0"], "argument --concurrency-limit: '0' is not"),
        (["queues", "set", "q", "--rate", "fast"], "argument --rate: 'fast' is not a rate"),
        (["queues", "set", "q", "--key-rate", "1/9d"], "its period is from 1 ms to 7 days"),
        (["queues", "set", "q", "--key-concurrency", "x"], "'x' is not a limit: give a whole"),
    ],
)
def test_a_bad_limit_flag_is_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert says in err.splitlines()[-1] and "Traceback" not in err

"""``broker queues ...``: list queues' settings, set their jobs' defaults,
pause and resume them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from jobbroker import Client, QueueSettings, RateLimit, RetryPolicy
from jobbroker.types import LIMIT_MAX

ClientOf = Callable[[argparse.Namespace], Client]


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _secs(value: timedelta | None) -> str:
    return f"{value.total_seconds():g}s" if value is not None else "-"


def _rate(value: RateLimit | None) -> str:
    return str(value) if value is not None else "-"


def _state(q: QueueSettings) -> str:
    return f"paused by {q.paused_by} at {_when(q.paused_at)}" if q.paused else "running"


def _table(found: list[QueueSettings]) -> None:
    print(
        f"{'QUEUE':24}  {'ATTEMPTS':>8}  {'BACKOFF':>8}  {'x':>4}  {'CAP':>8}  {'TIMEOUT':>8}  "
        f"{'SOFT':>8}  {'LOST COUNTS':11}  {'RATE':>9}  {'KEY RATE':>9}  {'KEY CONC':>8}  STATE"
    )
    for q in found:
        r = q.retry
        print(
            f"{q.name[:24]:24}  {q.max_attempts or '-':>8}  {_secs(r.backoff_base):>8}  "
            f"{r.backoff_factor or '-':>4}  {_secs(r.backoff_cap):>8}  {_secs(q.timeout):>8}  "
            f"{_secs(q.soft_timeout):>8}  {'yes' if q.lost_worker_counts else 'no':11}  "
            f"{_rate(q.rate):>9}  {_rate(q.key_rate):>9}  {q.key_concurrency or '-':>8}  "
            f"{_state(q)}"
        )


def _run(args: argparse.Namespace, client: Client) -> None:
    if args.action == "ls":
        _table(client.list_queues())
        return
    if args.action == "set":
        made = client.set_queue(
            args.queue,
            max_attempts=args.max_attempts,
            retry=RetryPolicy(
                backoff_base=args.backoff_base,
                backoff_factor=args.backoff_factor,
                backoff_cap=args.backoff_cap,
            ),
            timeout=args.hard_timeout,
            soft_timeout=args.soft_timeout,
            lost_worker_counts=not args.lost_worker_free,
            rate=args.rate,
            key_rate=args.key_rate,
            key_concurrency=args.key_concurrency,
        )
    elif args.action == "pause":
        made = client.pause_queue(args.queue)
    else:
        made = client.resume_queue(args.queue)
    _table([made])


def add_commands(
    sub: Any, target: argparse.ArgumentParser, client_of: ClientOf, seconds: Any
) -> None:
    """The ``queues`` command and its actions."""

    def run(args: argparse.Namespace) -> int:
        with client_of(args) as client:
            _run(args, client)
        return 0

    actions = sub.add_parser("queues", help="queues: pause, resume, their jobs' defaults")
    actions = actions.add_subparsers(dest="action", required=True)
    p = actions.add_parser("ls", parents=[target], help="queues with settings of their own")
    p.set_defaults(run=run)
    p = actions.add_parser(
        "set",
        parents=[target],
        help="replace the defaults of a queue's jobs (what a job and its task leave unset); "
        "a flag left out clears its setting",
    )
    p.add_argument("queue")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--backoff-base", type=_delta(seconds), metavar="SECONDS")
    p.add_argument("--backoff-factor", type=float)
    p.add_argument("--backoff-cap", type=_delta(seconds), metavar="SECONDS")
    p.add_argument(
        "--hard-timeout", type=_delta(seconds), metavar="SECONDS", help="per attempt, by the broker"
    )
    p.add_argument("--soft-timeout", type=_delta(seconds), metavar="SECONDS")
    p.add_argument(
        "--lost-worker-free",
        action="store_true",
        help="an attempt whose worker was lost (lease expired) does not count",
    )
    p.add_argument(
        "--rate",
        type=parse_rate,
        metavar="N/PERIOD",
        help="jobs of the whole queue started per period, on every replica: 100/s, 1000/min",
    )
    p.add_argument(
        "--key-rate",
        type=parse_rate,
        metavar="N/PERIOD",
        help="the rate of each rate key, for jobs that set none",
    )
    p.add_argument(
        "--key-concurrency",
        type=parse_limit,
        metavar="N",
        help="jobs of each concurrency key at once, for jobs that set none (default 1)",
    )
    p.set_defaults(run=run)
    for action, text in (
        ("pause", "lease nothing of the queue until resumed (submits still taken)"),
        ("resume", "lease the queue's jobs again"),
    ):
        p = actions.add_parser(action, parents=[target], help=text)
        p.add_argument("queue")
        p.set_defaults(run=run)


def parse_rate(text: str) -> RateLimit:
    """A rate flag: 100/s, 1000/min, 5/h, 10/2s."""
    try:
        return RateLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_limit(text: str) -> int:
    """A concurrency flag: a whole number from 1 to the broker's largest."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= LIMIT_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a limit: give a whole number from 1 to {LIMIT_MAX:,}"
        )
    return value


def _delta(seconds: Callable[[str], float]) -> Callable[[str], timedelta]:
    def parse(text: str) -> timedelta:
        return timedelta(seconds=seconds(text))

    parse.__name__ = "seconds"  # argparse names the type in its error
    return parse

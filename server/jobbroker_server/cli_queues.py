"""``broker queues ...``: list queues' settings, set their jobs' defaults,
pause and resume them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from jobbroker import Client, QueueSettings, RetryPolicy

ClientOf = Callable[[argparse.Namespace], Client]


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _secs(value: timedelta | None) -> str:
    return f"{value.total_seconds():g}s" if value is not None else "-"


def _state(q: QueueSettings) -> str:
    return f"paused by {q.paused_by} at {_when(q.paused_at)}" if q.paused else "running"


def _table(found: list[QueueSettings]) -> None:
    print(
        f"{'QUEUE':24}  {'ATTEMPTS':>8}  {'BACKOFF':>8}  {'x':>4}  {'CAP':>8}  {'TIMEOUT':>8}  "
        f"{'SOFT':>8}  {'LOST COUNTS':11}  STATE"
    )
    for q in found:
        r = q.retry
        print(
            f"{q.name[:24]:24}  {q.max_attempts or '-':>8}  {_secs(r.backoff_base):>8}  "
            f"{r.backoff_factor or '-':>4}  {_secs(r.backoff_cap):>8}  {_secs(q.timeout):>8}  "
            f"{_secs(q.soft_timeout):>8}  {'yes' if q.lost_worker_counts else 'no':11}  "
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
        help="replace the defaults of a queue's jobs (what a job and its task leave unset)",
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
    p.set_defaults(run=run)
    for action, text in (
        ("pause", "lease nothing of the queue until resumed (submits still taken)"),
        ("resume", "lease the queue's jobs again"),
    ):
        p = actions.add_parser(action, parents=[target], help=text)
        p.add_argument("queue")
        p.set_defaults(run=run)


def _delta(seconds: Callable[[str], float]) -> Callable[[str], timedelta]:
    def parse(text: str) -> timedelta:
        return timedelta(seconds=seconds(text))

    parse.__name__ = "seconds"  # argparse names the type in its error
    return parse

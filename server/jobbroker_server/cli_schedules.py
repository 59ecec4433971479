"""``broker schedules ...``: register, list, show, pause, resume and delete schedules."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from jobbroker import Client, Schedule

ClientOf = Callable[[argparse.Namespace], Client]


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _timing(s: Schedule) -> str:
    if s.cron is not None:
        return s.cron
    assert s.every is not None
    return f"every {s.every.total_seconds():g}s"


def _last_job(s: Schedule) -> str:
    if s.last_job_id is None:
        return "-"
    return f"{s.last_job_id} ({s.last_job_state.value if s.last_job_state else 'deleted'})"


def _table(found: list[Schedule]) -> None:
    print(
        f"{'NAME':24}  {'SCHEDULE':18}  {'ZONE':16}  {'NEXT RUN':25}  {'LAST RUN':25}  "
        f"{'LAST JOB (STATE)':49}  PAUSED"
    )
    for s in found:
        print(
            f"{s.name[:24]:24}  {_timing(s)[:18]:18}  {s.timezone[:16]:16}  "
            f"{_when(s.next_run_at):25}  {_when(s.last_run_at):25}  {_last_job(s):49}  "
            f"{'yes' if s.paused else 'no'}"
        )


def _show(s: Schedule) -> None:
    print(f"name:       {s.name}")
    print(f"schedule:   {_timing(s)}   zone: {s.timezone}   catch-up: {s.catch_up}")
    print(f"queue/task: {s.queue} / {s.task}")
    print(f"payload:    {s.payload.decode(errors='replace')[:200]}")
    print(f"paused:     {'yes' if s.paused else 'no'}")
    print(f"next run:   {_when(s.next_run_at)}")
    print(f"last run:   {_when(s.last_run_at)}")
    print(f"last job:   {_last_job(s)}")


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"broker: error: payload is not valid JSON: {exc}") from None


def _run(args: argparse.Namespace, client: Client) -> None:
    if args.action == "ls":
        _table(client.list_schedules())
    elif args.action == "get":
        _show(client.get_schedule(args.name))
    elif args.action == "create":
        made = client.create_schedule(
            args.name,
            args.task,
            _payload(args.payload),
            cron=args.cron,
            every=args.every,
            timezone=args.timezone,
            catch_up=args.catch_up,
            paused=args.paused,
            queue=args.queue,
        )
        print(f"schedule {args.name!r} {'registered' if made.changed else 'unchanged'}")
        _show(made.schedule)
    elif args.action == "delete":
        client.delete_schedule(args.name)
        print(f"deleted schedule {args.name!r}")
    else:
        act = client.pause_schedule if args.action == "pause" else client.resume_schedule
        _show(act(args.name))


def add_commands(
    sub: Any, target: argparse.ArgumentParser, client_of: ClientOf, seconds: Any
) -> None:
    """The ``schedules`` command and its actions, each reaching the broker
    through ``client_of(args)``."""

    def run(args: argparse.Namespace) -> int:
        with client_of(args) as client:
            _run(args, client)
        return 0

    actions = sub.add_parser("schedules", help="jobs the broker submits on a cron or interval")
    actions = actions.add_subparsers(dest="action", required=True)
    p = actions.add_parser("ls", parents=[target], help="list schedules, their next and last run")
    p.set_defaults(run=run)
    p = actions.add_parser(
        "create", parents=[target], help="register a schedule (idempotent by name)"
    )
    p.add_argument("name")
    p.add_argument("--task", required=True)
    p.add_argument("--queue", default="default")
    p.add_argument("--payload", help="JSON payload of each tick's job")
    timing = p.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", metavar="EXPR", help='e.g. "0 3 * * *" (in --timezone)')
    timing.add_argument("--every", type=seconds, metavar="SECONDS", help="a fixed interval")
    p.add_argument("--timezone", default="UTC", help="IANA name (default UTC)")
    p.add_argument(
        "--catch-up",
        choices=["skip", "latest"],
        default="skip",
        help="ticks missed while down: skip them, or run the latest once (default skip)",
    )
    p.add_argument("--paused", action="store_true", help="register it paused")
    p.set_defaults(run=run)
    for action, text in (
        ("get", "show a schedule"),
        ("pause", "stop a schedule's ticks"),
        ("resume", "start a schedule's ticks again"),
        ("delete", "delete a schedule (the jobs it made stay)"),
    ):
        p = actions.add_parser(action, parents=[target], help=text)
        p.add_argument("name")
        p.set_defaults(run=run)

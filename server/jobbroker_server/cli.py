"""``broker``: run the broker or a worker, and operate on jobs and the DLQ.

Bad input and broker errors print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from jobbroker import Client, Job, JobBrokerError, JobState, Task, Worker
from jobbroker_server.app import serve
from jobbroker_server.config import ENV, Settings, env_default
from jobbroker_server.domain.errors import BrokerError
from jobbroker_server.store import open_store

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for name, env, kind in ENV:
        default = getattr(defaults, name)
        flag = "--" + env.removeprefix("BROKER_").lower().replace("_", "-")
        shown = default.total_seconds() if kind is timedelta else default
        parser.add_argument(
            flag,
            dest=name,
            type=float if kind is timedelta else kind,
            default=env_default(env, kind, default),
            help=f"default {shown} (env {env})",
        )
    parser.add_argument("--log-level", default=os.environ.get("BROKER_LOG_LEVEL", "INFO"))


def _settings(args: argparse.Namespace) -> Settings:
    values = {}
    for name, _env, kind in ENV:
        value = getattr(args, name)
        if kind is timedelta and not isinstance(value, timedelta):
            value = timedelta(seconds=value)
        values[name] = value
    return Settings(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    asyncio.run(serve(_settings(args)))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    async def run() -> int:
        store = open_store(args.database)
        try:
            return await store.migrate()
        finally:
            await store.close()

    print(f"schema is at version {asyncio.run(run())}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(args.module)
    except ImportError as exc:
        raise SystemExit(f"broker: error: cannot import {args.module!r}: {exc}") from None
    tasks = [value for value in vars(module).values() if isinstance(value, Task)]
    if not tasks:
        raise SystemExit(f"broker: error: module {args.module!r} declares no @task functions")
    worker = Worker(
        tasks,
        target=args.target,
        queues=args.queue or None,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
    )
    worker.run()
    return 0


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"broker: error: payload is not valid JSON: {exc}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        handle = client.submit(
            args.task,
            _payload(args.payload),
            queue=args.queue,
            priority=args.priority,
            delay=timedelta(seconds=args.delay) if args.delay else None,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
        )
        note = " (duplicate of an existing job)" if handle.duplicate else ""
        print(f"{handle.id}{note}")
        if args.wait is not None:
            print(json.dumps(handle.result(timeout=args.wait)))
    return 0


def _when(value: Any) -> str:
    return value.isoformat(timespec="milliseconds") if value is not None else "-"


def _show_job(job: Job) -> None:
    print(f"id:          {job.id}")
    print(f"queue/task:  {job.queue} / {job.task}")
    print(f"state:       {job.state.value}   attempts: {job.attempts}/{job.retry.max_attempts}")
    print(f"priority:    {job.priority}")
    print(f"created:     {_when(job.created_at)}   scheduled: {_when(job.scheduled_at)}")
    print(f"started:     {_when(job.started_at)}   finished:  {_when(job.finished_at)}")
    print(f"payload:     {job.payload.decode(errors='replace')[:200]}")
    if job.result is not None:
        print(f"result:      {job.result.decode(errors='replace')[:200]}")
    if job.last_error is not None:
        print(f"last error:  {job.last_error.type}: {job.last_error.message}")
    for a in job.history:
        outcome = a.outcome.value if a.outcome else "unknown"
        error = f"  {a.error.type}: {a.error.message}" if a.error else ""
        print(
            f"  attempt {a.number} on {a.worker_id}: {outcome} "
            f"{_when(a.started_at)} -> {_when(a.finished_at)}{error}"
        )
        if a.error and a.error.traceback:
            for line in a.error.traceback.rstrip().splitlines():
                print(f"      {line}")


def _table(jobs: Sequence[Job]) -> None:
    print(f"{'ID':36}  {'QUEUE':12}  {'TASK':24}  {'STATE':9}  {'TRIES':>5}  CREATED")
    for j in jobs:
        print(
            f"{j.id:36}  {j.queue[:12]:12}  {j.task[:24]:24}  {j.state.value:9}  "
            f"{j.attempts:>5}  {_when(j.created_at)}"
        )


def cmd_job(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        job = client.get_job(args.id) if args.action == "get" else client.cancel(args.id)
    _show_job(job)
    return 0


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    states = [JobState(s) for s in args.state] if args.state else None
    with Client(args.target) as client:
        page = client.list_jobs(queue=args.queue, states=states, page_size=args.limit)
    _table(page.jobs)
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        if args.action == "ls":
            _table(client.dlq_list(queue=args.queue, page_size=args.limit).jobs)
            return 0
        if not args.ids and not args.all:
            raise SystemExit(f"broker: error: dlq {args.action} needs job ids or --all")
        if args.action == "replay":
            ids = client.dlq_replay(args.ids, queue=args.queue, all=args.all)
            print(f"replayed {len(ids)} job(s)")
        else:
            print(f"purged {client.dlq_purge(args.ids, queue=args.queue, all=args.all)} job(s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="jobbroker: a durable job broker")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--target",
        default=os.environ.get("BROKER_TARGET", DEFAULT_TARGET),
        help=f"broker address (env BROKER_TARGET, default {DEFAULT_TARGET})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker")
    _serve_flags(p)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("migrate", help="bring the database's schema to this version")
    p.add_argument(
        "--database",
        default=os.environ.get("BROKER_DATABASE", Settings().database),
        help="SQLite path or postgresql:// DSN (env BROKER_DATABASE)",
    )
    p.set_defaults(run=cmd_migrate)

    p = sub.add_parser("worker", parents=[target], help="run the @task handlers of a module")
    p.add_argument("module", help="importable module, e.g. myapp.tasks")
    p.add_argument("--queue", action="append", help="queue to serve (repeatable)")
    p.add_argument("--concurrency", type=int, default=16, help="handlers at once")
    p.add_argument(
        "--prefetch",
        type=int,
        help="jobs held at once (default: 4 x concurrency, up to 8 x while jobs are short)",
    )
    p.add_argument("--log-level", default=os.environ.get("BROKER_LOG_LEVEL", "INFO"))
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("submit", parents=[target], help="submit a job")
    p.add_argument("task")
    p.add_argument("payload", nargs="?", help="JSON payload")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for and print the result")
    p.set_defaults(run=cmd_submit)

    job = sub.add_parser("job", help="one job").add_subparsers(dest="action", required=True)
    for action, text in (("get", "show a job and its attempts"), ("cancel", "cancel a job")):
        p = job.add_parser(action, parents=[target], help=text)
        p.add_argument("id")
        p.set_defaults(run=cmd_job)

    jobs = sub.add_parser("jobs", help="many jobs").add_subparsers(dest="action", required=True)
    p = jobs.add_parser("ls", parents=[target], help="list jobs")
    p.add_argument("--queue")
    p.add_argument("--state", action="append", choices=[s.value for s in JobState])
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=cmd_jobs_ls)

    dlq = sub.add_parser("dlq", help="the dead-letter queue")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    p = dlq_sub.add_parser("ls", parents=[target], help="list dead jobs")
    p.add_argument("--queue")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=cmd_dlq)
    for action in ("replay", "purge"):
        p = dlq_sub.add_parser(action, parents=[target], help=f"{action} dead jobs")
        p.add_argument("ids", nargs="*")
        p.add_argument("--queue")
        p.add_argument("--all", action="store_true", help="every dead job (of --queue)")
        p.set_defaults(run=cmd_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (JobBrokerError, BrokerError) as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

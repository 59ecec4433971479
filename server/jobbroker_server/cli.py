"""``broker``: run the broker or a worker, operate on jobs and the DLQ, follow their events.

Bad input, broker errors, a broker that is not there and a start-up that
fails print one line and exit non-zero, never a traceback; a closed pipe
(``broker jobs ls | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobbroker import (
    ApiKey,
    BrokerUnavailableError,
    Client,
    ConnectionOptions,
    DeadlineExceededError,
    Explanation,
    Job,
    JobBrokerError,
    JobEvent,
    JobState,
    Role,
    Task,
    Worker,
)
from jobbroker_server import cli_queues, cli_schedules
from jobbroker_server.app import serve
from jobbroker_server.clock import SystemClock
from jobbroker_server.config import ENV, Settings, flag_of, from_text
from jobbroker_server.domain.errors import BrokerError
from jobbroker_server.domain.keys import ApiKey as StoredKey
from jobbroker_server.domain.keys import Role as StoredRole
from jobbroker_server.services.keys import ApiKeys
from jobbroker_server.store.open import CannotOpenStore, open_migrated

T = TypeVar("T")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0  # each call of an operator command
# How long an operator command waits for a broker to answer at all: one that
# is not there should not hold a terminal while the SDK retries for --timeout.
CONNECT_WAIT = 3.0
_FIX = "start one with `broker serve`, or name the right one with --target or BROKER_TARGET"


_SWITCHES = {
    "auth": "every call needs an API key (`broker keys create`)",
    "insecure": "serve an address other machines reach without --auth",
}


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for name, env, kind in ENV:
        default = getattr(defaults, name)
        shown = default.total_seconds() if kind is timedelta else default
        # Taken as text and converted in _settings, so that a bad value, from
        # the flag or the environment, is one line that names where it came from.
        if kind is bool:
            help_text = f"{_SWITCHES[name]} (env {env}=true)"
            parser.add_argument(
                flag_of(env), dest=name, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(flag_of(env), dest=name, help=f"default {shown} (env {env})")
    parser.add_argument("--log-level", default=os.environ.get("BROKER_LOG_LEVEL", "INFO"))


def _settings(args: argparse.Namespace) -> Settings:
    """Each setting from its flag, else its variable, else the default; the
    app checks the values (config.check) before it opens anything."""
    values = {}
    for name, env, kind in ENV:
        raw: str | None = getattr(args, name)
        from_env = raw is None
        if from_env:
            raw = os.environ.get(env)
        if raw is not None:
            values[name] = from_text(env, kind, raw, from_env=from_env)
    return Settings(**values)  # type: ignore[arg-type]  # each value is its setting's type


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    asyncio.run(serve(_settings(args)))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    async def run() -> int:
        store, version = await open_migrated(args.database)  # refused while a broker holds it
        await store.close()
        return version

    print(f"schema is at version {asyncio.run(run())}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(args.module)
    except Exception as exc:  # the module's own error, told in one line
        kind = "" if isinstance(exc, ImportError) else f"{type(exc).__name__}: "
        raise SystemExit(f"broker: error: cannot import {args.module!r}: {kind}{exc}") from None
    tasks = [value for value in vars(module).values() if isinstance(value, Task)]
    if not tasks:
        raise SystemExit(f"broker: error: module {args.module!r} declares no @task functions")
    worker = Worker(
        tasks,
        target=_connection(args),
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
    with _client(args) as client:
        handle = client.submit(
            args.task,
            _payload(args.payload),
            queue=args.queue,
            priority=args.priority,
            delay=timedelta(seconds=args.delay) if args.delay else None,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
            unique_key=args.unique_key,
            concurrency_key=args.concurrency_key,
            concurrency_limit=args.concurrency_limit,
            rate_key=args.rate_key,
            rate_limit=args.rate_limit,
        )
        note = " (duplicate of an existing job)" if handle.duplicate else ""
        print(f"{handle.id}{note}")
        if args.wait is not None:
            print(json.dumps(handle.result(timeout=args.wait)))
    return 0


def _connection(args: argparse.Namespace) -> ConnectionOptions:
    """Where and how to reach the broker: each flag, else its BROKER_* variable."""
    return ConnectionOptions.from_env(
        target=args.target,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=args.tls_ca,
        client_certificate=args.client_cert,
        client_key=args.client_key,
        server_name=args.tls_server_name,
        timeout=timedelta(seconds=args.timeout),
    )


def _answering(options: ConnectionOptions, wait: float) -> None:
    """Return once something answers at the target; else exit saying so."""
    channel = options.channel()
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=wait)
    except grpc.FutureTimeoutError:
        raise SystemExit(
            f"broker: error: no broker answers at {options.target} within {wait:g}s"
            f"{' over TLS' if options.uses_tls else ''}; {_FIX}"
        ) from None
    finally:
        ready.cancel()
        channel.close()


def _client(args: argparse.Namespace) -> Client:
    """A client of the broker at --target, once something answers there."""
    options = _connection(args)
    _answering(options, min(CONNECT_WAIT, args.timeout))
    return Client(options)


def cmd_health(args: argparse.Namespace) -> int:
    """The broker's gRPC health: exit 0 while it serves (its store takes writes)."""
    options = _connection(args)
    _answering(options, min(CONNECT_WAIT, args.timeout))
    with options.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=args.timeout
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _when(value: Any) -> str:
    return value.isoformat(timespec="milliseconds") if value is not None else "-"


def _show_job(job: Job) -> None:
    print(f"id:          {job.id}")
    print(f"queue/task:  {job.queue} / {job.task}")
    print(f"state:       {job.state.value}   attempts: {job.attempts}/{job.retry.max_attempts}")
    print(f"priority:    {job.priority}")
    if job.concurrency_key:
        limit = f"{job.concurrency_limit} at once" if job.concurrency_limit else "the queue's limit"
        print(f"concurrency: {job.concurrency_key}, {limit}")
    if job.rate_key:
        rate = str(job.rate_limit) if job.rate_limit else "the queue's key rate"
        print(f"rate:        {job.rate_key}, {rate}")
    if job.workflow_id:
        print(f"workflow:    {job.workflow_id}")
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


def _quoted(value: str) -> str:
    plain = value and not any(c.isspace() or c in "\"'" for c in value)
    return value if plain else json.dumps(value)


_DETAIL_ORDER = ("error_type", "error", "progress", "message", "run_at", "parent", "parent_state")


def _detail(detail: Mapping[str, str]) -> str:
    """key=value pairs, the usual keys first in a fixed order."""
    keys = sorted(detail, key=lambda k: (_DETAIL_ORDER.index(k) if k in _DETAIL_ORDER else 99, k))
    return " ".join(f"{k}={_quoted(detail[k])}" for k in keys)


def _event_line(event: JobEvent, *, job: bool = False) -> str:
    """One event on one line, its seq first (what --after takes)."""
    source = event.from_state.value if event.from_state else ""
    where = f"{event.job_id}  {event.queue}  " if job else ""
    detail = _detail(event.detail)
    return (
        f"{event.seq:>8}  {_when(event.at)}  {where}{event.reason:16}  "
        f"{source:>9} -> {event.to_state.value:9}  attempt {event.attempt}  by {event.actor}"
        f"{'  ' + detail if detail else ''}"
    )


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "cancel":
            _show_job(client.cancel(args.id))
            return 0
        job = client.get_job(args.id)
        events = client.job_events(args.id)
    _show_job(job)
    print("timeline:")
    for event in events:
        print(_event_line(event))
    return 0


def cmd_job_watch(args: argparse.Namespace) -> int:
    """Each event as it is written; exit 0 once the job succeeded, 1 if it
    ended otherwise."""
    state: JobState | None = None
    with _client(args) as client:
        for event in client.watch(args.id, after=args.after):
            print(_event_line(event), flush=True)  # live, through a pipe too
            state = event.to_state
        if state is None or not state.terminal:  # --after its last event
            state = client.get_job(args.id).state
    return 0 if state is JobState.SUCCEEDED else 1


_EXPLAINED = (
    ("attempt", "attempt"),
    ("run_at", "runs at"),
    ("jobs_ahead", "jobs ahead"),
    ("workers_serving", "workers serving"),
    ("worker_id", "worker"),
    ("since", "since"),
    ("last_heartbeat", "last heartbeat"),
    ("lease_expires_at", "lease expires"),
    ("deadline", "deadline"),
    ("cancel_requested", "cancel requested"),
    ("finished_at", "finished"),
)
_WAITING = ("pending", "no_worker")  # where no job ahead and no worker are facts too


def _show_explanation(e: Explanation) -> None:
    print(e.summary)
    print(f"{'state:':18}{e.state.value}")
    print(f"{'reason:':18}{e.reason}")
    for name, label in _EXPLAINED:
        value = getattr(e, name)
        waiting = e.reason in _WAITING and name in ("jobs_ahead", "workers_serving")
        if not value and not waiting:
            continue
        shown = _when(value) if isinstance(value, datetime) else str(value).lower()
        print(f"{label + ':':18}{shown}")
    if e.last_error is not None:
        print(f"{'last error:':18}{e.last_error.type}: {e.last_error.message}")
    for parent in e.waits_on:
        print(f"{'waits on:':18}{parent.job_id}  {parent.task}  {parent.state.value}")
    _show_limit(e)


def _show_limit(e: Explanation) -> None:
    """What holds a job back ("limited"): the limit, its key, and when the
    next start comes or which jobs hold the key's slots."""
    for label, value in (("limit:", e.limit), ("limit key:", e.limit_key)):
        if value:
            print(f"{label:18}{value}")
    if e.next_token_at is not None:
        print(f"{'next start at:':18}{_when(e.next_token_at)}")
    for holder in e.slot_holders:
        print(f"{'slot held by:':18}{holder}")


def cmd_job_explain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _show_explanation(client.explain(args.id))
    return 0


def cmd_events_tail(args: argparse.Namespace) -> int:
    """Every event, live, until Ctrl-C or a closed pipe (both end quietly)."""
    with _client(args) as client:
        for event in client.tail_events(queue=args.queue, task=args.task, after=args.after):
            print(_event_line(event, job=True), flush=True)
    return 0


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    states = [JobState(s) for s in args.state] if args.state else None
    with _client(args) as client:
        page = client.list_jobs(
            queue=args.queue, states=states, page_size=args.limit, workflow_id=args.workflow
        )
    _table(page.jobs)
    return 0


def cmd_workflow(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "cancel":
            print(f"cancelled {client.cancel_workflow(args.id)} job(s)")
            return 0
        jobs: list[Job] = []
        token = None
        while True:
            page = client.list_jobs(workflow_id=args.id, page_size=1000, page_token=token)
            jobs += page.jobs
            if not (token := page.next_page_token):
                break
    if not jobs:
        raise SystemExit(f"broker: error: no workflow with id {args.id!r}")
    _table(jobs)
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    with _client(args) as client:
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


# --- keys ---


@dataclass(frozen=True)
class _KeyRow:
    """A key as `keys ls` prints it, from the store or from the SDK."""

    id: str
    name: str
    role: str
    queues: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


def _stored_row(key: StoredKey) -> _KeyRow:
    return _KeyRow(key.id, key.name, key.role.value, key.queues, key.created_at, key.revoked_at)


def _sdk_row(key: ApiKey) -> _KeyRow:
    return _KeyRow(key.id, key.name, key.role.value, key.queues, key.created_at, key.revoked_at)


async def _on_database(database: str, action: Callable[[ApiKeys], Awaitable[T]]) -> T:
    """Act on the keys in the database itself: how the first admin key is made."""
    try:
        store, _version = await open_migrated(database)
    except CannotOpenStore as error:
        if "in use by" in str(error):
            raise CannotOpenStore(
                f"{error}; while it runs, manage keys through it: leave out --database "
                "and give an admin key (--api-key or BROKER_API_KEY)"
            ) from None
        raise
    try:
        # The keys of a broker that is not running: none of its calls to end.
        return await action(ApiKeys(store, SystemClock(), required=False, refresh=timedelta(0)))
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "create":
        queues = tuple(args.queue or ())
        if args.database:
            role = StoredRole(args.role)
            key, text = asyncio.run(
                _on_database(args.database, lambda keys: keys.create(args.name, role, queues))
            )
            row = _stored_row(key)
        else:
            with _client(args) as client:
                made = client.create_api_key(args.name, Role(args.role), queues)
            row, text = _sdk_row(made.key), made.secret
        print(text)
        limited = f", queues {', '.join(row.queues)}" if row.queues else ", every queue"
        print(
            f"created API key {row.id} {row.name!r} ({row.role}{limited}); it is shown this "
            "once: keep it now (give it as --api-key or BROKER_API_KEY)",
            file=sys.stderr,
        )
        return 0
    if args.action == "ls":
        if args.database:
            found = asyncio.run(_on_database(args.database, lambda keys: keys.list(args.all)))
            rows = [_stored_row(k) for k in found]
        else:
            with _client(args) as client:
                rows = [_sdk_row(k) for k in client.list_api_keys(include_revoked=args.all)]
        print(f"{'ID':16}  {'NAME':24}  {'ROLE':8}  {'QUEUES':24}  {'CREATED':29}  REVOKED")
        for r in rows:
            limited = ",".join(r.queues) or "*"
            print(
                f"{r.id:16}  {r.name[:24]:24}  {r.role:8}  {limited[:24]:24}  "
                f"{_when(r.created_at):29}  {_when(r.revoked_at)}"
            )
        return 0
    if args.database:
        key = asyncio.run(_on_database(args.database, lambda keys: keys.revoke(args.key)))
        row = _stored_row(key)
    else:
        with _client(args) as client:
            row = _sdk_row(client.revoke_api_key(args.key))
    print(f"revoked API key {row.id} {row.name!r}")
    return 0


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


_AFTER = "start after the event with this seq (the first number of each line)"


def _seq(text: str) -> int:
    try:
        seq = int(text)
    except ValueError:
        seq = -1
    if seq < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event's seq (a whole number, 0 or more)"
        )
    return seq


def _installed_version() -> str:
    try:
        return importlib.metadata.version("jobbroker")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="jobbroker: a durable job broker")
    parser.add_argument(
        "--version", action="version", version=f"broker (jobbroker) {_installed_version()}"
    )
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--target", help=f"broker address (env BROKER_TARGET, default {DEFAULT_TARGET})"
    )
    target.add_argument("--api-key", help="the API key to present (env BROKER_API_KEY)")
    target.add_argument(
        "--tls",
        action="store_const",
        const=True,
        help="speak TLS, trusting the system's CAs or --tls-ca (env BROKER_TLS=true)",
    )
    target.add_argument(
        "--tls-ca", metavar="PEM", help="CA that signed the broker's certificate (BROKER_TLS_CA)"
    )
    target.add_argument(
        "--client-cert", metavar="PEM", help="certificate for mutual TLS (BROKER_CLIENT_CERT)"
    )
    target.add_argument("--client-key", metavar="PEM", help="its private key (BROKER_CLIENT_KEY)")
    target.add_argument(
        "--tls-server-name",
        help="the name the broker's certificate carries, if not the target's host "
        "(BROKER_TLS_SERVER_NAME)",
    )
    target.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long each call to the broker may take (default {DEFAULT_TIMEOUT:g})",
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
    p.add_argument("--unique-key", help="return the unfinished job with this key, if any")
    p.add_argument(
        "--concurrency-key", metavar="KEY", help="at most --concurrency-limit of its jobs at once"
    )
    p.add_argument(
        "--concurrency-limit",
        type=cli_queues.parse_limit,
        metavar="N",
        help="with --concurrency-key (default: the queue's key concurrency, else 1)",
    )
    p.add_argument("--rate-key", metavar="KEY", help="at most --rate-limit of its jobs start")
    p.add_argument(
        "--rate-limit",
        type=cli_queues.parse_rate,
        metavar="N/PERIOD",
        help="with --rate-key: 100/s, 1000/min, 10/2s (default: the queue's key rate)",
    )
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for and print the result")
    p.set_defaults(run=cmd_submit)

    job = sub.add_parser("job", help="one job").add_subparsers(dest="action", required=True)
    for action, text, run in (
        ("get", "show a job, its attempts and its timeline", cmd_job),
        ("cancel", "cancel a job", cmd_job),
        ("explain", "say why a job is where it is", cmd_job_explain),
        ("watch", "print a job's events as they happen; exit 0 if it succeeds", cmd_job_watch),
    ):
        p = job.add_parser(action, parents=[target], help=text)
        p.add_argument("id")
        if action == "watch":
            p.add_argument("--after", type=_seq, default=0, metavar="SEQ", help=_AFTER)
        p.set_defaults(run=run)

    events = sub.add_parser("events", help="the event log of every job")
    events_sub = events.add_subparsers(dest="action", required=True)
    p = events_sub.add_parser(
        "tail", parents=[target], help="print every event as it happens, until Ctrl-C"
    )
    p.add_argument("--queue", help="only this queue's jobs")
    p.add_argument("--task", help="only this task's jobs")
    p.add_argument(
        "--after", type=_seq, default=0, metavar="SEQ", help=f"{_AFTER} (default: from now)"
    )
    p.set_defaults(run=cmd_events_tail)

    jobs = sub.add_parser("jobs", help="many jobs").add_subparsers(dest="action", required=True)
    p = jobs.add_parser("ls", parents=[target], help="list jobs")
    p.add_argument("--queue")
    p.add_argument("--state", action="append", choices=[s.value for s in JobState])
    p.add_argument("--workflow", metavar="ID", help="only the jobs of this workflow")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=cmd_jobs_ls)

    flows = sub.add_parser("workflow", help="one workflow (chain, group, chord)")
    flows_sub = flows.add_subparsers(dest="action", required=True)
    for action, text in (
        ("get", "its jobs and their states"),
        ("cancel", "cancel what has not ended"),
    ):
        p = flows_sub.add_parser(action, parents=[target], help=text)
        p.add_argument("id")
        p.set_defaults(run=cmd_workflow)

    keys = sub.add_parser("keys", help="API keys (for a broker started with --auth)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    on_database = argparse.ArgumentParser(add_help=False)
    on_database.add_argument(
        "--database",
        help="act on this database (SQLite path or postgresql:// DSN) instead of through a "
        "broker: how the first admin key is made, before `broker serve --auth`",
    )
    p = keys_sub.add_parser(
        "create", parents=[target, on_database], help="make a key; it is printed once"
    )
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--queue", action="append", help="limit the key to this queue (repeatable)")
    p.set_defaults(run=cmd_keys)
    p = keys_sub.add_parser("ls", parents=[target, on_database], help="list the keys")
    p.add_argument("--all", action="store_true", help="revoked keys too")
    p.set_defaults(run=cmd_keys)
    p = keys_sub.add_parser("revoke", parents=[target, on_database], help="revoke a key")
    p.add_argument("key", help="the key's id or name")
    p.set_defaults(run=cmd_keys)

    p = sub.add_parser("health", parents=[target], help="is the broker serving? (exit 0 or 1)")
    p.set_defaults(run=cmd_health)

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

    cli_schedules.add_commands(sub, target, _client, _seconds)
    cli_queues.add_commands(sub, target, _client, _seconds)
    return parser


def _not_there(args: argparse.Namespace, exc: JobBrokerError) -> str | None:
    """What to say when no broker answered (not: one that answered with an error)."""
    if not hasattr(args, "api_key") or exc.reason is not None:  # not a command of a broker
        return None
    target = args.target or os.environ.get("BROKER_TARGET", DEFAULT_TARGET)
    if isinstance(exc, BrokerUnavailableError):
        return f"no broker is reachable at {target} ({exc}); {_FIX}"
    if isinstance(exc, DeadlineExceededError):
        return f"the broker at {target} did not answer within {args.timeout:g}s; {_FIX}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except JobBrokerError as exc:
        print(f"broker: error: {_not_there(args, exc) or exc}", file=sys.stderr)
        return 1
    except (BrokerError, ValueError) as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nowhere to
        # say it; point stdout at /dev/null so the exit's flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command killed by SIGPIPE
    except OSError as exc:
        print(f"broker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

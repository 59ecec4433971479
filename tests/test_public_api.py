"""The SDK's public names are a promise: changing them must be deliberate."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

import jobbroker

ROOT = Path(__file__).resolve().parent.parent


def test_public_api_is_pinned() -> None:
    assert sorted(jobbroker.__all__) == sorted(
        [
            "ApiKey",
            "AsyncClient",
            "AsyncJobHandle",
            "AsyncLease",
            "AsyncLeaseStream",
            "Attempt",
            "AttemptOutcome",
            "AuthenticationError",
            "BrokerUnavailableError",
            "CancelReason",
            "Client",
            "ConnectionOptions",
            "ConnectionSettings",
            "CreatedApiKey",
            "CreatedSchedule",
            "DeadlineExceededError",
            "ErrorInfo",
            "Explanation",
            "FailedPreconditionError",
            "InvalidArgumentError",
            "Job",
            "JobBrokerError",
            "JobCancelledError",
            "JobContext",
            "JobEvent",
            "JobFailedError",
            "JobHandle",
            "JobNotFoundError",
            "JobRequest",
            "JobState",
            "Lease",
            "LeaseLostError",
            "LeaseStream",
            "Page",
            "PermanentError",
            "PermissionDeniedError",
            "ResourceExhaustedError",
            "RateLimit",
            "RetryAfter",
            "RetryPolicy",
            "Role",
            "Schedule",
            "ScheduleOptions",
            "ScheduleSpec",
            "SubmitOptions",
            "Task",
            "Worker",
            "configure",
            "current_job",
            "schedule",
            "task",
            "QueueSettings",
            # workflows
            "AsyncWorkflowHandle",
            "Chain",
            "Chord",
            "FailureInfo",
            "Flow",
            "Group",
            "Outcome",
            "Piped",
            "Signature",
            "WaitsOn",
            "WorkflowHandle",
            "WorkflowStep",
            "chain",
            "chord",
            "group",
        ]
    )
    for name in jobbroker.__all__:
        assert getattr(jobbroker, name) is not None


def test_generated_code_is_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-protos"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# Foreign types a public signature shows on purpose, by where they appear.
# ConnectionOptions builds grpc channels: that is what the two methods are for
# (the broker's CLI makes its admin stub on one), so they return grpc's type.
_DELIBERATE: dict[str, tuple[type, ...]] = {
    "ConnectionOptions.channel": (grpc.Channel,),
    "ConnectionOptions.aio_channel": (grpc.aio.Channel,),
}


def _public_callables(obj: object) -> list[tuple[str, Any]]:
    """What a user reaches through one public name and whose annotations
    name types: the function itself, or a class (its public fields), its
    public methods and its property getters."""
    if not isinstance(obj, type):
        return [("", obj)] if callable(obj) else []
    found: list[tuple[str, Any]] = [("", obj)]
    for attr in dir(obj):
        if attr.startswith("_"):
            continue
        raw = inspect.getattr_static(obj, attr)
        if isinstance(raw, property):
            if raw.fget is not None:
                found.append((attr, raw.fget))
        elif isinstance(raw, staticmethod | classmethod):
            found.append((attr, raw.__func__))
        elif inspect.isfunction(raw):
            found.append((attr, raw))
    return found


def _leaks(hint: object) -> Iterator[type]:
    """Every class inside ``hint`` (through unions and generics) that is a wire
    type, private, ours but not exported, or from outside the standard library."""
    for arg in typing.get_args(hint):
        yield from _leaks(arg)
    origin = typing.get_origin(hint)
    cls = origin if isinstance(origin, type) else hint
    if not isinstance(cls, type):
        return  # a TypeVar, None, a Literal's value, a typing special form
    module = cls.__module__
    wire = module.startswith("jobbroker.v1") or module.rpartition(".")[2].endswith("_pb2")
    private = cls.__name__.startswith("_")
    if module.partition(".")[0] == "jobbroker":
        hidden = getattr(jobbroker, cls.__name__, None) is not cls
    else:
        hidden = module.partition(".")[0] not in sys.stdlib_module_names
    if wire or private or hidden:
        yield cls


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except NameError:
        # A name imported only for type checking: look it up in jobbroker's
        # namespace, under the module's own names so that none is shadowed.
        module = vars(sys.modules[obj.__module__])
        return typing.get_type_hints(obj, globalns={**vars(jobbroker), **module})


def test_public_signatures_show_only_public_types() -> None:
    """What a user passes or receives through a public name is importable
    from jobbroker, and no protobuf message ever is."""
    problems: list[str] = []
    for name in jobbroker.__all__:
        for attr, fn in _public_callables(getattr(jobbroker, name)):
            where = f"{name}.{attr}" if attr else name
            for param, hint in _hints(fn).items():
                if isinstance(fn, type) and param.startswith("_"):
                    continue  # a class's private field
                for leak in _leaks(hint):
                    if not issubclass(leak, _DELIBERATE.get(where, ())):
                        problems.append(f"{where} ({param}): {leak.__module__}.{leak.__qualname__}")
    assert not problems, "\n".join(sorted(set(problems)))

"""Which role may call which method: the gRPC edge's one table of rules.

``handlers.add_service`` looks every method of the Broker service up here, so
a method without a rule stops the broker from starting. What a key's queues
allow is checked by the servicer, which knows each call's queue.
"""

from __future__ import annotations

from typing import Any

import grpc

from jobbroker_server.domain.errors import PermissionDenied
from jobbroker_server.domain.keys import Caller, Role
from jobbroker_server.services.keys import ApiKeys

_PRODUCE = frozenset({Role.PRODUCER, Role.ADMIN})
_WORK = frozenset({Role.WORKER, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})

RULES: dict[str, frozenset[Role]] = {
    "Submit": _PRODUCE,
    "SubmitBatch": _PRODUCE,
    "SubmitGrouped": _PRODUCE,
    "SubmitWorkflow": _PRODUCE,
    "CancelWorkflow": _PRODUCE,
    "GetJob": _PRODUCE,
    "WaitJob": _PRODUCE,
    "ListJobEvents": _PRODUCE,
    "WatchJob": _PRODUCE,
    "TailEvents": _PRODUCE,
    "ExplainJob": _PRODUCE,
    "CancelJob": _PRODUCE,
    "ListJobs": _PRODUCE,
    "LeaseStream": _WORK,
    "ListDeadJobs": _ADMIN,
    "ReplayDeadJobs": _ADMIN,
    "PurgeDeadJobs": _ADMIN,
    "CreateApiKey": _ADMIN,
    "ListApiKeys": _ADMIN,
    "RevokeApiKey": _ADMIN,
    "ListQueues": _PRODUCE,
    "SetQueue": _ADMIN,
    "PauseQueue": _ADMIN,
    "ResumeQueue": _ADMIN,
    "CreateSchedule": _PRODUCE,
    "ListSchedules": _PRODUCE,
    "GetSchedule": _PRODUCE,
    "PauseSchedule": _PRODUCE,
    "ResumeSchedule": _PRODUCE,
    "DeleteSchedule": _PRODUCE,
}

AUTHORIZATION = "authorization"


class Guard:
    """Admits a call: its key (UNAUTHENTICATED), then its role (PERMISSION_DENIED)."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        if not self.keys.required:
            return self.keys.caller(None)
        presented = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == AUTHORIZATION), None
        )
        caller = self.keys.caller(presented)
        allowed = RULES[method]
        if caller.role not in allowed:
            roles = " or ".join(role for role in Role if role in allowed)
            raise PermissionDenied(
                f"API key {caller.name!r} has the {caller.role} role, which may not call "
                f"{method}; it takes a {roles} key"
            )
        return caller

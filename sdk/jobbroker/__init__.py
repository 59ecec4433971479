"""jobbroker: the typed Python SDK of the jobbroker gRPC job broker.

Example::

    from jobbroker import Client, Worker, task

    @task(queue="emails")
    def send_email(payload: dict[str, str]) -> int: ...

    with Client() as client:
        handle = client.submit(send_email, {"to": "ada@example.com"})
        sent: int = handle.result(timeout=30)

    Worker([send_email]).run()

A broker started with `--auth` takes an API key, over TLS if it serves TLS::

    Client("broker:50051", api_key=key, tls=True, root_certificates="ca.pem")
    Worker([send_email], target=ConnectionOptions.from_env())
"""

from ._async_stream import AsyncLeaseStream
from ._sync_stream import LeaseStream
from .canvas import (
    Chain,
    Chord,
    FailureInfo,
    Flow,
    Group,
    Outcome,
    Piped,
    Signature,
    chain,
    chord,
    group,
)
from .client import AsyncClient, Client
from .connection import ConnectionOptions, ConnectionSettings
from .context import JobContext, current_job
from .default import configure
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobBrokerError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    LeaseLostError,
    PermanentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryAfter,
)
from .handle import AsyncJobHandle, JobHandle
from .lease import AsyncLease, Lease
from .schedules import schedule
from .task import Task, task
from .types import (
    ApiKey,
    Attempt,
    AttemptOutcome,
    CancelReason,
    CreatedApiKey,
    CreatedSchedule,
    ErrorInfo,
    Explanation,
    Job,
    JobEvent,
    JobRequest,
    JobState,
    Page,
    QueueSettings,
    RateLimit,
    RetryPolicy,
    Role,
    Schedule,
    ScheduleOptions,
    ScheduleSpec,
    SubmitOptions,
    WaitsOn,
)
from .worker import Worker
from .workflow import AsyncWorkflowHandle, WorkflowHandle, WorkflowStep

__all__ = [
    "ApiKey",
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncLease",
    "AsyncLeaseStream",
    "AsyncWorkflowHandle",
    "Attempt",
    "AttemptOutcome",
    "AuthenticationError",
    "BrokerUnavailableError",
    "CancelReason",
    "Chain",
    "Chord",
    "Client",
    "ConnectionOptions",
    "ConnectionSettings",
    "CreatedApiKey",
    "CreatedSchedule",
    "DeadlineExceededError",
    "ErrorInfo",
    "Explanation",
    "FailedPreconditionError",
    "FailureInfo",
    "Flow",
    "Group",
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
    "Outcome",
    "Page",
    "PermanentError",
    "PermissionDeniedError",
    "Piped",
    "QueueSettings",
    "RateLimit",
    "ResourceExhaustedError",
    "RetryAfter",
    "RetryPolicy",
    "Role",
    "Schedule",
    "ScheduleOptions",
    "ScheduleSpec",
    "Signature",
    "SubmitOptions",
    "Task",
    "WaitsOn",
    "Worker",
    "WorkflowHandle",
    "WorkflowStep",
    "chain",
    "chord",
    "configure",
    "current_job",
    "group",
    "schedule",
    "task",
]

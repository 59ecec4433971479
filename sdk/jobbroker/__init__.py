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

from .client import AsyncClient, Client
from .connection import ConnectionOptions
from .context import JobContext, current_job
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
from .task import Task, task
from .types import (
    ApiKey,
    Attempt,
    AttemptOutcome,
    CreatedApiKey,
    ErrorInfo,
    Job,
    JobRequest,
    JobState,
    Page,
    RetryPolicy,
    Role,
)
from .worker import Worker

__all__ = [
    "ApiKey",
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncLease",
    "Attempt",
    "AttemptOutcome",
    "AuthenticationError",
    "BrokerUnavailableError",
    "Client",
    "ConnectionOptions",
    "CreatedApiKey",
    "DeadlineExceededError",
    "ErrorInfo",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "Job",
    "JobBrokerError",
    "JobCancelledError",
    "JobContext",
    "JobFailedError",
    "JobHandle",
    "JobNotFoundError",
    "JobRequest",
    "JobState",
    "Lease",
    "LeaseLostError",
    "Page",
    "PermanentError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryAfter",
    "RetryPolicy",
    "Role",
    "Task",
    "Worker",
    "current_job",
    "task",
]

"""jobbroker: the typed Python SDK of the jobbroker gRPC job broker.

Example::

    from jobbroker import Client, Worker, task

    @task(queue="emails")
    def send_email(payload: dict[str, str]) -> int: ...

    with Client() as client:
        handle = client.submit(send_email, {"to": "ada@example.com"})
        sent: int = handle.result(timeout=30)

    Worker([send_email]).run()
"""

from .client import AsyncClient, Client
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
    ResourceExhaustedError,
    RetryAfter,
)
from .handle import AsyncJobHandle, JobHandle
from .lease import AsyncLease, Lease
from .task import Task, task
from .types import (
    Attempt,
    AttemptOutcome,
    ErrorInfo,
    Job,
    JobRequest,
    JobState,
    Page,
    RetryPolicy,
)
from .worker import Worker

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncLease",
    "Attempt",
    "AttemptOutcome",
    "AuthenticationError",
    "BrokerUnavailableError",
    "Client",
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
    "ResourceExhaustedError",
    "RetryAfter",
    "RetryPolicy",
    "Task",
    "Worker",
    "current_job",
    "task",
]

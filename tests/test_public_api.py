"""The SDK's public names are a promise: changing them must be deliberate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jobbroker

ROOT = Path(__file__).resolve().parent.parent


def test_public_api_is_pinned() -> None:
    assert sorted(jobbroker.__all__) == sorted(
        [
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

"""The broker's settings: defaults, ``BROKER_*`` environment variables, flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from jobbroker_server.domain.retry import RetryPolicy


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    database: str = "./jobbroker.db"
    metrics_port: int = 9464  # 0 turns the metrics endpoint off
    max_payload_bytes: int = 1024 * 1024
    max_batch: int = 10_000
    lease_duration: timedelta = timedelta(seconds=30)
    dedup_window: timedelta = timedelta(hours=24)
    retention: timedelta = timedelta(days=7)
    retention_interval: timedelta = timedelta(minutes=1)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    shutdown_grace: timedelta = timedelta(seconds=10)
    reap_interval: timedelta = timedelta(seconds=1)
    poll_interval: timedelta = timedelta(seconds=1)


# (setting, environment variable, type) for what `broker serve` takes as flags.
ENV: tuple[tuple[str, str, type], ...] = (
    ("host", "BROKER_HOST", str),
    ("port", "BROKER_PORT", int),
    ("database", "BROKER_DATABASE", str),
    ("metrics_port", "BROKER_METRICS_PORT", int),
    ("max_payload_bytes", "BROKER_MAX_PAYLOAD_BYTES", int),
    ("lease_duration", "BROKER_LEASE_SECONDS", timedelta),
    ("dedup_window", "BROKER_DEDUP_WINDOW_SECONDS", timedelta),
    ("retention", "BROKER_RETENTION_SECONDS", timedelta),
    ("shutdown_grace", "BROKER_SHUTDOWN_GRACE_SECONDS", timedelta),
)


def env_default(name: str, kind: type, default: object) -> object:
    """The environment's value for a setting, or ``default``."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return timedelta(seconds=float(raw)) if kind is timedelta else kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc

"""The broker's settings: defaults, ``BROKER_*`` environment variables, flags.

A value that cannot be used is refused before the broker opens anything, with
one line that names the flag and the variable (``check``).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from datetime import timedelta

from jobbroker_server.domain import limits
from jobbroker_server.domain.retry import RetryPolicy


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    database: str = "./jobbroker.db"
    metrics_port: int = 9464  # 0 turns the metrics endpoint off
    metrics_host: str = ""  # "" for the gRPC port's host
    auth: bool = False  # every call needs an API key
    insecure: bool = False  # serve a non-loopback address without auth
    tls_cert: str = ""  # PEM files; both, or neither for plaintext
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM: clients must show a certificate it signed
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
    max_lease_streams: int = 1000  # open LeaseStreams at once
    max_watch_streams: int = 10_000  # open WaitJob calls at once
    max_metric_queues: int = 1000  # queues with labels of their own; the rest share one


# (setting, environment variable, type) for what `broker serve` takes as flags.
ENV: tuple[tuple[str, str, type], ...] = (
    ("host", "BROKER_HOST", str),
    ("port", "BROKER_PORT", int),
    ("database", "BROKER_DATABASE", str),
    ("metrics_port", "BROKER_METRICS_PORT", int),
    ("metrics_host", "BROKER_METRICS_HOST", str),
    ("auth", "BROKER_AUTH", bool),
    ("insecure", "BROKER_INSECURE", bool),
    ("tls_cert", "BROKER_TLS_CERT", str),
    ("tls_key", "BROKER_TLS_KEY", str),
    ("tls_client_ca", "BROKER_TLS_CLIENT_CA", str),
    ("max_payload_bytes", "BROKER_MAX_PAYLOAD_BYTES", int),
    ("lease_duration", "BROKER_LEASE_SECONDS", timedelta),
    ("dedup_window", "BROKER_DEDUP_WINDOW_SECONDS", timedelta),
    ("retention", "BROKER_RETENTION_SECONDS", timedelta),
    ("shutdown_grace", "BROKER_SHUTDOWN_GRACE_SECONDS", timedelta),
    ("max_lease_streams", "BROKER_MAX_LEASE_STREAMS", int),
    ("max_watch_streams", "BROKER_MAX_WATCH_STREAMS", int),
    ("max_metric_queues", "BROKER_MAX_METRIC_QUEUES", int),
)


class SettingError(ValueError):
    """A setting the broker cannot run with; the message names it."""


def flag_of(env: str) -> str:
    """``BROKER_LEASE_SECONDS`` -> ``--lease-seconds``."""
    return "--" + env.removeprefix("BROKER_").lower().replace("_", "-")


def _named(name: str) -> str:
    env = next((e for n, e, _ in ENV if n == name), None)
    return f"{flag_of(env)} ({env})" if env else name


def parse(kind: type, raw: str) -> object:
    """A setting's text as its type; ValueError naming what was expected."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("a whole number") from None
    if kind is timedelta:
        try:
            seconds = float(text)
            if math.isfinite(seconds):
                return timedelta(seconds=seconds)
        except (ValueError, OverflowError):
            pass
        raise ValueError("a number of seconds")
    return raw


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def from_text(env: str, kind: type, raw: str, *, from_env: bool) -> object:
    """``parse``, its error naming where the text came from: ``env``, or the flag."""
    try:
        return parse(kind, raw)
    except ValueError as expected:
        where = f"{env}={raw!r}" if from_env else f"{flag_of(env)} {raw!r}"
        raise SettingError(f"{where} is not {expected}") from None


# Durations past this would put `now ± duration` out of the store's range.
_LONGEST = timedelta(days=3650)
_PORTS = range(0, 65536)
# Half of what one message may carry (limits.MAX_MESSAGE_BYTES, the SDK's
# receive limit): a job, its result or a lease of it must fit one message.
_LARGEST_PAYLOAD = limits.MAX_MESSAGE_BYTES // 2

# Each count setting and its least value.
_COUNTS: tuple[tuple[str, int], ...] = (
    ("max_batch", 1),
    ("max_lease_streams", 1),
    ("max_watch_streams", 1),
    ("max_metric_queues", 0),
)

# Each duration setting, and whether it may be 0 (else it must be more).
_DURATIONS: tuple[tuple[str, bool], ...] = (
    ("lease_duration", False),
    ("dedup_window", True),
    ("retention", True),
    ("retention_interval", False),
    ("shutdown_grace", True),
    ("reap_interval", False),
    ("poll_interval", False),
)


def check(settings: Settings) -> None:
    """Raise SettingError for the first setting the broker cannot run with."""
    s = settings
    for name in ("host", "database"):
        if not getattr(s, name).strip():
            raise SettingError(f"{_named(name)} must not be empty")
    for name in ("port", "metrics_port"):
        if getattr(s, name) not in _PORTS:
            raise SettingError(
                f"{_named(name)} must be a port from 0 to 65535, not {getattr(s, name)}"
            )
    _check_exposure(s)
    _check_tls(s)
    if not 1 <= s.max_payload_bytes <= _LARGEST_PAYLOAD:
        raise SettingError(
            f"{_named('max_payload_bytes')} must be from 1 to {_LARGEST_PAYLOAD}, "
            f"not {s.max_payload_bytes}"
        )
    for name, least in _COUNTS:
        if getattr(s, name) < least:
            raise SettingError(f"{_named(name)} must be at least {least}, not {getattr(s, name)}")
    for name, zero_allowed in _DURATIONS:
        value: timedelta = getattr(s, name)
        seconds = f"{value.total_seconds():g}"
        if value < timedelta(0) or (value == timedelta(0) and not zero_allowed):
            bound = "0 or more" if zero_allowed else "more than 0"
            raise SettingError(f"{_named(name)} must be {bound} seconds, not {seconds}")
        if value > _LONGEST:
            raise SettingError(
                f"{_named(name)} must be at most {_LONGEST.days} days, not {seconds} seconds"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _check_exposure(s: Settings) -> None:
    """Off the loopback address, anyone who reaches the port could read every
    payload: refuse that unless keys are required or it is asked for."""
    if is_loopback(s.host) or s.auth or s.insecure:
        return
    raise SettingError(
        f"{_named('host')} {s.host} is reachable from other machines: start with "
        f"{_named('auth')} so that every call needs an API key, or with "
        f"{_named('insecure')} to serve anyone who can reach it"
    )


def _check_tls(s: Settings) -> None:
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingError(f"give {_named('tls_cert')} and {_named('tls_key')} together")
    if s.tls_client_ca and not s.tls_cert:
        raise SettingError(
            f"{_named('tls_client_ca')} checks client certificates over TLS: "
            f"give {_named('tls_cert')} and {_named('tls_key')} too"
        )
    tls_files(s)


def tls_files(s: Settings) -> tuple[bytes, bytes, bytes | None] | None:
    """The certificate, key and client CA the broker serves TLS with (PEM
    bytes), or None for plaintext; SettingError naming a file it cannot use."""
    if not s.tls_cert:
        return None
    cert, key = _pem(s, "tls_cert"), _pem(s, "tls_key")
    return cert, key, _pem(s, "tls_client_ca") if s.tls_client_ca else None


def _pem(s: Settings, name: str) -> bytes:
    path = getattr(s, name)
    try:
        with open(path, "rb") as file:
            data: bytes = file.read()
    except OSError as error:
        raise SettingError(f"{_named(name)} {path!r}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SettingError(f"{_named(name)} {path!r} is not a PEM file")
    return data

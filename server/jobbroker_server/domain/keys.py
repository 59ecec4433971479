"""API keys: who a caller is, and what its role lets it do.

A key reads ``jbk_<id>_<secret>``. The id is public (listings and logs name a
key by it); the secret is 256 random bits, of which the store keeps only the
SHA-256. A slow hash (bcrypt, scrypt) guards passwords people choose; a random
secret this long cannot be guessed from its hash, and a fast one keeps the
check off every call's bill.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from jobbroker_server.domain import limits
from jobbroker_server.domain.errors import InvalidArgument, PermissionDenied

PREFIX = "jbk"
MAX_KEY_QUEUES = 100  # queues one key may be limited to
MAX_KEYS = 10_000  # valid keys at once: every broker holds them all in memory


class Role(enum.StrEnum):
    PRODUCER = "producer"  # submit, get, wait, cancel, list
    WORKER = "worker"  # the lease stream
    ADMIN = "admin"  # everything: the DLQ and the keys too


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as the store keeps it: everything but the secret."""

    id: str
    name: str
    role: Role
    queues: tuple[str, ...]  # empty: every queue
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key it presented, or anyone when auth is off."""

    key_id: str  # "" when auth is off
    name: str
    role: Role
    queues: frozenset[str] | None  # None: every queue

    # Who did it, in a job's story: the key's name, or "client". Set once:
    # it is read for every job a call submits.
    actor: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "actor", self.name if self.key_id else "client")

    def may_use(self, queue: str) -> bool:
        return self.queues is None or queue in self.queues

    def check_queue(self, queue: str) -> None:
        if not self.may_use(queue):
            raise PermissionDenied(
                f"API key {self.name!r} may not use queue {queue!r}; "
                f"it is limited to {_listed(self.queues)}"
            )

    def named_queue(self, queue: str | None, what: str) -> None:
        """A listing or DLQ call: a key limited to queues must name one of them."""
        if queue is not None:
            self.check_queue(queue)
        elif self.queues is not None:
            raise PermissionDenied(
                f"API key {self.name!r} is limited to {_listed(self.queues)}: "
                f"name one of them as the queue to {what}"
            )


ANYONE = Caller(key_id="", name="", role=Role.ADMIN, queues=None)


def caller_of(key: ApiKey) -> Caller:
    return Caller(key.id, key.name, key.role, frozenset(key.queues) if key.queues else None)


def _listed(queues: frozenset[str] | None) -> str:
    return ", ".join(repr(q) for q in sorted(queues or ()))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(name: str, role: Role, queues: tuple[str, ...], now: datetime) -> tuple[ApiKey, str]:
    """A key to store, and the text to hand its owner (this once)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(key_id, name, role, queues, hash_secret(secret), now)
    return key, f"{PREFIX}_{key_id}_{secret}"


def parse(text: str) -> tuple[str, str] | None:
    """(id, secret) of a key's text; None for text that is not a key."""
    prefix, _, rest = text.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not key_id or not secret:
        return None
    return key_id, secret


def matches(key: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(key.secret_hash, hash_secret(secret))


def key_spec(name: str, queues: list[str]) -> tuple[str, tuple[str, ...]]:
    """A new key's name and queues, checked like any other name."""
    checked = limits.name(name, "name")
    if len(queues) > MAX_KEY_QUEUES:
        raise InvalidArgument(
            f"a key is limited to at most {MAX_KEY_QUEUES} queues (got {len(queues)})"
        )
    return checked, tuple(dict.fromkeys(limits.name(q, "queues[]") for q in queues))

"""The client that `task.delay(...)` and `task.apply_async(...)` submit
through: configured once by the app (`jobbroker.configure(...)`), or made on
first use from the BROKER_* environment variables, as the CLI reads them."""

from __future__ import annotations

import threading
from typing import Unpack

from .client import Client
from .connection import ConnectionOptions, ConnectionSettings

_lock = threading.Lock()
_client: Client | None = None


def configure(target: str | None = None, **settings: Unpack[ConnectionSettings]) -> Client:
    """Set the client `delay` and `apply_async` use: BROKER_* variables, then
    these arguments. Replaces (and closes) one configured before."""
    global _client
    made = Client(ConnectionOptions.from_env(target=target, **settings))
    with _lock:
        old, _client = _client, made
    if old is not None:
        old.close()
    return made


def default_client() -> Client:
    """The configured client, or one from the BROKER_* variables (127.0.0.1:50051
    without them), made once."""
    global _client
    with _lock:
        if _client is None:
            _client = Client(ConnectionOptions.from_env())
        return _client

"""Time-sortable job ids (UUIDv7, RFC 9562), monotonic within one process."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = 0


def new_job_id() -> str:
    """A UUIDv7 string; ids made later in this process sort after earlier ones."""
    global _last
    with _lock:
        # 48-bit ms timestamp + 12-bit counter as sub-ms sequence, strictly increasing.
        candidate = (time.time_ns() // 1_000_000) << 12
        _last = max(candidate, _last + 1)
        stamp = _last
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (stamp >> 12) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64 | 0b10 << 62 | rand
    return str(uuid.UUID(int=value))

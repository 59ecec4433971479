"""Time-sortable job ids (UUIDv7, RFC 9562), monotonic within one process."""

from __future__ import annotations

import random
import threading
import time

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
    # The random bits keep replicas' ids apart; they need not be secret, and
    # os.urandom, a system call per id, was a tenth of a batch submit's time.
    # (The random module reseeds in a forked child.)
    rand = random.getrandbits(62)
    value = (stamp >> 12) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64 | 0b10 << 62 | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

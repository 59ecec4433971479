"""Time-ordered ids (UUIDv7, RFC 9562), strictly increasing within a process.

Job ids (made by the broker) and automatic idempotency keys (made by the SDK)
both come from here. Ordered values add to one end of the database's indexes;
random ones dirtied a page of an index per job.

The random bits come from a generator of this module's own, seeded from the
operating system and seeded again in a forked child: two processes that seed
the global `random` alike must still not make the same key, and the
operating system's source is a system call per value.
"""

from __future__ import annotations

import os
import random
import threading
import time

_random = random.Random()
_lock = threading.Lock()
_last = 0


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a fork while another thread held it would leave it held
    _random.seed()


os.register_at_fork(after_in_child=_after_fork)


def uuid7() -> str:
    global _last
    with _lock:
        # 48-bit ms timestamp + 12-bit counter as sub-ms sequence, strictly increasing.
        _last = max((time.time_ns() // 1_000_000) << 12, _last + 1)
        stamp = _last
        rand = _random.getrandbits(62)
    value = (stamp >> 12) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64 | 0b10 << 62 | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

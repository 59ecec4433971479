"""How many leased jobs a Worker holds: its prefetch window.

A window of a fixed count is either too small for short jobs or too large for
long ones. Short jobs want a larger window: the broker leases into it a
quarter at a time, and a batch's transaction and messages cost about the same
for 16 jobs as for 64 (a no-op drain ran at ~13,000 jobs/s holding 64 and
~15,600 holding 128). Long jobs want a small one: a job held by a busy worker
waits while another worker may be idle. So the window is sized in time: it
starts at four jobs per handler slot and doubles while the jobs it holds
would keep the slots busy for at most HOLD_SECONDS, up to eight per slot; it
halves back when they would keep them busy for more than twice that.

Eight, not more: under steady load the window is full of jobs waiting for a
slot, and each one held adds to the wait of those behind it. Sixteen per slot
drained no-op jobs a sixth faster again but raised the p99 submit-to-start
latency of a saturated producer and worker (W4) from ~42 to ~57 ms.
"""

from __future__ import annotations

HOLD_SECONDS = 0.1
_FLOOR_PER_SLOT = 4
_CAP_PER_SLOT = 8


class Window:
    def __init__(self, concurrency: int, fixed: int | None = None) -> None:
        self._slots = concurrency
        self.floor = fixed or _FLOOR_PER_SLOT * concurrency
        self.cap = fixed or _CAP_PER_SLOT * concurrency
        self.size = self.floor
        self._busy = 0.0  # slot seconds of the jobs finished since the last look
        self._finished = 0

    def finished(self, seconds: float) -> int | None:
        """A job held its slot this long; the new window size when it changes.

        The window is looked at once per window's worth of finished jobs."""
        self._busy += seconds
        self._finished += 1
        if self._finished < self.size:
            return None
        held = self.size * (self._busy / self._finished) / self._slots
        self._busy, self._finished = 0.0, 0
        if held * 2 <= HOLD_SECONDS and self.size < self.cap:
            self.size = min(self.size * 2, self.cap)
        elif held > 2 * HOLD_SECONDS and self.size > self.floor:
            self.size = max(self.size // 2, self.floor)
        else:
            return None
        return self.size

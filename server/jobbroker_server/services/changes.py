"""The one seam for state changes.

Every store operation that moves jobs returns the transitions it made
(``Moved``); whoever called it hands them here, and each part of the broker
that reacts to state changes listens here: the waiters (``JobWatch``), the
metrics, the worker streams (wake-ups for jobs that became ready, cancels for
attempts the broker ended), the scheduler, and the live event tails. A new
reaction is a new listener, not an edit to every caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from jobbroker_server.domain.transitions import Transition

log = logging.getLogger(__name__)

Listener = Callable[[Sequence[Transition]], None]


class Changes:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def apply(self, transitions: Sequence[Transition]) -> None:
        """Run every listener on one operation's transitions. The store has
        committed them: a listener that fails is logged, and the others run."""
        if not transitions:
            return
        for listener in self._listeners:
            try:
                listener(transitions)
            except Exception:
                log.exception("reacting to %d job transition(s) failed", len(transitions))

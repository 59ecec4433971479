"""How a background loop logs the failure of one pass."""

from __future__ import annotations

import logging
import sys

from jobbroker_server.domain.errors import STORE_DOWN


def log_failure(log: logging.Logger, message: str, *args: object) -> None:
    """Log the exception being handled: with its traceback if it is a bug;
    as one debug line if the store is out, which the store has logged (once
    per kind and interval) and health reports, so an outage does not write a
    traceback per stream per pass."""
    if isinstance(sys.exc_info()[1], STORE_DOWN):
        log.debug(message, *args)
    else:
        log.exception(message, *args)

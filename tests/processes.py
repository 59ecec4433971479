"""Real ``broker`` processes for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BROKER = [sys.executable, "-m", "jobbroker_server"]
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


class Process:
    """A child process whose output is collected by a thread, so it never blocks."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = pattern.search(line)
                if found:
                    return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern.pattern!r} in:\n{self.output}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)


def start_broker(database: str, *extra: str, metrics_port: int = 0) -> tuple[Process, str]:
    """Start ``broker serve`` on a free port; return it and its target."""
    proc = Process(
        [
            *BROKER,
            "serve",
            "--port",
            "0",
            "--database",
            database,
            "--metrics-port",
            str(metrics_port),
            *extra,
        ]
    )
    port = proc.wait_for_line(LISTENING).group(1)
    return proc, f"127.0.0.1:{port}"

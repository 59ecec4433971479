"""docs/migrating.md's examples run as written: each ```python block is a
module whose tasks a real worker process serves and whose __main__ part runs
as the app, against a real broker (the ```py snippets are the other queues'
code, not run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST
from tests.processes import BROKER, Process

DOC = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    database = str(tmp_path_factory.mktemp("migrating") / "broker.db")
    with BrokerThread(replace(FAST, database=database)) as running:
        yield running


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.timeout(90)
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_an_example_runs_as_written(number: int, broker: BrokerThread, tmp_path: Path) -> None:
    module = f"example_{number}"
    (tmp_path / f"{module}.py").write_text(BLOCKS[number])
    env = {**os.environ, "BROKER_TARGET": broker.target}
    worker = Process([*BROKER, "worker", module], env=env, cwd=tmp_path)
    try:
        app = subprocess.run(
            [sys.executable, f"{module}.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        worker.kill()
    assert app.returncode == 0, app.stderr + "\n--- worker:\n" + worker.output[-3000:]

"""scripts/bench.py --quick runs end to end and reports every workload (correctness, not speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
FIGURES = (
    "wall.unary",
    "wall.unary16",
    "wall.pairs",
    "wall.pipelined",
    "W1",
    "W1c",
    "W1b",
    "W2",
    "W3.p50",
    "W3.p99",
    "W4",
    "W4.p99",
    "WF",
    "WF.start",
    "MEM.max",
)
SIGNED = ("MEM.growth",)  # RSS may shrink between the two samples


@pytest.mark.timeout(330)
def test_quick_bench_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--runs", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert report["errors"] == []
    for key in FIGURES:
        assert key in figures, f"{key} missing from {sorted(figures)}"
        assert len(figures[key]["values"]) == 1
        assert figures[key]["median"] > 0, (key, figures[key])
    for key in SIGNED:
        assert math.isfinite(figures[key]["median"]), (key, figures[key])

"""The one-command GPU check runs every section end to end in its CPU smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every section of the GPU check end to end: ~60 s on the 2-core box

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "check.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("## GPU check: ")
    assert "torch " in report and "triton " in report  # versions come first
    for section in ("versions", "kernels", "bench_kernels", "streaming", "capacity"):
        assert f"| {section} | ok |" in report, report
    # every streaming run (2 sizes x CASA/insertion eager, the small size compiled) reached frame 1
    rows = [line for line in report.splitlines() if line.startswith("| 24²") or line.startswith("| 48²")]
    for size in ("24²", "48²"):
        for fusion in ("casa", "insertion"):
            for mode in ("eager", "compiled") if size == "24²" else ("eager",):
                mine = [r for r in rows if r.startswith(f"| {size}") and f"| {fusion} | {mode} | 1 |" in r]
                assert mine, f"no frame-1 row for {size} {fusion} {mode}:\n" + "\n".join(rows)
    assert "error:" not in report
    assert "| N | frames sent |" in report  # the load test's table

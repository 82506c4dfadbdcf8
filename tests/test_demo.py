"""`vmferry demo` migrates a dirtying guest between two processes and ends with a report."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_report import png_size
from vmferry.migration.trace import read_trace
from vmferry.report import PANELS
from vmproc import REPO

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


def test_demo_writes_a_report_and_prints_its_path(tmp_path: Path) -> None:
    out = tmp_path / "demo.html"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "100"}
    r = subprocess.run(
        [sys.executable, "-m", "vmferry", "demo", "-m", "256M", "--ws", "32", "--rate", "8",
         "--warmup", "0.5", "--after", "0.5", "--report", str(out)],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', out.read_text())
    assert len(pngs) == PANELS  # one per panel of the report
    assert all(png_size(base64.b64decode(p)) == (1200, 400) for p in pngs)
    assert read_trace(tmp_path / "source.jsonl").of("pass")
    assert read_trace(tmp_path / "destination.jsonl").of("applied")

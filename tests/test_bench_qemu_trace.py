"""bench/qemu_trace.py: QEMU's polled query-migrate answers become a trace that the project's own
checker accepts, with one pass per dirty-sync-count step and QEMU's figures in it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from qemu_trace import QemuTrace  # noqa: E402

from vmferry.migration.trace import read_trace  # noqa: E402


def _answer(status: str, sync: int, transferred: int, remaining: int, normal: int) -> dict:
    return {"status": status, "expected-downtime": 300,
            "ram": {"dirty-sync-count": sync, "transferred": transferred, "remaining": remaining,
                    "normal": normal, "duplicate": 10, "page-size": 4096, "mbps": 800.0,
                    "dirty-pages-rate": 25}}


def test_polled_answers_become_a_valid_trace(tmp_path: Path) -> None:
    path = tmp_path / "qemu.jsonl"
    tr = QemuTrace(path, ram_bytes=1 << 30)
    tr.sample({"status": "setup"}, 0.0)
    tr.sample(_answer("active", 1, 0, 1 << 30, 0), 0.01)
    tr.sample(_answer("active", 1, 100 << 20, 900 << 20, 25600), 0.5)
    tr.sample(_answer("active", 2, 200 << 20, 8 << 20, 51200), 1.0)  # pass 1 ended
    tr.sample(_answer("active", 4, 209 << 20, 0, 53504), 1.1)  # passes 2 and 3 in one sample
    final = {"status": "completed", "total-time": 1100, "downtime": 12,
             "ram": {"transferred": 209 << 20}}
    tr.sample(final, 1.12)
    tr.close(final)
    trace = read_trace(path)
    passes = trace.of("pass")
    assert [p["pass"] for p in passes] == [1, 2]
    assert passes[0]["bytes"] == 200 << 20 and passes[0]["pages"] == 51200
    assert passes[0]["bandwidth-bps"] == 800.0 * 1e6 / 8
    assert passes[0]["dirty-rate-bps"] == 25 * 4096
    assert passes[1]["bytes"] == 9 << 20
    assert trace.of("setup")[0]["pages-to-send"] == (1 << 30) // 4096
    assert trace.of("downtime")[0]["downtime-ms"] == 12
    assert trace.end is not None and trace.end["status"] == "completed"
    assert [e["phase"] for e in trace.of("phase")] == ["setup", "active", "completed"]

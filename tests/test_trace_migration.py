"""Traces of real migrations: `vmferry migrate --trace` makes both processes write theirs, and
what they wrote agrees with query-migrate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.migration.trace import read_trace
from vmproc import REPO, QmpReplyError, VmProcess

pytestmark = [pytest.mark.kvm]

MEM = "256M"
DIRTY = "ws=32 rate=20 verify=1"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_both_sides_trace_a_migration(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    trace_path = tmp_path / "mig.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "vmferry", "migrate", "--qmp", f"unix:{src.qmp_path}",
         "--dest-qmp", f"unix:{dst.qmp_path}", "--trace", str(trace_path), dst.incoming_uri()],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    info = src.wait_migration()
    assert info["status"] == "completed"
    # The destination closes its trace when its migration completes; the source may finish first.
    assert dst.wait_migration()["status"] == "completed"

    # Each side ends its trace just after its status turns final: wait for the `end` lines.
    source = wait_for(lambda: (t := read_trace(trace_path)).end and t, "the source trace's end")
    assert source.side == "source"
    phases = [e["phase"] for e in source.of("phase")]
    assert phases == ["setup", "active", "device", "completed"]
    passes = source.of("pass")
    assert [p["pass"] for p in passes] == list(range(1, len(passes) + 1))
    assert len(passes) == len(info["passes"])
    assert [p["pages"] for p in passes] == [p["pages"] for p in info["passes"]]
    assert sum(p["pages"] for p in passes) <= info["ram"]["normal"]
    assert passes[0]["unpopulated-pages"] == info["ram"]["unpopulated"]
    syncs = source.of("sync")
    assert [s["sync"] for s in syncs] == list(range(2, info["ram"]["dirty-sync-count"] + 1))
    (downtime,) = source.of("downtime")
    assert set(downtime["phases"]) == set(info["downtime-phases"])
    assert round(downtime["downtime-ms"]) == info["downtime"]
    assert source.end is not None and source.end["status"] == "completed"
    assert source.end["transferred-bytes"] == info["ram"]["transferred"]

    dest = wait_for(lambda: (t := read_trace(tmp_path / "mig.destination.jsonl")).end and t,
                    "the destination trace's end")
    assert dest.side == "destination"
    applied = dest.of("applied")
    assert [a["what"] for a in applied if a["what"] != "pass-start"] == ["ram", "devices", "started"]
    starts = [a["pass"] for a in applied if a["what"] == "pass-start"]
    assert starts == list(range(1, len(passes) + 1))
    received = [a["bytes"] for a in applied]
    assert received == sorted(received)
    assert dest.end is not None and dest.end["status"] == "completed"


def test_trace_file_in_a_missing_directory_is_refused(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", "32M", "--guest", "heartbeat")
    procs.append(src)
    with pytest.raises(QmpReplyError, match="x-trace-file. expects a path in an existing directory"):
        src.cmd("migrate-set-parameters", **{"x-trace-file": str(tmp_path / "nope" / "t.jsonl")})
    assert src.cmd("query-migrate-parameters")["x-trace-file"] == ""
    src.cmd("migrate-set-parameters", **{"x-trace-file": str(tmp_path / "t.jsonl")})
    assert src.cmd("query-migrate-parameters")["x-trace-file"] == str(tmp_path / "t.jsonl")
    src.cmd("migrate-set-parameters", **{"x-trace-file": None})
    assert src.cmd("query-migrate-parameters")["x-trace-file"] == ""


def test_migrate_with_forecast(tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    with pytest.raises(QmpReplyError, match="no dirty rate measured"):
        src.cmd("x-migrate-forecast")
    with pytest.raises(QmpReplyError, match="no bandwidth known"):
        src.cmd("x-migrate-forecast", **{"dirty-rate": 1 << 20})
    with pytest.raises(QmpReplyError, match="Parameter 'bandwidth' expects a value of 0 or more"):
        src.cmd("x-migrate-forecast", **{"dirty-rate": 1, "bandwidth": -1})
    f = src.cmd("x-migrate-forecast", **{"dirty-rate": 0, "bandwidth": 100 << 20})
    assert f["converges"] is True and f["passes"] == 1
    assert f["inputs"]["initial-bytes"] == f["total-bytes"] > 0
    r = subprocess.run(
        [sys.executable, "-m", "vmferry", "migrate", "--qmp", f"unix:{src.qmp_path}", "--forecast",
         "--forecast-bandwidth", str(200 << 20), dst.incoming_uri()],
        capture_output=True, text=True, timeout=300, env={**_env(), "COLUMNS": "160"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "forecast against what happened" in r.stdout
    info = src.wait_migration()
    assert info["status"] == "completed"
    # The next forecast from this source takes what the migration measured: the passes' bytes over
    # their time, its setup, its pause besides the last RAM.
    f = src.cmd("x-migrate-forecast", **{"dirty-rate": 0})
    secs = sum(p["duration-ms"] for p in info["passes"]) / 1000
    assert f["inputs"]["bandwidth"] == round(sum(p["bytes"] for p in info["passes"]) / secs)
    assert f["inputs"]["setup-ms"] == info["setup-time"]
    assert f["inputs"]["switchover-ms"] > 0 and f["inputs"]["pass-overhead-ms"] >= 0


def test_trace_of_a_refused_migrate_and_an_unwritable_destination_trace(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", MEM, "--guest", "dirty", "--append", DIRTY)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"verify ok")
    src.cmd("migrate-set-parameters", **{"x-trace-file": str(tmp_path / "refused.jsonl")})
    with pytest.raises(QmpReplyError, match="Connection refused"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    refused = read_trace(tmp_path / "refused.jsonl")
    assert [e["event"] for e in refused.events] == ["start", "end"]
    assert refused.end is not None and "Connection refused" in refused.end["error"]

    # A directory cannot be opened as the trace: the destination refuses the stream, naming it.
    dst.cmd("migrate-set-parameters", **{"x-trace-file": str(tmp_path)})
    src.cmd("migrate-set-parameters", **{"x-trace-file": ""})
    src.cmd("migrate", uri=dst.incoming_uri())
    dinfo = dst.wait_migration()
    assert dinfo["status"] == "failed" and "cannot write the trace file" in dinfo["error-desc"], dinfo
    assert src.wait_migration()["status"] == "failed"
    assert src.status() == "running"

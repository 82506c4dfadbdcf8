"""`vmferry run --metrics`: scraped by a real HTTP client and parsed as Prometheus text by a strict
parser written here from the exposition format (version 0.0.4)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from polling import wait_for
from vmferry.monitor.metrics import render
from vmproc import REPO, VmProcess

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels): value}; raises AssertionError at the first line the format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    types: dict[str, str] = {}
    helped: set[str] = set()
    sampled: set[str] = set()
    samples: dict[tuple[str, str], float] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helped, f"line {n}: {line}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            parts = line.split(" ")
            assert len(parts) == 4 and parts[3] in TYPES, f"line {n}: {line}"
            assert parts[2] not in types and parts[2] not in sampled, f"line {n}: TYPE after samples or twice"
            types[parts[2]] = parts[3]
        elif line.startswith("#") or not line:
            assert not line, f"line {n}: blank lines are not expected here"
        else:
            m = SAMPLE.match(line)
            assert m, f"line {n}: not a sample: {line!r}"
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            assert name in types, f"line {n}: sample of {name} before its TYPE"
            if types[name] == "counter":
                assert name.endswith("_total"), f"line {n}: a counter's name ends in _total"
            assert (name, labels) not in samples, f"line {n}: duplicate sample"
            samples[(name, labels)] = float(value)
            sampled.add(name)
    return samples


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(r.read().decode())


def test_render_is_valid_for_every_status() -> None:
    for status in ("running", "paused", "postmigrate", "something-new"):
        text = render({"status": status, "running": status == "running"},
                      {"status": "active", "expected-downtime": -1, "ram": {"transferred": 5}},
                      ram_bytes=1 << 20, vcpus=2)
        samples = parse_prometheus(text)
        assert samples[("vmferry_vm_state", f'{{state="{status}"}}')] == 1
        assert ("vmferry_migration_expected_downtime_seconds", "") not in samples  # -1: unbounded
        assert samples[("vmferry_migration_transferred_bytes_total", "")] == 5


def _metrics_url(vm: VmProcess) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"metrics on tcp:(\S+):(\d+)", vm.log())
        if m:
            return f"http://{m.group(1)}:{m.group(2)}/metrics"
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in the log: {vm.log()}")


@pytest.mark.kvm
def test_metrics_endpoint_is_scraped_before_and_after_a_migration(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    src = VmProcess(tmp_path, "src", "-m", "128M", "--guest", "dirty", "--append", "ws=16 rate=8",
                    "--metrics", "tcp:127.0.0.1:0")
    procs.append(src)
    url = _metrics_url(src)
    # The endpoint is up before the vCPUs start: wait for them.
    before = wait_for(lambda: (m := scrape(url))[("vmferry_vm_state", '{state="running"}')] == 1 and m,
                      "the VM running")
    assert before[("vmferry_vm_running", "")] == 1
    assert before[("vmferry_vm_ram_bytes", "")] >= 128 << 20
    assert before[("vmferry_migration_status", '{status="none"}')] == 1
    assert ("vmferry_migration_transferred_bytes_total", "") not in before

    dst = VmProcess(tmp_path, "dst", "-m", "128M", "--incoming", "tcp:127.0.0.1:0")
    procs.append(dst)
    src.wait_serial(r"dirty: filled")
    src.cmd("migrate", uri=dst.incoming_uri())
    info = src.wait_migration()
    assert info["status"] == "completed"
    # query-migrate says completed a moment before the run state says postmigrate.
    after = wait_for(lambda: (m := scrape(url))[("vmferry_vm_state", '{state="postmigrate"}')] == 1 and m,
                     "the source in postmigrate")
    assert after[("vmferry_migration_status", '{status="completed"}')] == 1
    assert after[("vmferry_migration_transferred_bytes_total", "")] == info["ram"]["transferred"]
    assert after[("vmferry_migration_normal_pages_total", "")] == info["ram"]["normal"]
    assert after[("vmferry_migration_downtime_seconds", "")] == pytest.approx(info["downtime"] / 1000)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=30)
    assert e.value.code == 404


@pytest.mark.kvm
def test_bad_metrics_address_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "vmferry", "run", "--guest", "heartbeat", "-m", "16M",
                        "--metrics", "udp:1"], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "--metrics udp:1: expected tcp:HOST:PORT" in r.stderr and "Traceback" not in r.stderr

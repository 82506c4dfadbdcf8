"""`vmferry report`: PNGs of the promised size, HTML embedding them, clear errors for bad input."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402

from test_trace import write_sample  # noqa: E402
from vmferry.errors import VmferryError  # noqa: E402
from vmferry.migration.trace import TraceError  # noqa: E402
from vmferry.report import write_report  # noqa: E402
from vmproc import REPO  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_report_is_a_valid_image_of_the_promised_size(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a.jsonl")
    b = write_sample(tmp_path / "b.jsonl")
    d = write_sample(tmp_path / "a.destination.jsonl", side="destination")
    out = write_report([a, b, d], tmp_path / "r.png")
    data = out.read_bytes()
    assert png_size(data) == (1200, 2000)
    pixels = mpimg.imread(io.BytesIO(data), format="png")  # decodes every row
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0  # something was drawn


def test_html_report_embeds_one_png_per_panel(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a.jsonl")
    out = write_report([a], tmp_path / "r.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    img = r'<img alt="(\w+)" width="1200" height="400" src="data:image/png;base64,([^"]+)">'
    images = re.findall(img, text)
    assert [name for name, _ in images] == ["remaining", "rates", "downtime", "applied", "faults"]
    for _, b64 in images:
        assert png_size(base64.b64decode(b64)) == (1200, 400)
    assert "<td>a.jsonl</td>" in text and "<td>completed</td>" in text


def test_bad_trace_stops_the_report_naming_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = write_sample(tmp_path / "t.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:5] + [lines[5].replace('"bytes": ', '"bytes": "x", "b": ')]) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:6: field 'bytes' of a 'pass' event must be an integer"):
        write_report([bad], tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    with pytest.raises(VmferryError, match="must end in .html or .png"):
        write_report([tmp_path / "t.jsonl"], tmp_path / "r.pdf")


def test_cli_reports_errors_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"event": "pass", "t": 0}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "vmferry", "report", str(tmp_path / "bad.jsonl"),
                        "-o", str(tmp_path / "r.html")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("bad.jsonl:1: a trace begins with a 'start' event, not 'pass'")
    good = write_sample(tmp_path / "good.jsonl")
    r = subprocess.run([sys.executable, "-m", "vmferry", "report", str(good), "-o", str(tmp_path / "r.png")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "r.png")


def test_postcopy_fault_latencies_are_drawn_in_log2_buckets(tmp_path: Path) -> None:
    from vmferry.migration.trace import TraceWriter, read_trace
    from vmferry.report import _fault_latency, _pyplot

    path = tmp_path / "d.jsonl"
    w = TraceWriter(path, "destination", ram_bytes=64 << 20)
    lat = [0.5, 3.0, 3.5, 900.0, 1500.0, 70_000.0]  # buckets 1 us, 2 us (x2), 512 us, 1 ms, 64 ms
    w.event("postcopy", requests=6, pages_placed=100, blocktime_ms=2.0,
            fault_latency={"faults": len(lat)}, fault_latencies_us=lat)
    w.close("completed")
    plt = _pyplot()
    fig, ax = plt.subplots()
    try:
        _fault_latency(ax, [read_trace(path)])
        heights = [p.get_height() for p in ax.patches]
    finally:
        plt.close(fig)
    assert sum(heights) == len(lat)
    assert heights[0] == 1 and heights[1] == 2 and heights[9] == 1 and heights[10] == 1 and heights[16] == 1

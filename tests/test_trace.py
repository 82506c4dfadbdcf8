"""Migration traces (migration/trace.py): what the writer writes the reader accepts; every kind
of bad trace is refused with a TraceError naming the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.migration.trace import EVENT_FIELDS, NULL_TRACE, TraceError, TraceWriter, parse_trace, read_trace


def write_sample(path: Path, side: str = "source") -> Path:
    """A small but complete trace, written by the real writer."""
    w = TraceWriter(path, side, ram_bytes=64 << 20)
    w.event("phase", phase="setup")
    w.event("setup", pages_to_send=1000, unpopulated_pages=15000)
    w.event("phase", phase="active")
    for n, remaining in ((1, 300), (2, 40)):
        w.event("sync", sync=n + 1, dirty_pages=remaining, remaining_bytes=remaining * 4096, duration_ms=0.5)
        w.event("pass", pass_=n, duration_ms=100.0, bytes=4 << 20, pages=1000, zero_pages=3,
                unpopulated_pages=15000 if n == 1 else 0, transferred_bytes=n * (4 << 20),
                remaining_bytes=remaining * 4096, bandwidth_bps=40e6, dirty_rate_bps=4e6,
                expected_downtime_ms=float("inf") if n == 1 else 4.1, throttle_percent=0)
    w.event("applied", what="pass-start", pass_=1, bytes=10, pages=0, zero_pages=0)
    w.event("downtime", downtime_ms=12.5, bytes=200_000,
            phases={"pause": 0.1, "ram": 3.0, "devices": 0.4, "confirm": 9.0})
    w.event("phase", phase="completed")
    w.close("completed", total_time_ms=250)
    return path


def test_what_the_writer_writes_the_reader_accepts(tmp_path: Path) -> None:
    trace = read_trace(write_sample(tmp_path / "t.jsonl"))
    assert trace.side == "source"
    kinds = [e["event"] for e in trace.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [p["pass"] for p in trace.of("pass")] == [1, 2]
    assert trace.of("pass")[0]["expected-downtime-ms"] is None  # infinity is written as null
    assert trace.of("pass")[0]["zero-pages"] == 3
    assert trace.end is not None and trace.end["status"] == "completed"
    times = [e["t"] for e in trace.events]
    assert times == sorted(times)


def test_close_is_idempotent_and_events_after_it_are_dropped(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.jsonl", "destination")
    w.close("failed", error="x")
    w.close("failed")
    w.event("phase", phase="late")
    trace = read_trace(tmp_path / "t.jsonl")
    assert [e["event"] for e in trace.events] == ["start", "end"]


def test_null_trace_does_nothing() -> None:
    NULL_TRACE.event("pass", anything=1)
    NULL_TRACE.close("completed")


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot write the trace file"):
        TraceWriter(tmp_path / "missing-dir" / "t.jsonl", "source")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _bad(tmp_path: Path, edit) -> str:  # noqa: ANN001 - a small lambda over the lines
    lines = _lines(write_sample(tmp_path / "t.jsonl"))
    lines = edit(lines)
    with pytest.raises(TraceError) as info:
        parse_trace(lines, Path("t.jsonl"))
    return str(info.value)


def _set(lines: list[str], index: int, **changes: object) -> list[str]:
    record = json.loads(lines[index])
    for k, v in changes.items():
        if v is ...:
            del record[k]
        else:
            record[k] = v
    lines[index] = json.dumps(record)
    return lines


def test_bad_traces_name_line_and_field(tmp_path: Path) -> None:
    assert _bad(tmp_path, lambda ls: ls[:3] + ["{not json"] + ls[3:]).startswith("t.jsonl:4: not JSON")
    assert "t.jsonl:2: an event must be a JSON object, not an array" in _bad(
        tmp_path, lambda ls: [ls[0], "[1, 2]"])
    # index 6 is pass 1 (start, phase, setup, phase, sync, pass)
    msg = _bad(tmp_path, lambda ls: _set(ls, 5, bytes="many"))
    assert msg == "t.jsonl:6: field 'bytes' of a 'pass' event must be an integer, not a string"
    msg = _bad(tmp_path, lambda ls: _set(ls, 5, **{"bandwidth-bps": ...}))
    assert msg == "t.jsonl:6: 'pass' event has no field 'bandwidth-bps'"
    msg = _bad(tmp_path, lambda ls: _set(ls, 5, pages=True))
    assert "field 'pages' of a 'pass' event must be an integer, not a boolean" in msg
    msg = _bad(tmp_path, lambda ls: _set(ls, 5, event="pas"))
    assert msg.startswith("t.jsonl:6: unknown event 'pas'")
    msg = _bad(tmp_path, lambda ls: _set(ls, 5, t=-1))
    assert "t.jsonl:6: field 't' of a 'pass' event must be a number of seconds >= 0" in msg
    msg = _bad(tmp_path, lambda ls: _set(_set(ls, 4, t=5.0), 5, t=1.0))
    assert "t.jsonl:6: field 't' goes back in time" in msg
    assert _bad(tmp_path, lambda ls: ls[1:]).startswith("t.jsonl:1: a trace begins with a 'start' event")
    assert "field 'version' is 99" in _bad(tmp_path, lambda ls: _set(ls, 0, version=99))
    msg = _bad(tmp_path, lambda ls: _set(ls, 0, side="x"))
    assert "field 'side' must be one of source, destination" in msg
    msg = _bad(tmp_path, lambda ls: ls + [json.dumps({**json.loads(ls[0]), "t": 99.0})])
    assert "a second 'start' event" in msg
    assert _bad(tmp_path, lambda ls: []) == "t.jsonl: empty trace (no events)"
    assert "field 'phases' of a 'downtime' event must be an object" in _bad(
        tmp_path, lambda ls: [_set(ls, i, phases=[1]) for i, line in enumerate(ls)
                              if json.loads(line)["event"] == "downtime"][0])


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "nope.jsonl")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not a trace"):
        read_trace(tmp_path / "bin")


def test_every_event_kind_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace.md").read_text()
    for kind, fields in EVENT_FIELDS.items():
        assert f"### `{kind}`" in doc
        for name in fields:
            assert f"`{name}`" in doc, (kind, name)


@given(st.lists(st.one_of(st.text(max_size=40),
                          st.dictionaries(st.sampled_from(["event", "t", "side", "version", "bytes"]),
                                          st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                                    st.floats(allow_nan=True), st.booleans()),
                                          max_size=5).map(json.dumps)), max_size=8))
def test_any_input_is_accepted_or_refused_with_a_trace_error(lines: list[str]) -> None:
    try:
        parse_trace(lines, Path("fuzz.jsonl"))
    except TraceError as e:
        assert str(e).startswith("fuzz.jsonl")

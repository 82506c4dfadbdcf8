"""Migration traces: one JSON object per line, written while a migration runs, read and checked
afterwards (`vmferry report`). Format: docs/trace.md.

Writer: `TraceWriter(path, side)` opens the file and writes the `start` event; the migration's
hooks call `trace.event(KIND, field=value, ...)` (python names, `_` becomes `-`); `close(...)`
writes `end`. Every line is flushed as it is written, so a trace of a migration that crashed is
readable up to its last event. `NULL_TRACE` has the same methods and writes nothing: code with a
hook never asks whether tracing is on.

Reader: `read_trace(path)` checks every line against `EVENT_FIELDS` (the event kinds, their
required fields and types) and the order rules (first `start`, time never going back), and
raises `TraceError` naming the file, line and field — never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vmferry.errors import VmferryError

TRACE_VERSION = 1
SIDES = ("source", "destination")

NUM = (int, float)
INT = (int,)
STR = (str,)
DICT = (dict,)
LIST = (list,)

# kind -> {field: accepted python types}. Required fields only; other fields are allowed (a
# reader of version 1 ignores what it does not know). Every event also has `event` and `t`.
EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "start": {"version": INT, "side": STR, "wall-time": NUM, "ram-bytes": INT},
    "phase": {"phase": STR},
    "setup": {"pages-to-send": INT, "unpopulated-pages": INT},
    "sync": {"sync": INT, "dirty-pages": INT, "remaining-bytes": INT, "duration-ms": NUM},
    "pass": {"pass": INT, "duration-ms": NUM, "bytes": INT, "pages": INT, "zero-pages": INT,
             "unpopulated-pages": INT, "transferred-bytes": INT, "remaining-bytes": INT,
             "bandwidth-bps": NUM, "dirty-rate-bps": NUM, "expected-downtime-ms": NUM,
             "throttle-percent": NUM},
    "downtime": {"downtime-ms": NUM, "phases": DICT, "bytes": INT},
    "applied": {"what": STR, "pass": INT, "bytes": INT, "pages": INT, "zero-pages": INT},
    "postcopy": {"requests": INT, "pages-placed": INT, "blocktime-ms": NUM, "fault-latency": DICT,
                 "fault-latencies-us": LIST},
    "end": {"status": STR},
}
_TYPE_WORDS = {NUM: "a number", INT: "an integer", STR: "a string", DICT: "an object", LIST: "an array"}


class TraceError(VmferryError):
    """A trace file that is not what docs/trace.md describes; the message names line and field."""


class NullTrace:
    """Tracing off: every hook is a no-op."""

    path: Path | None = None

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def close(self, status: str, **fields: Any) -> None:
        pass


NULL_TRACE = NullTrace()


class TraceWriter(NullTrace):
    """Writes one migration's trace. Thread-safe: the migration thread writes passes and syncs,
    the monitor thread may write phases; a lock keeps lines whole and `t` in order."""

    def __init__(self, path: str | os.PathLike[str], side: str, *, ram_bytes: int = 0,
                 **start_fields: Any) -> None:
        if side not in SIDES:
            raise ValueError(f"trace side must be one of {SIDES}, not {side!r}")
        self.path = Path(path)
        try:
            self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise TraceError(f"cannot write the trace file {str(path)!r}: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.event("start", version=TRACE_VERSION, side=side, wall_time=round(time.time(), 6),
                   ram_bytes=ram_bytes, **start_fields)

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event; `t` (seconds since the trace started) is added here."""
        with self._lock:
            if self._file is None:
                return
            record: dict[str, Any] = {"event": kind, "t": round(time.monotonic() - self._t0, 6)}
            # `pass_` (a keyword in Python) is written `pass`.
            record.update((k.rstrip("_").replace("_", "-"), _plain(v)) for k, v in fields.items())
            try:
                self._file.write(json.dumps(record, allow_nan=False) + "\n")
                self._file.flush()
            except OSError:
                # A full disk must not fail the migration; the trace just ends here.
                self._file = None

    def close(self, status: str, **fields: Any) -> None:
        """Write `end` and close. Idempotent."""
        if self._file is None:
            return
        self.event("end", status=status, **fields)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _plain(v: Any) -> Any:
    """Floats to 3 decimals (ms and bytes/s need no more); JSON has no infinity, so an unbounded
    expected downtime is written as null."""
    if isinstance(v, float):
        return round(v, 3) if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


# --- reading ---------------------------------------------------------------------------------


@dataclass
class Trace:
    """A checked trace: its events in file order, with `t` in seconds."""

    path: Path
    side: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def start(self) -> dict[str, Any]:
        return self.events[0]

    @property
    def end(self) -> dict[str, Any] | None:
        ends = self.of("end")
        return ends[-1] if ends else None


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and check a trace file; raises TraceError naming the line and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace file") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{p}: not a trace (not UTF-8 text at byte {e.start})") from None
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror or e}") from None
    return parse_trace(text.splitlines(), p)


def parse_trace(lines: Iterable[str], path: Path) -> Trace:
    events: list[dict[str, Any]] = []
    last_t = 0.0
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise TraceError(f"{where}: an event must be a JSON object, not {_json_kind(record)}")
        kind = record.get("event")
        if not isinstance(kind, str):
            raise TraceError(f"{where}: field 'event' is missing or not a string")
        spec = EVENT_FIELDS.get(kind)
        if spec is None:
            raise TraceError(f"{where}: unknown event '{kind}' (known: {', '.join(EVENT_FIELDS)})")
        if not events and kind != "start":
            raise TraceError(f"{where}: a trace begins with a 'start' event, not '{kind}'")
        t = record.get("t")
        if not _is(t, NUM) or not math.isfinite(t) or t < 0:
            raise TraceError(f"{where}: field 't' of a '{kind}' event must be a number of seconds >= 0")
        if t < last_t:
            raise TraceError(f"{where}: field 't' goes back in time ({t} after {last_t})")
        last_t = t
        for name, types in spec.items():
            if name not in record:
                raise TraceError(f"{where}: '{kind}' event has no field '{name}'")
            value = record[name]
            # expected-downtime-ms is null while no bandwidth has been measured (infinite).
            if value is None and name == "expected-downtime-ms":
                continue
            if not _is(value, types):
                raise TraceError(f"{where}: field '{name}' of a '{kind}' event must be "
                                 f"{_TYPE_WORDS[types]}, not {_json_kind(value)}")
        if not events:
            if record["version"] != TRACE_VERSION:
                raise TraceError(f"{where}: field 'version' is {record['version']}; this reader "
                                 f"knows version {TRACE_VERSION}")
            if record["side"] not in SIDES:
                raise TraceError(f"{where}: field 'side' must be one of {', '.join(SIDES)}")
        elif kind == "start":
            raise TraceError(f"{where}: a second 'start' event")
        events.append(record)
    if not events:
        raise TraceError(f"{path}: empty trace (no events)")
    return Trace(path, events[0]["side"], events)


def _is(value: object, types: tuple[type, ...]) -> bool:
    # bool is an int in Python but not a number in a trace.
    return isinstance(value, types) and not isinstance(value, bool)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"

"""Coverage-guided fuzzing of the QMP framer (monitor/protocol.py). Not collected by pytest;
run by tests/fuzz/fuzz.py.

    python tests/fuzz/fuzz.py qmp -max_total_time=60 tests/fuzz/corpus/qmp

Contract: `QmpConnection.feed` takes any bytes and returns replies — never raises, never hangs;
every reply is one line holding a JSON object with either "return" or "error"; the scanner never
holds more than its input limit (plus the chunk being scanned); and framing does not depend on
how the input was split: fed whole or in chunks, the same replies come back in the same order.

Input: byte 0 is the chunk size (0: all at once); the rest is what a client sends. The dispatcher
is a small stand-in (qmp_capabilities, an echo command, CommandNotFound for the rest) with a
256-byte input limit, so the framer and the session rules are what is exercised.
"""

from __future__ import annotations

import json
import re

from vmferry.errors import QmpError
from vmferry.monitor.protocol import QmpConnection, Session

MAX_INPUT = 256


class _Dispatcher:
    def dispatch(self, name: str, arguments: dict, session: Session) -> object:
        if name == "qmp_capabilities":
            session.negotiated = True
            return {}
        if name == "echo":
            return arguments
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")

    def has_command(self, name: str) -> bool:
        return name in ("qmp_capabilities", "echo")

    def greeting_version(self) -> dict:
        return {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "vmferry-fuzz"}


def replies(body: bytes, chunk: int) -> list[bytes]:
    conn = QmpConnection(_Dispatcher(), max_input_bytes=MAX_INPUT)
    out = bytearray(conn.greeting())
    size = chunk or max(len(body), 1)
    for i in range(0, len(body), size):
        out += conn.feed(body[i:i + size])
        held = len(conn._scanner.buf)
        assert held <= MAX_INPUT + size, f"the scanner holds {held} bytes"
    lines = bytes(out).split(b"\n")
    assert lines[-1] == b"", "the last reply does not end with a newline"
    for line in lines[:-1]:
        msg = json.loads(line)
        assert isinstance(msg, dict), f"reply is not an object: {line!r}"
    for line in lines[1:-1]:
        msg = json.loads(line)
        assert ("return" in msg) != ("error" in msg), f"reply has neither or both: {line!r}"
        desc = msg.get("error", {}).get("desc", "")
        assert not desc.startswith("Internal error"), f"a bug answered as an internal error: {line!r}"
    return lines


# A value both too long and too deep is refused once either way, but which limit is named depends
# on where the chunks end (the length is checked at a chunk's end, the depth at each bracket).
_LIMITS = re.compile(rb"JSON parse error, (nesting too deep|input exceeds the limit of \d+ bytes)")


def check(data: bytes) -> None:
    if not data:
        return
    chunk, body = data[0], data[1:]
    split = [_LIMITS.sub(b"JSON parse error, limit", r) for r in replies(body, chunk)]
    whole = [_LIMITS.sub(b"JSON parse error, limit", r) for r in replies(body, 0)]
    assert split == whole, f"chunked replies {split} != whole {whole}"


def one_input(data: bytes) -> None:
    check(data)


"""QMP protocol core for one connection: bytes in, reply bytes out, no I/O.

    conn = QmpConnection(dispatcher)
    sock.sendall(conn.greeting())
    sock.sendall(conn.feed(sock.recv(4096)))     # any chunking: one byte, many objects, ...

Framing. Clients (qemu.qmp among them) send JSON objects with *no* trailing newline, so the input is
split by scanning JSON values, never lines: a small scanner tracks string/escape state and the
depth of {} and [] (as QEMU's json-streamer does) and hands each complete value to `json.loads`.
A malformed value costs one "JSON parse error, ..." reply and the scanner starts afresh after it;
the connection stays usable. A value larger than `max_input_bytes` (or nested deeper than
`MAX_DEPTH`) is answered once and then skipped to its end without being stored, so a hostile peer
cannot make us buffer without bound.

Session. Before `qmp_capabilities` only that command is accepted (CommandNotFound otherwise); the
dispatcher's qmp_capabilities handler flips `session.negotiated`. Every reply to an object that
carried an `id` echoes it. Replies are one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from vmferry.errors import VmferryError

log = logging.getLogger("vmferry.monitor")

DEFAULT_MAX_INPUT_BYTES = 1 << 20
# Python's json recursion would fail near 1000 levels; no QMP command nests more than a few.
MAX_DEPTH = 64

_WS = b" \t\r\n"
_OPEN, _CLOSE = b"{[", b"}]"
# Where the scanner must look next: in a string, a quote or backslash; in a container, a quote or
# bracket; in a bare top-level token (number, keyword, junk), anything that ends it.
_STRING_STOP = re.compile(rb'["\\]')
_CONTAINER_STOP = re.compile(rb'["{}\[\]]')
_BARE_STOP = re.compile(rb'[ \t\r\n{}\[\]",:]')


@dataclass
class Session:
    """Per-connection state the commands may read or change."""

    offered: tuple[str, ...] = ("oob",)
    negotiated: bool = False
    oob_enabled: bool = False
    peer: str = "?"


class Dispatcher(Protocol):
    """Runs one validated-shape request. Raise VmferryError (e.g. QmpError) to answer an error."""

    def dispatch(self, name: str, arguments: dict, session: Session) -> object: ...

    def has_command(self, name: str) -> bool: ...

    def greeting_version(self) -> dict: ...


class _Scanner:
    """Splits a byte stream into top-level JSON texts. States: between values; inside a
    container (depth > 0, possibly in a string); inside a top-level string; inside a bare token."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.bare = False  # inside a top-level bare token (number, keyword, junk)
        self.discarding = False  # an oversized value is being skipped, not stored

    def scan(self, data: bytes) -> Iterator[bytes | str]:
        """Yield each complete value's bytes, or an error text (str) for input refused outright."""
        start = 0  # first byte of `data` not yet copied into buf
        i, n = 0, len(data)
        while i < n:
            if self.in_string:
                if self.escape:  # a backslash ended the previous chunk: skip the escaped byte
                    self.escape = False
                    i += 1
                    continue
                # Jump to the next quote or backslash: string bodies are most of the input.
                m = _STRING_STOP.search(data, i)
                if m is None:
                    break
                i = m.start()
                if data[i] == 0x5C:  # backslash: the next byte is escaped, whatever it is
                    if i + 1 < n:
                        i += 2
                    else:
                        self.escape = True
                        i += 1
                    continue
                self.in_string = False  # closing quote
                if self.depth == 0:
                    yield from self._finish(data, start, i + 1)
                    start = i + 1
                i += 1
                continue
            if self.bare:
                m = _BARE_STOP.search(data, i)
                if m is None:
                    break
                i = m.start()
                # The token ended just before data[i]; data[i] itself is scanned afresh.
                yield from self._finish(data, start, i)
                start = i
                continue
            if self.depth > 0:
                m = _CONTAINER_STOP.search(data, i)
                if m is None:
                    break
                i = m.start()
            c = data[i]
            if c == 0x22:
                self.in_string = True
                if self.depth == 0:
                    start = i
            elif c in _OPEN:
                if self.depth == 0:
                    start = i
                self.depth += 1
                if self.depth > MAX_DEPTH and not self.discarding:
                    self._start_discard()
                    yield "JSON parse error, nesting too deep"
            elif c in _CLOSE:
                if self.depth == 0:
                    start = i + 1
                    yield f"JSON parse error, unexpected '{chr(c)}'"
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        yield from self._finish(data, start, i + 1)
                        start = i + 1
            elif c in _WS:
                start = i + 1
            elif c in b",:":
                start = i + 1
                yield f"JSON parse error, unexpected '{chr(c)}'"
            else:
                self.bare = True
                start = i
            i += 1
        if self._in_value():
            self._keep(data, start, n)
            if len(self.buf) > self.max_bytes and not self.discarding:
                self._start_discard()
                yield f"JSON parse error, input exceeds the limit of {self.max_bytes} bytes"

    def _in_value(self) -> bool:
        return self.depth > 0 or self.in_string or self.bare

    def _keep(self, data: bytes, start: int, end: int) -> None:
        if not self.discarding:
            self.buf += data[start:end]

    def _start_discard(self) -> None:
        self.discarding = True
        self.buf = bytearray()

    def _finish(self, data: bytes, start: int, end: int) -> Iterator[bytes | str]:
        self._keep(data, start, end)
        text, discarded = bytes(self.buf), self.discarding
        self.buf = bytearray()
        self.bare = self.discarding = False
        if discarded:
            return  # its error was already reported when it crossed the limit
        if len(text) > self.max_bytes:
            yield f"JSON parse error, input exceeds the limit of {self.max_bytes} bytes"
        else:
            yield text


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400: we could not send it back as JSON
        raise ValueError(f"number out of range '{text}'")
    return value


def _parse(text: bytes) -> object:
    """json.loads, refusing what QEMU's parser refuses (NaN, Infinity, not UTF-8); raises ValueError."""
    try:
        # Decode explicitly: json.loads(bytes) would guess UTF-16/32 from NUL bytes.
        return json.loads(text.decode("utf-8"), parse_constant=_reject_constant, parse_float=_parse_float)
    except UnicodeDecodeError as e:
        raise ValueError("invalid UTF-8 sequence") from e
    except RecursionError as e:  # unreachable with MAX_DEPTH, kept as a guard
        raise ValueError("nesting too deep") from e


def _error(cls: str, desc: str, msg_id: object = None, has_id: bool = False) -> dict:
    reply: dict[str, object] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def _encode(msg: dict) -> bytes:
    # allow_nan=False: a backend returning NaN must become an error reply, not invalid JSON.
    return json.dumps(msg, allow_nan=False).encode() + b"\n"


class QmpConnection:
    """One client's QMP session, independent of any socket."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        peer: str = "?",
    ) -> None:
        self.dispatcher = dispatcher
        self.session = Session(peer=peer)
        self._scanner = _Scanner(max_input_bytes)

    @property
    def negotiated(self) -> bool:
        return self.session.negotiated

    def greeting(self) -> bytes:
        return _encode({"QMP": {"version": self.dispatcher.greeting_version(),
                                "capabilities": list(self.session.offered)}})

    def feed(self, data: bytes, on_reply: Callable[[bytes], None] | None = None) -> bytes:
        """Consume any amount of input; return the replies it produced (possibly b""), or, with
        `on_reply`, hand each reply to it as soon as it is made (and return b"")."""
        out = bytearray()
        emit = on_reply or out.extend
        for item in self._scanner.scan(data):
            if isinstance(item, str):
                emit(_encode(_error("GenericError", item)))
                continue
            try:
                msg = _parse(item)
            except ValueError as e:
                emit(_encode(_error("GenericError", f"JSON parse error, {_describe(e)}")))
                continue
            emit(self._handle(msg))
        return bytes(out)

    def _handle(self, msg: object) -> bytes:
        if not isinstance(msg, dict):
            return _encode(_error("GenericError", "QMP input must be a JSON object"))
        msg_id, has_id = msg.get("id"), "id" in msg
        try:
            name, arguments = self._check_request(msg)
            if not self.session.negotiated and name != "qmp_capabilities":
                raise _Refusal("CommandNotFound", _NEGOTIATE_FIRST)
            result = self.dispatcher.dispatch(name, arguments, self.session)
            reply: dict[str, object] = {"return": {} if result is None else result}
            if has_id:
                reply["id"] = msg_id
            return _encode(reply)  # inside the try: a result JSON cannot encode is an error reply
        except _Refusal as e:
            return _encode(_error(e.qmp_class, e.desc, msg_id, has_id))
        except VmferryError as e:
            return _encode(_error(e.qmp_class, str(e), msg_id, has_id))
        except NotImplementedError as e:
            what = msg.get("execute") or msg.get("exec-oob")
            return _encode(_error("GenericError", str(e) or f"'{what}' is not supported yet", msg_id, has_id))
        except Exception as e:
            # A bug in a handler or the backend: log it loudly, answer, keep the connection.
            log.exception("QMP command %r from %s failed", msg.get("execute"), self.session.peer)
            desc = f"Internal error: {type(e).__name__}: {e}"
            return _encode(_error("GenericError", desc, msg_id, has_id))

    def _check_request(self, msg: dict) -> tuple[str, dict]:
        """QEMU's qmp_dispatch_check_obj: which members a request may have, and their types."""
        exec_key = None
        for key, value in msg.items():
            if key == "execute" or (key == "exec-oob" and self.session.oob_enabled):
                if not isinstance(value, str):
                    raise _Refusal("GenericError", f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise _Refusal("GenericError", f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _Refusal("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _Refusal("GenericError", f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise _Refusal("GenericError", "QMP input lacks member 'execute'")
        name = msg[exec_key]
        if exec_key == "exec-oob" and self.session.negotiated:
            # None of our commands may run out of band (QEMU allows it only for a few).
            if not self.dispatcher.has_command(name):
                raise _Refusal("CommandNotFound", f"The command {name} has not been found")
            raise _Refusal("GenericError", f"The command {name} does not support OOB")
        return name, msg.get("arguments", {})


_NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"


class _Refusal(Exception):
    """A protocol-level refusal, answered with the given class and text."""

    def __init__(self, qmp_class: str, desc: str) -> None:
        super().__init__(desc)
        self.qmp_class, self.desc = qmp_class, desc


def _describe(e: ValueError) -> str:
    # json's messages ("Expecting value: line 1 column 2 (char 1)") already say what and where.
    return str(e).replace("Expecting", "expecting", 1) if str(e) else "invalid input"

"""The QMP protocol core, without sockets: framing, negotiation, ids, errors, limits."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from test_monitor_qmp import FakeVm
from vmferry.errors import MigrationError, QmpError
from vmferry.monitor.commands import COMMANDS, CommandDispatcher
from vmferry.monitor.protocol import QmpConnection, Session


class EchoDispatcher:
    """A tiny dispatcher: qmp_capabilities negotiates, `echo` returns its arguments, `fail`/`crash`
    raise, `unknown` is not a command."""

    def greeting_version(self) -> dict:
        return {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "test"}

    def has_command(self, name: str) -> bool:
        return name in ("qmp_capabilities", "echo", "fail", "crash", "todo")

    def dispatch(self, name: str, arguments: dict, session: Session) -> object:
        if name == "qmp_capabilities":
            session.oob_enabled = "oob" in arguments.get("enable", [])
            session.negotiated = True
            return {}
        if name == "echo":
            return arguments
        if name == "fail":
            raise MigrationError("no way")
        if name == "crash":
            raise ZeroDivisionError("oops")
        if name == "todo":
            raise NotImplementedError
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")


def replies(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def negotiated(**kw: object) -> QmpConnection:
    conn = QmpConnection(EchoDispatcher(), **kw)  # type: ignore[arg-type]
    assert replies(conn.feed(b'{"execute": "qmp_capabilities"}')) == [{"return": {}}]
    return conn


def test_greeting_advertises_version_and_oob() -> None:
    conn = QmpConnection(EchoDispatcher())
    (greeting,) = replies(conn.greeting())
    assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert conn.greeting().endswith(b"\n")


def test_only_qmp_capabilities_before_negotiation() -> None:
    conn = QmpConnection(EchoDispatcher())
    out = replies(conn.feed(b'{"execute": "echo", "id": 7}'))
    assert out == [
        {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": 7,
        }
    ]
    assert replies(
        conn.feed(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}')
    ) == [{"return": {}, "id": 1}]
    assert conn.negotiated and conn.session.oob_enabled


def test_id_echoed_with_any_json_value() -> None:
    conn = negotiated()
    for msg_id in ("__qmp#00001", 3, None, [1, {"a": 2}], {"x": "y"}):
        raw = json.dumps({"execute": "echo", "arguments": {"k": 1}, "id": msg_id}).encode()
        assert replies(conn.feed(raw)) == [{"return": {"k": 1}, "id": msg_id}]
    assert replies(conn.feed(b'{"execute": "fail", "id": "e"}')) == [
        {"error": {"class": "GenericError", "desc": "no way"}, "id": "e"}
    ]


def test_no_trailing_newline_needed_and_one_reply_per_line() -> None:
    conn = negotiated()
    out = conn.feed(b'{"execute": "echo", "id": 1}{"execute": "echo", "id": 2} {"execute":"echo","id":3}')
    assert out.count(b"\n") == 3
    assert [r["id"] for r in replies(out)] == [1, 2, 3]


def test_byte_by_byte_input_gives_the_same_replies() -> None:
    conn = negotiated()
    raw = json.dumps({"execute": "echo", "arguments": {"s": 'a "quoted" \\ {brace} [x]'}, "id": 9}).encode()
    out = b"".join(conn.feed(raw[i : i + 1]) for i in range(len(raw)))
    assert replies(out) == [{"return": {"s": 'a "quoted" \\ {brace} [x]'}, "id": 9}]


def test_escape_split_across_chunks() -> None:
    conn = negotiated()
    assert conn.feed(b'{"execute": "echo", "arguments": {"s": "a\\') == b""
    assert replies(conn.feed(b'"}"}}')) == [{"return": {"s": 'a"}'}}]


def test_malformed_json_then_connection_still_usable() -> None:
    conn = negotiated()
    out = replies(conn.feed(b'{"execute": tru}{"execute": "echo", "id": 2}'))
    assert out[0]["error"]["class"] == "GenericError"
    assert out[0]["error"]["desc"].startswith("JSON parse error, ")
    assert out[1] == {"return": {}, "id": 2}


def test_garbage_between_objects() -> None:
    conn = negotiated()
    out = replies(conn.feed(b'foo}]:, {"execute": "echo", "id": 1} 42 "str" [1]'))
    descs = [r["error"]["desc"] for r in out if "error" in r]
    assert [r for r in out if "return" in r] == [{"return": {}, "id": 1}]
    assert descs[0].startswith("JSON parse error, ")  # foo
    assert descs[1:4] == [
        "JSON parse error, unexpected '}'",
        "JSON parse error, unexpected ']'",
        "JSON parse error, unexpected ':'",
    ]
    assert descs[4] == "JSON parse error, unexpected ','"
    # 42, "str" and [1] are valid JSON but not objects.
    assert descs[5:] == ["QMP input must be a JSON object"] * 3


def test_request_shape_errors_use_qemu_words() -> None:
    conn = negotiated()
    cases = {
        b'{"id": 1}': "QMP input lacks member 'execute'",
        b'{"execute": 5, "id": 1}': "QMP input member 'execute' must be a string",
        b'{"execute": "echo", "arguments": [], "id": 1}': "QMP input member 'arguments' must be an object",
        b'{"execute": "echo", "extra": 1, "id": 1}': "QMP input member 'extra' is unexpected",
    }
    for raw, desc in cases.items():
        assert replies(conn.feed(raw)) == [{"error": {"class": "GenericError", "desc": desc}, "id": 1}]


def test_exec_oob_only_when_enabled_and_never_for_our_commands() -> None:
    conn = negotiated()  # without oob
    assert replies(conn.feed(b'{"exec-oob": "echo"}'))[0]["error"]["desc"] == (
        "QMP input member 'exec-oob' is unexpected"
    )
    conn = QmpConnection(EchoDispatcher())
    conn.feed(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert replies(conn.feed(b'{"exec-oob": "echo", "id": 1}')) == [
        {"error": {"class": "GenericError", "desc": "The command echo does not support OOB"}, "id": 1}
    ]
    assert replies(conn.feed(b'{"exec-oob": "nope"}'))[0]["error"]["class"] == "CommandNotFound"


def test_backend_bug_becomes_generic_error_and_is_logged(caplog) -> None:
    conn = negotiated()
    with caplog.at_level("ERROR", logger="vmferry.monitor"):
        out = replies(conn.feed(b'{"execute": "crash", "id": 1}'))
    assert out == [
        {"error": {"class": "GenericError", "desc": "Internal error: ZeroDivisionError: oops"}, "id": 1}
    ]
    assert any(r.exc_info for r in caplog.records)
    assert replies(conn.feed(b'{"execute": "echo"}')) == [{"return": {}}]


def test_not_implemented_says_so() -> None:
    conn = negotiated()
    out = replies(conn.feed(b'{"execute": "todo"}'))
    assert out[0]["error"]["desc"] == "'todo' is not supported yet"


def test_unserializable_result_is_an_error_not_a_crash() -> None:
    class Weird(EchoDispatcher):
        def dispatch(self, name: str, arguments: dict, session: Session) -> object:
            return super().dispatch(name, arguments, session) if name == "qmp_capabilities" else {1: object()}

    conn = QmpConnection(Weird())
    conn.feed(b'{"execute": "qmp_capabilities"}')
    assert replies(conn.feed(b'{"execute": "x", "id": 1}'))[0]["error"]["class"] == "GenericError"


def test_oversized_input_is_refused_once_and_not_stored() -> None:
    conn = negotiated(max_input_bytes=1000)
    out = conn.feed(b'{"execute": "echo", "arguments": {"s": "' + b"x" * 600)
    assert out == b""
    out = replies(conn.feed(b"y" * 600))
    assert out == [
        {
            "error": {
                "class": "GenericError",
                "desc": "JSON parse error, input exceeds the limit of 1000 bytes",
            }
        }
    ]
    assert len(conn._scanner.buf) == 0
    for _ in range(100):  # the rest of the hostile value keeps coming and is skipped, not buffered
        assert conn.feed(b"z" * 10_000) == b""
        assert len(conn._scanner.buf) == 0
    assert replies(conn.feed(b'"}}{"execute": "echo", "id": 5}')) == [{"return": {}, "id": 5}]


def test_oversized_value_within_one_chunk() -> None:
    conn = negotiated(max_input_bytes=100)
    out = replies(
        conn.feed(
            json.dumps({"execute": "echo", "arguments": {"s": "x" * 200}}).encode()
            + b'{"execute": "echo", "id": 1}'
        )
    )
    assert out[0]["error"]["desc"].startswith("JSON parse error, input exceeds the limit")
    assert out[1] == {"return": {}, "id": 1}


def test_deep_nesting_is_refused() -> None:
    conn = negotiated()
    out = replies(conn.feed(b"[" * 5000 + b"]" * 5000 + b'{"execute": "echo", "id": 1}'))
    assert out == [
        {"error": {"class": "GenericError", "desc": "JSON parse error, nesting too deep"}},
        {"return": {}, "id": 1},
    ]


def test_nan_and_bad_utf8_are_parse_errors() -> None:
    conn = negotiated()
    for raw in (
        b'{"execute": "echo", "arguments": {"x": NaN}}',
        b'{"execute": "echo", "arguments": {"x": 1e400}}',
        b'{"execute": "\xff\xfe"}',
        '{"execute": "echo"}'.encode("utf-16-le"),
    ):
        assert replies(conn.feed(raw))[0]["error"]["desc"].startswith("JSON parse error, ")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.booleans())
def test_arbitrary_bytes_never_raise(chunks: list[bytes], negotiate: bool) -> None:
    conn = QmpConnection(EchoDispatcher(), max_input_bytes=256)
    if negotiate:
        conn.feed(b'{"execute": "qmp_capabilities"}')
    for chunk in chunks:
        out = conn.feed(chunk)
        for line in out.splitlines():
            msg = json.loads(line)
            assert "return" in msg or msg["error"]["class"] in ("GenericError", "CommandNotFound")
        assert len(conn._scanner.buf) <= 256 + 64
    # Whatever came before, once the open value (if any) is closed, requests are served again.
    sc = conn._scanner
    closing = (b"x" if sc.escape else b"") + (b'"' if sc.in_string else b"") + b"]" * sc.depth + b" "
    conn.feed(closing)
    conn.feed(b'{"execute": "qmp_capabilities"}')
    out = replies(conn.feed(b'{"execute": "echo", "id": "last"}'))
    assert out[-1] == {"return": {}, "id": "last"}


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    ),
    st.integers(min_value=1, max_value=17),
)
def test_any_json_arguments_round_trip_in_any_chunking(args: object, step: int) -> None:
    conn = negotiated()
    raw = json.dumps({"execute": "echo", "arguments": {"v": args}, "id": 1}).encode()
    out = b"".join(conn.feed(raw[i : i + step]) for i in range(0, len(raw), step))
    assert replies(out) == [{"return": {"v": args}, "id": 1}]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_ARG_NAMES = sorted({a.name for c in COMMANDS.values() for a in c.args} | {"x"})


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(COMMANDS) + ["nope"]),
            st.dictionaries(st.sampled_from(_ARG_NAMES), _JSON, max_size=3),
        ),
        max_size=8,
    ),
    st.sampled_from(["running", "paused", "inmigrate", "postmigrate"]),
)
def test_any_request_to_the_real_command_table_gets_exactly_one_reply(requests: list, status: str) -> None:
    conn = QmpConnection(CommandDispatcher(FakeVm(status)))
    conn.feed(b'{"execute": "qmp_capabilities"}')
    for i, (name, args) in enumerate(requests):
        raw = json.dumps({"execute": name, "arguments": args, "id": i}).encode()
        out = [m for m in replies(conn.feed(raw)) if "event" not in m]
        assert len(out) == 1 and out[0]["id"] == i
        if "error" in out[0]:
            # Only refusals of bad input or state; never an internal error.
            assert not out[0]["error"]["desc"].startswith("Internal error"), out[0]

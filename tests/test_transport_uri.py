"""Migration URI parsing: every scheme, every malformation named, and nothing but TransportError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import TransportError
from vmferry.transport.uri import ExecUri, FdUri, FileUri, TcpUri, UnixUri, parse_uri


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:4444", TcpUri("127.0.0.1", 4444)),
        ("tcp:localhost:4444", TcpUri("localhost", 4444)),
        ("tcp:dst-host.example.org:49152", TcpUri("dst-host.example.org", 49152)),
        ("tcp:0.0.0.0:0", TcpUri("0.0.0.0", 0)),
        ("tcp:[::]:0", TcpUri("::", 0)),
        ("tcp:[::1]:4444", TcpUri("::1", 4444)),
        ("tcp:[fe80::1%eth0]:4444", TcpUri("fe80::1%eth0", 4444)),
        ("tcp::4444", TcpUri("", 4444)),
        ("tcp:h:65535", TcpUri("h", 65535)),
        ("unix:/run/vmferry/migrate.sock", UnixUri("/run/vmferry/migrate.sock")),
        ("unix:relative.sock", UnixUri("relative.sock")),
        ("file:/var/lib/vm.snap", FileUri("/var/lib/vm.snap", 0)),
        ("file:/var/lib/vm.snap,offset=4096", FileUri("/var/lib/vm.snap", 4096)),
        ("file:/var/lib/vm.snap,offset=0x1000", FileUri("/var/lib/vm.snap", 4096)),
        ("file:/a,b/c", FileUri("/a,b/c", 0)),
        ("exec:cat > /tmp/x", ExecUri("cat > /tmp/x")),
        ("exec:ssh dst 'vmferry run -i exec:cat'", ExecUri("ssh dst 'vmferry run -i exec:cat'")),
        ("fd:3", FdUri(3)),
        ("fd:0", FdUri(0)),
    ],
)
def test_parse_valid(text: str, expected: object) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:host", "tcp URI 'tcp:host' has no port"),
        ("tcp:host:", "tcp URI 'tcp:host:' has no port"),
        ("tcp:", "tcp URI 'tcp:' has no port"),
        ("tcp:host:http", "port 'http' is not a number"),
        ("tcp:host:-1", "port '-1' is not a number"),
        ("tcp:host:65536", "port 65536 is out of range (0-65535)"),
        ("tcp:host:99999999999999999999", "is out of range (0-65535)"),
        ("tcp:::1:4444", "an IPv6 address must be in brackets"),
        ("tcp:[::1:4444", "unclosed '['"),
        ("tcp:[::1]", "has no port (expected tcp:[IPV6]:PORT)"),
        ("tcp:[nonsense]:1", "'nonsense' is not an IPv6 address"),
        ("tcp:my host:1", "'my host' is not a valid host name"),
        ("tcp:h:1,ipv4", "options are not supported"),
        ("foo:bar", "unknown migration URI scheme 'foo' in 'foo:bar' (expected tcp, unix, file, exec or fd)"),
        ("TCP:h:1", "unknown migration URI scheme 'TCP'"),
        ("localhost", "has no scheme"),
        ("", "has no scheme"),
        ("unix:", "unix URI 'unix:' has an empty path"),
        ("unix:/" + "x" * 200, "longer than 107 bytes"),
        ("file:", "file URI 'file:' has an empty path"),
        ("file:,offset=5", "has an empty path"),
        ("file:/x,offset=", "offset '' is not a non-negative number"),
        ("file:/x,offset=-4", "offset '-4' is not a non-negative number"),
        ("file:/x,offset=+4", "offset '+4' is not a non-negative number"),
        ("file:/x,offset=1_000", "offset '1_000' is not a non-negative number"),
        ("file:/x,offset=ten", "offset 'ten' is not a non-negative number"),
        ("exec:", "exec URI 'exec:' has an empty command"),
        ("exec:   ", "has an empty command"),
        ("fd:", "has no file descriptor number"),
        ("fd:migfd", "'migfd' is not a file descriptor number"),
        ("fd:-1", "'-1' is not a file descriptor number"),
        ("fd:99999999999", "out of range for a file descriptor"),
        ("unix:/a\0b", "contains a NUL byte"),
    ],
)
def test_parse_malformed_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(TransportError) as info:
        parse_uri(text)
    assert message in str(info.value)


def test_non_string_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="must be a string"):
        parse_uri(4444)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "uri",
    [TcpUri("127.0.0.1", 1), TcpUri("::1", 2), TcpUri("", 3), UnixUri("/s"), FileUri("/f", 0),
     FileUri("/f", 512), ExecUri("cat"), FdUri(7)],
)
def test_str_round_trips(uri: object) -> None:
    assert parse_uri(str(uri)) == uri


@given(st.text(max_size=60))
def test_parse_raises_only_transport_error(text: str) -> None:
    try:
        uri = parse_uri(text)
    except TransportError:
        return
    assert parse_uri(str(uri)) == uri


_SCHEME_PREFIXES = st.sampled_from(["tcp:", "unix:", "file:", "exec:", "fd:", "tcp:[", "file:x,offset="])


@given(_SCHEME_PREFIXES, st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_parse_with_known_scheme_raises_only_transport_error(prefix: str, rest: str) -> None:
    try:
        uri = parse_uri(prefix + rest)
    except TransportError:
        return
    assert parse_uri(str(uri)) == uri


@given(st.integers(min_value=0, max_value=65535), st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True))
def test_tcp_host_port_round_trip(port: int, host: str) -> None:
    assert parse_uri(f"tcp:{host}:{port}") == TcpUri(host, port)

"""Migration URIs, parsed: QEMU's `tcp:`, `unix:`, `file:`, `exec:` and `fd:` forms.

Pure logic, no I/O. `parse_uri` returns one frozen dataclass per scheme; `str()` of any of them gives
back a canonical URI that parses to an equal value, so a listener can report the address it really
bound (`tcp:127.0.0.1:40123`) in the same language the user typed.

    tcp:HOST:PORT     HOST = IPv4 address, host name, or [IPv6] in brackets; empty = every address
                      (destination only). PORT 0 asks the destination to pick a free port.
    unix:PATH         a unix stream socket
    file:PATH[,offset=N]
                      a snapshot file in the stream format; N (decimal or 0x-hex) = where the stream
                      starts inside the file, so a stream can live inside a larger container file
    exec:CMD          run through /bin/sh -c; source writes to its stdin, destination reads its stdout
    fd:N              an already-open file descriptor handed over by the management tool
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

from vmferry.errors import TransportError

SCHEMES = ("tcp", "unix", "file", "exec", "fd")

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class TcpUri:
    host: str  # as typed, without brackets; "" = every address (only meaningful when listening)
    port: int  # 0 = let the destination pick one

    scheme: ClassVar[str] = "tcp"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixUri:
    path: str

    scheme: ClassVar[str] = "unix"

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FileUri:
    path: str
    offset: int = 0  # byte offset in the file where the stream begins

    scheme: ClassVar[str] = "file"

    def __str__(self) -> str:
        return f"file:{self.path},offset={self.offset}" if self.offset else f"file:{self.path}"


@dataclass(frozen=True)
class ExecUri:
    command: str  # a /bin/sh command line

    scheme: ClassVar[str] = "exec"

    def __str__(self) -> str:
        return f"exec:{self.command}"


@dataclass(frozen=True)
class FdUri:
    fd: int

    scheme: ClassVar[str] = "fd"

    def __str__(self) -> str:
        return f"fd:{self.fd}"


MigrationUri = TcpUri | UnixUri | FileUri | ExecUri | FdUri


def parse_uri(text: str) -> MigrationUri:
    """Parse a migration URI. Raises TransportError, and only that, naming what is wrong."""
    if not isinstance(text, str):
        raise TransportError(f"migration URI must be a string, not {type(text).__name__}")
    if "\0" in text:
        raise TransportError(f"migration URI {text!r} contains a NUL byte")
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise TransportError(
            f"migration URI {text!r} has no scheme (expected tcp:, unix:, file:, exec: or fd:)"
        )
    parser = _PARSERS.get(scheme)
    if parser is None:
        raise TransportError(
            f"unknown migration URI scheme {scheme!r} in {text!r} (expected tcp, unix, file, exec or fd)"
        )
    return parser(text, rest)


def _parse_tcp(text: str, rest: str) -> TcpUri:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise TransportError(f"tcp URI {text!r} has an unclosed '[' in its IPv6 address")
        host, after = rest[1:close], rest[close + 1 :]
        if not after.startswith(":"):
            raise TransportError(f"tcp URI {text!r} has no port (expected tcp:[IPV6]:PORT)")
        port_text = after[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TransportError(f"tcp URI {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise TransportError(f"tcp URI {text!r} has no port (expected tcp:HOST:PORT)")
        if ":" in host:
            raise TransportError(
                f"tcp URI {text!r}: an IPv6 address must be in brackets (tcp:[{host}]:{port_text})"
            )
        if host and not _plausible_host_name(host):
            raise TransportError(f"tcp URI {text!r}: {host!r} is not a valid host name or IPv4 address")
    if "," in port_text:
        # QEMU accepts ",ipv4", ",keep-alive" etc. here; we would rather refuse than ignore them.
        port_text, _, options = port_text.partition(",")
        raise TransportError(f"tcp URI {text!r}: options are not supported (got {options!r})")
    if not port_text:
        raise TransportError(f"tcp URI {text!r} has no port (expected tcp:HOST:PORT)")
    if not (port_text.isascii() and port_text.isdigit()):
        raise TransportError(f"tcp URI {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise TransportError(f"tcp URI {text!r}: port {port} is out of range (0-65535)")
    return TcpUri(host, port)


def _plausible_host_name(host: str) -> bool:
    # Letters, digits, '-', '_' and '.' cover IPv4 literals and DNS names; anything else (spaces,
    # slashes, '@', ...) is a typo we can name now instead of a resolver error later.
    return host.isascii() and all(c.isalnum() or c in "-_." for c in host)


def _parse_unix(text: str, rest: str) -> UnixUri:
    if not rest:
        raise TransportError(f"unix URI {text!r} has an empty path")
    if len(rest.encode("utf-8", "surrogateescape")) > UNIX_PATH_MAX:
        raise TransportError(
            f"unix URI {text!r}: path is longer than {UNIX_PATH_MAX} bytes, the limit for a unix socket"
        )
    return UnixUri(rest)


def _parse_file(text: str, rest: str) -> FileUri:
    path, marker, offset_text = rest.rpartition(",offset=")
    if not marker:
        path, offset_text = rest, ""
    if not path:
        raise TransportError(f"file URI {text!r} has an empty path")
    offset = 0
    if marker:
        # Only plain decimal or 0x-hex: int() alone would also take "+5", " 5" and "1_000".
        if re.fullmatch(r"[0-9]+", offset_text, re.ASCII):
            offset = int(offset_text, 10)
        elif re.fullmatch(r"0[xX][0-9a-fA-F]+", offset_text, re.ASCII):
            offset = int(offset_text, 16)
        else:
            raise TransportError(f"file URI {text!r}: offset {offset_text!r} is not a non-negative number")
    return FileUri(path, offset)


def _parse_exec(text: str, rest: str) -> ExecUri:
    if not rest.strip():
        raise TransportError(f"exec URI {text!r} has an empty command")
    return ExecUri(rest)


def _parse_fd(text: str, rest: str) -> FdUri:
    if not rest:
        raise TransportError(f"fd URI {text!r} has no file descriptor number")
    if not (rest.isascii() and rest.isdigit()):
        # QEMU also accepts a name registered with the `getfd` monitor command; we have no such table.
        raise TransportError(f"fd URI {text!r}: {rest!r} is not a file descriptor number")
    fd = int(rest)
    if fd > 2**31 - 1:
        raise TransportError(f"fd URI {text!r}: {fd} is out of range for a file descriptor")
    return FdUri(fd)


_PARSERS = {
    "tcp": _parse_tcp,
    "unix": _parse_unix,
    "file": _parse_file,
    "exec": _parse_exec,
    "fd": _parse_fd,
}

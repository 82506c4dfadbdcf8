"""The NBD client (block/nbd.py) and the NBD drive backend (block/nbd_image.py) against a real
qemu-storage-daemon serving a real qcow2 image; QEMU's NBD URIs as pure logic. No KVM needed."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserver import StorageDaemon, create_qcow2, free_port, require_tools, to_raw
from vmferry.block.backend import BlockError
from vmferry.block.nbd import NbdAddress, NbdClient, NbdError, is_nbd_uri, parse_nbd_uri
from vmferry.block.opener import open_drive
from vmferry.block.options import DriveSpec, parse_drive

SIZE = 16 << 20
CLUSTER = 64 << 10  # qemu-img's default qcow2 cluster: the server's allocation granularity


# --- URIs (pure logic) ---

@pytest.mark.parametrize(("uri", "want"), [
    ("nbd://localhost/disk0", NbdAddress("disk0", host="localhost", port=10809)),
    ("nbd://127.0.0.1:10810/a/b", NbdAddress("a/b", host="127.0.0.1", port=10810)),
    ("nbd+tcp://[::1]:99/x", NbdAddress("x", host="::1", port=99)),
    ("nbd://host", NbdAddress("", host="host")),
    ("nbd+unix:///disk0?socket=/run/n.sock", NbdAddress("disk0", socket="/run/n.sock")),
    ("nbd+unix://?socket=/s", NbdAddress("", socket="/s")),
    ("nbd://h/with%20space", NbdAddress("with space", host="h")),
])
def test_nbd_uris_as_qemu_spells_them(uri: str, want: NbdAddress) -> None:
    assert is_nbd_uri(uri)
    assert parse_nbd_uri(uri) == want


@pytest.mark.parametrize(("uri", "fragment"), [
    ("nbd+unix:///disk0", "needs one socket=PATH"),
    ("nbd+unix://host/disk0?socket=/s", "takes no host"),
    ("nbd+unix:///d?socket=/s&bogus=1", "unknown parameter 'bogus'"),
    ("nbd://h/d?socket=/s", "takes no parameters"),
    ("nbd:///disk0", "needs a host"),
    ("nbd://h:port/d", "the port must be a number"),
    ("nbds://h/d", "TLS"),
    ("nbd:localhost:10809", "is not an NBD URI"),
])
def test_bad_nbd_uris_are_refused_by_name(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_nbd_uri(uri)
    with pytest.raises(BlockError, match=fragment):
        parse_drive(f"file={uri},id=d0")


def test_files_are_not_nbd_uris() -> None:
    for name in ("disk.img", "/tmp/nbd.img", "./nbd://x", "nbdfile.img"):
        assert not is_nbd_uri(name)
        assert parse_drive(f"file={name}").file == name


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
       st.integers(1, 65535))
def test_any_export_name_survives_the_uri(export: str, port: int) -> None:
    got = parse_nbd_uri(f"nbd://127.0.0.1:{port}/{quote(export, safe='')}")
    assert got == NbdAddress(export, host="127.0.0.1", port=port)


# --- the protocol, against qemu-storage-daemon ---

@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201 - a generator fixture
    require_tools()
    qsd = StorageDaemon(create_qcow2(tmp_path / "d.qcow2", SIZE))
    try:
        yield qsd
    finally:
        qsd.stop()


def test_handshake_negotiates_structured_replies_and_allocation(server: StorageDaemon) -> None:
    c = server.client()
    try:
        assert c.info.size == SIZE and not c.read_only
        assert c.structured and c.allocation_context is not None
        assert c.can["flush"] and c.can["write_zeroes"]
    finally:
        c.close()


def test_read_write_flush_and_holes(server: StorageDaemon, tmp_path: Path) -> None:
    c = server.client()
    try:
        buf = bytearray(3 * CLUSTER)
        c.read_into(0, memoryview(buf))
        assert buf == bytes(len(buf))  # a fresh qcow2 reads as zeros (OFFSET_HOLE chunks)
        data = os.urandom(CLUSTER)
        c.write(2 * CLUSTER, data)
        c.write(5 * CLUSTER + 512, b"\xab" * 512)  # unaligned to the cluster
        c.flush()
        got = bytearray(CLUSTER)
        c.read_into(2 * CLUSTER, memoryview(got))
        assert got == data
        # Holes: what base:allocation says reads as zeros; the rest may hold data.
        extents = c.block_status(0, SIZE)
        assert sum(n for n, _ in extents) <= SIZE
        zero = [(n, f & 2) for n, f in extents]
        assert zero[0] == (2 * CLUSTER, 2)  # clusters 0-1 never written
        # A read spanning a hole and data, and a request larger than one cluster.
        span = bytearray(6 * CLUSTER)
        c.read_into(0, memoryview(span))
        assert span[2 * CLUSTER : 3 * CLUSTER] == data
        assert span[5 * CLUSTER + 512 : 5 * CLUSTER + 1024] == b"\xab" * 512
        assert span.count(0) == len(span) - CLUSTER - 512 + data.count(0)
        # Zeroes over data: reads as zeros afterwards; trim is accepted.
        c.write_zeroes(2 * CLUSTER, CLUSTER)
        c.read_into(2 * CLUSTER, memoryview(got))
        assert got == bytes(CLUSTER)
        c.trim(8 * CLUSTER, CLUSTER)
    finally:
        c.close()
    server.stop()
    raw = to_raw(server.image, tmp_path / "d.raw").read_bytes()
    assert len(raw) == SIZE and raw[5 * CLUSTER + 512 : 5 * CLUSTER + 1024] == b"\xab" * 512
    assert raw[2 * CLUSTER : 3 * CLUSTER] == bytes(CLUSTER)


def test_backend_extents_are_the_written_clusters(server: StorageDaemon) -> None:
    d = open_drive(DriveSpec("d0", server.uri))
    try:
        assert list(d.allocated_extents()) == []  # nothing written: all hole
        d.write(3 * CLUSTER, b"x" * 4096)
        d.write(4 * CLUSTER, b"y" * 4096)  # the next cluster: one merged extent
        d.write(10 * CLUSTER, b"z" * 4096)
        assert list(d.allocated_extents()) == [(3 * CLUSTER, 2 * CLUSTER), (10 * CLUSTER, CLUSTER)]
        assert list(d.allocated_extents(4 * CLUSTER, 11 * CLUSTER - 1)) == [
            (4 * CLUSTER, CLUSTER), (10 * CLUSTER, CLUSTER - 1)]
        q = d.describe()
        assert q["file"] == server.uri and q["drv"] == "raw" and q["ro"] is False
        assert q["image"]["virtual-size"] == SIZE
    finally:
        d.close()


def test_threads_sharing_one_client_each_get_their_own_replies(server: StorageDaemon) -> None:
    """The drive's I/O thread, a migration's reads and its flusher share one connection."""
    c = server.client()
    errors: list[str] = []

    def worker(i: int) -> None:
        mine = bytes([i + 1]) * 4096
        got = bytearray(4096)
        for n in range(50):
            off = (i * 64 + n % 64) * 4096
            c.write(off, mine)
            c.read_into(off, memoryview(got))
            if got != mine:
                errors.append(f"thread {i} read back another's data at {off}")
            if n % 10 == 0:
                c.flush()

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
    finally:
        c.close()


def test_server_error_is_named_and_the_connection_goes_on(server: StorageDaemon) -> None:
    c = server.client()
    try:
        with pytest.raises(NbdError, match="read at offset .* failed: NBD_EINVAL") as e:
            c.read_into(SIZE, memoryview(bytearray(512)))  # past the end: the server refuses
        assert e.value.errno == errno.EINVAL
        buf = bytearray(512)
        c.read_into(0, memoryview(buf))  # the connection is still sound
    finally:
        c.close()


def test_server_dying_breaks_the_connection_with_io_errors(server: StorageDaemon) -> None:
    c = server.client()
    try:
        c.write(0, b"a" * 4096)
        server.kill()
        with pytest.raises(NbdError) as e:
            c.write(4096, b"b" * 4096)
        assert e.value.errno == errno.EIO and "broke" in str(e.value)
        with pytest.raises(NbdError, match="is broken"):  # at once, with the first cause
            c.read_into(0, memoryview(bytearray(512)))
    finally:
        c.close()


def test_stalled_server_turns_into_an_io_error(server: StorageDaemon) -> None:
    c = NbdClient(server.address, io_timeout=1.0)
    try:
        server.freeze()
        with pytest.raises(NbdError, match="no reply to a read within 1 s"):
            c.read_into(0, memoryview(bytearray(512)))
    finally:
        server.thaw()
        c.close()


# --- bad input, by name ---

def test_refused_connection_is_named(tmp_path: Path) -> None:
    with pytest.raises(BlockError, match=r"drive d0: Failed to connect to '.*nope.sock': No such file"):
        open_drive(DriveSpec("d0", f"nbd+unix:///x?socket={tmp_path}/nope.sock"))
    require_tools()
    port = free_port()  # nobody listens there
    with pytest.raises(BlockError, match=f"drive d0: Failed to connect to '127.0.0.1:{port}': "
                                         "Connection refused"):
        open_drive(DriveSpec("d0", f"nbd://127.0.0.1:{port}/x"))


def test_missing_export_is_named(server: StorageDaemon) -> None:
    uri = server.uri.replace("/disk0?", "/nosuch?")
    with pytest.raises(BlockError, match="drive d0: NBD server .* has no export 'nosuch' "
                                         r"\(NBD_REP_ERR_UNKNOWN"):
        open_drive(DriveSpec("d0", uri))


def test_read_only_export_with_a_writable_drive_is_refused(tmp_path: Path) -> None:
    require_tools()
    qsd = StorageDaemon(create_qcow2(tmp_path / "ro.qcow2", SIZE), writable=False, tcp=True)
    try:
        with pytest.raises(BlockError, match="drive d0: NBD export 'disk0' on '127.0.0.1:[0-9]+' is "
                                             "read-only .*add readonly=on"):
            open_drive(DriveSpec("d0", qsd.uri))
        d = open_drive(DriveSpec("d0", qsd.uri, readonly=True))
        try:
            assert d.readonly and d.size == SIZE
        finally:
            d.close()
    finally:
        qsd.stop()


def test_a_server_that_is_not_nbd_is_named(tmp_path: Path) -> None:
    path = tmp_path / "not-nbd.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def talk() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=talk)
    t.start()
    try:
        with pytest.raises(BlockError, match=f"'{path}' is not an NBD server"):
            open_drive(DriveSpec("d0", f"nbd+unix:///x?socket={path}"))
    finally:
        t.join(timeout=30)
        srv.close()


# --- replies qemu-storage-daemon rarely sends, from a scripted server on a real socket ---

class _ScriptedServer:
    """A server that does the handshake by the book and answers each request with what
    `answer(cmd, cookie, offset, length, payload)` returns (raw reply bytes)."""

    def __init__(self, tmp_path: Path, answer, *, flags: int = 0x0D) -> None:  # noqa: ANN001
        self.path = tmp_path / "scripted.sock"
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(str(self.path))
        self._srv.listen(1)
        self.requests: list[tuple[int, int, int]] = []

        def recv(conn: socket.socket, n: int) -> bytes:
            out = b""
            while len(out) < n:
                got = conn.recv(n - len(out))
                if not got:
                    raise ConnectionError
                out += got
            return out

        def reply(conn: socket.socket, opt: int, kind: int, data: bytes = b"") -> None:
            conn.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, kind, len(data)) + data)

        def serve() -> None:
            conn, _ = self._srv.accept()
            with conn:
                conn.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 1))
                recv(conn, 4)
                try:
                    while True:
                        _, opt, n = struct.unpack(">QII", recv(conn, 16))
                        recv(conn, n)
                        if opt == 8:
                            reply(conn, opt, 1)
                        elif opt == 10:
                            reply(conn, opt, 4, struct.pack(">I", 7) + b"base:allocation")
                            reply(conn, opt, 1)
                        elif opt == 7:
                            reply(conn, opt, 3, struct.pack(">HQH", 0, 1 << 20, flags))
                            reply(conn, opt, 1)
                            break
                    while True:
                        _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
                        if cmd == 2:
                            return
                        payload = recv(conn, length) if cmd == 1 else b""
                        self.requests.append((cmd, offset, length))
                        conn.sendall(answer(cmd, cookie, offset, length, payload))
                except ConnectionError:
                    return

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()

    def client(self) -> NbdClient:
        return NbdClient(NbdAddress("x", socket=str(self.path)), io_timeout=30)

    def close(self) -> None:
        self._thread.join(timeout=30)
        self._srv.close()


def _chunk(cookie: int, kind: int, body: bytes, done: bool) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, int(done), kind, cookie, len(body)) + body


def test_read_chunks_out_of_order_are_reassembled(tmp_path: Path) -> None:
    def answer(cmd: int, cookie: int, offset: int, length: int, payload: bytes) -> bytes:
        half = length // 2
        return (_chunk(cookie, 1, struct.pack(">Q", offset + half) + b"B" * (length - half), False)
                + _chunk(cookie, 2, struct.pack(">QI", offset, half), False)
                + _chunk(cookie, 0, b"", True))

    srv = _ScriptedServer(tmp_path, answer)
    c = srv.client()
    try:
        buf = bytearray(b"\xff" * 8192)
        c.read_into(4096, memoryview(buf))
        assert buf == bytes(4096) + b"B" * 4096
    finally:
        c.close()
        srv.close()


def test_error_chunk_is_named_with_its_offset_and_message(tmp_path: Path) -> None:
    def answer(cmd: int, cookie: int, offset: int, length: int, payload: bytes) -> bytes:
        msg = b"bad sector"
        return _chunk(cookie, 0x8002, struct.pack(">IH", 5, len(msg)) + msg + struct.pack(">Q", offset + 512),
                      True)

    srv = _ScriptedServer(tmp_path, answer)
    c = srv.client()
    try:
        with pytest.raises(NbdError, match=r"read at offset 0 \(4096 bytes\) failed: NBD_EIO "
                                           r"\(Input/output error\): bad sector \(at offset 512\)") as e:
            c.read_into(0, memoryview(bytearray(4096)))
        assert e.value.errno == errno.EIO
    finally:
        c.close()
        srv.close()


def test_a_reply_to_another_request_breaks_the_connection(tmp_path: Path) -> None:
    def answer(cmd: int, cookie: int, offset: int, length: int, payload: bytes) -> bytes:
        return struct.pack(">IIQ", 0x67446698, 0, cookie + 1)

    srv = _ScriptedServer(tmp_path, answer)
    c = srv.client()
    try:
        with pytest.raises(NbdError, match="broke: a reply for request 2 while waiting for 1"):
            c.flush()
        with pytest.raises(NbdError, match="is broken"):
            c.flush()
    finally:
        c.close()
        srv.close()


def test_without_write_zeroes_the_zeros_are_written(tmp_path: Path) -> None:
    def answer(cmd: int, cookie: int, offset: int, length: int, payload: bytes) -> bytes:
        assert cmd == 1 and payload == bytes(length)
        return struct.pack(">IIQ", 0x67446698, 0, cookie)

    srv = _ScriptedServer(tmp_path, answer, flags=0x05)  # HAS_FLAGS | SEND_FLUSH only
    c = srv.client()
    try:
        c.write_zeroes(0, 3 << 20)
    finally:
        c.close()
        srv.close()
    assert srv.requests == [(1, 0, 1 << 20), (1, 1 << 20, 1 << 20), (1, 2 << 20, 1 << 20)]

"""Channels end to end over real sockets, pipes, files and processes, for every URI scheme."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.errors import TransportError
from vmferry.transport import Channel, SocketChannel, connect_outgoing, listen_incoming
from vmferry.transport.channel import IOV_MAX, FdChannel

PAGE = 4096
PAYLOAD_BYTES = 6 << 20  # a few MiB, more pages than IOV_MAX so sendmsg must split the vector


@pytest.fixture(scope="module")
def payload() -> bytes:
    return random.Random(1234).randbytes(PAYLOAD_BYTES)


def page_views(data: bytes, *, odd_sizes: bool = False) -> list[memoryview]:
    """Slices of one buffer, as the RAM saver hands them over: page views, no copies."""
    view = memoryview(data)
    if not odd_sizes:
        return [view[i : i + PAGE] for i in range(0, len(view), PAGE)]
    rng = random.Random(99)
    cuts, pos = [], 0
    while pos < len(view):
        size = rng.choice([0, 1, 7, 512, PAGE, 3 * PAGE + 5])
        cuts.append(view[pos : pos + size])
        pos += size
    return cuts


def run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run fn on a thread; its result or exception lands in the returned list."""
    out: list[object] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed back to the test thread to assert on
            out.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def finish(thread: threading.Thread, out: list[object]) -> object:
    thread.join(timeout=60)
    assert not thread.is_alive(), "worker thread is stuck"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def receive_all(channel: Channel, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    # Read in uneven pieces straight into the caller's buffer, as the RAM loader does.
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        step = min(nbytes - pos, 3 * PAGE + 123)
        channel.recv_exactly_into(view[pos : pos + step])
        pos += step
    return bytes(buf)


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- socket schemes -----------------------------------------------------------------------------


@pytest.mark.parametrize("odd_sizes", [False, True])
@pytest.mark.parametrize(
    "uri",
    [
        "tcp:127.0.0.1:0",
        pytest.param(
            "tcp:[::1]:0",
            marks=pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback"),
        ),
        "tcp:localhost:0",
        "unix",
    ],
)
def test_socket_scheme_end_to_end(uri: str, odd_sizes: bool, payload: bytes, tmp_path) -> None:
    if uri == "unix":
        uri = f"unix:{tmp_path / 'mig.sock'}"
    with listen_incoming(uri) as listener:
        views = page_views(payload, odd_sizes=odd_sizes)
        assert len(views) > IOV_MAX

        def source() -> int:
            with connect_outgoing(str(listener.address)) as ch:
                sent = ch.sendmsg(views)
                # The return path: the destination acknowledges on the same connection.
                assert ch.recv_exactly(3) == b"ack"
                return sent

        thread, out = run_in_thread(source)
        with listener.accept(timeout_s=30) as dst:
            assert dst.has_return_path
            received = receive_all(dst, len(payload))
            dst.sendall(b"ack")
            assert dst.bytes_received == len(payload)
            assert dst.bytes_sent == 3
        assert finish(thread, out) == len(payload)
    assert received == payload


def test_tcp_listener_reports_the_port_it_picked() -> None:
    with listen_incoming("tcp:127.0.0.1:0") as listener:
        assert listener.address.scheme == "tcp"
        assert str(listener.address).startswith("tcp:127.0.0.1:")
        assert listener.address.port != 0


def test_partial_socket_writes_resume_at_the_right_byte(payload: bytes) -> None:
    # With a timeout set, Python's socket is non-blocking underneath, so sendmsg returns short
    # counts whenever the small send buffer fills: the resume path runs many times.
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    src, dst = SocketChannel(a, "socketpair:a"), SocketChannel(b, "socketpair:b")
    src.settimeout(60)
    thread, out = run_in_thread(lambda: src.sendmsg(page_views(payload, odd_sizes=True)))
    received = receive_all(dst, len(payload))
    assert finish(thread, out) == len(payload)
    assert received == payload
    assert src.bytes_sent == len(payload)
    src.close()
    dst.close()


# -- file, exec, fd -----------------------------------------------------------------------------


def test_file_scheme_end_to_end(payload: bytes, tmp_path) -> None:
    path = tmp_path / "vm.snap"
    path.write_bytes(b"old contents that must be replaced" * 1000)
    with connect_outgoing(f"file:{path}") as ch:
        assert not ch.has_return_path
        assert ch.sendmsg(page_views(payload, odd_sizes=True)) == len(payload)
    assert path.read_bytes() == payload
    with listen_incoming(f"file:{path}") as listener, listener.accept() as ch:
        assert receive_all(ch, len(payload)) == payload
        assert ch.recv(10) == b""


def test_file_offset_keeps_the_bytes_before_it(payload: bytes, tmp_path) -> None:
    path = tmp_path / "container.img"
    header = b"H" * 4096
    path.write_bytes(header + b"stale tail" * 5000)
    with connect_outgoing(f"file:{path},offset=4096") as ch:
        ch.sendmsg(page_views(payload[: 1 << 20]))
    assert path.read_bytes() == header + payload[: 1 << 20]
    with listen_incoming(f"file:{path},offset=0x1000") as listener, listener.accept() as ch:
        assert receive_all(ch, 1 << 20) == payload[: 1 << 20]


def test_exec_scheme_end_to_end(payload: bytes, tmp_path) -> None:
    path = tmp_path / "via-cat.bin"
    with connect_outgoing(f"exec:cat > '{path}'") as ch:
        assert not ch.has_return_path
        assert ch.sendmsg(page_views(payload, odd_sizes=True)) == len(payload)
    # close() waited for cat, so the file is complete now.
    assert path.read_bytes() == payload
    with listen_incoming(f"exec:cat '{path}'") as listener, listener.accept() as ch:
        assert receive_all(ch, len(payload)) == payload
        assert ch.recv(1) == b""


def test_fd_scheme_over_a_pipe(payload: bytes) -> None:
    read_fd, write_fd = os.pipe()
    src = connect_outgoing(f"fd:{write_fd}")
    listener = listen_incoming(f"fd:{read_fd}")
    dst = listener.accept()
    assert not src.has_return_path and not dst.has_return_path
    # A 64 KiB pipe against 4 MiB: the writer blocks and resumes partial writes all the way.
    thread, out = run_in_thread(lambda: src.sendmsg(page_views(payload, odd_sizes=True)))
    received = receive_all(dst, len(payload))
    assert finish(thread, out) == len(payload)
    src.close()
    assert dst.recv(1) == b""
    dst.close()
    listener.close()
    assert received == payload


def test_fd_scheme_over_a_socket_is_duplex() -> None:
    a, b = socket.socketpair()
    src = connect_outgoing(f"fd:{a.detach()}")
    dst = listen_incoming(f"fd:{b.detach()}").accept()
    assert src.has_return_path and dst.has_return_path
    src.sendall(b"stream")
    assert dst.recv_exactly(6) == b"stream"
    dst.sendall(b"ack")
    assert src.recv_exactly(3) == b"ack"
    src.close()
    dst.close()


def test_fd_scheme_with_a_listening_socket_accepts() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with listen_incoming(f"fd:{server.detach()}") as listener:
        thread, out = run_in_thread(lambda: connect_outgoing(f"tcp:127.0.0.1:{port}").sendall(b"hi"))
        with listener.accept(timeout_s=30) as ch:
            assert ch.recv_exactly(2) == b"hi"
        finish(thread, out)


def test_one_shot_listener_hands_out_one_channel(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with listen_incoming(f"file:{path}") as listener:
        listener.accept().close()
        with pytest.raises(TransportError, match="single incoming migration"):
            listener.accept()


# -- end of stream, shutdown, cancel -------------------------------------------------------------


def test_eof_mid_read_names_the_counts() -> None:
    a, b = socket.socketpair()
    src, dst = SocketChannel(a, "tcp:test"), SocketChannel(b, "tcp:test")
    src.sendall(b"x" * 100)
    src.close()
    with pytest.raises(TransportError, match="connection closed after 100 of 1000 bytes"):
        dst.recv_exactly_into(bytearray(1000))
    dst.close()


def test_eof_mid_read_on_a_pipe_names_the_counts() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"y" * 10)
    os.close(write_fd)
    with FdChannel(read_fd, "fd:pipe") as ch, pytest.raises(TransportError, match="after 10 of 4096 bytes"):
        ch.recv_exactly(4096)


def blocked_channels() -> list[str]:
    return ["tcp", "unix", "pipe", "exec"]


def open_idle_pair(kind: str, tmp_path) -> tuple[Channel, Channel | None, list[object]]:
    """A (receiver, sender) pair where the sender sends nothing, so the receiver blocks."""
    if kind in ("tcp", "unix"):
        uri = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 's.sock'}"
        listener = listen_incoming(uri)
        src = connect_outgoing(str(listener.address))
        dst = listener.accept(timeout_s=30)
        return dst, src, [listener]
    if kind == "pipe":
        read_fd, write_fd = os.pipe()
        return FdChannel(read_fd, "fd:r"), FdChannel(write_fd, "fd:w"), []
    listener = listen_incoming("exec:sleep 600")
    return listener.accept(), None, [listener]


@pytest.mark.parametrize("kind", blocked_channels())
def test_shutdown_unblocks_a_blocked_receive(kind: str, tmp_path) -> None:
    dst, src, keep = open_idle_pair(kind, tmp_path)
    started = threading.Event()

    def blocked_read() -> None:
        started.set()
        dst.recv_exactly_into(bytearray(PAGE))

    thread, out = run_in_thread(blocked_read)
    started.wait()
    dst.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive(), "shutdown() did not wake the blocked receive"
    assert isinstance(out[0], TransportError)
    assert "shut down" in str(out[0])
    dst.close()  # after a cancel, an exec child's exit status is not an error
    if src is not None:
        src.close()
    for item in keep:
        item.close()


@pytest.mark.parametrize("kind", ["tcp", "pipe"])
def test_shutdown_unblocks_a_blocked_send(kind: str, tmp_path) -> None:
    dst, src, keep = open_idle_pair(kind, tmp_path)
    assert src is not None
    # The receiver never reads, so the sender fills every buffer and blocks.
    data = bytes(64 << 20)
    thread, out = run_in_thread(lambda: src.sendmsg(page_views(data)))
    # Data reaching the receiver means the sender is under way; the pause lets it fill the buffers
    # and block. (Were it not yet blocked, shutdown() must still make the send fail.)
    select.select([dst.fileno()], [], [], 30)
    thread.join(timeout=0.2)
    src.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive(), "shutdown() did not wake the blocked send"
    assert isinstance(out[0], TransportError), out[0]
    src.close()
    dst.close()
    for item in keep:
        item.close()


def test_peer_shutdown_ends_the_destination_read() -> None:
    # Cancel on the source: its shutdown() reaches the destination as end of stream.
    a, b = socket.socketpair()
    src, dst = SocketChannel(a, "src"), SocketChannel(b, "dst")
    thread, out = run_in_thread(lambda: dst.recv_exactly_into(bytearray(10)))
    src.shutdown()
    with pytest.raises(TransportError, match="connection closed after 0 of 10 bytes"):
        finish(thread, out)
    src.close()
    dst.close()


def test_receive_timeout_is_a_transport_error() -> None:
    read_fd, write_fd = os.pipe()
    a, b = socket.socketpair()
    for ch in (FdChannel(read_fd, "fd:r"), SocketChannel(a, "sock")):
        ch.settimeout(0.05)
        with pytest.raises(TransportError, match="timed out"):
            ch.recv(1)
        ch.close()
    os.close(write_fd)
    b.close()


# -- the sendmsg loop itself, against a writer that takes random short counts ------------------------


class ShortWriteChannel(Channel):
    """Accepts a random number of bytes per call, like a kernel under pressure would."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__("short-write")
        self.rng = rng
        self.out = bytearray()
        self.vector_lengths: list[int] = []

    def _write_vector(self, views) -> int:
        self.vector_lengths.append(len(views))
        flat = b"".join(bytes(v) for v in views)
        n = self.rng.randint(1, len(flat)) if flat else 0
        self.out += flat[:n]
        self.bytes_sent += n
        return n


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=300), max_size=60), st.integers(min_value=0, max_value=2**32))
def test_sendmsg_writes_every_byte_once_in_order_despite_short_writes(chunks: list[bytes], seed: int) -> None:
    ch = ShortWriteChannel(random.Random(seed))
    total = ch.sendmsg([memoryview(c) for c in chunks])
    assert bytes(ch.out) == b"".join(chunks)
    assert total == ch.bytes_sent == sum(map(len, chunks))
    assert max(ch.vector_lengths, default=0) <= IOV_MAX

"""Connecting and listening: every failure is a TransportError whose text says what and why."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from vmferry.errors import TransportError
from vmferry.transport import connect_outgoing, listen_incoming


def free_tcp_port() -> int:
    """A port with nothing listening on it (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def test_connection_refused_names_uri_and_reason() -> None:
    port = free_tcp_port()
    with pytest.raises(TransportError) as info:
        connect_outgoing(f"tcp:127.0.0.1:{port}")
    assert str(info.value) == f"cannot connect to tcp:127.0.0.1:{port}: Connection refused"


def test_connect_to_port_zero_is_refused() -> None:
    with pytest.raises(TransportError, match="port 0 is only for listening"):
        connect_outgoing("tcp:127.0.0.1:0")


def test_connect_needs_a_host() -> None:
    with pytest.raises(TransportError, match="no host given"):
        connect_outgoing("tcp::4444")


def test_malformed_uri_reaches_the_caller_as_transport_error() -> None:
    with pytest.raises(TransportError, match="has no port"):
        connect_outgoing("tcp:127.0.0.1")
    with pytest.raises(TransportError, match="unknown migration URI scheme 'rdma'"):
        listen_incoming("rdma:host:1")


def test_unix_connect_to_a_missing_path(tmp_path) -> None:
    path = tmp_path / "nobody-home.sock"
    with pytest.raises(TransportError) as info:
        connect_outgoing(f"unix:{path}")
    assert str(info.value) == f"cannot connect to unix:{path}: No such file or directory"


def test_unix_connect_to_a_dead_socket(tmp_path) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    with pytest.raises(TransportError, match="Connection refused"):
        connect_outgoing(f"unix:{path}")


def test_file_in_a_missing_directory(tmp_path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "vm.snap"
    with pytest.raises(TransportError) as info:
        connect_outgoing(f"file:{path}")
    assert str(info.value) == f"cannot open file:{path} for writing: No such file or directory"
    # The destination fails at listen time, not later at accept.
    with pytest.raises(TransportError, match="for reading: No such file or directory"):
        listen_incoming(f"file:{path}")


def test_file_that_is_not_a_regular_file(tmp_path) -> None:
    with pytest.raises(TransportError, match="not a regular file"):
        listen_incoming(f"file:{tmp_path}")


def test_bad_fd_is_named() -> None:
    fd = closed_fd()
    with pytest.raises(TransportError) as info:
        connect_outgoing(f"fd:{fd}")
    assert str(info.value) == f"fd:{fd}: file descriptor {fd} is not open"
    with pytest.raises(TransportError, match="is not open"):
        listen_incoming(f"fd:{fd}")


def test_tcp_address_in_use_is_reported_at_listen_time() -> None:
    with listen_incoming("tcp:127.0.0.1:0") as first:
        port = first.address.port
        with pytest.raises(TransportError) as info:
            listen_incoming(f"tcp:127.0.0.1:{port}")
    assert str(info.value) == f"cannot listen on tcp:127.0.0.1:{port}: Address already in use"


def test_listen_on_every_address_takes_ipv4_connections() -> None:
    with listen_incoming("tcp::0") as listener:
        port = listener.address.port
        src = connect_outgoing(f"tcp:127.0.0.1:{port}")
        with listener.accept(timeout_s=30) as dst:
            src.sendall(b"v4")
            assert dst.recv_exactly(2) == b"v4"
        src.close()


def test_unix_listen_in_a_missing_directory(tmp_path) -> None:
    path = tmp_path / "missing" / "s.sock"
    with pytest.raises(TransportError, match=f"cannot listen on unix:{path}: No such file or directory"):
        listen_incoming(f"unix:{path}")


def test_unix_stale_socket_is_replaced_and_removed_on_close(tmp_path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    assert path.exists()
    with listen_incoming(f"unix:{path}") as listener:
        src = connect_outgoing(f"unix:{path}")
        with listener.accept(timeout_s=30) as dst:
            src.sendall(b"ok")
            assert dst.recv_exactly(2) == b"ok"
        src.close()
    assert not path.exists()


def test_unix_live_socket_is_not_stolen(tmp_path) -> None:
    path = tmp_path / "live.sock"
    with listen_incoming(f"unix:{path}"):
        with pytest.raises(TransportError, match="another process is listening there"):
            listen_incoming(f"unix:{path}")
        assert path.exists()


def test_unix_path_that_is_a_regular_file_is_left_alone(tmp_path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(TransportError, match="exists and is not a socket"):
        listen_incoming(f"unix:{path}")
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_listener_close_unblocks_accept(scheme: str, tmp_path) -> None:
    uri = "tcp:127.0.0.1:0" if scheme == "tcp" else f"unix:{tmp_path / 'a.sock'}"
    listener = listen_incoming(uri)
    errors: list[BaseException] = []
    started = threading.Event()

    def wait_for_source() -> None:
        started.set()
        try:
            listener.accept()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=wait_for_source, daemon=True)
    thread.start()
    started.wait()
    listener.close()
    thread.join(timeout=30)
    assert not thread.is_alive(), "close() did not wake accept()"
    assert isinstance(errors[0], TransportError)
    assert "was closed" in str(errors[0])


def test_accept_timeout() -> None:
    with listen_incoming("tcp:127.0.0.1:0") as listener, pytest.raises(
        TransportError, match=r"no incoming migration on tcp:127\.0\.0\.1:\d+ within"
    ):
        listener.accept(timeout_s=0.05)


def test_tcp_channels_have_nodelay() -> None:
    with listen_incoming("tcp:127.0.0.1:0") as listener:
        src = connect_outgoing(str(listener.address))
        with listener.accept(timeout_s=30) as dst:
            for ch in (src, dst):
                assert ch.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        src.close()


# -- exec failures --------------------------------------------------------------------------------


def test_exec_nonzero_exit_is_reported_at_close(tmp_path) -> None:
    ch = connect_outgoing("exec:cat >/dev/null; exit 3")
    ch.sendall(b"x" * 1000)
    with pytest.raises(TransportError, match=r"exit 3: the command exited with status 3$"):
        ch.close()


def test_exec_command_not_found(tmp_path) -> None:
    ch = connect_outgoing("exec:vmferry-no-such-command-xyz")
    with pytest.raises(TransportError, match=r"status 127 \(command not found\)"):
        # The write may hit the closed pipe first (EPIPE) or succeed into the buffer; either way
        # the command's failure is what the message reports.
        try:
            ch.sendall(b"y" * (1 << 20))
        finally:
            ch.close()


def test_exec_reader_that_fails_is_reported(tmp_path) -> None:
    listener = listen_incoming(f"exec:cat '{tmp_path / 'missing'}'")
    ch = listener.accept()
    assert ch.recv(10) == b""
    with pytest.raises(TransportError, match="exited with status 1"):
        ch.close()


def test_exec_reader_closed_early_is_not_an_error(tmp_path) -> None:
    # We stop reading before the end (e.g. the stream said it was complete); the command then dies
    # of SIGPIPE, which is our doing and not a failure.
    ch = listen_incoming("exec:yes").accept()
    assert ch.recv_exactly(4) == b"y\ny\n"
    ch.close()


def test_exec_shutdown_stops_a_whole_pipeline(tmp_path) -> None:
    marker = tmp_path / "pid"
    # The marker gets the pid of the pipeline's second `sleep`, a grandchild of ours.
    second = f"echo $$ > {marker}.tmp; mv {marker}.tmp {marker}; exec sleep 600"
    ch = listen_incoming(f"exec:sleep 600 | sh -c '{second}'").accept()
    idle = threading.Event()
    for _ in range(3000):
        if marker.exists():
            break
        idle.wait(0.01)
    grandchild = int(marker.read_text())
    errors: list[BaseException] = []

    def read() -> None:
        try:
            ch.recv(1)
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ch.shutdown()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert "shut down" in str(errors[0])
    ch.close()  # a cancelled command's exit status is not an error
    # Gone, or a zombie waiting for its reaper: either way it is not running any more.
    state = "?"
    for _ in range(3000):
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        idle.wait(0.01)
    pytest.fail(f"pipeline member {grandchild} survived the cancel (state {state})")


def test_forked_child_closing_the_listener_does_not_wake_the_parent() -> None:
    # The wake pipe is inherited across fork(); a child's close() once cancelled the parent's accept.
    with listen_incoming("tcp:127.0.0.1:0") as listener:
        pid = os.fork()
        if pid == 0:
            listener.close()
            os._exit(0)
        os.waitpid(pid, 0)
        src = connect_outgoing(str(listener.address))
        with listener.accept(timeout_s=30) as dst:
            src.sendall(b"still here")
            assert dst.recv_exactly(10) == b"still here"
        src.close()

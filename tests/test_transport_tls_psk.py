"""TLS-PSK on real sockets: the keys file, a TLS 1.3 handshake keyed by a pre-shared key, bulk
bytes both ways, close_notify, and each refusal (key mismatch, unknown username, plain text
against PSK, x509 against PSK) named on both ends within the handshake timeout."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import TransportError
from vmferry.transport.channel import SocketChannel
from vmferry.transport.tls import TlsChannel, tls_accept, tls_connect
from vmferry.transport.tls_psk import PskContext, PskError, read_keys

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def _dir(tmp: Path, name: str, text: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "keys.psk").write_text(text)
    return d


def _pair(server_ctx: object, client_ctx: object, authorize: object = None) -> tuple[object, object]:
    """(the server's TlsChannel or its error, the client's TlsChannel or its error)."""
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            result["server"] = tls_accept(SocketChannel(a, "server"), server_ctx, authorize, timeout_s=20)  # type: ignore[arg-type]
        except TransportError as e:
            result["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        client: object = tls_connect(SocketChannel(b, "client"), client_ctx, "localhost", timeout_s=20)  # type: ignore[arg-type]
    except TransportError as e:
        client = e
    t.join(30)
    assert not t.is_alive()
    return result["server"], client


def test_keys_file_lines(tmp_path: Path) -> None:
    p = tmp_path / "keys.psk"
    p.write_text(f"qemu:{KEY}\n\nalice:0a0b\nqemu:ffff\n")
    assert read_keys(str(p)) == {"qemu": bytes.fromhex(KEY), "alice": b"\x0a\x0b"}
    for text, message in [
        ("qemu\n", "line 1: expected username:hexkey"),
        (":00\n", "line 1: expected username:hexkey"),
        ("qemu:zz\n", "line 1: the key of 'qemu' is not hexadecimal"),
        ("ok:00\nqemu:\n", "line 2: the key of 'qemu' must be 1 to 256 bytes"),
        ("\n", "holds no username:hexkey line"),
    ]:
        p.write_text(text)
        with pytest.raises(PskError, match=message):
            read_keys(str(p))
    with pytest.raises(PskError, match=r"Unable to access credentials .*nope/keys.psk"):
        PskContext(str(tmp_path / "nope"), server=True)
    p.write_text(f"alice:{KEY}\n")
    with pytest.raises(PskError, match=r"Username qemu not found in PSK file .*keys.psk"):
        PskContext(str(tmp_path), server=False)


USERNAMES = st.text(st.characters(blacklist_characters=":\n\r", blacklist_categories=("Cs",)),
                    min_size=1, max_size=20)


@given(st.dictionaries(USERNAMES, st.binary(min_size=1, max_size=64), min_size=1, max_size=5))
def test_keys_file_round_trip(keys: dict[str, bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "keys.psk")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(f"{u}:{k.hex()}\n" for u, k in keys.items()))
        assert read_keys(path) == keys


def test_psk_channel_carries_bytes_both_ways_and_ends_with_close_notify(tmp_path: Path) -> None:
    d = _dir(tmp_path, "k", f"qemu:{KEY}\nalice:{'ab' * 32}\n")
    seen: list[str | None] = []

    def authorize(name: str | None) -> str | None:
        seen.append(name)
        return None

    server, client = _pair(PskContext(str(d), server=True),
                           PskContext(str(d), server=False, username="alice"), authorize)
    assert isinstance(server, TlsChannel) and isinstance(client, TlsChannel), (server, client)
    assert seen == ["alice"] and server.peer_dn == "alice"
    assert client.tls_version == "TLSv1.3" and client.cipher is not None
    payload = os.urandom(3 << 20)
    views = [memoryview(payload)[i : i + 4096] for i in range(0, len(payload), 4096)]
    sender = threading.Thread(target=client.sendmsg, args=(views,))
    sender.start()
    got = bytearray()
    buf = bytearray(1 << 20)
    while len(got) < len(payload):
        n = server.recv_into(buf)
        assert n > 0
        got += buf[:n]
    sender.join(60)
    assert bytes(got) == payload
    server.sendall(b"ack")
    assert client.recv_into(buf) == 3 and buf[:3] == b"ack"
    client.close()
    assert server.recv_into(buf) == 0  # close_notify: a clean end, not a truncation
    server.close()


def test_psk_refusals_are_named_on_both_ends(tmp_path: Path) -> None:
    srv = PskContext(str(_dir(tmp_path, "srv", f"qemu:{KEY}\n")), server=True)
    other_key = PskContext(str(_dir(tmp_path, "other", f"qemu:{'ff' * 32}\n")), server=False)
    bob = PskContext(str(_dir(tmp_path, "bob", f"bob:{KEY}\n")), server=False, username="bob")

    server, client = _pair(srv, other_key)
    assert isinstance(server, TransportError) and isinstance(client, TransportError)
    assert "the client's key for PSK username 'qemu' does not match" in str(server), server
    assert "decrypt error" in str(client) and "key for PSK username 'qemu'" in str(client), client

    server, client = _pair(srv, bob)
    assert "PSK username 'bob' is not in" in str(server), server
    assert "PSK username 'bob'" in str(client) and "TLS handshake" in str(client), client

    def refuse(name: str | None) -> str | None:
        return f"client '{name}' is not allowed by tls-authz 'auth0'"

    good = PskContext(str(_dir(tmp_path, "good", f"qemu:{KEY}\n")), server=False)
    server, client = _pair(srv, good, refuse)
    assert "refused the TLS connection: client 'qemu' is not allowed by tls-authz 'auth0'" in str(client)


def test_plain_text_peer_against_psk_is_named(tmp_path: Path) -> None:
    d = _dir(tmp_path, "k", f"qemu:{KEY}\n")
    # A PSK client against a peer that answers in plain text.
    a, b = socket.socketpair()
    try:
        a.sendall(b"QEVM" + b"\0" * 200)
        with pytest.raises(TransportError, match=r"TLS handshake on client failed: .*does not speak TLS"):
            tls_connect(SocketChannel(b, "client"), PskContext(str(d), server=False), "x", timeout_s=20)
    finally:
        a.close()
    # A PSK server against a peer that sends plain text.
    a, b = socket.socketpair()
    try:
        a.sendall(b"QEVM" + b"\0" * 200)
        with pytest.raises(TransportError, match=r"TLS handshake on server failed: .*does not speak TLS"):
            tls_accept(SocketChannel(b, "server"), PskContext(str(d), server=True), None, timeout_s=20)
    finally:
        a.close()

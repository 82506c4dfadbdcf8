"""TLS against plain text on loopback: the migration channel's raw copy rate, with and without TLS.

    python bench/bench_tls.py [--mib 1024] [--runs 3] [--batch-kib 256] [--recv-kib 256]
                              [--shape pages|runs]
                              [--channels N] [--creds x509|psk]

The sender (this process) sends --mib MiB through a `SocketChannel` (plain) or a `TlsChannel`
(TLS 1.3; mutual x509 with trustme's certificates, or a pre-shared key); a receiver in a child
process (its own GIL) reads with `recv_into` into a 1 MiB buffer, the destination's bulk shape.
`--shape pages`: lists of 1000 separate 4 KiB page views per `sendmsg` (scattered dirty pages:
the TLS channel copies each into its batch); `--shape runs`: a 2 MiB view per `sendmsg` (a run of
CHUNK_PAGES consecutive pages, as the RAM saver sends one: encrypted in place). `--channels N`:
N connections at once, a sender thread and a receiver thread each (several migration channels).
Rate = bytes / wall time from the first send to the receiver having everything (GB = 1e9
bytes); median of --runs, with the range; CPU seconds of each process per GiB show which side
limits. `--batch-kib` sets the plaintext batch the TLS channel encrypts per system call, `--recv-kib`
the ciphertext it reads per system call.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import trustme

from vmferry.transport import tls as tlsmod
from vmferry.transport.channel import Channel, SocketChannel
from vmferry.transport.tls import TlsContext, TlsFiles, make_context, tls_accept, tls_connect
from vmferry.transport.tls_psk import PskContext

PAGE = 4096
VIEWS = 1000
RUN_BYTES = 512 * PAGE  # the RAM saver's CHUNK_PAGES run


def _pki(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    srv, cli = ca.issue_cert("127.0.0.1"), ca.issue_cert("src.example", common_name="src.example")
    for name, leaf in (("server", srv), ("client", cli)):
        leaf.cert_chain_pems[0].write_to_path(str(root / f"{name}-cert.pem"))
        leaf.private_key_pem.write_to_path(str(root / f"{name}-key.pem"))
    ca.cert_pem.write_to_path(str(root / "ca-cert.pem"))
    ca_file = str(root / "ca-cert.pem")
    server = make_context(TlsFiles(ca_file, str(root / "server-cert.pem"), str(root / "server-key.pem")),
                          server=True, verify_peer=True)
    client = make_context(TlsFiles(ca_file, str(root / "client-cert.pem"), str(root / "client-key.pem")),
                          server=False, verify_peer=True)
    return server, client


def _psk(root: Path) -> tuple[PskContext, PskContext]:
    (root / "keys.psk").write_text(f"qemu:{os.urandom(32).hex()}\n")
    return PskContext(str(root), server=True), PskContext(str(root), server=False)


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _receive(listener: socket.socket, share: int, server: TlsContext | None) -> None:
    conn, _ = listener.accept()
    ch: Channel = SocketChannel(conn, "recv")
    if server is not None:
        ch = tls_accept(ch, server, None)
    buf = bytearray(1 << 20)
    got = 0
    while got < share:
        n = ch.recv_into(buf)
        if n == 0:
            break
        got += n
    ch.sendall(b"k")  # everything arrived
    ch.close()


def _send(ch: Channel, share: int, shape: str, ram: memoryview) -> None:
    pages = [ram[i * PAGE : (i + 1) * PAGE] for i in range(len(ram) // PAGE)]
    sent, i = 0, 0
    while sent < share:
        if shape == "runs":
            n = min(RUN_BYTES, share - sent)
            at = (i * RUN_BYTES) % (len(ram) - RUN_BYTES + 1)
            sent += ch.sendmsg([ram[at : at + n]])
            i += 1
            continue
        count = min(VIEWS, (share - sent) // PAGE)  # exactly `share`: the receiver stops there
        views = [pages[(i + k) % len(pages)] for k in range(count)]
        i += VIEWS
        sent += ch.sendmsg(views)
    ch.recv_exactly(1)
    ch.close()


def run_once(total: int, contexts: tuple[TlsContext, TlsContext] | None, shape: str,
             channels: int) -> tuple[float, float, float]:
    """(bytes/s, the sender's CPU s per GiB, the receiver's CPU s per GiB)."""
    share = total // channels
    listener = socket.create_server(("127.0.0.1", 0), backlog=channels)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            threads = [threading.Thread(target=_receive, args=(listener, share, contexts and contexts[0]))
                       for _ in range(channels)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException as e:  # noqa: BLE001 - the child reports and exits
            print(f"receiver: {e}", file=sys.stderr)
        finally:
            os._exit(0)
    listener.close()
    chans: list[Channel] = []
    for _ in range(channels):
        ch: Channel = SocketChannel(socket.create_connection(("127.0.0.1", port)), "send")
        ch.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if contexts is not None:
            ch = tls_connect(ch, contexts[1], "127.0.0.1")
        chans.append(ch)
    ram = memoryview(bytearray(os.urandom(1 << 20)) * 16)  # 16 MiB of incompressible pages
    cpu0, child0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    senders = [threading.Thread(target=_send, args=(ch, share, shape, ram)) for ch in chans]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    elapsed = time.perf_counter() - t0
    os.waitpid(pid, 0)
    gib = share * channels / (1 << 30)
    return (share * channels / elapsed, (_cpu(resource.RUSAGE_SELF) - cpu0) / gib,
            (_cpu(resource.RUSAGE_CHILDREN) - child0) / gib)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-kib", type=int, default=tlsmod.BATCH_BYTES // 1024)
    ap.add_argument("--recv-kib", type=int, default=tlsmod.RECV_BYTES // 1024)
    ap.add_argument("--shape", choices=("pages", "runs"), default="pages")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--creds", choices=("x509", "psk"), default="x509")
    a = ap.parse_args()
    tlsmod.BATCH_BYTES = a.batch_kib * 1024
    tlsmod.RECV_BYTES = a.recv_kib * 1024
    total = a.mib << 20
    with tempfile.TemporaryDirectory() as d:
        contexts = _pki(Path(d)) if a.creds == "x509" else _psk(Path(d))
    print(f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} {platform.python_version()} "
          f"{ssl.OPENSSL_VERSION} kernel {platform.release()} load {os.getloadavg()[0]:.1f}")
    print(f"# ssl.OP_ENABLE_KTLS: {'yes' if hasattr(ssl, 'OP_ENABLE_KTLS') else 'absent'}; "
          f"/proc/net/tls_stat: {'yes' if os.path.exists('/proc/net/tls_stat') else 'absent'}")
    print(f"# {a.mib} MiB, shape {a.shape}, {a.channels} channel(s), {a.creds}, TLS batch "
          f"{a.batch_kib} KiB, ciphertext read {a.recv_kib} KiB, {a.runs} runs")
    medians = {}
    for name, ctx in (("plain", None), ("tls", contexts)):
        results = [run_once(total, ctx, a.shape, a.channels) for _ in range(a.runs)]
        rates = [r[0] for r in results]
        medians[name] = statistics.median(rates)
        print(f"{name:6s} {medians[name] / 1e9:6.3f} GB/s  [{min(rates) / 1e9:.3f}-{max(rates) / 1e9:.3f}]  "
              f"CPU s/GiB sender {statistics.median(r[1] for r in results):.2f} "
              f"receiver {statistics.median(r[2] for r in results):.2f}")
    print(f"tls/plain {medians['tls'] / medians['plain']:.0%}  (load {os.getloadavg()[0]:.1f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

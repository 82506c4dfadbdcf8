"""Postcopy's preempt channel (capability `postcopy-preempt`, QEMU's name): requested pages on a
connection of their own, so that they never queue behind the background push.

With the capability on both sides, the source opens a second connection to the migration's
address right after CONFIG (TLS too when tls-creds is set, as multifd's data channels). It
carries a vmferry stream of its own, like a data channel (docs/stream-format.md): stream header,
COMMAND CHANNEL (JSON: the migration's id, `"channel": "postcopy-preempt"`), RAM_BLOCKS, then —
only after the switch to postcopy — the requested pages (RAM_PAGES / RAM_ZERO), then END with its
own record count and digest. The destination's PAGE_REQUESTs go the other way on the same
connection, as a stream of their own too (header, COMMAND PAGE_REQUEST..., END), so that a
request crosses one thread on each side and no other:

  destination  the fault resolver (migration/postcopy.py) polls the userfaultfd and this
               connection together: it writes the request as soon as it reads the fault, and it
               reads and places (UFFDIO_COPY) the pages that come back (`PreemptLink`);
  source       one thread (`PreemptSender`) reads the requests and sends each requested page
               (and a few after it) from guest RAM at once: it takes them out of the postcopy set
               (`PostcopySource.take_request`, under the set's lock: each page goes on exactly one
               of the two streams) and writes them with one sendmsg.

A page can never be placed with stale content: the source's vCPUs are stopped for all of
postcopy, so every copy of a page that is sent is its final content. The main stream's records
and END are unchanged; the return path still carries PAGE_REQUESTs when the preempt channel is
not there (lost, or after a postcopy recovery: it is not opened again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vmferry.errors import MigrationError, VmferryError
from vmferry.migration.multifd import DIRECT_BYTES, DataChannelLost, DataChannelReceiver
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import (
    Buffer,
    Command,
    CommandCode,
    EndOfStream,
    RamBlocks,
    StreamHeader,
    record_type_name,
)
from vmferry.transport.channel import Channel

if TYPE_CHECKING:
    from vmferry.migration.postcopy import PostcopyDestination, PostcopySource
    from vmferry.migration.ram import RamLoader

log = logging.getLogger("vmferry.migration")

PREEMPT_CHANNEL = "postcopy-preempt"
REQUEST_CHUNK_BYTES = 64 << 10  # PAGE_REQUESTs read per system call on the source (36 bytes each)
PAGES_CHUNK_BYTES = 1 << 20  # pages read per system call on the destination


def preempt_hello(migration_id: str) -> Command:
    doc = {"migration": migration_id, "channel": PREEMPT_CHANNEL}
    return Command(CommandCode.CHANNEL, data=json.dumps(doc, separators=(",", ":")).encode())


def no_delay(channel: Channel) -> None:
    """A requested page is one small write: it must leave at once (no Nagle)."""
    sock = getattr(channel, "socket", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PreemptSender:
    """The source's preempt channel: its stream, and the thread that reads the destination's
    requests from it and answers each with the requested pages at once."""

    def __init__(self, channel: Channel, migration_id: str, table: RamBlocks, machine_type: str) -> None:
        self.channel = channel
        self.encoder = StreamEncoder(machine_type=machine_type)
        no_delay(channel)
        channel.sendmsg([self.encoder.header(), self.encoder.encode(preempt_hello(migration_id)),
                         self.encoder.encode(table)])
        # Orders the thread's pages and finish()'s END: pages taken are on the wire before END.
        self._send_lock = threading.Lock()
        self._finished = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the channel failed, if it did
        self.bytes = 0

    def start(self, pc: PostcopySource) -> None:
        """After RUN: serve requests from here on (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(pc,), name="postcopy-preempt",
                                            daemon=True)
            self._thread.start()

    def _run(self, pc: PostcopySource) -> None:
        from vmferry.migration.postcopy import fault_path_priority
        fault_path_priority()
        dec = StreamDecoder()
        chunk = memoryview(bytearray(REQUEST_CHUNK_BYTES))
        try:
            while True:
                n = self.channel.recv_into(chunk)
                if n == 0:
                    dec.feed_eof()  # a destination that ends its requests ends them with END
                else:
                    dec.feed(chunk[:n])
                while (rec := dec.next_record()) is not None:
                    if isinstance(rec, Command) and rec.code == CommandCode.PAGE_REQUEST:
                        self._serve(pc, rec.block_id, rec.index, rec.count)
                    elif isinstance(rec, EndOfStream):
                        return
                    elif not isinstance(rec, StreamHeader | Command):
                        raise MigrationError(f"the destination sent {record_type_name(rec)} on the "
                                             "postcopy-preempt channel, not PAGE_REQUEST")
        except (VmferryError, OSError) as e:
            if not self._finished:
                self.error = f"postcopy-preempt channel: {e}"
                log.warning("%s", self.error)

    def _serve(self, pc: PostcopySource, block_id: int, first_page: int, count: int) -> None:
        with self._send_lock:
            if not self._finished:  # after END every page went out already
                self.bytes += pc.take_request(block_id, first_page, count, send=self.channel.sendmsg,
                                              encoder=self.encoder)

    def finish(self) -> None:
        """Every page was taken: end the channel's stream (END with its record count and digest)
        after the pages the thread is sending, if any; requests that come later are for pages
        sent already. The thread ends with the destination's END (or at close())."""
        if self.error is not None:
            raise MigrationError(self.error)
        with self._send_lock:
            self._finished = True
            self.channel.sendmsg([self.encoder.end()])

    def close(self) -> None:
        """Failure or the end of the migration: cut the connection, stop the thread. Idempotent."""
        self._finished = True  # before the shutdown: the thread's failure that follows is no error
        with contextlib.suppress(VmferryError, OSError):
            self.channel.shutdown()  # first: a send blocked on a peer that stopped reading fails
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None
        with contextlib.suppress(VmferryError, OSError):
            self.channel.close()


class PreemptPages:
    """Where the preempt channel's pages go on the destination: straight to the postcopy placer
    (UFFDIO_COPY), never through guest memory. Pages before POSTCOPY_LISTEN are refused."""

    def __init__(self, ram: RamLoader, dest: Callable[[], PostcopyDestination | None]) -> None:
        self._ram = ram
        self._dest = dest
        # What this channel placed (RamLoader counts the main stream's): query-migrate's ram.normal
        # and ram.duplicate count both. Written by the one thread that reads the channel.
        self.pages = 0
        self.zero_pages = 0

    def _placer(self) -> PostcopyDestination:
        d = self._dest()
        if d is None or d.uffd is None:
            raise MigrationError("postcopy-preempt: pages arrived before POSTCOPY_LISTEN")
        return d

    def apply_pages(self, block_id: int, pages: np.ndarray, data: Buffer, generation: int) -> None:
        self.pages += self._placer().place_list(block_id, pages, data)

    def apply_zero(self, block_id: int, first: int, count: int, generation: int) -> None:
        self._placer().place_zero(block_id, first, count)
        self.zero_pages += count  # as RamLoader counts the main stream's zero runs

    def check_layout(self, table: RamBlocks) -> None:
        self._ram.check_layout(table)


class PreemptReceiver(DataChannelReceiver):
    """The destination's preempt channel (sans-I/O, as a data channel): its hello names the
    preempt channel of this migration."""

    def _where(self) -> str:
        return "the postcopy-preempt channel"

    def _hello(self, rec: object) -> None:
        if not (isinstance(rec, Command) and rec.code == CommandCode.CHANNEL):
            raise MigrationError(f"the postcopy-preempt channel began with {record_type_name(rec)}, "
                                 "not COMMAND CHANNEL")
        try:
            doc = json.loads(rec.data)
            mid, cid = doc["migration"], doc["channel"]
        except (ValueError, KeyError, TypeError):
            raise MigrationError("the postcopy-preempt channel's COMMAND CHANNEL is not {migration, channel} "
                                 "JSON") from None
        if cid != PREEMPT_CHANNEL:
            raise MigrationError(f"expected the postcopy-preempt channel, got channel {cid!r}")
        if self.expect_migration is not None and mid != self.expect_migration:
            raise MigrationError(f"the postcopy-preempt channel belongs to migration {mid!r}, not this one "
                                 f"({self.expect_migration!r})")

    def read_buffered(self, recv: Callable[[memoryview], int], chunk: memoryview) -> int:
        """read_from for what the channel holds already (TLS: records decrypted or decryptable
        without a system call): `recv` never blocks, and 0 means nothing more is held, not EOF."""
        target = self.decoder.get_buffer()
        if len(target) >= DIRECT_BYTES:
            n = recv(target)
            if n:
                self.decoder.buffer_updated(n)
        else:
            n = recv(chunk)
            if n:
                self.decoder.feed(chunk[:n])
        self.bytes_received += n
        self._drain()
        return n


class PreemptLink:
    """The destination's preempt channel from POSTCOPY_LISTEN on, driven by the fault resolver
    (PostcopyDestination): `request` writes a PAGE_REQUEST on the channel's reverse direction;
    `pump`, when the channel is readable, reads and places the pages that came. One thread does
    both, so no other thread is on a request's way here.

    `counted()` runs per request sent (the destination's request count). The resolver sets
    `released` once it no longer uses the channel (END, failure, or the resolver's end): only then
    may the channel be closed (its fd is in the resolver's poll)."""

    def __init__(self, channel: Channel, rx: PreemptReceiver, counted: Callable[[], None]) -> None:
        self.channel = channel
        self.rx = rx
        self._counted = counted
        self._encoder = StreamEncoder()
        self._started = False
        self._chunk = memoryview(bytearray(PAGES_CHUNK_BYTES))
        self.attached = threading.Event()  # the resolver polls the channel
        self.released = threading.Event()
        self.ended = threading.Event()  # the source's END arrived (every page on it placed)

    def fileno(self) -> int:
        return self.channel.fileno()

    def request(self, block_id: int, first_page: int, count: int) -> None:
        bufs = [] if self._started else [self._encoder.header()]
        self._started = True
        bufs.append(self._encoder.encode(Command(CommandCode.PAGE_REQUEST, block_id=block_id,
                                                 index=first_page, count=count)))
        self.channel.sendmsg(bufs)
        self._counted()

    def pump(self) -> bool:
        """The channel is readable: read once, then whatever TLS holds already, placing every
        page (UFFDIO_COPY). False once the source's END is in: the requests end with END too."""
        rx = self.rx
        if rx.read_from(self.channel.recv_into, self._chunk) == 0 and not rx.ended:
            raise DataChannelLost("the postcopy-preempt channel closed before its END")
        while not rx.ended and rx.read_buffered(self.channel.recv_buffered_into, self._chunk):
            pass
        if not rx.ended:
            return True
        bufs = [] if self._started else [self._encoder.header()]
        self._started = True
        with contextlib.suppress(VmferryError, OSError):  # the source may be gone already
            self.channel.sendmsg([*bufs, self._encoder.end()])
        self.ended.set()
        return False

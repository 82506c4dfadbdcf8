"""The return path: the destination's commands back to the source over a duplex channel.

It is a stream of its own (docs/stream-format.md): a stream header, then COMMAND records. The
source reads it on a thread of its own for the whole migration, so a destination that gives up
(SHUT with a reason) stops the source at once with that reason instead of a bare "broken pipe".
"""

from __future__ import annotations

import contextlib
import logging
import threading

from vmferry.errors import StreamError, TransportError
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Command, CommandCode
from vmferry.transport.channel import Channel

log = logging.getLogger("vmferry.migration")


class ReturnPathWriter:
    """Destination side: send commands to the source."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.encoder = StreamEncoder()
        self._lock = threading.Lock()
        self._started = False

    def send(self, cmd: Command) -> None:
        with self._lock:
            bufs: list[bytes] = [] if self._started else [self.encoder.header()]
            self._started = True
            bufs.append(self.encoder.encode(cmd))
            self.channel.sendmsg(bufs)

    def shut(self, reason: str) -> None:
        """Tell the source we give up, and why. Best effort: the channel may be gone already."""
        with contextlib.suppress(TransportError, OSError, ValueError):
            self.send(Command(CommandCode.SHUT, data=reason.encode()[:4096]))


class ReturnPathReader:
    """Source side: a thread that reads commands and records what the source must act on."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.acked = threading.Event()
        self.ack_index: int | None = None
        self.shut_reason: str | None = None
        self.closed = threading.Event()  # the destination's side ended (EOF, error or SHUT)
        self._thread = threading.Thread(target=self._run, name="migration-return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        dec = StreamDecoder()
        try:
            while True:
                buf = dec.get_buffer()
                n = self.channel.recv_into(buf)
                if n == 0:
                    return
                dec.buffer_updated(n)
                while (rec := dec.next_record()) is not None:
                    if isinstance(rec, Command):
                        self._on_command(rec)
        except (TransportError, StreamError, OSError) as e:
            log.debug("return path ended: %s", e)
        finally:
            self.closed.set()
            self.acked.set()  # wake a waiter; it checks ack_index

    def _on_command(self, cmd: Command) -> None:
        if cmd.code == CommandCode.ACK:
            self.ack_index = cmd.index
            self.acked.set()
        elif cmd.code == CommandCode.SHUT:
            self.shut_reason = cmd.message
            log.warning("destination gave up: %s", self.shut_reason)
            # Unblock the sender at once; it reports shut_reason.
            self.channel.shutdown()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

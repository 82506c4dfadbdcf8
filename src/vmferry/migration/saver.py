"""The saver contract: how every kind of migrated state plugs into the engine.

A `Saver` moves one kind of state from the source (RAM, device state; disks later), a `Loader`
receives it on the destination. The source session loops over a list of savers and never looks
inside one; the destination session dispatches records through a table built from the loaders'
`handlers()`. A new kind of state is one saver, one loader and their record types — the loops do
not change.

Source, in order (the session calls these; drivers never do):

    setup(out)            announce what will follow (block tables, descriptions, hints) and start
                          tracking changes; the VM runs
    sync()                fold the dirty log into what is waiting to be sent (at pass boundaries)
    pending()             bytes still to send (what `iterate` and `complete` would send now)
    iterate(out, budget)  send at most about `budget` bytes of what is waiting; the VM runs
    complete(out)         the VM is stopped: sync and send everything left
    cleanup()             stop tracking; always called, also after a failure

`out` is a `SaverOutput`: the stream's encoder and `send(buffers) -> bytes accepted`. Savers write
encoded records through it, so page data goes from guest memory to the channel without a copy.

Destination: `handlers()` maps record classes (and `CommandCode`s of COMMAND records) to the
functions that apply them; `complete()` runs after END was verified and before the guest starts
(apply staged state); `release()` always runs at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import CommandCode

Buffer = bytes | bytearray | memoryview
Send = Callable[[Sequence[Buffer]], int]


class SaverOutput(Protocol):
    encoder: StreamEncoder

    def send(self, bufs: Sequence[Buffer]) -> int:
        """Write encoded records; returns the bytes the channel accepted."""
        ...

    def cancelled(self) -> bool:
        """Has the migration been cancelled? Long loops check it between steps."""
        ...


class Saver(ABC):
    """One kind of state on the source. See the module docstring for the call order."""

    name: str
    # Sent before the others in each pass: state the guest rewrites slowly for its size (a disk),
    # so the faster-dirtied state (RAM) goes last and less of it is dirtied again within the pass.
    bulk_first: bool = False

    @abstractmethod
    def setup(self, out: SaverOutput) -> None: ...

    def sync(self) -> None:  # noqa: B027 - state without a dirty log has nothing to fold in
        """Fold the dirty log into what is waiting to be sent."""

    @abstractmethod
    def pending(self) -> int:
        """Bytes (about) still to send for this saver's state as it stands."""

    def iterate(self, out: SaverOutput, budget_bytes: int) -> int:
        """Send at most about `budget_bytes` of what is waiting while the VM runs; returns the
        bytes sent. State that only moves with the VM stopped sends nothing here."""
        return 0

    @abstractmethod
    def complete(self, out: SaverOutput) -> None:
        """The VM is stopped: send everything that is left."""

    def cleanup(self) -> None:  # noqa: B027 - nothing to undo by default
        """Undo setup (stop tracking); called once however the migration ended."""

    def sent_elsewhere(self) -> int:
        """Bytes this saver's own channels accepted (multifd data channels), beside `out`; the
        session counts them with the main stream's for the pass's bandwidth."""
        return 0

    def page_counts(self) -> tuple[int, int, int]:
        """(pages sent with contents, zero pages sent, pages waiting) for query-migrate's page
        counters; state that is not made of pages has none."""
        return 0, 0, 0

    def units(self) -> tuple[int, int]:
        """(4 KiB units sent so far, units waiting): what the switchover rule weighs, a RAM page
        and a disk block alike (convergence.switch_now). Pages by default."""
        sent, zero, waiting = self.page_counts()
        return sent + zero, waiting


Handler = Callable[[Any], None]


class Loader(ABC):
    """One kind of state on the destination."""

    name: str

    @abstractmethod
    def handlers(self) -> Mapping[type | CommandCode, Handler]:
        """Record class (or COMMAND code) -> the function applying such a record."""

    def complete(self) -> None:  # noqa: B027 - state applied as it arrives needs nothing here
        """END is verified and the guest has not started: apply whatever was staged."""

    def release(self) -> None:  # noqa: B027 - nothing held by default
        """Free what the loader holds (threads, views); called once however the load ended."""

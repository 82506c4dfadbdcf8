"""The destination side of a migration as a protocol object: decoded records in, each applied
by the loader that owns its type. Sans-I/O: no threads, no sockets, no clock — the driver
(`destination.py`) decodes the channel and feeds records here.

    session = DestSession(loaders, check_header=..., check_config=...)
    for rec in records:
        if session.feed(rec):      # True once END arrived (the decoder verified count and digest)
            break
    session.complete()             # every loader applies what it staged; then the guest may start

Dispatch is a table built from the loaders' `handlers()` (record class -> function, and COMMAND
code -> function) plus the session's own records (stream header, CONFIG, PASS, SHUT). A record no
loader takes, or a COMMAND code that is neither handled nor advisory, is refused with an error
naming the record type and its number in the stream: state the destination cannot apply must
never be dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmferry.errors import MigrationError
from vmferry.migration.saver import Handler, Loader
from vmferry.stream.records import (
    ADVISORY_COMMANDS,
    Command,
    CommandCode,
    Config,
    EndOfStream,
    PassStart,
    Skipped,
    StreamHeader,
    record_type_name,
)


class DestSession:
    def __init__(self, loaders: Sequence[Loader], *,
                 check_header: Callable[[StreamHeader], None] = lambda h: None,
                 check_config: Callable[[Mapping[str, Any]], None] = lambda c: None) -> None:
        self.loaders = list(loaders)
        self.check_header = check_header
        self.check_config = check_config
        self.records = 0  # records fed (the stream header is not a record)
        self.passes = 0  # the last PASS number seen
        self.ended = False
        self.record_count = 0  # what END carried
        self._records: dict[type, Handler] = {Config: self._on_config, PassStart: self._on_pass}
        self._commands: dict[int, Handler] = {CommandCode.SHUT: self._on_shut}
        owner: dict[object, str] = {}
        for loader in self.loaders:
            for key, fn in loader.handlers().items():
                table: dict[Any, Handler] = self._commands if isinstance(key, CommandCode) else self._records
                if key in table:
                    raise ValueError(f"loaders '{owner.get(key, 'session')}' and '{loader.name}' "
                                     f"both handle {key!r}")
                owner[key] = loader.name
                table[key] = fn

    def feed(self, rec: object) -> bool:
        """Apply one decoded record; True when it was END."""
        if isinstance(rec, StreamHeader):
            self.check_header(rec)
            return False
        index = self.records
        self.records += 1
        if isinstance(rec, EndOfStream):
            self.ended = True
            self.record_count = rec.record_count
            return True
        if isinstance(rec, Skipped):
            return False  # an unknown type flagged skippable: the decoder checked it; ignorable
        if isinstance(rec, Command):
            fn = self._commands.get(int(rec.code))
            if fn is None:
                if rec.code >= ADVISORY_COMMANDS:
                    return False  # advisory: a reader that does not know it ignores it
                raise MigrationError(f"{record_type_name(rec)} (record {index}) is not supported "
                                     "by this destination")
        else:
            fn = self._records.get(type(rec))
            if fn is None:
                raise MigrationError(f"{record_type_name(rec)} record (record {index}) has no loader "
                                     "on this destination: it cannot apply that state")
        fn(rec)
        return False

    def complete(self) -> None:
        """END is verified: every loader applies what it staged, in loader order."""
        if not self.ended:
            raise MigrationError("the stream has not ended; nothing may be applied")
        for loader in self.loaders:
            loader.complete()

    def release(self) -> None:
        for loader in self.loaders:
            loader.release()

    def _on_config(self, rec: Config) -> None:
        self.check_config(rec.settings)

    def _on_pass(self, rec: PassStart) -> None:
        self.passes = rec.pass_number

    def _on_shut(self, rec: Command) -> None:
        raise MigrationError(f"the source gave up: {rec.message}")

"""The one error tree. Every error a user can see is a VmferryError; each maps to a QMP error class."""

from __future__ import annotations


class VmferryError(Exception):
    """Root of every error vmferry raises on purpose."""

    qmp_class: str = "GenericError"


class KvmUnavailableError(VmferryError):
    """/dev/kvm is missing or not accessible; the message says what to do."""

    qmp_class = "KVMMissingCap"


class KvmError(VmferryError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed. Names the ioctl and the errno."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        import os

        self.ioctl = ioctl
        self.errno = errno
        msg = f"{ioctl} failed: {os.strerror(errno) if errno else 'error'} (errno {errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class GuestError(VmferryError):
    """A guest image could not be loaded or the guest did something the VMM cannot serve."""


class StreamError(VmferryError):
    """A migration stream is malformed. Says where (byte offset, record index, section) and why."""

    def __init__(
        self,
        reason: str,
        *,
        offset: int | None = None,
        record_index: int | None = None,
        section: str | None = None,
    ) -> None:
        self.reason = reason
        self.offset = offset
        self.record_index = record_index
        self.section = section
        where = []
        if record_index is not None:
            where.append(f"record {record_index}")
        if section:
            where.append(f"section '{section}'")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{reason} (at {', '.join(where)})" if where else reason)


class StateLoadError(VmferryError):
    """Device state could not be loaded; names the section and, when known, the field."""

    def __init__(self, reason: str, *, section: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.section = section
        self.field = field
        where = ""
        if section:
            where = f"section '{section}'" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}" if where else reason)


class TransportError(VmferryError):
    """A migration URI is malformed or its endpoint cannot be reached."""


class MigrationError(VmferryError):
    """A migration failed or was refused."""


class QmpError(VmferryError):
    """An error reply to a QMP command, with its QMP error class."""

    def __init__(self, desc: str, qmp_class: str = "GenericError") -> None:
        self.qmp_class = qmp_class
        super().__init__(desc)

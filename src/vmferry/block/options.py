"""`--drive file=PATH,format=raw,id=disk0[,readonly=on]`: QEMU's -drive syntax, the subset vmferry
serves. file= is an image file or an NBD export in QEMU's URI syntax (`nbd://HOST[:PORT]/EXPORT`,
`nbd+unix:///EXPORT?socket=PATH`; block/nbd.py), checked here. A comma inside a value is written
twice (`file=a,,b.img` is the file `a,b.img`), as in QEMU. Anything else is refused by name,
never ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmferry.block.backend import BlockError
from vmferry.block.nbd import is_nbd_uri, parse_nbd_uri
from vmferry.options import split_options

FORMATS = ("raw",)
_BOOL = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}
_KEYS = ("file", "format", "id", "readonly")
# QEMU's rule for ids: a letter first, then letters, digits, '-', '.', '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class DriveSpec:
    id: str
    file: str
    format: str = "raw"
    readonly: bool = False


def parse_drive(text: str, index: int = 0) -> DriveSpec:
    """One --drive value. `index` names the drive when it has no id= (disk0, disk1, ...)."""
    opts: dict[str, str] = {}
    for part in split_options(text):
        key, eq, value = part.partition("=")
        if not eq:
            raise BlockError(f"--drive {text!r}: '{part}' is not key=value")
        if key not in _KEYS:
            raise BlockError(f"--drive {text!r}: unknown option '{key}' (known: {', '.join(_KEYS)})")
        if key in opts:
            raise BlockError(f"--drive {text!r}: '{key}' given twice")
        opts[key] = value
    if not opts.get("file"):
        raise BlockError(f"--drive {text!r}: needs file=PATH")
    if is_nbd_uri(opts["file"]):
        try:
            parse_nbd_uri(opts["file"])
        except ValueError as e:
            raise BlockError(f"--drive {text!r}: {e}") from None
    fmt = opts.get("format", "raw")
    if fmt not in FORMATS:
        raise BlockError(f"--drive {text!r}: format '{fmt}' is not supported "
                         f"(supported: {', '.join(FORMATS)})")
    drive_id = opts.get("id", f"disk{index}")
    if not _ID.fullmatch(drive_id):
        raise BlockError(f"--drive {text!r}: id '{drive_id}' must start with a letter and hold only "
                         "letters, digits, '-', '.', '_'")
    ro = opts.get("readonly", "off")
    if ro not in _BOOL:
        raise BlockError(f"--drive {text!r}: readonly '{ro}' must be on or off")
    return DriveSpec(drive_id, opts["file"], fmt, _BOOL[ro])


def parse_drives(texts: list[str]) -> list[DriveSpec]:
    specs = [parse_drive(t, i) for i, t in enumerate(texts)]
    seen: set[str] = set()
    for s in specs:
        if s.id in seen:
            raise BlockError(f"--drive: duplicate id '{s.id}'")
        seen.add(s.id)
    return specs

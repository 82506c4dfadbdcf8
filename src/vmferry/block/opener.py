"""`open_drive`: the backend for one `--drive`, chosen by its file=: an NBD URI (`nbd://`,
`nbd+unix://`: block/nbd_image.py) or an image file (block/raw.py)."""

from __future__ import annotations

from vmferry.block.backend import BlockBackend, BlockError
from vmferry.block.nbd import is_nbd_uri
from vmferry.block.nbd_image import NbdImage
from vmferry.block.options import DriveSpec
from vmferry.block.raw import RawImage


def open_drive(spec: DriveSpec, *, lock: bool = True) -> BlockBackend:
    """Open one drive. `lock=False`: a migration destination, which takes the image's lock when
    the migration hands it over (raw.py's module doc)."""
    if spec.format != "raw":
        raise BlockError(f"drive {spec.id}: format '{spec.format}' is not supported")
    if is_nbd_uri(spec.file):
        return NbdImage(spec, lock=lock)
    return RawImage(spec, lock=lock)

"""The bundled guest programs: multiboot v1 ELF32 images built from `guests/` in the repository
(see guests/README.md for their parameters) and shipped prebuilt, so running vmferry needs no
compiler. `verify` checks the `dirty` guest's memory from the host, `verify_disk` an image
the `disk` guest wrote."""

from __future__ import annotations

from pathlib import Path

from vmferry.errors import GuestError

GUESTS = ("heartbeat", "dirty", "disk")
IMAGES_DIR = Path(__file__).parent / "images"


def image_path(name: str) -> Path:
    """The image file of a bundled guest, by name (`heartbeat`, `dirty`, `disk`)."""
    if name not in GUESTS:
        raise GuestError(f"unknown guest {name!r}: the bundled guests are {', '.join(GUESTS)}")
    path = IMAGES_DIR / f"{name}.elf"
    if not path.is_file():
        raise GuestError(f"guest image {path} is missing: rebuild it with `make -C guests`")
    return path

"""Released vmferry builds, run beside the current code (compat/README.md).

A release is a committed wheel. It is unpacked once per test session into a temporary directory
and started as `python -m vmferry` with PYTHONPATH pointing there (and not at this checkout's
src/), so the process runs the release's code with the current environment's dependencies.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPAT = REPO / "compat"


@dataclass(frozen=True)
class Release:
    version: str
    wheel: str  # file name under compat/
    sha256: str
    machine_types: tuple[str, ...]  # what this release can run (and so receive)


RELEASES = (
    Release("0.1.0", "vmferry-0.1.0-py3-none-any.whl",
            "17e83e5e3aaf7848dcd30c16309f1dac8d9916285c339ff60b7945de09de6609", ("vmferry-0.1",)),
)


@dataclass(frozen=True)
class Unpacked:
    release: Release
    path: Path  # the directory that holds the release's `vmferry` package

    def env(self) -> dict[str, str]:
        """Environment for a process that must run this release, not the checkout's src/."""
        return {"PYTHONPATH": str(self.path)}


def unpack(release: Release, into: Path) -> Unpacked:
    """Check the wheel is the recorded one, unpack it, and check it runs as that version."""
    wheel = COMPAT / release.wheel
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != release.sha256:
        raise AssertionError(f"{wheel}: sha256 {digest}, but release {release.version} is {release.sha256}")
    target = into / f"vmferry-{release.version}"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    out = subprocess.run([sys.executable, "-m", "vmferry", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=target, env={**os.environ, "PYTHONPATH": str(target)})
    if out.stdout.strip() != f"vmferry {release.version}":
        raise AssertionError(f"{wheel} runs as {out.stdout.strip()!r} ({out.stderr.strip()}), "
                             f"not vmferry {release.version}")
    return Unpacked(release, target)

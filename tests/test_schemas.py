"""Released machine types are frozen: schemas/<machine>.json is what `vmferry describe -M <machine>`
printed when it was released. The code must still describe each one exactly, and a stream from
each must still load on the newest machine type (docs/vmstate.md, "Descriptions you can compare").

When this fails: a change altered what an old release sends or reads. Put the new state in a
subsection or a new machine type instead — never regenerate a committed schema.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.machine.machine_type import MACHINE_TYPES, section_registry
from vmferry.vmstate.describe import schema_problems

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
COMMITTED = sorted(SCHEMAS.glob("*.json"))


def test_every_machine_type_has_a_committed_schema() -> None:
    machine_types = set(MACHINE_TYPES)
    assert "vmferry-0.1" in machine_types
    assert machine_types <= {p.stem for p in COMMITTED}


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_code_still_matches_the_committed_schema(path: Path) -> None:
    assert schema_problems(path.stem, path, section_registry()) == []


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_check_compat_accepts_the_committed_schema_against_the_current_build(path: Path,
                                                                              tmp_path: Path) -> None:
    vmferry = [sys.executable, "-m", "vmferry"]
    current = tmp_path / "current.json"
    described = subprocess.run([*vmferry, "describe"], capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    current.write_text(described.stdout)
    r = subprocess.run([*vmferry, "check-compat", str(path), str(current)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("compatible:")

"""Released machine types are frozen: schemas/<machine>.json is what `vmferry describe -M <machine>`
printed when it was released. The code must still describe each one exactly, and a stream from
each must still load on the newest machine type (docs/vmstate.md, "Descriptions you can compare").

When this fails: a change altered what an old release sends or reads. Put the new state in a
subsection or a new machine type instead — never regenerate a committed schema.
"""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_dynamic_check_runs_the_committed_schema_against_the_current_build(path: Path) -> None:
    """The schema gate's dynamic pass: generated states of each released machine type go from its
    committed description to this build's same machine type and back (backward migration), and
    from it to the newest machine type."""
    vmferry = [sys.executable, "-m", "vmferry", "check-compat", "--dynamic"]
    for args in ([str(path), f"build:{path.stem}", "--both-directions"],
                 [str(path), f"build:{section_registry().newest()}"]):
        r = subprocess.run([*vmferry, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("compatible:")
        assert "generated states" in r.stdout


def test_dynamic_check_fails_on_an_incompatible_schema(tmp_path: Path) -> None:
    """The gate can fail: a released description whose serial sends one field more than this
    build reads is refused, by section, field and machine type."""
    frozen = json.loads((SCHEMAS / "vmferry-0.1.json").read_text())
    frozen["serial"]["fields"].append({"field": "extra", "field_exists": False, "size": 1, "type": "u8",
                                       "version_id": 0})
    bad = tmp_path / "vmferry-0.1.json"
    bad.write_text(json.dumps(frozen))
    r = subprocess.run([sys.executable, "-m", "vmferry", "check-compat", "--dynamic", "--both-directions",
                        str(bad), "build:vmferry-0.1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    dynamic = [line for line in r.stdout.splitlines() if line.startswith("vmferry-0.1 (")]
    assert any("section 'serial', field 'extra'" in line for line in dynamic), r.stdout

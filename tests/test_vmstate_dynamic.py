"""Units of the dynamic compat pass (vmstate/dynamic.py): sides read from descriptions are the
sections they describe, this build agrees with itself, and bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.errors import VmferryError
from vmferry.vmstate import dynamic as dyn
from vmferry.vmstate.description import qemu_description

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "vmferry-0.1.json"


def test_a_described_side_describes_exactly_as_its_description() -> None:
    """Classes built from a description print that description again, section by section, so
    a described side encodes and decodes the layout the release sent."""
    frozen = json.loads(SCHEMA.read_text())
    side = dyn.description_side(frozen, "frozen")
    assert side.machine == "vmferry-0.1"
    assert sorted(side.sections) == sorted(k for k in frozen if k != "vmschkmachine")
    for name, spec in side.sections.items():
        assert qemu_description(spec.cls, spec.version) == frozen[name], name


def test_this_build_agrees_with_itself_and_reaches_its_sections() -> None:
    side = dyn.build_side("vmferry-0.1")
    coverage = dyn.Coverage()
    assert dyn.check_dynamic(side, side, coverage=coverage) == []
    reached = {k.rsplit(": ", 1)[1] for k, n in coverage.ran.items() if n > 0}
    assert {"cpu", "serial", "pit", "clock", "irqchip"} <= reached


def test_a_malformed_description_names_the_section() -> None:
    frozen = json.loads(SCHEMA.read_text())
    frozen["serial"]["fields"][0]["type"] = "u7"
    with pytest.raises(VmferryError, match=r"section 'serial'.*unknown type 'u7'"):
        dyn.description_side(frozen, "bad.json")


@pytest.mark.parametrize(("args", "message"), [
    (["nofile.json", "build:vmferry-0.1"], "cannot read description nofile.json"),
    ([str(SCHEMA), "build:vmferry-7.7"], "unknown machine type"),
    ([str(SCHEMA), "build:vmferry-0.1", "--examples", "0"], "--examples must be at least 1"),
])
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vmferry", "check-compat", "--dynamic", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr

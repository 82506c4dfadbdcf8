"""Machine types as data: the generated docs/machine-types.md, `query-machines`, the alias, the
limits a type states, and the one stream feature a type gates (DEVICE_PROPERTIES, vmferry-0.2 on)
— sent only by the types that have it, and checked by the destination before any RAM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.devices.serial import SerialState
from vmferry.errors import VmferryError
from vmferry.machine import machine_doc
from vmferry.machine.machine import Machine
from vmferry.machine.machine_type import (
    DEFAULT_MACHINE_TYPE,
    MACHINE_TYPES,
    get_machine_type,
    query_machines,
)
from vmferry.stream import StreamDecoder, StreamEncoder, StreamHeader
from vmferry.stream.records import Command, CommandCode, Description, EndOfStream, RamPages, RamZero
from vmferry.vmstate import U8, VMState
from vmproc import VmProcess

DOC = Path(__file__).resolve().parents[1] / "docs" / "machine-types.md"


def test_the_machine_types_doc_is_the_generator_output() -> None:
    assert DOC.read_text() == machine_doc.render(), \
        "docs/machine-types.md is stale: run python -m vmferry.machine.machine_doc"


def test_the_doc_check_mode(tmp_path: Path) -> None:
    out = tmp_path / "machine-types.md"
    assert machine_doc.main(["--check", str(out)]) == 1
    assert machine_doc.main([str(out)]) == 0
    assert machine_doc.main(["--check", str(out)]) == 0


def test_the_doc_lists_every_type_what_it_pins_and_what_changed() -> None:
    text = machine_doc.render()
    for name, mt in MACHINE_TYPES.items():
        assert f"### `{name}`" in text
        for spec in mt.devices:
            assert f"`{spec.section.name}` | {spec.version} |" in text
    assert "property `lsr-overrun` `false` → `true`" in text
    assert "adds fields `rx_dropped`; subsections `serial/overrun`" in text
    assert "## Lifetime policy" in text


def test_query_machines_lists_every_type_with_one_default_and_the_alias_on_the_newest() -> None:
    infos = query_machines()
    assert [i["name"] for i in infos] == list(MACHINE_TYPES)
    assert [i["name"] for i in infos if i.get("is-default")] == [DEFAULT_MACHINE_TYPE]
    assert [(i["name"], i["alias"]) for i in infos if "alias" in i] == [(DEFAULT_MACHINE_TYPE, "vmferry")]
    assert all(i["deprecated"] is False and i["cpu-max"] >= 1 for i in infos)
    assert list(MACHINE_TYPES)[-1] == DEFAULT_MACHINE_TYPE  # the default is the newest


def test_the_alias_and_unknown_names() -> None:
    assert get_machine_type("vmferry") is get_machine_type(None) is get_machine_type(DEFAULT_MACHINE_TYPE)
    with pytest.raises(VmferryError, match=r"unknown machine type 'pc' \(known: vmferry-0.1, vmferry-0.2, "
                                           r"vmferry \(alias of vmferry-0.2\)\)"):
        get_machine_type("pc")


def test_more_vcpus_than_the_type_takes_are_refused_by_name() -> None:
    cpu_max = get_machine_type("vmferry-0.1").cpu_max
    with pytest.raises(VmferryError, match=f"--smp {cpu_max + 1}: machine type 'vmferry-0.1' takes at most "
                                           f"{cpu_max} vCPUs"):
        Machine("vmferry-0.1", memory=16 << 20, smp=cpu_max + 1)


def test_a_subsection_may_not_be_newer_than_its_section() -> None:
    sub = type("Sub", (VMState,), {"name": "x/sub", "since": 3, "__annotations__": {"y": U8}})
    with pytest.raises(TypeError, match="subsection 'x/sub' since=3 is not within 0..version 2"):
        type("X", (VMState,), {"name": "x", "version": 2, "subsections": (sub,),
                               "__annotations__": {"a": U8}})
    assert [s.name for s in SerialState.subsections_at(1)] == ["serial/fifo"]
    assert [s.name for s in SerialState.subsections_at(2)] == ["serial/fifo", "serial/overrun"]


# --- real processes ------------------------------------------------------------------------------


def _snapshot(tmp_path: Path, procs: list[VmProcess], machine: str) -> Path:
    p = VmProcess(tmp_path, f"src-{machine}", "-M", machine, "-m", "16M", "--guest", "heartbeat")
    procs.append(p)
    p.wait_serial(r"tick", timeout=60)
    snap = tmp_path / f"{machine}.snap"
    p.cmd("migrate", uri=f"file:{snap}")
    assert p.wait_migration(timeout=120)["status"] == "completed"
    p.close()
    return snap


def _records(snap: Path) -> list[object]:
    dec = StreamDecoder()
    dec.feed(snap.read_bytes())
    dec.feed_eof()
    return list(dec.records())


def _properties_commands(records: list[object]) -> list[Command]:
    return [r for r in records if isinstance(r, Command) and r.code == CommandCode.DEVICE_PROPERTIES]


@pytest.mark.kvm
def test_query_machines_over_qmp(tmp_path: Path, procs: list[VmProcess]) -> None:
    p = VmProcess(tmp_path, "vm", "-M", "vmferry", "-m", "16M", "--guest", "heartbeat", "-S")
    procs.append(p)
    assert p.cmd("query-machines") == query_machines()


@pytest.mark.kvm
def test_device_properties_are_sent_by_vmferry_0_2_only_after_the_description_before_any_ram(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    assert _properties_commands(_records(_snapshot(tmp_path, procs, "vmferry-0.1"))) == []
    records = _records(_snapshot(tmp_path, procs, "vmferry-0.2"))
    (cmd,) = _properties_commands(records)
    at = records.index(cmd)
    assert isinstance(records[at - 1], Description)
    assert not any(isinstance(r, RamPages | RamZero) for r in records[:at])
    assert json.loads(cmd.data) == get_machine_type("vmferry-0.2").device_properties()
    assert json.loads(cmd.data)["serial0"]["lsr-overrun"] is True


def _with_properties(records: list[object], properties: dict) -> bytes:
    """The stream re-encoded (checksums, digest and all) with another DEVICE_PROPERTIES."""
    header, *body = records
    assert isinstance(header, StreamHeader) and isinstance(body[-1], EndOfStream)
    enc = StreamEncoder(header.page_size, header.producer, header.machine_type)
    out = [enc.header()]
    for r in body[:-1]:
        if isinstance(r, Command) and r.code == CommandCode.DEVICE_PROPERTIES:
            r = Command(CommandCode.DEVICE_PROPERTIES, data=json.dumps(properties).encode())
        out.append(enc.encode(r))
    return b"".join(out) + enc.end()


@pytest.mark.kvm
def test_a_source_whose_device_properties_differ_is_refused_by_name_before_any_ram(
        tmp_path: Path, procs: list[VmProcess]) -> None:
    records = _records(_snapshot(tmp_path, procs, "vmferry-0.2"))
    props = get_machine_type("vmferry-0.2").device_properties()
    props["serial0"]["lsr-overrun"] = False  # a build whose vmferry-0.2 differs from ours
    tampered = tmp_path / "tampered.snap"
    tampered.write_bytes(_with_properties(records, props))
    dst = VmProcess(tmp_path, "dst", "-M", "vmferry-0.2", "-m", "16M", "--incoming", f"file:{tampered}")
    procs.append(dst)
    info = dst.wait_migration(timeout=60)
    assert info["status"] == "failed", info
    assert ("machine type 'vmferry-0.2': device 'serial0' property 'lsr-overrun' is false on the source "
            "but true here") in info.get("error-desc", ""), info
    ram = info.get("ram", {})
    assert ram.get("normal", 0) == 0 and ram.get("duplicate", 0) == 0, info
    assert dst.status() == "inmigrate"

    # The untouched stream loads on the same kind of destination (the refusal above is the property).
    good = tmp_path / "good.snap"
    good.write_bytes(_with_properties(records, get_machine_type("vmferry-0.2").device_properties()))
    ok = VmProcess(tmp_path, "ok", "-M", "vmferry-0.2", "-m", "16M", "--incoming", f"file:{good}")
    procs.append(ok)
    assert ok.wait_migration(timeout=60)["status"] == "completed"

"""check-compat: one test per kind of break, the compatible changes it must accept, the CLI, and
`vmferry describe` with the registry."""

from __future__ import annotations

import json
from typing import Any

from vmferry.cli import main
from vmferry.vmstate import (
    I16,
    U8,
    U16,
    U32,
    Array,
    Bits,
    Bytes,
    List,
    Pad,
    Struct,
    VarBytes,
    VMState,
    field,
    registry,
)
from vmferry.vmstate import compat as c
from vmferry.vmstate.describe import dumps, json_differences, schema_problems, write_schema
from vmferry.vmstate.testdev import register_testdev


def make(name: str, version: int = 1, minimum: int = 1, subsections=(), **fields: Any) -> type[VMState]:
    """A section class; a field given as (type, since) has a per-field version."""
    ns: dict[str, Any] = {"name": name, "version": version, "minimum_version": minimum,
                          "subsections": tuple(subsections), "__annotations__": {}}
    for fname, spec in fields.items():
        ftype, since = spec if isinstance(spec, tuple) else (spec, 0)
        ns["__annotations__"][fname] = ftype
        ns[fname] = field(since=since)
    return type(name, (VMState,), ns)


def machine(*classes: type[VMState]) -> dict[str, Any]:
    reg = registry.Registry()
    for cls in classes:
        reg.register("m", cls)
    return reg.describe("m")


def kinds(old: list[type[VMState]], new: list[type[VMState]]) -> list[tuple[str, str, str | None]]:
    return [(p.kind, p.section, p.field) for p in c.check_compat(machine(*old), machine(*new))]


BASE = make("serial", ier=U8, divisor=U16)


def test_identical_is_compatible():
    assert kinds([BASE], [BASE]) == []


def test_section_removed_and_rename_hint():
    problems = c.check_compat(machine(BASE), machine(make("uart", ier=U8, divisor=U16)))
    assert [(p.kind, p.section) for p in problems] == [(c.SECTION_REMOVED, "serial")]
    assert "renamed to 'uart'?" in str(problems[0])


def test_version_too_new():
    assert kinds([make("serial", 2, ier=U8, divisor=U16)], [BASE]) == [(c.VERSION_TOO_NEW, "serial", None)]


def test_minimum_version_raised():
    new = make("serial", 3, 2, ier=U8, divisor=U16, fcr=(U8, 3))
    assert kinds([BASE], [new]) == [(c.MINIMUM_RAISED, "serial", None)]


def test_field_removed_without_version_bump():
    assert kinds([BASE], [make("serial", ier=U8)]) == [(c.FIELD_REMOVED, "serial", "divisor")]


def test_field_version_raised_is_a_removal_at_the_old_version():
    new = make("serial", 2, ier=U8, divisor=(U16, 2))
    problems = c.check_compat(machine(BASE), machine(new))
    assert [(p.kind, p.field) for p in problems] == [(c.FIELD_REMOVED, "divisor")]
    assert "only from version 2" in problems[0].detail


def test_field_added_without_version_bump():
    new = make("serial", ier=U8, divisor=U16, fcr=U8)
    assert kinds([BASE], [new]) == [(c.FIELD_ADDED, "serial", "fcr")]


def test_field_added_with_a_version_bump_is_compatible():
    assert kinds([BASE], [make("serial", 2, ier=U8, divisor=U16, fcr=(U8, 2))]) == []


def test_field_resized():
    assert kinds([make("s", b=Bytes(4))], [make("s", b=Bytes(8))]) == [(c.FIELD_RESIZED, "s", "b")]
    assert kinds([make("s", a=Array(U8, 4))], [make("s", a=Array(U8, 5))]) == [(c.FIELD_RESIZED, "s", "a")]


def test_field_type_changed():
    new = make("serial", ier=U8, divisor=I16)
    assert kinds([BASE], [new]) == [(c.FIELD_TYPE_CHANGED, "serial", "divisor")]


def test_padding_became_a_field():
    assert kinds([make("s", x=Pad(1))], [make("s", x=U8)]) == [(c.FIELD_TYPE_CHANGED, "s", "x")]


def test_field_retired_as_padding_is_compatible():
    assert kinds([BASE], [make("serial", ier=U8, _unused=Pad(2))]) == []
    assert kinds([BASE], [make("serial", ier=U8, divisor=Pad(2))]) == []


def test_field_moved():
    assert kinds([BASE], [make("serial", divisor=U16, ier=U8)]) == [(c.FIELD_MOVED, "serial", "ier")]


def test_bits_changed():
    old = make("s", lcr=Bits(U8, {"a": 1, "b": 2}))
    new = make("s", lcr=Bits(U8, {"a": 2, "b": 1}))
    assert kinds([old], [new]) == [(c.BITS_CHANGED, "s", "lcr")]


def test_limit_lowered():
    small, large = make("s", v=VarBytes(max=16)), make("s", v=VarBytes(max=64))
    assert kinds([large], [small]) == [(c.LIMIT_LOWERED, "s", "v")]
    assert kinds([small], [large]) == []


def test_nested_field_change_names_its_path():
    old = make("blk", q=List(make("req", addr=U32), max=8), h=Struct(make("hdr", x=U8)))
    new = make("blk", q=List(make("req", addr=U16), max=8), h=Struct(make("hdr", x=U8)))
    assert kinds([old], [new]) == [(c.FIELD_TYPE_CHANGED, "blk", "q.addr")]


def test_subsection_removed():
    fifo = make("serial/fifo", fifo=Bytes(16))
    old = make("serial", subsections=[fifo], ier=U8, divisor=U16)
    assert kinds([old], [BASE]) == [(c.SUBSECTION_REMOVED, "serial", None)]


def test_subsection_added_breaks_only_the_backward_direction():
    # The old source never sends the new subsection, so OLD -> NEW is fine; NEW -> OLD may send
    # it to a destination that refuses it by name: that is the same check with arguments swapped.
    new = make("serial", subsections=[make("serial/fifo", fifo=Bytes(16))], ier=U8, divisor=U16)
    assert kinds([BASE], [new]) == []
    assert kinds([new], [BASE]) == [(c.SUBSECTION_REMOVED, "serial", None)]


def test_subsection_fields_are_compared_too():
    old = make("serial", subsections=[make("serial/fifo", fifo=Bytes(16))], ier=U8, divisor=U16)
    new = make("serial", subsections=[make("serial/fifo", fifo=Bytes(8))], ier=U8, divisor=U16)
    assert kinds([old], [new]) == [(c.FIELD_RESIZED, "serial/fifo", "fifo")]


def test_split_device_is_compatible_forward_only():
    reg = registry.Registry()
    register_testdev(reg)
    assert c.check_compat(reg.describe("testdev-1"), reg.describe("testdev-2")) == []
    backward = c.check_compat(reg.describe("testdev-2"), reg.describe("testdev-1"))
    assert sorted(p.section for p in backward) == ["testdev-back", "testdev-front"]


def test_cli_exit_codes(tmp_path, capsys):
    old, new, same = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "same.json"
    old.write_text(json.dumps(machine(BASE)))
    same.write_text(json.dumps(machine(BASE)))
    new.write_text(json.dumps(machine(make("serial", ier=U8, divisor=U32))))
    assert main(["check-compat", str(old), str(same)]) == 0
    assert main(["check-compat", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    line = "section 'serial', field 'divisor': type u16 -> u32 without a version bump [field-type-changed]"
    assert line in out.splitlines()
    assert main(["check-compat", str(old), str(tmp_path / "missing.json")]) == 1
    assert "cannot read description" in capsys.readouterr().err


def test_describe_prints_sorted_stable_json(capsys):
    assert main(["describe", "-M", "vmferry-0.1"]) == 0
    first = capsys.readouterr().out
    assert main(["describe", "--machine", "vmferry-0.1"]) == 0
    assert capsys.readouterr().out == first
    assert main(["describe", "-M", "vmferry-0.2"]) == 0
    newest = capsys.readouterr().out
    assert newest != first
    for alias in ([], ["-M", "vmferry"]):  # the newest is the default, and `vmferry` its alias
        assert main(["describe", *alias]) == 0
        assert capsys.readouterr().out == newest
    described = json.loads(first)
    assert list(described) == sorted(described)
    assert described["serial"]["fields"][0] == {
        "field": "ier", "field_exists": False, "size": 1, "type": "u8", "version_id": 0}


def test_a_load_only_section_is_described_as_such():
    reg = registry.Registry()
    register_testdev(reg)
    described = json.loads(dumps(reg.describe("testdev-2")))
    assert described["testdev"]["load_only"] is True
    assert described["testdev-front"]["fields"][0] == {
        "field": "a", "field_exists": False, "size": 4, "type": "u32", "version_id": 0}


def test_describe_names_an_unknown_machine_type(capsys):
    assert main(["describe", "-M", "nonesuch"]) == 1
    assert "unknown machine type 'nonesuch'" in capsys.readouterr().err


def test_schema_helper_flags_a_changed_release(tmp_path):
    reg = registry.Registry()
    register_testdev(reg)
    schema = tmp_path / "testdev-1.json"
    write_schema("testdev-1", schema, reg)
    assert schema_problems("testdev-1", schema, reg, newest="testdev-2") == []
    frozen = json.loads(schema.read_text())
    frozen["testdev"]["fields"][1]["size"] = 4  # as if the release had a u32 where code has u16
    schema.write_text(json.dumps(frozen))
    problems = schema_problems("testdev-1", schema, reg, newest="testdev-2")
    assert "testdev-1: $.testdev.fields[1].size: 4 -> 2" in problems
    assert any("field-resized" in p for p in problems)


def test_json_differences():
    assert json_differences({"a": [1, 2], "b": 1}, {"a": [1, 3, 4], "c": 1}) == [
        "$.a[1]: 2 -> 3", "$.a: length 2 -> 3", "$.b: removed", "$.c: added"]

"""`vmferry check-compat OLD NEW`: what would break a migration from OLD (the source) to NEW (the
destination), read from two `-dump-vmstate`-shaped descriptions (`vmferry describe` output, or
`build:MACHINE` for this build's own). `--dynamic` adds a pass that runs generated states through
both sides' code (vmstate/dynamic.py); this module is the static, declarations-only part.

The question asked of every section is the destination's: "given what the source sends at its
version, can I read it?" So the destination's fields are taken as they are at the *source's*
version, and compared with the source's field by field. Backward migration (NEW -> OLD) is the
same question with the arguments swapped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from vmferry.errors import VmferryError

SECTION_REMOVED = "section-removed"
VERSION_TOO_NEW = "version-too-new"
MINIMUM_RAISED = "minimum-version-raised"
SUBSECTION_REMOVED = "subsection-removed"
FIELD_REMOVED = "field-removed"
FIELD_ADDED = "field-added"
FIELD_MOVED = "field-moved"
FIELD_RESIZED = "field-resized"
FIELD_TYPE_CHANGED = "field-type-changed"
BITS_CHANGED = "bits-changed"
LIMIT_LOWERED = "limit-lowered"


@dataclasses.dataclass(frozen=True)
class Incompat:
    """One reason the destination would refuse (or misread) the source's stream."""

    kind: str
    section: str
    field: str | None
    detail: str

    def __str__(self) -> str:
        where = f"section '{self.section}'" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.detail} [{self.kind}]"


def check_compat(old: dict[str, Any], new: dict[str, Any]) -> list[Incompat]:
    """Every change between machine descriptions OLD (source) and NEW (destination) that breaks
    OLD -> NEW migration. A section description (with `fields`) is accepted as a one-section machine."""
    old_sections, new_sections = _sections(old), _sections(new)
    problems: list[Incompat] = []
    for name, o in old_sections.items():
        if o.get("load_only"):
            continue  # the source only reads this section, never sends it
        if name not in new_sections:
            problems.append(Incompat(SECTION_REMOVED, name, None,
                                     "the source sends this section; the destination has no such section"
                                     + _rename_hint(o, old_sections, new_sections)))
            continue
        _section(o, new_sections[name], name, problems)
    return problems


def _sections(d: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(d, dict):
        raise VmferryError("a description must be a JSON object")
    if "fields" in d:
        return {d["name"]: d}
    return {k: v for k, v in d.items() if k != "vmschkmachine" and isinstance(v, dict)}


def _rename_hint(o: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> str:
    shape = _shape(o.get("fields", []))
    for name, n in new.items():
        if name not in old and _shape(n.get("fields", [])) == shape:
            return f" (renamed to '{name}'? a rename needs a load_only section under the old name)"
    return ""


def _shape(fields: list[Any]) -> list[tuple[Any, ...]]:
    return [(f.get("field"), f.get("type"), f.get("size"), f.get("count")) for f in fields]


def _section(o: dict[str, Any], n: dict[str, Any], label: str, problems: list[Incompat]) -> None:
    ov, nv = o["version_id"], n["version_id"]
    if ov > nv:
        problems.append(Incompat(VERSION_TOO_NEW, label, None,
                                 f"the source sends version {ov}; the destination reads at most {nv}"))
        return
    if n["minimum_version_id"] > ov:
        problems.append(Incompat(MINIMUM_RAISED, label, None,
                                 f"the destination's minimum version {n['minimum_version_id']} is above "
                                 f"the version {ov} the source sends"))
        return
    _fields(o["fields"], n["fields"], ov, label, "", problems)
    new_subs = {s["name"]: s for s in n.get("subsections", [])}
    for sub in o.get("subsections", []):
        if sub["name"] not in new_subs:
            problems.append(Incompat(SUBSECTION_REMOVED, label, None,
                                     f"subsection '{sub['name']}' may be sent (its needed() may be true); "
                                     "the destination does not know it and would refuse the stream"))
        else:
            _section(sub, new_subs[sub["name"]], sub["name"], problems)


def _fields(old: list[dict[str, Any]], new_all: list[dict[str, Any]], ov: int, label: str, path: str,
            problems: list[Incompat]) -> None:
    sent = [f for f in old if f["version_id"] <= ov]
    read = [f for f in new_all if f["version_id"] <= ov]
    sent_names = [f["field"] for f in sent]
    read_names = [f["field"] for f in read]
    later = {f["field"]: f["version_id"] for f in new_all if f["version_id"] > ov}

    def add(kind: str, name: str, detail: str) -> None:
        problems.append(Incompat(kind, label, path + name, detail))

    for i, f in enumerate(sent):
        name = f["field"]
        if name in read_names:
            _field(f, read[read_names.index(name)], ov, label, path, problems)
        elif _retired_in_place(f, read, i, sent_names):
            continue
        elif name in later:
            add(FIELD_REMOVED, name, f"sent at version {ov}, but the destination reads it only from version "
                                     f"{later[name]} (its version_id was raised)")
        else:
            add(FIELD_REMOVED, name, f"sent at version {ov}; the destination does not read it "
                                     "(removed without a version bump; retire it as padding instead)")
    for j, f in enumerate(read):
        name = f["field"]
        if name not in sent_names and not _retired_in_place(f, sent, j, read_names):
            what = "padding" if f.get("pad") else "field"
            add(FIELD_ADDED, name, f"the destination reads this {what} at version {ov} but the source does "
                                   f"not send it (a new field needs version_id {ov + 1}, a version bump)")
    common = [n for n in sent_names if n in read_names]
    order = [n for n in read_names if n in sent_names]
    for a, b in zip(common, order, strict=True):
        if a != b:
            add(FIELD_MOVED, a, "fields are in a different order on the destination")
            break


def _retired_in_place(f: dict[str, Any], other: list[dict[str, Any]], i: int, own_names: list[str]) -> bool:
    """A field replaced by padding of the same size (or the reverse) at the same position, under
    another name: the bytes line up, so it is the sanctioned way to retire a field."""
    if i >= len(other) or other[i]["field"] in own_names:
        return False
    o = other[i]
    return bool(f.get("pad") or o.get("pad")) and _nbytes(f) is not None and _nbytes(f) == _nbytes(o)


def _nbytes(f: dict[str, Any]) -> int | None:
    size = f.get("size")
    return None if size is None else size * f.get("count", 1)


def _field(o: dict[str, Any], n: dict[str, Any], ov: int, label: str, path: str,
           problems: list[Incompat]) -> None:
    name = o["field"]

    def add(kind: str, detail: str) -> None:
        problems.append(Incompat(kind, label, path + name, detail))

    if n.get("pad") and _nbytes(o) is not None and _nbytes(o) == _nbytes(n):
        return  # retired to padding of the same size under the same name
    if o["type"] != n["type"] or bool(o.get("pad")) != bool(n.get("pad")):
        add(FIELD_TYPE_CHANGED, f"type {_type(o)} -> {_type(n)} without a version bump")
        return
    if o.get("count") != n.get("count"):
        add(FIELD_RESIZED, f"array length {o.get('count')} -> {n.get('count')} without a version bump")
    elif o.get("size") != n.get("size"):
        add(FIELD_RESIZED, f"size {o.get('size')} -> {n.get('size')} bytes without a version bump")
    if o.get("bits") != n.get("bits"):
        add(BITS_CHANGED, f"bitfield layout {_bits(o)} -> {_bits(n)}")
    if "max" in o and "max" in n and n["max"] < o["max"]:
        add(LIMIT_LOWERED, f"max {o['max']} -> {n['max']}: the source may send more than the destination "
                           "accepts")
    if "Description" in o and "Description" in n:
        _fields(o["Description"]["fields"], n["Description"]["fields"], ov, label, f"{path}{name}.", problems)


def _type(f: dict[str, Any]) -> str:
    return "padding" if f.get("pad") else str(f["type"])


def _bits(f: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{b['name']}:{b['width']}" for b in f.get("bits") or []) + "}"


BUILD_PREFIX = "build:"


def main_check_compat(args: argparse.Namespace) -> int:
    """Static check OLD -> NEW (and NEW -> OLD with --both-directions); with --dynamic, the same
    directions again through generated states (vmstate/dynamic.py). Exit 1 if anything breaks."""
    if args.examples < 1:
        raise VmferryError(f"--examples must be at least 1, not {args.examples}")
    pairs = [(args.old, args.new)] + ([(args.new, args.old)] if args.both_directions else [])
    lines: list[str] = []
    for src, dst in pairs:
        try:
            lines += [str(p) for p in check_compat(_read(src), _read(dst))]
        except (KeyError, TypeError, AttributeError) as e:
            raise VmferryError(f"malformed description: {e!r}") from None
    coverage = None
    if args.dynamic:
        from vmferry.vmstate import dynamic

        coverage = dynamic.Coverage()
        for src, dst in pairs:
            lines += [str(f) for f in dynamic.check_dynamic(_side(src), _side(dst), examples=args.examples,
                                                            seed=args.seed, coverage=coverage)]
    for line in lines:
        print(line)
    if not lines:
        both = " and back" if args.both_directions else ""
        print(f"compatible: a stream from {args.old} loads on {args.new}{both}")
    if coverage is not None:
        print(f"dynamic: {coverage}")
    return 1 if lines else 0


def _side(spec: str) -> Any:
    from vmferry.vmstate import dynamic

    if spec.startswith(BUILD_PREFIX):
        return dynamic.build_side(spec.removeprefix(BUILD_PREFIX))
    return dynamic.description_side(_read(spec), spec)


def _read(path: str) -> dict[str, Any]:
    """A description file, or `build:MACHINE`: this build's description of that machine type."""
    if path.startswith(BUILD_PREFIX):
        from vmferry.machine.machine_type import get_machine_type, section_registry

        # get_machine_type: `build:vmferry` is the newest (the alias), as `-M vmferry`.
        return section_registry().describe(get_machine_type(path.removeprefix(BUILD_PREFIX)).name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise VmferryError(f"cannot read description {path}: {e}") from None

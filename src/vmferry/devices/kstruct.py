"""Between KVM's ctypes structs (`vmferry.kvm.structs`) and vmstate values, by field name.

A device whose state lives in the kernel declares it as a VMState whose field names are the
header's member names; these two functions then copy values across. Members the VMState does not
declare (the header's `pad`/`reserved` words) are not migrated: reading leaves them out, writing
leaves them at the zero a fresh struct has, which is what KVM expects of them.

`List` fields are not handled here: a counted list's count lives in another member (`nmsrs`,
`nent`, `nr_xcrs`), so the device module converts those itself.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from vmferry.vmstate import Array, Bytes, FieldType, Struct, VMState


def to_values(obj: ctypes.Structure, state: type[VMState]) -> dict[str, Any]:
    """The values of `state`'s fields, read from the members of the same names in `obj`."""
    return _compiled(type(obj), state)[0](obj)


def fill(obj: ctypes.Structure, state: type[VMState], values: dict[str, Any]) -> None:
    """Write `values` (decoded for `state`) into the members of the same names in `obj`."""
    _compiled(type(obj), state)[1](obj, values)


def warm(ctype: type, state: type[VMState]) -> None:
    """Build the copiers of `ctype` <-> `state`, nested structures included, ahead of use."""
    obj = ctype()
    fill(obj, state, to_values(obj, state))


def read_fields(obj: ctypes.Structure, state: type[VMState]) -> dict[str, Any]:
    """`to_values` one field at a time: the reference the compiled copier must equal."""
    return {f.name: _read(obj, f.attr, f.type) for f in state.fields if f.type.carries_value}


def write_fields(obj: ctypes.Structure, state: type[VMState], values: dict[str, Any]) -> None:
    """`fill` one field at a time: the reference the compiled copier must equal."""
    for f in state.fields:
        if f.type.carries_value:
            _write(obj, f.attr, f.type, values[f.name])


# A vCPU's state is ~850 members; copying them through `_read`/`_write` (an isinstance chain per
# member) took milliseconds of the downtime. Per (ctypes struct, VMState) pair the same copy is
# generated once as straight-line Python.
_Copier = tuple[Callable[[Any], dict[str, Any]], Callable[[Any, dict[str, Any]], None]]
_copiers: dict[tuple[type, type], _Copier] = {}


def _compiled(ctype: type, state: type[VMState]) -> _Copier:
    found = _copiers.get((ctype, state))
    if found is None:
        found = _copiers[(ctype, state)] = _build_copier(ctype, state)
    return found


def _build_copier(ctype: type, state: type[VMState]) -> _Copier:
    env: dict[str, Any] = {"_to_values": to_values, "_fill": fill, "_mv": memoryview}
    reads, writes = [], ["mv = _mv(o).cast('B')"]
    for i, f in enumerate(state.fields):
        if not f.type.carries_value:
            continue
        t, member, key = f.type, f"o.{f.attr}", repr(f.name)
        env[f"_c{i}"] = getattr(t, "cls", None) or getattr(getattr(t, "elem", None), "cls", None)
        if isinstance(t, Bytes):
            off = getattr(ctype, f.attr).offset
            reads.append(f"{key}: bytes(mv[{off}:{off + t.nbytes}])")
            writes.append(f"mv[{off}:{off + t.nbytes}] = v[{key}]")
        elif isinstance(t, Struct):
            reads.append(f"{key}: _to_values({member}, _c{i})")
            writes.append(f"_fill({member}, _c{i}, v[{key}])")
        elif isinstance(t, Array) and isinstance(t.elem, Struct):
            reads.append(f"{key}: [_to_values(e, _c{i}) for e in {member}]")
            writes.append(f"for e, x in zip({member}, v[{key}]): _fill(e, _c{i}, x)")
        elif isinstance(t, Array):
            reads.append(f"{key}: list({member})")
            writes.append(f"a = {member}\n    for j, x in enumerate(v[{key}]): a[j] = x")
        else:
            reads.append(f"{key}: int({member})")
            writes.append(f"{member} = v[{key}]")
    if any("mv[" in r for r in reads):
        read_src = "def read(o):\n    mv = _mv(o).cast('B')\n    return {" + ", ".join(reads) + "}\n"
    else:
        read_src = "def read(o):\n    return {" + ", ".join(reads) + "}\n"
    write_src = "def write(o, v):\n    " + "\n    ".join(writes) + "\n"
    exec(read_src + write_src, env)  # noqa: S102 - generated above from our own declarations
    return env["read"], env["write"]


def _member_bytes(obj: ctypes.Structure, attr: str, nbytes: int) -> memoryview:
    # Raw memory of the member, not getattr(): a c_char array reads back cut at its first NUL
    # (the LAPIC page is full of zeros). The view lives as long as `obj`.
    offset = getattr(type(obj), attr).offset
    return memoryview(obj).cast("B")[offset : offset + nbytes]


def _read(obj: ctypes.Structure, attr: str, t: FieldType) -> Any:
    if isinstance(t, Bytes):
        return bytes(_member_bytes(obj, attr, t.nbytes))
    value = getattr(obj, attr)
    if isinstance(t, Struct):
        return to_values(value, t.cls)
    if isinstance(t, Array):
        if isinstance(t.elem, Struct):
            return [to_values(v, t.elem.cls) for v in value]
        return list(value)
    return int(value)


def _write(obj: ctypes.Structure, attr: str, t: FieldType, value: Any) -> None:
    if isinstance(t, Bytes):
        _member_bytes(obj, attr, t.nbytes)[:] = value
    elif isinstance(t, Struct):
        fill(getattr(obj, attr), t.cls, value)
    elif isinstance(t, Array):
        arr = getattr(obj, attr)
        for i, v in enumerate(value):
            if isinstance(t.elem, Struct):
                fill(arr[i], t.elem.cls, v)
            else:
                arr[i] = v
    else:
        setattr(obj, attr, value)

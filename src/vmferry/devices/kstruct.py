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
from typing import Any

from vmferry.vmstate import Array, Bytes, FieldType, Struct, VMState


def to_values(obj: ctypes.Structure, state: type[VMState]) -> dict[str, Any]:
    """The values of `state`'s fields, read from the members of the same names in `obj`."""
    return {f.name: _read(obj, f.attr, f.type) for f in state.fields if f.type.carries_value}


def fill(obj: ctypes.Structure, state: type[VMState], values: dict[str, Any]) -> None:
    """Write `values` (decoded for `state`) into the members of the same names in `obj`."""
    for f in state.fields:
        if f.type.carries_value:
            _write(obj, f.attr, f.type, values[f.name])


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

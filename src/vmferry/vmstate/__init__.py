"""Declarative device state: field types, versioned sections with subsections and hooks, their
wire encoding, JSON descriptions, and the compatibility checker. Rules: docs/vmstate.md."""

from vmferry.vmstate.compound import Array, Bits, List, Struct
from vmferry.vmstate.fields import (
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    Bytes,
    Field,
    FieldType,
    Pad,
    Str,
    VarBytes,
    field,
)
from vmferry.vmstate.state import Section, VMState

__all__ = [
    "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64",
    "Array", "Bits", "Bool", "Bytes", "Field", "FieldType", "List", "Pad", "Section", "Str",
    "Struct", "VMState", "VarBytes", "field",
]

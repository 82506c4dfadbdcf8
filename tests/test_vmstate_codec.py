"""VMState: field types on the wire, version skew, subsections, hooks, all-or-nothing load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmferry.errors import StateLoadError
from vmferry.vmstate import (
    I32,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bits,
    Bool,
    Bytes,
    List,
    Pad,
    Section,
    Str,
    Struct,
    VarBytes,
    VMState,
    field,
)

LCR = Bits(U8, {"enable": 1, "mode": 3})


class SerialFifo(VMState):
    name = "serial/fifo"
    fifo: VarBytes(max=16)

    @classmethod
    def needed(cls, obj):
        return len(obj.fifo) > 0


class SerialState(VMState):
    name = "serial"
    version = 3
    minimum_version = 2
    ier: U8
    lcr: LCR
    divisor: U16
    fcr: U8 = field(since=3, default=0xC1)
    subsections = (SerialFifo,)


def serial(**kw):
    dev = SimpleNamespace(ier=1, lcr={"enable": 1, "mode": 5}, divisor=0x0C, fcr=7, fifo=b"")
    vars(dev).update(kw)
    return dev


def test_payload_layout_is_the_documented_one():
    payload = SerialState.save(serial(fifo=b"hi"))
    assert payload.hex() == (
        "01"          # ier u8
        "0b"          # lcr: enable=1 in bit 0, mode=5 in bits 1-3
        "0c00"        # divisor u16 LE
        "07"          # fcr (since 3)
        "0100"        # one subsection present
        "0000"        # its index in the description's subsection list
        "08000000"    # its body length
        "02000000" "6869"  # its field fifo: u32 length + bytes
        "0000"        # its own subsection block: none
    )


def test_round_trip_through_a_device():
    payload = SerialState.save(serial(fifo=b"abc"))
    dst = serial(ier=0, lcr={"enable": 0, "mode": 0}, divisor=0, fcr=0, fifo=b"")
    SerialState.load(dst, payload)
    assert vars(dst) == vars(serial(fifo=b"abc"))


def test_subsection_not_needed_is_not_sent():
    assert SerialState.save(serial()).endswith(b"\x00\x00")
    assert SerialState.decode(SerialState.save(serial())).subsections == {}


def test_old_stream_new_code_gives_defaults():
    sec = SerialState.decode(SerialState.save(serial(), version=2), version=2)
    assert sec.version == 2 and sec.fields["fcr"] == 0xC1


def test_stream_below_minimum_version_is_refused_naming_the_section():
    with pytest.raises(StateLoadError, match="older than the minimum") as e:
        SerialState.decode(b"\x01\x00\x00\x00\x00\x00", version=1)
    assert e.value.section == "serial"


def test_stream_above_known_version_is_refused_naming_both_versions():
    newer = SerialState.stream_description() | {"version": 4}
    with pytest.raises(StateLoadError, match=r"version 4.*2\.\.3") as e:
        SerialState.decode(SerialState.save(serial()), description=newer)
    assert e.value.section == "serial"


def test_unknown_subsection_is_refused_by_name():
    class Plain(VMState):
        name = "serial"
        version = 3
        minimum_version = 2
        ier: U8
        lcr: LCR
        divisor: U16
        fcr: U8 = field(since=3)

    with pytest.raises(StateLoadError, match="unknown subsection 'serial/fifo'") as e:
        Plain.decode(SerialState.save(serial(fifo=b"x")), description=SerialState.stream_description())
    assert e.value.section == "serial"
    # Described but not sent is fine: there is nothing to lose.
    Plain.decode(SerialState.save(serial()), description=SerialState.stream_description())


def test_sender_layout_that_differs_is_refused_naming_the_field():
    theirs = SerialState.stream_description()
    theirs["fields"][2] = {"name": "divisor", "type": "u32"}
    with pytest.raises(StateLoadError, match="type is 'u16' here, 'u32'") as e:
        SerialState.decode(SerialState.save(serial()), description=theirs)
    assert (e.value.section, e.value.field) == ("serial", "divisor")


def test_padding_of_ours_accepts_a_retired_field_of_the_same_size():
    class Retired(VMState):
        name = "r"
        a: U8
        _was_b: Pad(4)

    class Live(VMState):
        name = "r"
        a: U8
        b: U32

    payload = Live.encode(Section("r", 1, {"a": 1, "b": 99}))
    assert Retired.decode(payload, description=Live.stream_description()).fields == {"a": 1}


def test_bad_bytes_raise_state_load_error_with_the_field():
    cases = [
        (SerialState.save(serial())[:3], "divisor", "truncated"),
        (b"\x01\x81\x0c\x00\x07\x00\x00", "lcr", "reserved bits"),
        (SerialState.save(serial()) + b"\x00", None, "left over"),
    ]
    for payload, fld, reason in cases:
        with pytest.raises(StateLoadError, match=reason) as e:
            SerialState.decode(payload)
        assert e.value.field == fld


def test_scalar_corruption_is_named():
    class S(VMState):
        name = "s"
        flag: Bool
        text: Str(max=8)
        blob: VarBytes(max=4)

    with pytest.raises(StateLoadError, match="bool byte is 2"):
        S.decode(b"\x02")
    with pytest.raises(StateLoadError, match="not UTF-8") as e:
        S.decode(b"\x00\x01\x00\x00\x00\xff")
    assert e.value.field == "text"
    with pytest.raises(StateLoadError, match="exceeds the field's max 4"):
        S.decode(b"\x00\x00\x00\x00\x00" + b"\xff\xff\xff\xff")


class Req(VMState):
    name = "req"
    version = 2
    addr: U64
    nbytes: U32
    flags: U8 = field(since=2, default=0)


class Request:
    def __init__(self, addr, nbytes, flags):
        self.addr, self.nbytes, self.flags = addr, nbytes, flags


class ObjReq(Req):
    @classmethod
    def build(cls, values):
        return Request(**values)


class BlkState(VMState):
    name = "blk"
    version = 2
    queue: List(ObjReq, max=4)
    head: Struct(Req)
    regs: Array(I32, 3)
    _pad: Pad(3)
    serial: Bytes(4)


def test_lists_of_objects_and_nested_structs():
    dev = SimpleNamespace(queue=[Request(0x1000, 512, 1), Request(0x2000, 4096, 0)],
                          head={"addr": 7, "nbytes": 8, "flags": 1}, regs=[-1, 0, 2**31 - 1],
                          serial=b"abcd")
    payload = BlkState.save(dev)
    dst = SimpleNamespace()
    BlkState.load(dst, payload)
    assert [vars(r) for r in dst.queue] == [vars(r) for r in dev.queue]
    assert dst.head == dev.head and dst.regs == dev.regs and dst.serial == b"abcd"
    assert not hasattr(dst, "_pad")
    # A nested structure's `since` counts in the section's versions: a v1 stream has no flags.
    v1 = BlkState.decode(BlkState.save(dev, version=1), version=1)
    assert [r["flags"] for r in v1.fields["queue"]] == [0, 0]


def test_list_count_beyond_max_or_payload_is_refused_before_allocating():
    with pytest.raises(StateLoadError, match="exceeds the field's max 4") as e:
        BlkState.decode(b"\x05\x00\x00\x00")
    assert e.value.field == "queue"

    class Many(VMState):
        name = "many"
        q: List(Req, max=2**32 - 1)

    with pytest.raises(StateLoadError, match="cannot fit"):
        Many.decode(b"\xff\xff\xff\xff")


def test_saving_bad_values_names_the_field():
    with pytest.raises(ValueError, match="'divisor'.*does not fit in u16"):
        SerialState.save(serial(divisor=70000))
    with pytest.raises(ValueError, match="lcr.mode"):
        SerialState.save(serial(lcr={"enable": 0, "mode": 8}))


class Recorder(VMState):
    name = "rec"
    x: U8
    y: U8

    @classmethod
    def validate(cls, values, version):
        if values["y"] == 0xFF:
            raise StateLoadError("y is 0xff", section=cls.name, field="y")

    @classmethod
    def pre_load(cls, obj):
        obj.log.append("pre_load")

    @classmethod
    def post_load(cls, obj, version):
        obj.log.append(f"post_load v{version}")


class RecorderSub(VMState):
    name = "rec/sub"
    z: Bool

    @classmethod
    def post_load(cls, obj, version):
        obj.log.append("sub post_load")


class RecorderWithSub(Recorder):
    subsections = (RecorderSub,)


def test_hooks_run_in_order_after_everything_is_decoded():
    dev = SimpleNamespace(x=1, y=2, z=True, log=[])
    payload = RecorderWithSub.save(dev)
    dst = SimpleNamespace(x=0, y=0, z=False, log=[])
    RecorderWithSub.load(dst, payload)
    assert dst.log == ["pre_load", "sub post_load", "post_load v1"]
    assert (dst.x, dst.y, dst.z) == (1, 2, True)


@pytest.mark.parametrize("how", ["validate", "bad subsection", "truncated subsection"])
def test_a_failing_section_leaves_the_device_untouched(how):
    good = RecorderWithSub.save(SimpleNamespace(x=1, y=2, z=True, log=[]))
    payload = {
        "validate": RecorderWithSub.save(SimpleNamespace(x=1, y=0xFF, z=True, log=[])),
        "bad subsection": good[:-1] + b"\x07",  # the subsection's bool byte
        "truncated subsection": good[:-1],
    }[how]
    dst = SimpleNamespace(x=9, y=9, z=False, log=[])
    with pytest.raises(StateLoadError):
        RecorderWithSub.load(dst, payload)
    assert vars(dst) == {"x": 9, "y": 9, "z": False, "log": []}


def test_field_attr_binds_to_another_attribute():
    class A(VMState):
        name = "a"
        ier: U8 = field(attr="_ier")

    dst = SimpleNamespace()
    A.load(dst, A.save(SimpleNamespace(_ier=5)))
    assert dst._ier == 5


def test_declaration_mistakes_are_caught_at_class_definition():
    with pytest.raises(TypeError, match="since=3"):
        type("A", (VMState,), {"name": "a", "__annotations__": {"x": U8}, "x": field(since=3)})
    with pytest.raises(TypeError, match="reserved"):
        type("A", (VMState,), {"name": "a", "__annotations__": {"version": U8}})
    with pytest.raises(TypeError, match="bad default"):
        type("A", (VMState,), {"name": "a", "__annotations__": {"x": U8}, "x": 300})
    with pytest.raises(TypeError, match="subsections"):
        Struct(SerialState)
    with pytest.raises(TypeError, match="minimum_version"):
        type("A", (VMState,), {"name": "a", "version": 1, "minimum_version": 2})


class Empty(VMState):
    name = "empty"
    nothing: Array(U8, 0)


class ThreeEmpties(VMState):
    name = "three"
    items: Array(Struct(Empty), 3)
    tail: U16


def test_generic_bound_counts_an_empty_array_as_zero_bytes():
    # Regression: the description-driven decoder's "can N elements fit?" check took a
    # zero-length array for one element and refused a valid payload.
    from vmferry.stream.sections import decode_section

    payload = ThreeEmpties.encode(Section("three", 1, {"items": [{"nothing": []}] * 3, "tail": 7}))
    decoded = decode_section(ThreeEmpties.stream_description(), payload)
    assert decoded.fields == {"items": [{"nothing": []}] * 3, "tail": 7}

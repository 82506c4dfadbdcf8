"""MachineDeviceState on real KVM: a running heartbeat guest's device state, saved through the
vmstate descriptions and loaded into a second machine, keeps the guest ticking where it stopped;
a corrupted, unknown, missing or mis-versioned section is refused before anything is applied."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from polling import ticks, wait_for
from vmferry.devices.cpu import CpuState, VcpuDevice, save_vcpu, state_values
from vmferry.devices.state import MachineDeviceState
from vmferry.errors import StateLoadError
from vmferry.machine.machine import Machine
from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.records import Description, SectionInfo
from vmferry.stream.sections import decode_section
from vmferry.vmm import guest_image

MiB = 1 << 20
pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Path]]:
    """A heartbeat guest that ran a while and is now paused (and stays paused)."""
    out = tmp_path_factory.mktemp("src") / "serial"
    with Machine(memory=32 * MiB, serial=f"file:{out}") as m:
        m.load_kernel(guest_image("heartbeat"), "hz=100")
        m.start()
        wait_for(lambda: len(ticks(out)) >= 3, "source ticks")
        time.sleep(0.5)
        m.pause()
        yield m, out


def copy_ram(src: Machine, dst: Machine) -> None:
    for a, b in zip(src.ram_blocks, dst.ram_blocks, strict=True):
        b.view()[:] = a.view()


def wire(desc: Description) -> Description:
    """The description as a destination receives it: through the stream encoder and decoder."""
    enc = StreamEncoder(machine_type="vmferry-0.1")
    dec = StreamDecoder()
    dec.feed(enc.header() + enc.encode(desc))
    recs = list(dec.records())
    (got,) = [r for r in recs if isinstance(r, Description)]
    return got


def test_description_lists_every_section_with_ids_and_instances(source: tuple[Machine, Path]) -> None:
    m, _ = source
    desc = MachineDeviceState(m).description()
    assert [(s.id, s.name, s.instance) for s in desc.sections] == [
        (1, "cpu", 0), (2, "irqchip", 0), (3, "pit", 0), (4, "clock", 0), (5, "serial", 0),
        (6, "debug-exit", 0),
    ]
    assert all(s.schema["id"] == s.id and s.schema["instance"] == s.instance for s in desc.sections)


def test_heartbeat_continues_on_a_second_machine(source: tuple[Machine, Path], tmp_path: Path) -> None:
    src, src_out = source
    saver = MachineDeviceState(src)
    desc, payloads = wire(saver.description()), saver.save()
    last = ticks(src_out)[-1]
    dst_out = tmp_path / "dst"
    with Machine(memory=32 * MiB, serial=f"file:{dst_out}") as dst:
        copy_ram(src, dst)
        loader = MachineDeviceState(dst)
        loader.check_description(desc)
        for sid, payload in payloads:
            loader.stage(sid, payload)
        loader.apply()
        assert [(s["name"], s["version"]) for s in loader.summary()["sections"]] == [
            ("cpu", 1), ("irqchip", 1), ("pit", 1), ("clock", 1), ("serial", 2), ("debug-exit", 1)]
        dst.start()
        wait_for(lambda: ticks(dst_out) and ticks(dst_out)[-1] > last + 3, "destination ticks")
        dst.pause()
    # The destination's output continues the source's byte for byte: nothing repeated, nothing
    # skipped. (Read together: the source may have paused in the middle of a line, which the
    # destination then finishes, so the destination's own first whole tick may be last + 2.)
    both = ticks(src_out, dst_out)
    assert both == list(range(both[0], both[0] + len(both)))
    assert both[-1] > last + 3


def test_vcpu_section_restores_exactly_into_another_machine(source: tuple[Machine, Path]) -> None:
    src, _ = source
    payload = CpuState.save(VcpuDevice(src.vcpus[0], src.msr_indices))
    with Machine(memory=32 * MiB) as dst:
        CpuState.load(VcpuDevice(dst.vcpus[0], dst.msr_indices), payload)
        before = save_vcpu(src.vcpus[0], src.msr_indices)
        after = save_vcpu(dst.vcpus[0], dst.msr_indices)
    for name in before:
        if name != "msrs":
            assert after[name] == before[name], name
    # The guest TSC cannot be set on this host (KVM-FACTS.md): every MSR but IA32_TSC matches.
    msrs_before = {m["index"]: m["data"] for m in state_values(before)["msrs"]}
    msrs_after = {m["index"]: m["data"] for m in state_values(after)["msrs"]}
    assert msrs_before.keys() == msrs_after.keys() == set(src.msr_indices)
    IA32_TSC = 0x10
    assert {i: d for i, d in msrs_after.items() if i != IA32_TSC} == {
        i: d for i, d in msrs_before.items() if i != IA32_TSC}


def test_every_section_round_trips_through_encode_and_decode(source: tuple[Machine, Path]) -> None:
    src, _ = source
    saver = MachineDeviceState(src)
    desc = saver.description()
    saved = saver.save()
    assert [sid for sid, _ in saved] == [s.id for s in desc.sections]
    for info in desc.sections:
        slot = saver._by_key[(info.name, info.instance)]
        # One capture, encoded once: the guest TSC keeps moving between two captures.
        captured = slot.cls.snapshot(slot.target, slot.version)
        payload = slot.cls.encode(captured)
        decoded = slot.cls.decode(payload, description=dict(info.schema))
        assert decoded == captured, info.name
        # The stream's own reader, which knows no classes, reads the same values.
        generic = decode_section(info.schema, payload).to_json()
        assert generic["fields"] == decoded.to_json()["fields"], info.name


def test_corrupted_vcpu_section_is_refused_and_touches_nothing(source: tuple[Machine, Path]) -> None:
    src, _ = source
    saver = MachineDeviceState(src)
    desc, payloads = saver.description(), dict(saver.save())
    bad = bytearray(payloads[1])
    bad[3] ^= 0xFF  # the high byte of the CPUID list's u32 count: now far beyond its max
    # cpuid (u32 count + 28 B each), regs (18 x u64), then cs: base u64, limit u32, selector u16,
    # type u8, present u8.
    cs_present = 4 + 28 * len(CpuState.decode(payloads[1]).fields["cpuid"]) + 18 * 8 + 15
    odd = bytearray(payloads[1])
    odd[cs_present] = 0xFE  # a boolean byte of the CS descriptor that is neither 0 nor 1
    with Machine(memory=32 * MiB) as dst:
        regs_before = bytes(dst.vcpus[0].get_regs())
        loader = MachineDeviceState(dst)
        loader.check_description(desc)
        with pytest.raises(StateLoadError, match="section 'cpu', field 'cpuid': list count") as e:
            loader.stage(1, bytes(bad))
        assert e.value.section == "cpu"
        with pytest.raises(StateLoadError, match=r"section 'cpu', field 'sregs\.cs\.present': 254"):
            loader.stage(1, bytes(odd))
        truncated = payloads[1][:-1]
        with pytest.raises(StateLoadError, match="section 'cpu'.*truncated"):
            loader.stage(1, truncated)
        for sid, payload in payloads.items():
            if sid != 1:
                loader.stage(sid, payload)
        with pytest.raises(StateLoadError, match=r"section 'cpu': .*missing: cpu\[0\]"):
            loader.apply()
        assert bytes(dst.vcpus[0].get_regs()) == regs_before


def test_unknown_section_in_the_description_is_refused_by_name(source: tuple[Machine, Path]) -> None:
    src, _ = source
    desc = MachineDeviceState(src).description()
    extra = SectionInfo(7, "virtio-gpu", 0, 1, {"id": 7, "name": "virtio-gpu", "instance": 0, "version": 1,
                                                  "fields": [], "subsections": []})
    with Machine(memory=32 * MiB) as dst:
        loader = MachineDeviceState(dst)
        with pytest.raises(StateLoadError, match="section 'virtio-gpu': unknown section"):
            loader.check_description(Description((*desc.sections, extra)))


def test_versions_and_instances_outside_this_machine_are_refused(source: tuple[Machine, Path]) -> None:
    src, _ = source
    desc = MachineDeviceState(src).description()
    serial = next(s for s in desc.sections if s.name == "serial")
    newer = SectionInfo(serial.id, "serial", 0, 9, {**serial.schema, "version": 9})
    cpu1 = SectionInfo(9, "cpu", 1, 1, {**desc.sections[0].schema, "id": 9, "instance": 1})
    with Machine(memory=32 * MiB) as dst:
        with pytest.raises(StateLoadError, match=r"section 'serial': the stream has version 9; .* 1\.\.2"):
            MachineDeviceState(dst).check_description(Description((newer,)))
        with pytest.raises(StateLoadError, match=r"section 'cpu': instance 1 does not exist"):
            MachineDeviceState(dst).check_description(Description((cpu1,)))


def test_msr_unknown_to_this_host_is_refused_at_stage(source: tuple[Machine, Path]) -> None:
    src, _ = source
    saver = MachineDeviceState(src)
    values = CpuState.snapshot(VcpuDevice(src.vcpus[0], src.msr_indices))
    values.fields["msrs"][0]["index"] = 0x4B564DFF  # past KVM's paravirtual MSR range
    with Machine(memory=32 * MiB) as dst:
        loader = MachineDeviceState(dst)
        loader.check_description(saver.description())
        with pytest.raises(StateLoadError, match=r"section 'cpu', field 'msrs\[0\]\.index'"):
            loader.stage(1, CpuState.encode(values))


def test_pending_serial_input_travels_in_its_subsection(source: tuple[Machine, Path]) -> None:
    src, _ = source
    serial = src.devices["serial0"]
    saver = MachineDeviceState(src)
    slot = saver._by_key[("serial", 0)]
    idle = slot.cls.snapshot(serial)
    assert idle.subsections == {}  # an idle UART sends no FIFO
    # Input that arrived before the pause (the paused machine's UART holds new input back).
    serial.load_rx_fifo(b"hi")  # type: ignore[attr-defined]
    serial.sync_irq()  # type: ignore[attr-defined]
    try:
        info = next(s for s in saver.description().sections if s.name == "serial")
        payload = dict(saver.save())[slot.id]
        sec = slot.cls.decode(payload, description=dict(info.schema))
        assert sec.subsections["serial/fifo"].fields == {"fifo": b"hi"}
        with Machine(memory=32 * MiB) as dst:
            slot.cls.apply_section(dst.devices["serial0"], sec)
            assert dst.devices["serial0"].get_state() == serial.get_state()  # type: ignore[attr-defined]
    finally:
        serial.load_rx_fifo(b"")  # type: ignore[attr-defined]
        serial.sync_irq()  # type: ignore[attr-defined]


# A source in another process: runs the heartbeat guest, pauses it, and writes its device state
# (the DESCRIPTION JSON and every section payload) plus its vCPU's raw KVM structs.
_CHILD = r"""
import json, pickle, sys, time
from vmferry.devices.cpu import save_vcpu
from vmferry.devices.state import MachineDeviceState
from vmferry.machine.machine import Machine
from vmferry.vmm import guest_image
with Machine(memory=32 << 20) as m:
    m.load_kernel(guest_image("heartbeat"), "hz=100")
    m.start()
    time.sleep(0.5)
    m.pause()
    ds = MachineDeviceState(m)
    out = {"description": ds.description().to_json(), "payloads": ds.save(),
           "raw": save_vcpu(m.vcpus[0], m.msr_indices)}
with open(sys.argv[1], "wb") as f:
    pickle.dump(out, f)
"""


def test_vcpu_state_from_another_process_restores_exactly(tmp_path: Path) -> None:
    dump = tmp_path / "state.pickle"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(dump)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = pickle.loads(dump.read_bytes())
    desc = Description.from_schemas(json.loads(got["description"])["sections"])
    with Machine(memory=32 * MiB) as dst:
        loader = MachineDeviceState(dst)
        loader.check_description(desc)
        for sid, payload in got["payloads"]:
            loader.stage(sid, payload)
        loader.apply()
        after = save_vcpu(dst.vcpus[0], dst.msr_indices)
    before = got["raw"]
    for name in before:
        if name != "msrs":
            assert after[name].hex() == before[name].hex(), name
    IA32_TSC = 0x10  # cannot be set on this host (KVM-FACTS.md); everything else is exact
    msrs_before = {m["index"]: m["data"] for m in state_values(before)["msrs"] if m["index"] != IA32_TSC}
    msrs_after = {m["index"]: m["data"] for m in state_values(after)["msrs"] if m["index"] != IA32_TSC}
    assert msrs_after == msrs_before


def test_two_vcpus_are_two_instances_and_need_a_machine_with_both() -> None:
    with Machine(memory=32 * MiB, smp=2) as src, Machine(memory=32 * MiB, smp=2) as dst, \
            Machine(memory=32 * MiB) as small:
        saver = MachineDeviceState(src)
        desc = saver.description()
        assert [(s.id, s.name, s.instance) for s in desc.sections[:3]] == [
            (1, "cpu", 0), (2, "cpu", 1), (3, "irqchip", 0)]
        regs = src.vcpus[1].get_regs()
        regs.rbx = 0x5EC0
        src.vcpus[1].set_regs(regs)
        loader = MachineDeviceState(dst)
        loader.check_description(desc)
        for sid, payload in saver.save():
            loader.stage(sid, payload)
        loader.apply()
        assert dst.vcpus[1].get_regs().rbx == 0x5EC0
        assert dst.vcpus[0].get_regs().rbx == 0
        with pytest.raises(StateLoadError, match=r"section 'cpu': instance 1 does not exist .*\[0\]"):
            MachineDeviceState(small).check_description(desc)

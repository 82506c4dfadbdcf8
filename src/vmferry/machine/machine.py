"""`Machine`: assembles a VM from a MachineType — RAM blocks, vCPUs and their threads, and the
devices its table names (each built by its class's `create(machine, properties)`, wiring itself
on the port-I/O or MMIO bus) — and runs, pauses, resumes and stops it.

Lifecycle: built (vCPUs not running) -> start() -> running <-> paused (pause()/resume()) ->
finished (guest powered off through the debug-exit port, halted for good, crashed, or
shutdown() was called). `wait()` returns the `ExitStatus`. A migration destination builds a
Machine without a kernel, fills RAM and state, then calls start().

Pausing parks every vCPU, then quiesces every device that has a thread of its own (a device
with `quiesce()`/`unquiesce()`: the serial input thread, each drive's I/O thread): once pause()
returns, nothing changes device state until resume(), so the device phase of a migration
captures a still machine. resume() un-quiesces the devices, then lets the vCPUs run. A drive
whose migrated state carried requests in flight holds them until that first resume/start.

Dirty tracking: KVM's slot bitmaps (manual protect) by default; with `dirty_ring_size` (QEMU's
`-accel kvm,dirty-ring-size=N`) KVM's per-vCPU dirty ring instead (`dirty_ring`, the RAM blocks'
guest-write producer; machine/dirty_ring.py), which also gives each vCPU a dirty rate and makes
the dirty limiter possible (`dirty_limiter`; machine/dirty_limit.py).

`on_event(name, data)` is called on state changes: "STOP", "RESUME", "SHUTDOWN" (data has the
exit status), from whichever thread caused them; the monitor turns them into QMP events.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmferry.block.backend import BlockBackend
from vmferry.devices.chardev import Chardev, open_chardev
from vmferry.devices.virtio_blk import VirtioBlk
from vmferry.devices.virtio_mmio import MMIO_STRIDE
from vmferry.errors import GuestError, VmferryError
from vmferry.kvm.ioctls import Cap
from vmferry.kvm.system import Kvm
from vmferry.kvm.vcpu import Vcpu
from vmferry.machine import multiboot
from vmferry.machine.bus import Bus
from vmferry.machine.dirty_limit import DirtyLimiter
from vmferry.machine.dirty_ring import DirtyRing, check_ring_size
from vmferry.machine.exits import handle_exit
from vmferry.machine.machine_type import MachineType, get_machine_type
from vmferry.machine.ramblock import RamBlock
from vmferry.machine.vcpu_runner import VcpuRunner, install_kick_handler

log = logging.getLogger("vmferry.machine")
EventCallback = Callable[[str, dict], None]


@dataclass(frozen=True)
class ExitStatus:
    """How the machine finished. kind: "poweroff" (debug-exit; code = the value written),
    "shutdown" (shutdown() called; code 0), "halted" (the guest halted for good; code 0) or
    "error" (triple fault, KVM internal error, ...; reason says which; code 1)."""

    kind: str
    code: int
    reason: str

    @property
    def is_error(self) -> bool:
        return self.kind == "error"


class Machine:
    def __init__(
        self,
        machine_type: MachineType | str | None = None,
        memory: int = 128 << 20,
        smp: int = 1,
        serial: str | Chardev = "null",
        kvm: Kvm | None = None,
        on_event: EventCallback | None = None,
        drives: Sequence[tuple[str, BlockBackend]] = (),
        dirty_ring_size: int = 0,
    ) -> None:
        """`drives`: (id, opened backend) pairs; the machine owns the backends from here on and
        closes them in close() (also when construction fails). `dirty_ring_size`: entries of
        KVM's per-vCPU dirty ring (QEMU's `-accel kvm,dirty-ring-size=N`); 0 = slot bitmaps."""
        self.block_devices: list[VirtioBlk] = []
        self.dirty_ring: DirtyRing | None = None
        try:
            self._build(machine_type, memory, smp, serial, kvm, on_event, drives, dirty_ring_size)
        except BaseException:
            for dev in self.block_devices:
                dev.close()
            for _, backend in drives[len(self.block_devices):]:
                backend.close()
            raise

    def _build(self, machine_type: MachineType | str | None, memory: int, smp: int,
               serial: str | Chardev, kvm: Kvm | None, on_event: EventCallback | None,
               drives: Sequence[tuple[str, BlockBackend]], dirty_ring_size: int) -> None:
        install_kick_handler()
        self.machine_type = machine_type if isinstance(machine_type, MachineType) else get_machine_type(
            machine_type
        )
        if smp < 1:
            raise VmferryError(f"--smp {smp}: need at least one vCPU")
        if self.machine_type.deprecated:
            log.warning("machine type '%s' is deprecated and will be retired (docs/machine-types.md)",
                        self.machine_type.name)
        if smp > self.machine_type.cpu_max:
            raise VmferryError(f"--smp {smp}: machine type '{self.machine_type.name}' takes at most "
                               f"{self.machine_type.cpu_max} vCPUs")
        self.memory = memory
        self.smp = smp
        self.on_event = on_event
        self.kvm = kvm or Kvm()
        self.msr_indices = self.kvm.get_msr_index_list()
        self.vm = self.kvm.create_vm()
        if dirty_ring_size:
            # The ring must be on before any vCPU exists. Not with manual protect: its
            # INITIALLY_SET makes KVM skip write-protecting a slot when logging starts, and only
            # CLEAR_DIRTY_LOG (bitmap mode) would protect the pages later.
            found = self.vm.dirty_ring_cap()
            if found is None:
                raise VmferryError(f"dirty-ring-size={dirty_ring_size}: this KVM has no dirty ring "
                                   "(KVM_CAP_DIRTY_LOG_RING)")
            check_ring_size(dirty_ring_size, found[1])
            self.vm.enable_dirty_ring(dirty_ring_size)
            self.dirty_ring = DirtyRing(self.vm, dirty_ring_size)
        else:
            # Manual protect must be on before any slot logs dirty pages.
            self.vm.enable_manual_dirty_protect()
        # With exception payloads on, KVM_GET/SET_VCPU_EVENTS keep a pending exception apart from
        # an injected one, so a vCPU paused with an exception pending restores exactly (QEMU
        # turns it on for the same reason).
        if self.vm.check_extension(Cap.EXCEPTION_PAYLOAD):
            self.vm.enable_cap(Cap.EXCEPTION_PAYLOAD, 1)
        self.vm.set_tss_addr()
        self.vm.set_identity_map_addr()
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.chardev = serial if isinstance(serial, Chardev) else open_chardev(serial)
        # Built in table order: the irqchip comes first, so the PIT and each vCPU's LAPIC find it.
        self.devices: dict[str, object] = {}
        for spec in self.machine_type.devices:
            if not spec.per_vcpu:
                self.devices[spec.id] = spec.device.create(self, spec.properties)

        self.ram_blocks: list[RamBlock] = []
        self.system_ram: list[tuple[int, int]] = []
        for slot, region in enumerate(self.machine_type.ram_layout(memory)):
            self.ram_blocks.append(RamBlock(region.name, region.gpa, region.nbytes, self.vm, slot,
                                            self.dirty_ring))
            if region.system_ram:
                self.system_ram.append((region.gpa, region.nbytes))

        cpuid = self.kvm.get_supported_cpuid()
        self.vcpus: list[Vcpu] = []
        for i in range(smp):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid2(_with_apic_id(cpuid, i))
            self.vcpus.append(vcpu)
            if self.dirty_ring is not None:
                self.dirty_ring.add_vcpu(vcpu)

        self._add_drives(drives)

        # _lock guards the run state and is only ever held briefly (a vCPU thread takes it when
        # the guest powers off or a vCPU crashes). _transitions serialises start/pause/resume,
        # which wait for vCPU threads: never while holding _lock, or such a thread would deadlock
        # the pauser.
        self._lock = threading.RLock()
        self._transitions = threading.RLock()
        self._quiesced: list[object] = []
        self._runners: list[VcpuRunner] = []
        self._running = False
        self._done = threading.Event()
        self.exit_status: ExitStatus | None = None
        self._closed = False
        self.cpu_throttle_percentage = 0  # every vCPU's, set by set_cpu_throttle (auto-converge)
        # Per vCPU: µs slept after each dirty-ring-full exit, set by the dirty limiter.
        self._dirty_limit_us = [0] * smp
        self.dirty_limiter = DirtyLimiter(self) if self.dirty_ring is not None else None

    def set_isa_irq(self, irq: int, level: int) -> None:
        """Drive ISA IRQ line `irq` (what a device's interrupt output is wired to)."""
        self.devices["irqchip"].set_irq(irq, level)  # type: ignore[attr-defined]

    def _add_drives(self, drives: Sequence[tuple[str, BlockBackend]]) -> None:
        """One virtio-blk on a virtio-mmio transport per drive, in order (docs/disks.md). Kept
        out of `devices` (the fixed table): their sections come from the machine type's
        `drive_device` entry, one instance per drive (devices/state.py)."""
        mt = self.machine_type
        if len(drives) > mt.virtio_mmio_slots:
            raise VmferryError(f"{len(drives)} drives: machine type '{mt.name}' has "
                               f"{mt.virtio_mmio_slots} virtio-mmio slots")
        for i, (drive_id, backend) in enumerate(drives):
            gsi = mt.virtio_mmio_irq_base + i
            dev = VirtioBlk(drive_id, backend, self, lambda level, gsi=gsi: self.set_isa_irq(gsi, level),
                            qdev=f"/machine/virtio-mmio@{mt.virtio_mmio_base + i * MMIO_STRIDE:x}")
            self.block_devices.append(dev)
            self.mmio_bus.register(mt.virtio_mmio_base + i * MMIO_STRIDE, MMIO_STRIDE, dev.transport)

    # --- RAM ---

    def ram_block(self, name: str) -> RamBlock:
        for block in self.ram_blocks:
            if block.name == name:
                return block
        raise VmferryError(f"no RAM block {name!r}")

    def ram_block_at(self, gpa: int, nbytes: int = 1) -> RamBlock:
        for block in self.ram_blocks:
            if block.contains_gpa(gpa, nbytes):
                return block
        raise GuestError(f"guest physical range [{gpa:#x}, +{nbytes:#x}) is not RAM")

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.ram_block_at(gpa, len(data)).write(gpa, data)

    def read_gpa(self, gpa: int, nbytes: int) -> bytes:
        return self.ram_block_at(gpa, nbytes).read(gpa, nbytes)

    # --- booting ---

    def load_kernel(self, path: str | Path, cmdline: str = "") -> multiboot.BootInfo:
        """Load a multiboot v1 ELF image and put vCPU 0 at its entry point."""
        try:
            image = Path(path).read_bytes()
        except OSError as e:
            raise GuestError(f"cannot read guest image {path}: {e.strerror}") from None
        boot = multiboot.load(image, cmdline, self.system_ram, self.write_gpa)
        multiboot.set_entry_state(self.vcpus[0], boot)
        return boot

    # --- running ---

    @property
    def running(self) -> bool:
        return self._running

    def vcpu_thread_ids(self) -> list[int]:
        """Host thread id (as in /proc) of each vCPU's thread; the process id before start()."""
        import os

        ids = [r.thread.native_id for r in self._runners]
        return [tid if tid is not None else os.getpid() for tid in ids] or [os.getpid()] * len(self.vcpus)

    def set_cpu_throttle(self, percentage: int) -> None:
        """Make every vCPU sleep `percentage` % of the time (0 = full speed, at most 99); see
        vcpu_runner.py. Vcpu threads started later get it too."""
        with self._lock:
            self.cpu_throttle_percentage = percentage
            runners = list(self._runners)
        for r in runners:
            r.set_throttle(percentage)

    def set_dirty_limit_sleep(self, vcpu_id: int, us: int) -> None:
        """vCPU `vcpu_id` sleeps `us` µs after each dirty-ring-full exit (the dirty limiter's
        knob; machine/dirty_limit.py). vCPU threads started later get it too."""
        with self._lock:
            self._dirty_limit_us[vcpu_id] = us
            runner = self._runners[vcpu_id] if self._runners else None
        if runner is not None:
            runner.set_dirty_limit_sleep(us)

    def _apply_vcpu_limits(self, r: VcpuRunner) -> None:
        if self.cpu_throttle_percentage:
            r.set_throttle(self.cpu_throttle_percentage)
        if self._dirty_limit_us[r.vcpu.id]:
            r.set_dirty_limit_sleep(self._dirty_limit_us[r.vcpu.id])

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def start(self) -> None:
        """Start the vCPU threads (first call) or resume them."""
        with self._transitions:
            with self._lock:
                if self.finished:
                    raise VmferryError("the machine has already stopped for good")
                if self._runners:
                    started = False
                else:
                    self._runners = [VcpuRunner(v, self._handle_exit, self._crash) for v in self.vcpus]
                    self._running = True
                    for r in self._runners:
                        r.start()
                        self._apply_vcpu_limits(r)
                    started = True
            if not started:
                self.resume()
                return
        self._emit("RESUME", {})

    def park_vcpus(self) -> None:
        """Create and start the vCPU threads parked, before the first start(): start() then only
        wakes them. An incoming migration does this while the stream arrives, so creating
        threads is not part of the downtime."""
        with self._lock:
            if self._runners or self.finished:
                return
            self._runners = [VcpuRunner(v, self._handle_exit, self._crash) for v in self.vcpus]
            for r in self._runners:
                r.request_pause()  # parked from their first instruction on
                r.start()
                self._apply_vcpu_limits(r)

    def pause(self) -> None:
        """Stop every vCPU, then quiesce the devices that own threads; returns when each vCPU is
        out of KVM_RUN and parked (or gone: crashed or stopped) and no device thread changes
        state. Idempotent; callable from any thread except a vCPU thread."""
        with self._transitions:
            with self._lock:
                if not self._running:
                    return
                runners = list(self._runners)
                for r in runners:
                    r.request_pause()
            # Not under _lock: a vCPU finishing its exit may need it (power-off, a crash).
            for r in runners:
                r.wait_parked()
            self._quiesce_devices()
            with self._lock:
                self._running = False
        self._emit("STOP", {})

    def resume(self) -> None:
        with self._transitions:
            with self._lock:
                if self._running or self.finished:
                    return
                fresh = not self._runners
            if fresh:
                self.start()
                return
            self._unquiesce_devices()
            with self._lock:
                if self.finished:
                    return
                for r in self._runners:
                    r.resume()
                self._running = True
        self._emit("RESUME", {})

    def _quiesce_devices(self) -> None:
        for dev in [*self.devices.values(), *self.block_devices]:
            quiesce = getattr(dev, "quiesce", None)
            if quiesce is not None and dev not in self._quiesced:
                quiesce()
                self._quiesced.append(dev)

    def _unquiesce_devices(self) -> None:
        while self._quiesced:
            self._quiesced.pop().unquiesce()  # type: ignore[attr-defined]
        # A migration destination's drives hold the requests carried in flight until the
        # machine first runs; unquiesce is a no-op for a drive that is serving already.
        for dev in self.block_devices:
            dev.unquiesce()

    def power_off(self, code: int) -> None:
        """The guest asked to power off with status `code` (debug-exit)."""
        self._finish(ExitStatus("poweroff", code, f"guest powered off with status {code}"))

    def request_shutdown(self) -> None:
        """Stop the machine for good without waiting for the vCPU threads: each leaves KVM_RUN at
        its next chance (a vCPU blocked on a postcopy page leaves once the page is placed or the
        userfaultfd closes, and then does not run the guest again)."""
        self._finish(ExitStatus("shutdown", 0, "shutdown requested"))

    def shutdown(self) -> None:
        """Stop the machine for good (from the host side)."""
        self.request_shutdown()
        for r in self._runners:
            r.join(timeout=5)
        with self._transitions:
            self._unquiesce_devices()  # a device thread blocked by the quiesce may go now

    def guest_halted(self, vcpu_id: int) -> None:
        self._finish(ExitStatus("halted", 0, f"vCPU {vcpu_id} halted with interrupts off"))

    def fail(self, reason: str) -> None:
        """Stop for good with an error status naming the reason."""
        log.error("machine stopped: %s", reason)
        self._finish(ExitStatus("error", 1, reason))

    def _crash(self, reason: str) -> None:
        self.fail(reason)

    def _finish(self, status: ExitStatus) -> None:
        with self._lock:
            if self.finished:
                return
            self.exit_status = status
            for r in self._runners:
                r.request_stop()  # never waits: this may run on a vCPU thread
            self._running = False
            self._done.set()
        self._emit("SHUTDOWN", {"kind": status.kind, "code": status.code, "reason": status.reason})

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """The exit status once the machine finished, or None if `timeout` seconds pass first."""
        self._done.wait(timeout)
        return self.exit_status

    def _handle_exit(self, vcpu: Vcpu) -> None:
        handle_exit(self, vcpu)

    def dirty_ring_full(self, vcpu: Vcpu) -> None:
        """KVM_EXIT_DIRTY_RING_FULL on `vcpu` (its thread): harvest its ring so it can run on."""
        if self.dirty_ring is None:
            self.fail(f"KVM_EXIT_DIRTY_RING_FULL on vCPU {vcpu.id} without a dirty ring")
            return
        self.dirty_ring.ring_full(vcpu.id)

    def _emit(self, name: str, data: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, data)
            except Exception:
                log.exception("on_event(%s) failed", name)

    def close(self) -> None:
        """Stop (if still running) and release every resource: threads, fds, RAM."""
        if self._closed:
            return
        if self.dirty_limiter is not None:
            self.dirty_limiter.close()
        self.shutdown()
        self._closed = True
        for dev in self.devices.values():
            close = getattr(dev, "close", None)
            if close is not None:
                close()
        self.chardev.close()
        # Before the RAM goes: a drive's I/O thread writes into it.
        for dev in self.block_devices:
            dev.close()
        if self.dirty_ring is not None:
            self.dirty_ring.close()  # its views of the rings go before the vCPUs unmap them
        for v in self.vcpus:
            v.close()
        for b in self.ram_blocks:
            b.close()
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_apic_id(cpuid: ctypes.Structure, apic_id: int) -> ctypes.Structure:
    """A copy of the supported CPUID table with this vCPU's APIC ID in leaf 1 EBX[31:24] and in
    the x2APIC topology leaves 0xB/0x1F EDX, so each vCPU sees a distinct ID."""


    out = type(cpuid).from_buffer_copy(cpuid)  # type: ignore[attr-defined]
    for e in out.entries[: out.nent]:  # type: ignore[attr-defined]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
    assert ctypes.sizeof(out) == ctypes.sizeof(cpuid)  # type: ignore[arg-type]
    return out

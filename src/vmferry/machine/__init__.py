"""vmferry.machine: `Machine` (RAM blocks, vCPU threads, devices on the port/MMIO buses),
`RamBlock`, machine types and the multiboot v1 loader."""

from vmferry.machine.machine import ExitStatus, Machine
from vmferry.machine.machine_type import DEFAULT_MACHINE_TYPE, MACHINE_TYPES, MachineType, get_machine_type
from vmferry.machine.ramblock import RamBlock

__all__ = [
    "DEFAULT_MACHINE_TYPE",
    "MACHINE_TYPES",
    "ExitStatus",
    "Machine",
    "MachineType",
    "RamBlock",
    "get_machine_type",
]

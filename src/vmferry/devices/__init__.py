"""vmferry.devices: one module per device, its behaviour and its state description side by side.

A device class names its section (`vmstate = ...`) and builds and wires itself with
`create(machine, properties)`; which devices a machine has, with which properties and at which
section version, is the machine type's table (`vmferry.machine.machine_type`).
"""

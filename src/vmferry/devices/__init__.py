"""vmferry.devices: one module per device, its behaviour and its state description side by side.

Importing the package imports every device module, and each registers its VMState sections with
`vmferry.vmstate.registry` for the machine types that carry them; that is what
`registry.load_device_registrations()` relies on.
"""

from vmferry.devices import cpu, debug_exit, irqchip, pit, serial  # noqa: F401 - registration

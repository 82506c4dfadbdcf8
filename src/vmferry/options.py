"""QEMU's option strings (`--drive`, `--object`): `key=value,key=value`, where `,,` is a comma
inside a value."""

from __future__ import annotations


def split_options(text: str) -> list[str]:
    """'a=1,b=x,,y' -> ['a=1', 'b=x,y']."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def parse_accel(text: str) -> int:
    """`--accel kvm[,dirty-ring-size=N]` (QEMU's -accel) -> the dirty ring's entries per vCPU
    (0 = off, KVM's dirty bitmap). Whether N fits this KVM is the Machine's check."""
    from vmferry.errors import VmferryError

    parts = split_options(text)
    name = parts[0].removeprefix("accel=")
    if name != "kvm":
        raise VmferryError(f"--accel {text}: accelerator '{name}' is not supported: vmferry runs on kvm only")
    ring = 0
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if key != "dirty-ring-size" or not eq:
            raise VmferryError(f"--accel {text}: property '{key}' is not supported "
                               "(kvm takes dirty-ring-size=N)")
        try:
            ring = int(value, 10)
        except ValueError:
            raise VmferryError(f"--accel {text}: dirty-ring-size '{value}' is not a number") from None
        if ring < 0 or ring & (ring - 1):
            raise VmferryError(f"--accel {text}: dirty-ring-size must be a power of two")
    return ring

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

"""Block backends: where a drive's bytes live (raw image files, NBD exports), how
an image is locked against a second writer, how `--drive` is parsed, and per-drive statistics.

The devices in `vmferry.devices` see only the `BlockBackend` protocol (backend.py)."""

"""Migration parameters and capabilities, under QMP's names, with QEMU 7.2's defaults and checks.

Two plain objects shared by the monitor (which writes them from `migrate-set-parameters` /
`migrate-set-capabilities`) and the migration thread (which reads them while it runs):

* `MigrationParameters` - one typed dataclass field per parameter (python name = QMP name with
  `-` -> `_`). `apply(changes)` validates *every* change first and then assigns them all under a
  lock, so a reader never sees half of a `migrate-set-parameters`. Reading one attribute is atomic
  under the GIL; read several that must agree through `snapshot()`.
* `MigrationCapabilities` - the 7.2 capability list plus 8.1's `dirty-limit`, off by default but
  `return-path`; `set()` validates the whole list (unknown names, unsupported ones, incompatible
  combinations) before changing anything.

The specs table (`PARAMETER_SPECS`) is the single source for QAPI types, ranges and docs: the
monitor builds its argument schema and `docs/qmp.md` from it.

Say yes only to what works: every name keeps QEMU 7.2's spelling, type and default (8.1's for
dirty-limit's; clients probe them with `query-migrate-parameters` /
`query-migrate-capabilities`), but only the names in
`EFFECTIVE_PARAMETERS` / `EFFECTIVE_CAPABILITIES` may be changed — each says what reads it. Any
other name is refused ("Parameter 'compress-level' is not supported by vmferry yet") unless the
value asked for is the one it already has: setting a parameter to its default, or a capability to
off, changes nothing and is accepted, so clients that write back what they read keep working.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmferry.errors import QmpError

UINT64_MAX = 2**64 - 1
# QEMU's MAX_MIGRATE_DOWNTIME: 2000 seconds, in ms.
MAX_DOWNTIME_MS = 2_000_000


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is typed, bounded and described. `expects` completes QEMU's
    "Parameter 'x' expects ..." when the value is out of [lo, hi]."""

    qmp_name: str
    qapi_type: str  # "size", "uint64", "uint32", "uint8", "bool", "str", "MultiFDCompression"
    doc: str
    lo: int | None = None
    hi: int | None = None
    expects: str = ""
    choices: tuple[str, ...] = ()

    @property
    def py_name(self) -> str:
        return self.qmp_name.replace("-", "_")


def _range(lo: int, hi: int, unit: str = "") -> str:
    return f"an integer in the range of {lo} to {hi}" + (f" {unit}" if unit else "")


# QEMU's three, plus lz4 and vmferry's `auto` (stream/compression.py)
MULTIFD_COMPRESSION = ("none", "zlib", "zstd", "lz4", "auto")

PARAMETER_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec("announce-initial", "size", "initial delay (ms) before the first self-announcement",
              0, 100_000, _range(0, 100_000, "ms")),
    ParamSpec("announce-max", "size", "maximum delay (ms) between self-announcements",
              0, 100_000, _range(0, 100_000, "ms")),
    ParamSpec("announce-rounds", "size", "number of self-announcement packets",
              0, 1000, _range(0, 1000)),
    ParamSpec("announce-step", "size", "increase (ms) of the delay between announcements",
              1, 10_000, _range(1, 10_000, "ms")),
    ParamSpec("compress-level", "uint8", "compression level of the 'compress' capability (0-9)",
              0, 9, "a value between 0 and 9"),
    ParamSpec("compress-threads", "uint8", "compression threads of the 'compress' capability",
              1, 255, "a value between 1 and 255"),
    ParamSpec("compress-wait-thread", "bool", "wait for a free compression thread instead of "
              "sending the page uncompressed"),
    ParamSpec("decompress-threads", "uint8", "decompression threads on the destination",
              1, 255, "a value between 1 and 255"),
    ParamSpec("throttle-trigger-threshold", "uint8", "percentage of dirtied/transferred bytes per "
              "pass above which auto-converge throttles", 1, 100, "an integer in the range of 1 to 100"),
    ParamSpec("cpu-throttle-initial", "uint8", "initial vCPU throttle percentage of auto-converge",
              1, 99, "an integer in the range of 1 to 99"),
    ParamSpec("cpu-throttle-increment", "uint8", "throttle percentage added each time auto-converge "
              "finds the migration not converging", 1, 99, "an integer in the range of 1 to 99"),
    ParamSpec("cpu-throttle-tailslow", "bool", "in the last throttling step, add only what the dirty "
              "rate requires rather than the whole increment"),
    ParamSpec("tls-creds", "str", "id of the TLS credentials object; \"\" means plain text"),
    ParamSpec("tls-hostname", "str", "hostname to check the destination's certificate against"),
    ParamSpec("tls-authz", "str", "id of the authorization object the destination checks clients with"),
    ParamSpec("max-bandwidth", "size", "bandwidth cap of the precopy phase, bytes per second; "
              "0 means unlimited (vmferry's default; QEMU 7.2's is 128 MiB/s)",
              0, UINT64_MAX, _range(0, UINT64_MAX, "bytes/second")),
    ParamSpec("downtime-limit", "uint64", "largest pause (ms) tolerated at switchover; the migration "
              "switches over once the expected downtime is below it",
              0, MAX_DOWNTIME_MS, _range(0, MAX_DOWNTIME_MS, "ms")),
    ParamSpec("x-checkpoint-delay", "uint32", "COLO checkpoint interval, ms", 0, 2**32 - 1,
              _range(0, 2**32 - 1, "ms")),
    ParamSpec("block-incremental", "bool", "block migration copies only the top image of a backing chain"),
    ParamSpec("multifd-channels", "uint8", "parallel connections of the 'multifd' capability",
              1, 255, "a value between 1 and 255"),
    ParamSpec("xbzrle-cache-size", "size", "page cache of the 'xbzrle' capability, bytes (a power of two, "
              "at least one page)", 4096, UINT64_MAX,
              "a power of two no less than the target page size"),
    ParamSpec("max-postcopy-bandwidth", "size", "bandwidth cap of the postcopy phase, bytes per second; "
              "0 means unlimited", 0, UINT64_MAX, _range(0, UINT64_MAX, "bytes/second")),
    ParamSpec("max-cpu-throttle", "uint8", "largest vCPU throttle percentage auto-converge may reach",
              1, 99, "an integer in the range of 1 to 99"),
    ParamSpec("multifd-compression", "MultiFDCompression", "compression of multifd channels (vmferry "
              "adds lz4, and auto: per chunk raw, lz4 or zstd, whichever the measured compression "
              "cost and wire rate say finishes sooner)",
              choices=MULTIFD_COMPRESSION),
    ParamSpec("multifd-zlib-level", "uint8", "zlib level of multifd compression", 0, 9,
              "a value between 0 and 9"),
    ParamSpec("multifd-zstd-level", "uint8", "zstd level of multifd compression", 0, 20,
              "a value between 0 and 20"),
    ParamSpec("vcpu-dirty-limit", "uint64", "dirty-limit's quota: each vCPU's dirty rate, MB/s, once "
              "throttling starts (QEMU 8.1)", 1, UINT64_MAX, "an integer of at least 1 (MB/s)"),
    ParamSpec("x-vcpu-dirty-limit-period", "uint64", "dirty-limit's period, ms: how often each vCPU's "
              "dirty rate is measured and its throttle adjusted (QEMU 8.1)", 1, 1000,
              "a value between 1 and 1000"),
    ParamSpec("x-trace-file", "str", "vmferry: write the next migration's JSON-lines trace "
              "(docs/trace.md) to this path on this side's host; \"\" means no trace",
              expects="a path in an existing directory"),
    ParamSpec("x-heartbeat-ms", "uint32", "vmferry: interval of the heartbeats both sides send, ms; "
              "a peer silent for 3 intervals fails the migration; 0 turns heartbeats off",
              0, 600_000, "0 (off) or an integer in the range of 100 to 600000 ms"),
    ParamSpec("x-block-drives", "str", "vmferry: comma-separated ids of the drives whose contents "
              "the next `migrate` copies in the stream (besides all writable ones with `blk: true`); "
              "the other drives are shared storage"),
    ParamSpec("x-block-compression", "MultiFDCompression", "vmferry: compression of the copied "
              "drives' blocks in the stream (BLOCK_COMPRESSED): the values of multifd-compression, "
              "with its zlib and zstd levels; none (the default) sends every block raw",
              choices=MULTIFD_COMPRESSION),
    ParamSpec("x-postcopy-after-ms", "uint32", "vmferry: with postcopy-ram, the source switches to "
              "postcopy by itself when, after a pass, precopy's forecast says it will not complete "
              "within this many ms of `migrate` (or never); 0 = only on migrate-start-postcopy",
              0, 2**32 - 1, _range(0, 2**32 - 1, "ms")),
    ParamSpec("x-postcopy-reconnect", "bool", "vmferry: after a postcopy's connection breaks, both "
              "sides reconnect by themselves (the destination listens again on its address, the "
              "source starts a connect to the original one every 50 ms) and the migration resumes"),
)
SPECS_BY_NAME: dict[str, ParamSpec] = {s.qmp_name: s for s in PARAMETER_SPECS}

# The parameters something reads, and what reads them (docs/qmp.md prints this). The TLS strings
# are read by `migrate` and by the destination when the stream arrives (monitor/objects.py): the
# connection is then TLS 1.3 (transport/tls.py), or the migration is refused; never plain text.
EFFECTIVE_PARAMETERS: dict[str, str] = {
    "max-bandwidth": "the source's rate limiter, from the next write on (may change during a migration)",
    "downtime-limit": "the source's switchover decision, after each pass (may change during a migration)",
    "tls-creds": "a `tls-creds-x509` object: the migration connection is TLS 1.3 with it; a "
                 "missing one refuses the migration (`No TLS credentials with id '...'`)",
    "tls-hostname": "the name the source checks the destination's certificate against (default: "
                    "the URI's host); ignored while tls-creds is empty, as in QEMU",
    "multifd-channels": "the number of data connections `migrate` opens beside the main stream while "
                        "capability multifd is on (read when `migrate` starts)",
    "multifd-compression": "how each multifd data channel compresses its pages: RAM_COMPRESSED records "
                           "(read when `migrate` starts)",
    "multifd-zlib-level": "the zlib level of multifd-compression zlib (read when `migrate` starts)",
    "multifd-zstd-level": "the zstd level of multifd-compression zstd (read when `migrate` starts; "
                          "auto uses it too)",
    "xbzrle-cache-size": "the size of the source's XBZRLE page cache while capability xbzrle is on "
                         "(read when `migrate` starts)",
    "tls-authz": "an `authz-simple` object: the destination accepts only the client certificate "
                 "with its distinguished name; ignored while tls-creds is empty, as in QEMU",
    "x-postcopy-after-ms": "the source, after each precopy pass from the second on, when capability "
                           "postcopy-ram was on at `migrate` (migration/postcopy.py precopy_overruns: "
                           "forecast.py's model from where the migration stands); may change during it",
    "x-postcopy-reconnect": "each side, when its postcopy pauses on a broken or silent connection (not "
                            "on migrate-pause): the destination listens again on the address it "
                            "migrated on, the source starts a connect to `migrate`'s address every "
                            "50 ms; then the recovery is QEMU's (migrate-recover + resume), done by "
                            "themselves",
    "max-postcopy-bandwidth": "the source's postcopy push after the switch (may change during it): "
                              "paces the background pages only; a page the destination requests "
                              "is sent at once",
    "x-heartbeat-ms": "read when the migration starts, on each side (migration/heartbeat.py): "
                      "each side beats at its own interval and gives up on a peer silent for 3 of "
                      "its own intervals; a peer that sends no heartbeat is never timed out",
    "x-trace-file": "opened by `migrate` (source) or when the source connects (destination); "
                    "docs/trace.md",
    "x-block-drives": "`migrate`: these drives' contents go in the stream (migration/block.py); an "
                      "id that is not a drive, or a read-only drive, refuses the migration by name",
    "x-block-compression": "`migrate`, for the drives it copies (migration/block.py): each run of "
                           "data goes raw or as BLOCK_COMPRESSED; `auto` compresses only while the "
                           "measured compression cost and wire rate say it finishes sooner. "
                           "Independent of multifd-compression (RAM's, on the data channels)",
    # auto-converge (migration/throttle.py), read at each evaluation (a dirty-log sync at least
    # 1 s after the previous one), so a change during a migration counts from the next one.
    "throttle-trigger-threshold": "auto-converge: a period is 'high' when the bytes it dirtied exceed "
                                  "this percentage of the bytes it transferred",
    "cpu-throttle-initial": "auto-converge: the throttle percentage set at the second high period",
    "cpu-throttle-increment": "auto-converge: added to the throttle at each further second high period",
    "cpu-throttle-tailslow": "auto-converge: add only what brings the dirty rate down to the threshold, "
                             "when that is less than the increment",
    "max-cpu-throttle": "auto-converge: the throttle never goes above it",
    # dirty-limit (machine/dirty_limit.py), read by the migration when the trigger fires and at
    # every period of the limiter.
    "vcpu-dirty-limit": "dirty-limit: the quota set on every vCPU when the auto-converge trigger fires "
                        "(a changed value is applied the next time it fires)",
    "x-vcpu-dirty-limit-period": "dirty-limit: the limiter's measuring and adjusting period while a "
                                 "migration with dirty-limit runs (1000 ms otherwise, as in QEMU)",
}


def parameter_unsupported(name: str) -> str:
    return f"Parameter '{name}' is not supported by vmferry yet"


@dataclass
class MigrationParameters:
    """QEMU 7.2's migration parameters and defaults. Units are in the field names' docs above
    (`PARAMETER_SPECS`): bandwidths in bytes/s, times in ms."""

    announce_initial: int = 50
    announce_max: int = 550
    announce_rounds: int = 5
    announce_step: int = 100
    compress_level: int = 1
    compress_threads: int = 8
    compress_wait_thread: bool = True
    decompress_threads: int = 2
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    tls_creds: str = ""
    tls_hostname: str = ""
    tls_authz: str = ""
    # vmferry's one deliberate default that differs from QEMU 7.2 (128 MiB/s, its MAX_THROTTLE):
    # unlimited. The cap dates from slow links; with it a guest dirtying 200 MiB/s never converges,
    # and vmferry measures the wire anyway. Set it to share a link.
    max_bandwidth: int = 0
    downtime_limit: int = 300
    x_checkpoint_delay: int = 20_000
    block_incremental: bool = False
    multifd_channels: int = 2
    xbzrle_cache_size: int = 67_108_864
    max_postcopy_bandwidth: int = 0
    max_cpu_throttle: int = 99
    multifd_compression: str = "none"
    multifd_zlib_level: int = 1
    multifd_zstd_level: int = 1
    vcpu_dirty_limit: int = 1
    x_vcpu_dirty_limit_period: int = 1000
    x_trace_file: str = ""
    x_heartbeat_ms: int = 1000
    x_block_drives: str = ""
    x_block_compression: str = "none"
    x_postcopy_after_ms: int = 0
    x_postcopy_reconnect: bool = False
    # Held while apply() assigns and while snapshot()/to_qmp() copy, so readers of several fields
    # never see half an update.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def apply(self, changes: Mapping[str, object]) -> None:
        """Validate every change (QMP names), then assign them all at once. Raises QmpError
        (GenericError) naming the parameter; on error nothing is changed. A parameter outside
        EFFECTIVE_PARAMETERS accepts only its default (see the module doc)."""
        checked = {SPECS_BY_NAME[name].py_name: value for name, value in _check_params(changes).items()}
        with self._lock:
            for py_name, value in checked.items():
                setattr(self, py_name, value)

    def snapshot(self) -> MigrationParameters:
        """A consistent private copy, for code that reads several parameters together."""
        with self._lock:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return MigrationParameters(**values)

    def to_qmp(self) -> dict[str, object]:
        """query-migrate-parameters' answer: every parameter under its QMP name."""
        with self._lock:
            return {spec.qmp_name: copy.copy(getattr(self, spec.py_name)) for spec in PARAMETER_SPECS}

    @classmethod
    def from_qmp(cls, values: Mapping[str, object]) -> MigrationParameters:
        """Defaults overridden by `values` (QMP names), validated like `apply`."""
        params = cls()
        params.apply(values)
        return params


_DEFAULTS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(MigrationParameters) if f.init
}


def _check_params(changes: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in changes.items():
        spec = SPECS_BY_NAME.get(name)
        if spec is None:
            raise QmpError(f"Parameter '{name}' is unexpected")
        checked = _check_one(spec, value)
        # Type and range first (QEMU's input checks), then whether anything would read it. An
        # unsupported parameter never leaves its default, so "equal to the default" is "unchanged".
        if name not in EFFECTIVE_PARAMETERS and checked != _DEFAULTS[spec.py_name]:
            raise QmpError(parameter_unsupported(name))
        out[name] = checked
    return out


def _check_one(spec: ParamSpec, value: object) -> object:
    name = spec.qmp_name
    if spec.qapi_type == "bool":
        if not isinstance(value, bool):
            raise QmpError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if spec.qapi_type == "str":
        # migrate-set-parameters takes StrOrNull for the TLS strings; null means "" (off).
        if value is None:
            return ""
        if not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{name}', expected: string")
        if name == "x-trace-file" and value and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
            raise QmpError(f"Parameter '{name}' expects {spec.expects}")
        return value
    if spec.choices:
        if not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{name}', expected: string")
        if value not in spec.choices:
            raise QmpError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise QmpError(f"Invalid parameter type for '{name}', expected: integer")
    assert spec.lo is not None and spec.hi is not None
    if not spec.lo <= value <= spec.hi:
        raise QmpError(f"Parameter '{name}' expects {spec.expects}")
    if name == "x-heartbeat-ms" and 0 < value < 100:
        raise QmpError(f"Parameter '{name}' expects {spec.expects}")
    if name == "xbzrle-cache-size" and value & (value - 1):
        raise QmpError(f"Parameter '{name}' expects {spec.expects}")
    return value


# The 7.2 list, in QEMU's order (query-migrate-capabilities answers in this order), and 8.1's
# dirty-limit (the one later capability vmferry has).
CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
    "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "dirty-limit",
)

CAPABILITY_DOCS: dict[str, str] = {
    "xbzrle": "send changed pages as XOR+RLE deltas against a cache",
    "rdma-pin-all": "pin all guest memory for RDMA up front",
    "auto-converge": "throttle vCPUs when the migration does not converge",
    "zero-blocks": "block migration skips zeroed blocks",
    "compress": "compress pages with compression threads",
    "events": "emit MIGRATION and MIGRATION_PASS events",
    "postcopy-ram": "allow switching to postcopy (migrate-start-postcopy)",
    "x-colo": "COLO fault tolerance",
    "release-ram": "the source frees RAM already sent during postcopy",
    "block": "migrate disks too (block migration)",
    "return-path": "the destination answers on the same connection (acknowledges the switchover, "
                   "or says why it refused the stream)",
    "pause-before-switchover": "pause in pre-switchover until migrate-continue",
    "multifd": "send pages over several channels",
    "dirty-bitmaps": "migrate persistent dirty bitmaps",
    "postcopy-blocktime": "measure vCPU blocktime during postcopy",
    "late-block-activate": "activate disks on the destination at cont, not at switchover",
    "x-ignore-shared": "do not send RAM that is shared with the destination",
    "validate-uuid": "check that source and destination UUIDs match",
    "background-snapshot": "snapshot RAM with write-protection while the VM runs",
    "zero-copy-send": "send multifd pages without copying them (MSG_ZEROCOPY)",
    "postcopy-preempt": "a separate channel for urgent postcopy page requests",
    "dirty-limit": "throttle only the vCPUs that dirty memory, each to vcpu-dirty-limit (QEMU 8.1; needs "
                   "--accel kvm,dirty-ring-size=N)",
}


# The capabilities something reads, and what reads them (docs/qmp.md prints this).
EFFECTIVE_CAPABILITIES: dict[str, str] = {
    "events": "MIGRATION and MIGRATION_PASS events are sent only while it is on, on either side",
    "auto-converge": "after each dirty-log sync the source may throttle every vCPU (QEMU's rule, "
                     "migration/throttle.py): a throttled vCPU sleeps that percentage of the time in "
                     "10 ms timeslices; query-migrate reports cpu-throttle-percentage while it is on; "
                     "the throttle ends with the migration (completed, failed or cancelled)",
    "xbzrle": "from the first pass on the source caches what it sends (xbzrle-cache-size); a cached page "
              "sent again goes as a RAM_DELTA record, QEMU's XOR run-length encoding against the cached "
              "copy, when that is at most a quarter page (else whole); with multifd too (QEMU refuses "
              "that pair), each delta on the channel its base went on; query-migrate reports "
              "xbzrle-cache",
    "multifd": "RAM pages travel on multifd-channels data connections beside the main stream (tcp: and "
               "unix: only; `migrate` refuses other URIs by name); the destination follows the "
               "source's CONFIG whether or not it set the capability",
    "postcopy-ram": "both sides: allows migrate-start-postcopy on the source; the destination "
                    "refuses a stream that advises postcopy while it is off here. Needs a return path; "
                    "not with multifd (migration/postcopy.py, docs/migration.md)",
    "postcopy-preempt": "both sides (each refuses a stream where only one side has it; needs "
                        "postcopy-ram and a tcp: or unix: URI): the source opens a second connection "
                        "for postcopy page requests and the requested pages: the destination's fault "
                        "resolver writes each request on it and places the pages that come back, a "
                        "thread of the source's answers each request from guest RAM at once, so they "
                        "never queue behind the background push (migration/preempt.py). Not reopened "
                        "after a postcopy recovery",
    "postcopy-blocktime": "destination: query-migrate reports postcopy-blocktime and "
                          "postcopy-vcpu-blocktime (ms; measured in every postcopy migration)",
    "return-path": "always on (QEMU's default is off) and cannot be turned off: on every two-way "
                   "channel (tcp:, unix:, an fd: socket) the source completes only when the destination "
                   "acknowledges, so a failure there resumes the source instead of losing the guest. "
                   "One-way channels (file:, exec:, an fd: pipe or file) carry no return path: "
                   "there the source completes once END is written",
    "dirty-limit": "when auto-converge's trigger fires (two periods dirtying more than "
                   "throttle-trigger-threshold % of what was sent), every vCPU gets vcpu-dirty-limit "
                   "as its quota (machine/dirty_limit.py): a vCPU sleeps after each time its dirty ring "
                   "fills, so only writers slow down; query-migrate reports "
                   "dirty-limit-throttle-time-per-round and dirty-limit-ring-full-time; the limits are "
                   "lifted when the migration ends. Needs the VM's dirty ring; excludes auto-converge",
}

# vmferry's defaults where they differ from QEMU's all-off.
CAPABILITY_DEFAULTS: dict[str, bool] = {"return-path": True}


def capability_unsupported(name: str) -> str:
    return f"Capability '{name}' is not supported by vmferry yet"


class MigrationCapabilities:
    """On/off switches under QMP's names; all off by default as in QEMU, except `return-path`
    (CAPABILITY_DEFAULTS). Only EFFECTIVE_CAPABILITIES may be turned on. `dirty_ring`: whether
    the VM runs with KVM's dirty ring (dirty-limit needs it)."""

    def __init__(self, dirty_ring: bool = False) -> None:
        self.dirty_ring = dirty_ring
        self._lock = threading.Lock()
        self._state: dict[str, bool] = {name: CAPABILITY_DEFAULTS.get(name, False) for name in CAPABILITIES}

    def enabled(self, name: str) -> bool:
        try:
            return self._state[name]
        except KeyError:
            raise KeyError(f"unknown migration capability {name!r}") from None

    def set(self, changes: Iterable[Mapping[str, object]]) -> None:
        """Apply `[{"capability": NAME, "state": BOOL}, ...]` (QMP's shape) all or nothing.
        Unknown names and incompatible combinations raise QmpError and change nothing."""
        with self._lock:
            candidate = dict(self._state)
            for i, entry in enumerate(changes):
                name, state = entry.get("capability"), entry.get("state")
                if not isinstance(name, str) or name not in candidate:
                    raise QmpError(f"Parameter 'capabilities[{i}].capability' does not accept value '{name}'")
                if not isinstance(state, bool):
                    raise QmpError(f"Invalid parameter type for 'capabilities[{i}].state', expected: boolean")
                _check_supported(name, state)
                candidate[name] = state
            _check_caps(candidate, self.dirty_ring)
            self._state = candidate

    def query(self) -> list[dict[str, object]]:
        """query-migrate-capabilities' answer."""
        with self._lock:
            return [{"capability": name, "state": self._state[name]} for name in CAPABILITIES]

    def to_dict(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._state)


def _check_supported(name: str, state: bool) -> None:
    """Refuse, by name, a state nothing would honour. Asking for the state a capability always
    has (off for the unsupported ones, on for return-path) changes nothing and is accepted."""
    if name == "return-path" and not state:
        raise QmpError("Capability 'return-path' cannot be turned off in vmferry: the destination "
                       "confirms the switchover on it")
    if name not in EFFECTIVE_CAPABILITIES and state:
        raise QmpError(capability_unsupported(name))


def _check_caps(caps: Mapping[str, bool], dirty_ring: bool = False) -> None:
    """QEMU's migrate_caps_check, for the combinations that matter to us (messages are QEMU's)."""
    if caps["dirty-limit"]:
        if caps["auto-converge"]:
            raise QmpError("dirty-limit conflicts with auto-converge either of then available currently")
        if not dirty_ring:
            raise QmpError("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set")
    if caps["postcopy-ram"] and caps["compress"]:
        raise QmpError("Postcopy is not currently compatible with compression")
    if caps["postcopy-ram"] and caps["x-ignore-shared"]:
        raise QmpError("Postcopy is not compatible with ignore-shared")
    if caps["postcopy-ram"] and caps["multifd"]:
        raise QmpError("Postcopy is not yet compatible with multifd")
    if caps["postcopy-ram"] and caps["xbzrle"]:
        # Not QEMU's rule (QEMU sends deltas until the switch): vmferry's postcopy destination
        # places whole pages only, so the two are refused together rather than half-honoured.
        raise QmpError("Capability 'xbzrle' cannot be used with 'postcopy-ram' in vmferry: "
                       "postcopy places whole pages only")
    if caps["postcopy-preempt"] and not caps["postcopy-ram"]:
        raise QmpError("Postcopy preempt requires postcopy-ram")
    if caps["zero-copy-send"] and (not caps["multifd"] or caps["compress"]):
        raise QmpError("Zero copy only available for non-compressed non-TLS multifd migration")
    if caps["background-snapshot"]:
        clash = [c for c in ("postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
                             "return-path", "multifd", "pause-before-switchover", "auto-converge",
                             "release-ram", "rdma-pin-all", "compress", "xbzrle", "x-colo",
                             "validate-uuid", "zero-copy-send") if caps[c]]
        if clash:
            raise QmpError(f"Background-snapshot is not compatible with {clash[0]}")

"""Summaries and Markdown tables of `bench_migration.py`'s runs: results, the limit, the targets."""

from __future__ import annotations

import statistics
from typing import Any

MiB = 1 << 20

METRICS = ("total_ms", "downtime_ms", "stall_ms", "expected_ms", "setup_ms", "transferred_mib",
           "passes", "wall_ms", "guest_rate_mibs", "guest_rate_during_mibs", "dirty_rate_seen_mibs",
           "stall_src_max_ms")
PAUSE_KEYS = ("downtime_ms", "stall_ms")  # the pause as the source reports it, as the guest saw it


def spread(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "completed"]
    out: dict[str, Any] = {"runs": len(runs), "completed": len(done),
                           "dest_ok": sum(1 for r in done if r.get("dest_ok"))}
    for k in METRICS:
        vals = [r[k] for r in done if r.get(k) is not None]
        if vals:
            out[k] = spread(vals)
    return out


def fmt(s: dict[str, Any], key: str, digits: int = 0) -> str:
    v = s.get(key)
    if not v:
        return "-"
    f = f"{{:.{digits}f}}"
    if v["min"] == v["max"]:
        return f.format(v["median"])
    return f"{f.format(v['median'])} [{f.format(v['min'])}-{f.format(v['max'])}]"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if key not in a or key not in b or not b[key]["median"]:
        return "-"
    return f"{a[key]['median'] / b[key]['median']:.2f}x"


def _capped_outcome(runs: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{x['status']}" + (f" (gave up at {x['gave_up_after_s']:.0f} s, {x.get('passes')} passes, "
                            f"{x['transferred_mib']:.0f} MiB sent, {x.get('remaining_mib', 0):.0f} MiB left)"
                            if "gave_up_after_s" in x else "") for x in runs)


def results_table(results: dict[str, dict[str, Any]], capped: set[str]) -> str:
    head = ("| id | side | completed | total ms | downtime ms | guest stall ms | expected ms "
            "| setup ms | transferred MiB | passes | guest MiB/s before / during | dest `verify ok` |")
    lines = [head, "|" + "---|" * 12]
    for sid, per in results.items():
        for side, data in per.items():
            s = data["summary"]
            comp = _capped_outcome(data["runs"]) if sid in capped else f"{s['completed']}/{s['runs']}"
            stall = fmt(s, "stall_ms", 1)
            if "stall_ms" in s and s["stall_ms"]["n"] < s["completed"]:
                stall += f" (n={s['stall_ms']['n']})"  # the others switched over in a verify pass
            rates = ("-" if "guest_rate_mibs" not in s and "guest_rate_during_mibs" not in s
                     else f"{fmt(s, 'guest_rate_mibs')} / {fmt(s, 'guest_rate_during_mibs')}")
            lines.append(
                f"| {sid} | {side} | {comp} | {fmt(s, 'total_ms')} | {fmt(s, 'downtime_ms')} | "
                f"{stall} | {fmt(s, 'expected_ms')} | {fmt(s, 'setup_ms')} | "
                f"{fmt(s, 'transferred_mib')} | {fmt(s, 'passes')} | {rates} | "
                f"{s['dest_ok']}/{s['completed']} |")
        if "vmferry" in per and sid not in capped:
            v = per["vmferry"]["summary"]
            for side in per:
                if side.startswith("qemu"):
                    q = per[side]["summary"]
                    lines.append(
                        f"| {sid} | vmferry/{side} | | {ratio(v, q, 'total_ms')} | "
                        f"{ratio(v, q, 'downtime_ms')} | {ratio(v, q, 'stall_ms')} | | "
                        f"{ratio(v, q, 'setup_ms')} | {ratio(v, q, 'transferred_mib')} | | | |")
    return "\n".join(lines)


def limit_summary(limit_runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {kind: spread([r["seconds"] * 1000 for r in runs]) for kind, runs in limit_runs.items() if runs}


def s3_over_limit(results: dict[str, dict[str, Any]], limits: dict[str, Any]) -> dict[str, float] | None:
    """vmferry's S3 bytes/s over the limit's bytes/s (median over median), per limit kind."""
    s = results.get("S3", {}).get("vmferry", {}).get("summary", {})
    if "total_ms" not in s or "transferred_mib" not in s or not limits:
        return None
    s3_rate = s["transferred_mib"]["median"] / s["total_ms"]["median"]  # MiB/ms
    return {kind: s3_rate / (1024 / v["median"]) for kind, v in limits.items()}


def limit_table(limits: dict[str, Any], over: dict[str, float] | None) -> str:
    lines = ["| limit: 1 GiB socket copy into fresh memory | ms | GB/s (median) | vmferry S3 rate / limit |",
             "|---|---|---|---|"]
    names = {"4k": "4 KiB pages", "thp": "MADV_HUGEPAGE on the receiver"}
    for kind, v in limits.items():
        gbs = 1024 * MiB / (v["median"] / 1000) / 1e9
        share = f"{over[kind]:.2f}" if over and kind in over else "-"
        lines.append(f"| {names.get(kind, kind)} | {fmt({'x': v}, 'x')} | {gbs:.2f} | {share} |")
    return "\n".join(lines)


def _runs(results: dict[str, dict[str, Any]], sid: str) -> list[dict[str, Any]]:
    return [r for r in results.get(sid, {}).get("vmferry", {}).get("runs", []) if r["status"] == "completed"]


def targets_table(results: dict[str, dict[str, Any]], over: dict[str, float] | None) -> str:
    """Issue 9's targets, for vmferry, from this run."""
    lines = ["| target (issue 9) | measured (vmferry) | met |", "|---|---|---|"]
    for sid in ("S1", "S2", "S3"):
        runs = _runs(results, sid)
        if not runs:
            continue
        parts, ok = [], len(runs) >= 5
        for key in PAUSE_KEYS:
            vals = [r[key] for r in runs if r.get(key) is not None]
            if not vals:
                parts.append(f"{key}: none")
                ok = False
                continue
            med = statistics.median(vals)
            ok = ok and med <= 10
            parts.append(f"{key} median {med:.1f} ({len(vals)} runs)")
        lines.append(f"| {sid} pause ≤ 10 ms median over ≥ 5 runs | {'; '.join(parts)} | "
                     f"{'yes' if ok else 'no'} |")
    worst: list[str] = []
    ok_all, any_run = True, False
    for sid in ("S1", "S2", "S3", "S4", "S5"):
        for r in _runs(results, sid):
            any_run = True
            pauses = [r[k] for k in PAUSE_KEYS if r.get(k) is not None]
            if not pauses or max(pauses) > 30:
                ok_all = False
                worst.append(f"{sid}: " + "/".join(f"{r.get(k)}" for k in PAUSE_KEYS))
    if any_run:
        lines.append(f"| no run of S1-S5 pauses > 30 ms (downtime and stall, where seen) | "
                     f"{'over (downtime/stall ms): ' + '; '.join(worst) if worst else 'all ≤ 30 ms'} | "
                     f"{'yes' if ok_all else 'no'} |")
    for sid in ("S4", "S5"):
        runs = _runs(results, sid)
        errs = [abs(r["expected_ms"] - r["downtime_ms"]) / r["downtime_ms"]
                for r in runs if r.get("expected_ms") is not None and r.get("downtime_ms")]
        if not runs:
            continue
        within = sum(1 for e in errs if e <= 0.2)
        detail = ", ".join(f"{r.get('expected_ms')}/{r.get('downtime_ms')}" for r in runs)
        lines.append(f"| {sid} expected downtime at switchover within 20 % of downtime | "
                     f"{within}/{len(runs)} runs within (expected/actual ms: {detail}) | "
                     f"{'yes' if runs and within == len(runs) else 'no'} |")
    if over:
        kind = min(over, key=lambda k: over[k])  # the faster limit is the one S3 reaches least of
        lines.append(f"| S3 ≥ 60 % of the faster limit | {over[kind]:.0%} of the {kind} limit | "
                     f"{'yes' if over[kind] >= 0.6 else 'no'} |")
    return "\n".join(lines)

"""`vmferry report TRACE [TRACE...] -o report.html|.png`: pictures of migrations from their traces.

Panels (docs/trace.md, "Reports"): remaining bytes over time; dirty rate against bandwidth per
pass; where the pause went (downtime phases); and, given destination traces, what the
destination had applied over time and, for postcopy, its fault latencies as a log2 histogram.
Several traces overlay, labelled by file name.

matplotlib draws with its Agg backend (no display needed). Sizes are fixed so a reader knows
what it gets: the PNG is one 1200 x 2000 pixel figure; the HTML embeds one 1200 x 400 PNG per
panel, base64, in a single self-contained file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmferry.errors import VmferryError
from vmferry.migration.trace import Trace, read_trace

DPI = 100
WIDTH_IN = 12.0
PANEL_HEIGHT_IN = 4.0
PANELS = 5
MiB = float(1 << 20)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _remaining(ax: Any, traces: Sequence[Trace]) -> None:
    for tr in traces:
        points = [(e["t"], e["pages-to-send"] * 4096) for e in tr.of("setup")]
        points += [(e["t"], e["remaining-bytes"]) for e in tr.of("sync")]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, [max(y, 1) / MiB for y in ys], where="post", marker="o", label=tr.label)
    ax.set_yscale("log")
    ax.set_title("remaining (dirty) bytes over time")
    ax.set_xlabel("seconds since the migration started")
    ax.set_ylabel("MiB")


def _rates(ax: Any, traces: Sequence[Trace]) -> None:
    for tr in traces:
        passes = tr.of("pass")
        if not passes:
            continue
        n = [p["pass"] for p in passes]
        line = ax.plot(n, [p["bandwidth-bps"] / MiB for p in passes], marker="o",
                       label=f"{tr.label}: bandwidth")
        ax.plot(n, [p["dirty-rate-bps"] / MiB for p in passes], marker="x", linestyle="--",
                color=line[0].get_color(), label=f"{tr.label}: dirty rate")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("dirty rate against bandwidth, per pass (converges while dirty rate < bandwidth)")
    ax.set_xlabel("pass")
    ax.set_ylabel("MiB/s")


def _downtime(ax: Any, traces: Sequence[Trace]) -> None:
    rows = [(tr.label, tr.of("downtime")[-1]["phases"]) for tr in traces if tr.of("downtime")]
    names: list[str] = []
    for _, phases in rows:
        names += [k for k in phases if k not in names]
    for i, (_, phases) in enumerate(rows):
        left = 0.0
        for j, name in enumerate(names):
            ms = float(phases.get(name, 0.0) or 0.0)
            ax.barh(i, ms, left=left, color=f"C{j}", label=name if i == 0 else None)
            left += ms
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_title("where the pause went (downtime phases)")
    ax.set_xlabel("ms")


def _applied(ax: Any, traces: Sequence[Trace]) -> None:
    for tr in traces:
        applied = tr.of("applied")
        if applied:
            ax.plot([a["t"] for a in applied], [a["bytes"] / MiB for a in applied], marker=".",
                    label=tr.label)
    ax.set_title("received and applied on the destination over time")
    ax.set_xlabel("seconds since the source connected")
    ax.set_ylabel("MiB")


def _fault_latency(ax: Any, traces: Sequence[Trace]) -> None:
    """Postcopy: how long each fault waited for its page, in log2 buckets of microseconds (the
    buckets of query-migrate's x-postcopy histogram), one line of bars per trace."""
    import numpy as np

    width = 0.8 / max(1, len(traces))
    for i, tr in enumerate(traces):
        lat = [x for e in tr.of("postcopy") for x in e["fault-latencies-us"]]
        if not lat:
            continue
        buckets = np.bincount(np.clip(np.floor(np.log2(np.maximum(lat, 1.0))).astype(int), 0, 23),
                              minlength=24)
        last = int(np.flatnonzero(buckets).max()) + 1
        ax.bar(np.arange(last) + i * width, buckets[:last], width=width, align="edge",
               label=f"{tr.label} ({len(lat)} faults)")
        ax.set_xticks(np.arange(last) + 0.4, [_us(1 << k) for k in range(last)], fontsize="small")
    ax.set_title("postcopy fault latency (fault read -> page placed)")
    ax.set_xlabel("latency at least (log2 buckets)")
    ax.set_ylabel("faults")


def _us(us: int) -> str:
    return f"{us} us" if us < 1000 else f"{us / 1000:g} ms"


Panel = Callable[[Any, Sequence[Trace]], None]
_PANELS: tuple[tuple[str, Panel, str], ...] = (
    ("remaining", _remaining, "source"),
    ("rates", _rates, "source"),
    ("downtime", _downtime, "source"),
    ("applied", _applied, "destination"),
    ("faults", _fault_latency, "destination"),
)


def _draw(ax: Any, panel: Panel, traces: Sequence[Trace]) -> None:
    if traces:
        panel(ax, traces)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data in these traces", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)


def _side(traces: Sequence[Trace], side: str) -> list[Trace]:
    return [t for t in traces if t.side == side]


def render_png(traces: Sequence[Trace]) -> bytes:
    """All panels in one figure: WIDTH_IN x PANELS*PANEL_HEIGHT_IN inches at DPI."""
    plt = _pyplot()
    fig, axes = plt.subplots(PANELS, 1, figsize=(WIDTH_IN, PANEL_HEIGHT_IN * PANELS), dpi=DPI)
    try:
        for ax, (_, panel, side) in zip(axes, _PANELS, strict=True):
            _draw(ax, panel, _side(traces, side))
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close(fig)


def render_panels(traces: Sequence[Trace]) -> dict[str, bytes]:
    """One PNG per panel, WIDTH_IN x PANEL_HEIGHT_IN inches at DPI."""
    plt = _pyplot()
    out: dict[str, bytes] = {}
    for name, panel, side in _PANELS:
        fig, ax = plt.subplots(figsize=(WIDTH_IN, PANEL_HEIGHT_IN), dpi=DPI)
        try:
            _draw(ax, panel, _side(traces, side))
            fig.tight_layout()
            out[name] = _png(fig)
        finally:
            plt.close(fig)
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No bbox_inches="tight": the size must stay what the docs promise.
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _summary(tr: Trace) -> dict[str, str]:
    end = tr.end or {}
    row = {"trace": tr.label, "side": tr.side, "status": str(end.get("status", "(no end: unfinished)"))}
    row["total time"] = f"{end['total-time-ms']} ms" if "total-time-ms" in end else "-"
    if "transferred-bytes" in end:
        row["bytes"] = f"{end['transferred-bytes'] / MiB:,.1f} MiB"
    row["passes"] = str(len(tr.of("pass")) or len([a for a in tr.of("applied") if a["what"] == "pass-start"]))
    downtime = tr.of("downtime")
    row["downtime"] = f"{downtime[-1]['downtime-ms']:.1f} ms" if downtime else "-"
    if end.get("error"):
        row["error"] = str(end["error"])
    return row


def render_html(traces: Sequence[Trace]) -> str:
    panels = render_panels(traces)
    rows = [_summary(t) for t in traces]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    table += ["<tr>" + "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows]
    table.append("</table>")
    imgs = [
        f'<h2>{html.escape(name)}</h2>\n<img alt="{html.escape(name)}" width="{int(WIDTH_IN * DPI)}" '
        f'height="{int(PANEL_HEIGHT_IN * DPI)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in panels.items()
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>vmferry migration report</title>",
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;border-bottom:1px solid #ccc}</style>",
        "</head><body>", "<h1>vmferry migration report</h1>", *table, *imgs, "</body></html>", "",
    ])


def write_report(trace_paths: Sequence[str | Path], out: str | Path) -> Path:
    """Read (and check) the traces, then write `out`: .html or .png."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise VmferryError(f"report {out}: the output must end in .html or .png")
    traces = [read_trace(p) for p in trace_paths]
    try:
        if suffix == ".png":
            out.write_bytes(render_png(traces))
        else:
            out.write_text(render_html(traces), encoding="utf-8")
    except OSError as e:
        raise VmferryError(f"cannot write the report {out}: {e.strerror or e}") from None
    return out


def main(args: argparse.Namespace) -> int:
    path = write_report(args.traces, args.output)
    print(path)
    return 0

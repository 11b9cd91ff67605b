#!/usr/bin/env python3
"""Plots benches/archive.rs's CSVs (archive_*.csv) as SVG and writes archive_summary.md.

    scripts/plot_archive.py [DIR]    # DIR defaults to docs/bench

Called by scripts/plot.py too. No third-party modules (bar charts from plot.py, the line
chart here).
"""

import os
import statistics
import sys
from html import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import COLORS, bar_chart, fmt, num, read, save_svg, table, unique  # noqa: E402

MODES = ["eager local", "lazy local", "eager http", "lazy http", "lazy http + prefetch"]


def size_label(mib):
    mib = int(mib)
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


def line_chart(path, title, series, xlabel, ylabel, note=""):
    """series: [(name, [(x, y)])], linear axes from 0."""
    W, H = 780, 440
    L, R, T, B = 80, 20, 50, 90
    pw, ph = W - L - R, H - T - B
    xs = [x for _, pts in series for x, _ in pts] or [1]
    ys = [y for _, pts in series for _, y in pts] or [1]
    xmax, ymax = max(xs) or 1, (max(ys) or 1) * 1.1

    def px(x):
        return L + pw * x / xmax

    def py(y):
        return T + ph - ph * y / ymax

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#333"/>',
        f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#333"/>',
    ]
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{L + pw}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{fmt(y)}</text>')
        x = xmax * i / 5
        out.append(f'<text x="{px(x):.1f}" y="{T + ph + 16}" text-anchor="middle" font-size="11">{fmt(x)}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{T + ph + 36}" text-anchor="middle" font-size="12">{escape(xlabel)}</text>')
    out.append(
        f'<text x="18" y="{T + ph / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 18 {T + ph / 2})">{escape(ylabel)}</text>'
    )
    for i, (name, pts) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        ly = T + ph + 54 + 14 * i
        out.append(f'<rect x="{L}" y="{ly - 9}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{L + 16}" y="{ly}" font-size="11">{escape(name)}</text>')
    if note:
        out.append(f'<text x="{W - R}" y="{H - 8}" text-anchor="end" font-size="10" fill="#555">{escape(note)}</text>')
    save_svg(path, out)


def median(rows, key):
    v = [num(r[key]) for r in rows if num(r[key]) is not None]
    return statistics.median(v) if v else None


def restore_cells(rest):
    """Cells of the (memory, mode) rows of the restore table (None where it has no runs)."""

    def cells(key):
        m, mode = key
        rows = [r for r in rest if int(r["mem_mib"]) == m and r["mode"] == mode]
        if not rows:
            return None

        def b(k):
            v = median(rows, k)
            return "" if v is None else f"{v / 1024:.0f} KiB ({100 * v / (m << 20):.3f} %)"

        return [
            size_label(m),
            mode,
            fmt(median(rows, "restore_ms")),
            b("before_first_bytes"),
            fmt(median(rows, "workload_ms")),
            b("bytes_after_workload"),
            b("first_second_bytes"),
        ]

    return cells


def create_cells(r):
    return [
        size_label(r["mem_mib"]),
        f"{int(r['nonzero_bytes']) >> 20} MiB",
        f"{fmt(num(r['create_ms']))} ms",
        f"{int(r['stored_bytes']) / 2**20:.1f} MiB",
        f"{fmt(num(r['push_ms']))} ms",
        f"{int(r['archive_bytes']) / 2**20:.1f} MiB",
    ]


def storage_cells(r):
    return [
        size_label(r["mem_mib"]),
        r["snapshot"],
        r["chunks_new"],
        f"{int(r['bytes_new']) / 2**20:.2f} MiB",
        f"{int(r['manifest_bytes']) / 1024:.0f} KiB",
        f"{int(r['state_bytes']) / 1024:.1f} KiB",
    ]


def main(d):
    rest = read(os.path.join(d, "archive_restore.csv"), lambda r: (r["mem_mib"], r["mode"]))
    create = read(os.path.join(d, "archive_create.csv"), lambda r: r["mem_mib"])
    storage = read(os.path.join(d, "archive_storage.csv"), lambda r: (r["mem_mib"], r["snapshot"]))
    tl = read(os.path.join(d, "archive_timeline.csv"), lambda r: r["mode"])
    sizes = sorted({int(r["mem_mib"]) for r in rest + create})
    cats = [size_label(m) for m in sizes]
    L = []
    if rest:
        def series(key, modes=MODES, scale=1.0):
            out = []
            for mode in modes:
                vals = []
                for m in sizes:
                    rows = [r for r in rest if int(r["mem_mib"]) == m and r["mode"] == mode]
                    v = median(rows, key) if rows else None
                    vals.append(v * scale if v is not None else None)
                out.append((mode, vals))
            return out

        bar_chart(
            os.path.join(d, "archive_restore.svg"),
            "Restore: start → vCPUs running (ms, median)",
            cats,
            series("restore_ms"),
            "ms",
            log=True,
            hlines=[(50, "target 50 ms")],
            note="tiny guest, 20 % of chunks non-zero; HTTP = nginx on loopback, empty cache",
        )
        bar_chart(
            os.path.join(d, "archive_workload.svg"),
            "Workload after resume: 5 % of the non-zero chunks touched (ms)",
            cats,
            series("workload_ms"),
            "ms",
            log=True,
        )
        http = ["lazy http", "lazy http + prefetch"]
        mem = {m: m << 20 for m in sizes}
        fs = []
        for mode in http:
            for key, what in [("before_first_bytes", "before 1st instr."), ("first_second_bytes", "first second")]:
                vals = []
                for m in sizes:
                    rows = [r for r in rest if int(r["mem_mib"]) == m and r["mode"] == mode]
                    v = median(rows, key) if rows else None
                    vals.append(100.0 * v / mem[m] if v is not None else None)
                fs.append((f"{mode}: {what}", vals))
        bar_chart(
            os.path.join(d, "archive_fetched.svg"),
            "Bytes fetched, % of guest memory (no background fill)",
            cats,
            fs,
            "% of memory",
            log=True,
            hlines=[(10, "target 10 %")],
        )
        header = ["memory", "mode", "restore → running (ms)", "fetched before 1st instruction", "workload (ms)",
                  "fetched after workload", "fetched in 1st second"]
        L += table(header, [(m, mode) for m in sizes for mode in MODES], restore_cells(rest))
    if create:
        by = {int(r["mem_mib"]): r for r in create}
        bar_chart(
            os.path.join(d, "archive_create.svg"),
            "Snapshot create and archive push (ms)",
            cats,
            [
                ("snapshot create", [num(by[m]["create_ms"]) if m in by else None for m in sizes]),
                ("archive push", [num(by[m]["push_ms"]) if m in by else None for m in sizes]),
            ],
            "ms",
            log=True,
        )
        header = ["memory", "non-zero", "create", "stored", "push", "archive size"]
        L += table(header, [by[m] for m in sizes if m in by], create_cells)
    if storage:
        kinds = sorted({r["snapshot"] for r in storage}, key=lambda k: (not k.startswith("full"), k))
        ser = []
        for k in kinds:
            vals = []
            for m in sizes:
                rows = [r for r in storage if int(r["mem_mib"]) == m and r["snapshot"] == k]
                vals.append(
                    (int(rows[0]["bytes_new"]) + int(rows[0]["manifest_bytes"]) + int(rows[0]["state_bytes"])) / 2**20
                    if rows
                    else None
                )
            ser.append((k, vals))
        bar_chart(
            os.path.join(d, "archive_storage.svg"),
            "Archive storage added per snapshot (MiB: new chunks + manifest + state)",
            cats,
            ser,
            "MiB",
            log=True,
        )
        header = ["memory", "snapshot", "chunks new", "bytes new", "manifest", "state"]
        L += table(header, sorted(storage, key=lambda r: (int(r["mem_mib"]), r["snapshot"])), storage_cells)
    if tl:
        modes = unique(r["mode"] for r in tl)
        ser = [
            (m, [(num(r["t_ms"]), int(r["total_bytes"]) / 2**20) for r in tl if r["mode"] == m])
            for m in modes
        ]
        line_chart(
            os.path.join(d, "archive_timeline.svg"),
            "Bytes fetched over time after a resume over HTTP (1 GiB guest)",
            ser,
            "ms since the restore started",
            "MiB fetched",
            note="workload (5 % of non-zero chunks) right after resume; fill 64 MiB/s",
        )
    with open(os.path.join(d, "archive_summary.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print(f"wrote {os.path.join(d, 'archive_summary.md')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")

#!/usr/bin/env python3
"""Plots the bench CSVs (written by benches/*.rs, collected by scripts/bench.sh) as SVG.

    scripts/plot.py [DIR]      # DIR defaults to docs/bench; reads DIR/*.csv, writes DIR/*.svg

No third-party modules: the SVG (grouped bar charts, linear or log scale) is written by hand.
Each CSV may hold several runs (column `run`); only the latest run of each file is plotted.
"""

import csv
import math
import os
import statistics
import sys
from html import escape

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f"]


def read(path, key=None):
    """Rows of a CSV; with `key` (row → tuple), only the latest run of each key is kept."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if key and rows and "run" in rows[0]:
        last = {}
        for r in rows:
            k = key(r)
            last[k] = max(last.get(k, 0), int(r["run"]))
        rows = [r for r in rows if int(r["run"]) == last[key(r)]]
    return rows


def num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt(v):
    if v is None:
        return ""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if 0 < v < 0.01:
        return f"{v:.2g}"
    return f"{v:.2f}"


def save_svg(path, out):
    """Closes the SVG element lines `out` and writes them to `path`."""
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path}")


def bar_chart(path, title, categories, series, ylabel, log=False, hlines=(), note=""):
    """series: [(name, [value or None per category])]; hlines: [(value, label)]."""
    W, H = 780, 440
    L, R, T, B = 70, 20, 50, 110
    pw, ph = W - L - R, H - T - B
    vals = [v for _, vs in series for v in vs if v is not None and v > 0]
    vals += [v for v, _ in hlines]
    if not vals:
        return
    if log:
        lo = 10 ** math.floor(math.log10(min(vals)) - 0.3)
        hi = 10 ** math.ceil(math.log10(max(vals) * 1.3))

        def y(v):
            v = max(v, lo)
            return T + ph - ph * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

        ticks = []
        d = lo
        while d <= hi * 1.0001:
            ticks.append(d)
            d *= 10
    else:
        lo, top = 0.0, max(vals) * 1.15
        step = 10 ** math.floor(math.log10(top))
        for m in (1, 2, 5, 10):
            if top / (step * m / 5) <= 8:
                step = step * m / 5
                break
        hi = math.ceil(top / step) * step

        def y(v):
            return T + ph - ph * (v - lo) / (hi - lo)

        ticks = [i * step for i in range(int(round(hi / step)) + 1)]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for t in ticks:
        yy = y(t)
        out.append(f'<line x1="{L}" y1="{yy:.1f}" x2="{L + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{yy + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(
        f'<text x="16" y="{T + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {T + ph / 2})">{escape(ylabel)}{" (log scale)" if log else ""}</text>'
    )
    n, k = len(categories), len(series)
    gw = pw / max(n, 1)
    bw = gw * 0.8 / max(k, 1)
    for i, c in enumerate(categories):
        gx = L + i * gw + gw * 0.1
        cx = L + i * gw + gw / 2
        for li, part in enumerate(c.split("\n")):
            out.append(f'<text x="{cx:.1f}" y="{T + ph + 16 + 14 * li}" text-anchor="middle">{escape(part)}</text>')
        for j, (_, vs) in enumerate(series):
            v = vs[i]
            if v is None:
                continue
            x = gx + j * bw
            y0 = y(lo if log else 0)
            y1 = y0 if (log and v <= 0) else y(v)
            if y0 - y1 > 0:
                out.append(
                    f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bw * 0.92:.1f}" height="{y0 - y1:.1f}" '
                    f'fill="{COLORS[j % len(COLORS)]}"/>'
                )
            tx, ty = x + bw * 0.46, y1 - 3
            label = fmt(v) if v > 0 else "0"
            if bw < 30:
                out.append(
                    f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="10" transform="rotate(-90 {tx:.1f} {ty:.1f})" '
                    f'dominant-baseline="middle">{label}</text>'
                )
            else:
                out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="middle" font-size="10">{label}</text>')
    for v, label in hlines:
        yy = y(v)
        out.append(f'<line x1="{L}" y1="{yy:.1f}" x2="{L + pw}" y2="{yy:.1f}" stroke="#c00" stroke-dasharray="6 4"/>')
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="black"/>')
    out.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="black"/>')
    lx, ly = L, T + ph + 50
    for j, (name, _) in enumerate(series):
        if lx + 30 + 7 * len(name) > W:
            lx, ly = L, ly + 18
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{COLORS[j % len(COLORS)]}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}">{escape(name)}</text>')
        lx += 30 + 7 * len(name)
    for _, name in hlines:
        if lx + 40 + 7 * len(name) > W:
            lx, ly = L, ly + 18
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="#c00" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{lx + 26}" y="{ly}" fill="#c00">{escape(name)}</text>')
        lx += 40 + 7 * len(name)
    if note:
        out.append(f'<text x="{L}" y="{H - 8}" font-size="10" fill="#555">{escape(note)}</text>')
    save_svg(path, out)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "docs/bench"
    snap = read(os.path.join(d, "snapshot.csv"), lambda r: (r["guest"], r["mem_mib"]))
    rest = read(os.path.join(d, "restore.csv"), lambda r: (r["guest"], r["mem_mib"], r["method"]))
    incr = read(os.path.join(d, "incremental.csv"), lambda r: ())
    host = {r["metric"]: r for r in read(os.path.join(d, "host.csv"), lambda r: r["metric"])}
    load = ""
    if snap:
        load = f"load average during the run: {min(float(r['load1']) for r in snap):.1f}–{max(float(r['load1']) for r in snap):.1f} on 2 cores"

    def label(guest, mib):
        mib = int(mib)
        size = f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"
        kind = {"synthetic": "synthetic", "synthetic-tmpfs": "synth., tmpfs", "linux": "Linux idle"}
        return f"{size}\n{kind.get(guest, guest)}"

    keys = unique((r["guest"], r["mem_mib"]) for r in snap)
    keys.sort(key=lambda k: (GUEST_ORDER.get(k[0], 3), k[0], int(k[1])))
    cats = [label(*k) for k in keys]

    if snap:
        by = {(r["guest"], r["mem_mib"]): r for r in snap}
        bar_chart(
            os.path.join(d, "create.svg"),
            "Snapshot create time vs memory size",
            cats,
            [
                ("create (ms)", [num(by[k]["create_ms"]) for k in keys]),
                ("target: 1.2 × non-zero bytes ÷ seq. write+fsync bandwidth", [num(by[k]["target_ms"]) for k in keys]),
            ],
            "milliseconds",
            log=True,
            note=load,
        )
        mib = 1 << 20
        bar_chart(
            os.path.join(d, "bytes.svg"),
            "Snapshot bytes vs memory size",
            cats,
            [
                ("non-zero 4 KiB pages", [int(by[k]["nonzero_pages"]) * 4096 / mib for k in keys]),
                ("new chunks, raw (64 KiB each)", [int(by[k]["bytes_new"]) / mib for k in keys]),
                ("stored (zstd-1, on disk)", [int(by[k]["bytes_written"]) / mib for k in keys]),
            ],
            "MiB",
            note="synthetic: ~15 % non-zero pages (see docs/BENCHMARKS.md); linux: the idle guest",
        )

    if rest:
        def med(m):
            vs = []
            for g, mb in keys:
                xs = [num(r["ms"]) for r in rest if r["guest"] == g and r["mem_mib"] == mb and r["method"] == m]
                xs = [x for x in xs if x is not None]
                vs.append(statistics.median(xs) if xs else None)
            return vs

        charts = [
            (
                "restore.svg",
                "Restore in process (build_from_snapshot → VM ready, paused)",
                [
                    ("in_process_lazy_warm", "lazy: ready"),
                    ("in_process_lazy_warm_filled", "lazy: all memory filled"),
                    ("in_process_eager_warm", "eager: ready"),
                    ("in_process_lazy_cold", "lazy, cache dropped: ready"),
                    ("in_process_eager_cold", "eager, cache dropped: ready"),
                ],
            ),
            (
                "restore_process.svg",
                "Restore as a process (vmm restore DIR --paused)",
                [
                    ("process_lazy_log", "lazy: spawn → `restored` log line"),
                    ("process_lazy_api", "lazy: spawn → GET /vm answered"),
                    ("process_eager_log", "--eager-memory: → log line"),
                    ("process_eager_api", "--eager-memory: → GET /vm"),
                ],
            ),
        ]
        for fname, title, methods in charts:
            series = [(name, med(m)) for m, name in methods]
            series = [(n, v) for n, v in series if any(x is not None for x in v)]
            bar_chart(
                os.path.join(d, fname),
                title,
                cats,
                series,
                "milliseconds (median of the warm runs)",
                log=True,
                hlines=[(5.0, "target ≤ 5 ms at 256 MiB")],
                note=load,
            )

    if incr:
        # One bar group per dirty fraction, one series per dirty-tracking method.
        methods = unique(r.get("method", "rehash") for r in incr)
        cats_i = unique("base (full)" if r["dirty_pct"] == "base" else f"{r['dirty_pct']} % dirty" for r in incr)

        def series(key, scale=1.0):
            out = []
            for m in methods:
                vals = {}
                for r in incr:
                    if r.get("method", "rehash") == m:
                        p = r["dirty_pct"]
                        vals["base (full)" if p == "base" else f"{p} % dirty"] = num(r[key]) * scale
                out.append((m, [vals.get(c, 0.0) for c in cats_i]))
            return out

        size = int(incr[0]["mem_mib"])
        bar_chart(
            os.path.join(d, "incremental_time.svg"),
            f"Incremental snapshot create time vs dirty fraction ({size} MiB, shared store)",
            cats_i,
            [(f"{m} (ms)", v) for m, v in series("create_ms")],
            "milliseconds",
            log=True,
            note="kvm-log: only chunks with a dirty page re-read; rehash: every chunk re-hashed, changed ones stored",
        )
        bar_chart(
            os.path.join(d, "incremental_bytes.svg"),
            f"Incremental snapshot: bytes added vs dirty fraction ({size} MiB)",
            cats_i,
            [(f"{m}: stored MiB added", v) for m, v in series("bytes_written", 1 / (1 << 20))],
            "MiB",
            log=True,
        )
    idle = read(os.path.join(d, "idle_series.csv"), lambda r: r.get("guest", "tiny"))
    if idle:
        # Store size after each of the ten snapshots, relative to the first one.
        guests = unique(r.get("guest", "tiny") for r in idle)
        snaps = sorted({int(r["snapshot"]) for r in idle})
        names = {"tiny": "tiny guest (synthetic memory)", "linux": "Linux, idle"}
        series = []
        for g in guests:
            rows = {int(r["snapshot"]): r for r in idle if r.get("guest", "tiny") == g}
            mem = int(next(iter(rows.values()))["mem_mib"])
            first = int(rows[min(rows)]["store_bytes"]) / (1 << 20)
            series.append(
                (
                    f"{names.get(g, g)}, {mem} MiB (first: {first:.2f} MiB)",
                    [num(rows[i]["ratio_to_first"]) if i in rows else None for i in snaps],
                )
            )
        bar_chart(
            os.path.join(d, "idle_series.svg"),
            "Ten snapshots into one store: store size ÷ the first snapshot's",
            [str(i) for i in snaps],
            series,
            "× first snapshot (chunk store only)",
            hlines=[(1.1, "target ≤ 1.1× after 10")],
            note="snapshot number; tiny: resumed 200 ms between snapshots; Linux: idle, 2 s apart (vmm snapshot create --store)",
        )
    peers = read(os.path.join(d, "peers.csv"), lambda r: ())
    peers = [r for r in peers if num(r["ratio"]) is not None]
    if peers:
        # benches/peers.rs: vmm ÷ Firecracker for each figure of the same run.
        bar_chart(
            os.path.join(d, "peers.svg"),
            "vmm ÷ Firecracker, same run (below 1: vmm faster / smaller)",
            [peer_label(r["metric"]) for r in peers],
            [("vmm ÷ Firecracker", [num(r["ratio"]) for r in peers])],
            "vmm ÷ Firecracker",
            log=True,
            hlines=[(1.0, "parity")],
            note=f"same host, same run; 1-minute load average {num(peers[-1]['load1']):.1f} on 2 cores at its end",
        )
    if host:
        names = [
            ("memcpy_warm", "memcpy"),
            ("memcpy_first_touch", "memcpy to\nfresh pages"),
            ("blake3_1thread", "BLAKE3\n1 thread"),
            ("blake3_all_cores", "BLAKE3\nall cores"),
            ("zstd1_compress_text", "zstd-1 comp.\ntext"),
            ("zstd1_decompress_text", "zstd-1 dec.\ntext"),
            ("write_fsync_seq_bench_dir", "write+fsync\nsequential"),
            ("write_fsync_chunks_bench_dir", "write+fsync\n64 KiB files"),
        ]
        names = [(m, n) for m, n in names if m in host]
        bar_chart(
            os.path.join(d, "host.svg"),
            "Host limits (GB/s)",
            [n for _, n in names],
            [("GB/s", [num(host[m]["value"]) for m, _ in names])],
            "GB/s",
            log=True,
        )


# Short x labels for the metrics of benches/peers.rs (first match wins).
PEER_LABELS = [
    ("boot", "boot"),
    ("full snapshot create", "full snap.\ntime"),
    ("pause", "pause"),
    ("full snapshot, bytes", "full snap.\nbytes"),
    ("create, p50", "10 snaps\ntime"),
    ("FC: full", "10 snaps\nvs full"),
    ("diff)", "10 snaps\nvs diff"),
    ("running, p50", "restore\np50"),
    ("running, min", "restore\nmin"),
    ("running, max", "restore\nmax"),
    ("all running", "clones\nall up"),
    ("PSS", "clones\nPSS"),
]


def peer_label(metric):
    return next((label for key, label in PEER_LABELS if key in metric), metric[:10])


def started(rows):
    """'Run started …' line for a table, from the CSV's `run` column (unix seconds)."""
    import datetime

    ids = [int(r["run"]) for r in rows if r.get("run", "").isdigit()]
    if not ids:
        return []
    ts = sorted({datetime.datetime.fromtimestamp(i, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M") for i in ids})
    return [f"*Run started {' and '.join(ts)} UTC.*", ""]


def table(header, items, cells, intro=(), run_rows=None):
    """Markdown lines of one table, then a blank line: the 'Run started' line of `run_rows`
    (if given), the `intro` lines, the `header` row and its `|---|` row, and one row per
    item of `items` with the cells `cells(item)` returns (an item for which it returns None
    is left out)."""
    out = started(run_rows) if run_rows is not None else []
    out += list(intro)
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in items:
        row = cells(item)
        if row is not None:
            out.append("| " + " | ".join(row) + " |")
    return out + [""]


def unique(values):
    """The distinct values in first-seen order."""
    return list(dict.fromkeys(values))


MIB = 1 << 20
GUEST_ORDER = {"synthetic": 0, "synthetic-tmpfs": 1, "linux": 2}

RESTORE_COLUMNS = [
    ("in_process_lazy_warm", "lazy: ready"),
    ("in_process_lazy_warm_filled", "lazy: filled"),
    ("in_process_eager_warm", "eager: ready"),
    ("in_process_lazy_cold", "lazy cold: ready"),
    ("in_process_lazy_cold_filled", "lazy cold: filled"),
    ("in_process_eager_cold", "eager cold: ready"),
    ("memory_only_warm", "memory only (lib)"),
    ("process_lazy_log", "process lazy → log"),
    ("process_lazy_api", "process lazy → API"),
    ("process_eager_log", "process eager → log"),
    ("process_eager_api", "process eager → API"),
]


def snapshot_cells(r):
    nz = int(r["nonzero_pages"]) * 4096
    c, t = float(r["create_ms"]), float(r["target_ms"])
    return [
        r["guest"],
        f"{r['mem_mib']} MiB",
        f"{nz / MIB:.1f} MiB ({100 * int(r['nonzero_pages']) / int(r['pages']):.1f} %)",
        f"{100 * int(r['nonzero_chunks']) / int(r['chunks_total']):.1f} %",
        f"{r['chunks_new']} / {r['chunks_deduped']}",
        f"{int(r['bytes_new']) / MIB:.1f} MiB",
        f"{int(r['bytes_written']) / MIB:.2f} MiB",
        f"{c:.0f} ms",
        f"{t:.1f} ms",
        f"{c / t:.1f}×",
    ]


def restore_cells(rest):
    """Cells of one (guest, memory) row of the restore table: median (min) per method."""

    def cells(key):
        g, mb = key
        out = [g, f"{mb} MiB"]
        for m, _ in RESTORE_COLUMNS:
            xs = [num(r["ms"]) for r in rest if (r["guest"], r["mem_mib"], r["method"]) == (g, mb, m)]
            xs = [x for x in xs if x is not None]
            if not xs:
                out.append("–")
            elif len(xs) == 1:
                out.append(f"{xs[0]:.1f}")
            else:
                out.append(f"{statistics.median(xs):.1f} ({min(xs):.1f})")
        return out

    return cells


def incremental_cells(r):
    p = "base (full)" if r["dirty_pct"] == "base" else f"{r['dirty_pct']} %"
    return [
        r.get("method", "rehash"),
        p,
        r["pages_dirtied"],
        r["chunks_touched"],
        f"{float(r['create_ms']):.0f} ms",
        r.get("chunks_reused", "–"),
        r["chunks_new"],
        f"{int(r['bytes_new']) / MIB:.1f} MiB",
        f"{int(r['bytes_written']) / MIB:.2f} MiB",
    ]


def idle_cells(r):
    return [
        r.get("guest", "tiny"),
        f"{r['mem_mib']} MiB",
        r["snapshot"],
        f"{float(r['create_ms']):.0f} ms",
        str(int(r["bytes_written"])),
        f"{int(r['store_bytes']) / MIB:.2f} MiB",
        f"{float(r['ratio_to_first']):.4f}",
    ]


def host_cells(r):
    return [r["metric"], f"{float(r['value']):.3f} {r['unit']}", r["detail"]]


def boot_cells(r):
    return [
        r["iter"],
        f"{float(r['info_s']):.2f} s",
        f"{float(r['guest_info_s']):.2f} s",
        f"{float(r['exit_s']):.2f} s",
        r["exit_code"],
        f"{r['load1_before']} → {r['load1_after']}",
    ]


def disk_cells(r):
    return [
        r["side"],
        r["what"],
        str(int(float(r["bytes"]))),
        f"{float(r['seconds']):.4g}",
        fmt(float(r["mb_per_s"])),
        r["detail"],
    ]


def block_cells(r):
    name = r["bench"] if "/" in r["bench"] else f"process_request/{r['bench']}"
    return [
        name,
        f"{float(r['median_ns']):.0f} ns",
        f"{float(r['mean_ns']):.0f} ns",
        f"{float(r['gb_per_s_median']):.1f}",
    ]


def run_txt(d):
    """The lines quoting run.txt, if there is one."""
    run = os.path.join(d, "run.txt")
    if not os.path.exists(run):
        return []
    return [
        "`run.txt` (the last `scripts/bench.sh` call; benches it did not run keep their "
        "earlier CSV, and each table says when its run started):",
        "",
        "```",
        open(run).read().rstrip(),
        "```",
        "",
    ]


def summary(d):
    """Writes DIR/summary.md: the latest figures of every CSV as Markdown tables."""
    L = run_txt(d)
    snap = read(os.path.join(d, "snapshot.csv"), lambda r: (r["guest"], r["mem_mib"]))
    snap.sort(key=lambda r: (GUEST_ORDER.get(r["guest"], 3), int(r["mem_mib"])))
    if snap:
        L += table(
            ["guest", "memory", "non-zero pages", "non-zero chunks", "chunks new / deduped", "raw new",
             "stored", "create", "target", "create ÷ target"],
            snap, snapshot_cells, run_rows=snap,
        )
    rest = read(os.path.join(d, "restore.csv"), lambda r: (r["guest"], r["mem_mib"], r["method"]))
    if rest:
        keys = unique((r["guest"], r["mem_mib"]) for r in rest)
        keys.sort(key=lambda k: (GUEST_ORDER.get(k[0], 3), int(k[1])))
        intro = ["Restore, milliseconds: median (min) of the warm runs; cold = one run after dropping the page cache.", ""]
        L += table(["guest", "memory"] + [n for _, n in RESTORE_COLUMNS], keys, restore_cells(rest), intro, rest)
    incr = read(os.path.join(d, "incremental.csv"), lambda r: ())
    if incr:
        intro = [
            f"Incremental ({incr[0]['mem_mib']} MiB, one shared store per method, each snapshot after dirtying the given share of pages since the previous one):",
            "",
        ]
        header = ["method", "dirty", "pages dirtied", "64 KiB chunks touched", "create", "chunks reused unread",
                  "new chunks", "raw new", "stored bytes added"]
        L += table(header, incr, incremental_cells, intro, incr)
    idle = read(os.path.join(d, "idle_series.csv"), lambda r: ())
    if idle:
        intro = [
            "Ten snapshots of one guest into one store (tiny guest: running 200 ms between them; "
            "Linux: idle, 2 s apart, through `vmm snapshot create --store`):",
            "",
        ]
        header = ["guest", "memory", "snapshot", "create", "bytes added", "store", "× first"]
        L += table(header, idle, idle_cells, intro, idle)
    host = read(os.path.join(d, "host.csv"), lambda r: r["metric"])
    if host:
        L += table(["host limit", "value", "how"], host, host_cells, run_rows=host)
    boot = read(os.path.join(d, "boot.csv"), lambda r: ())
    if boot:
        header = ["boot", "start → `vmmtest: info`", "guest clock at that line", "start → exit", "exit code", "load"]
        L += table(header, boot, boot_cells, run_rows=boot)
    disk = read(os.path.join(d, "guest_disk.csv"), lambda r: ())
    if disk:
        L += table(["side", "what", "bytes", "seconds", "MB/s", "note"], disk, disk_cells, run_rows=disk)
    blk = read(os.path.join(d, "block_request.csv"))
    if blk:
        intro = ["*(`block_request.csv` has no run time: from the last `scripts/bench.sh` call that ran `block_request`.)*", ""]
        L += table(["criterion bench", "median", "mean", "GB/s (median)"], blk, block_cells, intro)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write("\n".join(L))
    print(f"wrote {os.path.join(d, 'summary.md')}")


if __name__ == "__main__":
    main()
    summary(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")

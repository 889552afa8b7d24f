#!/usr/bin/env python3
"""Plot a W5 `fanout-sweep` run as an SVG (standard library only).

    timeline-bench fanout-sweep --json > sweep.jsonl
    python3 bench/plot_sweep.py sweep.jsonl -o docs/fanout-sweep.svg

Reads the `--json` result lines (other workloads' lines and non-JSON lines
are skipped; `-` or no file reads stdin) and draws three log-log panels
against the group size, one line per fan-out mode: storage writes per
message, reads per delivery, and the resulting read:write ratio (reads per
message over storage writes per message). A dashed vertical line marks the
hybrid threshold.
"""

import argparse
import json
import math
import sys
from xml.sax.saxutils import escape

MODES = [
    # mode, colour, dash pattern, marker radius
    ("write", "#1f77b4", "", 4.5),
    ("read", "#d62728", "", 4.5),
    ("hybrid", "#2ca02c", "6,4", 3.0),
]
PANELS = [
    ("storage_writes_per_message", "storage writes per message"),
    ("reads_per_delivery", "reads per delivery"),
    ("read_write_ratio", "read:write ratio (per message)"),
]
W, H = 1300, 470
PANEL_W, PANEL_H = 330, 300
LEFT, TOP, GAP = 80, 80, 90


def load(paths):
    points = {}
    meta = {}
    streams = [sys.stdin] if not paths or paths == ["-"] else [open(p) for p in paths]
    for f in streams:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("workload") != "fanout-sweep":
                continue
            mode, size = d.get("fanout_mode"), d.get("group_size")
            if mode is None or size is None:
                continue
            points.setdefault(mode, []).append(d)
            if mode == "hybrid" and d.get("hybrid_threshold") is not None:
                meta["threshold"] = d["hybrid_threshold"]
            for k in ("entries", "durability", "cores", "payload"):
                if k in d:
                    meta.setdefault(k, d[k])
    for v in points.values():
        v.sort(key=lambda d: d["group_size"])
    return points, meta


def decades(values):
    vals = [v for v in values if v and v > 0]
    if not vals:
        return 0, 1
    lo = math.floor(math.log10(min(vals)))
    hi = math.ceil(math.log10(max(vals)))
    if hi == lo:
        hi += 1
    return lo, hi


def label(e):
    v = 10.0 ** e
    if e >= 6:
        return f"{v / 1e6:g}M"
    if e >= 3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def panel(out, x0, y0, key, title, points, xr, meta):
    ys = [d.get(key) for ds in points.values() for d in ds]
    yr = decades(ys)

    def px(v):
        return x0 + (math.log10(v) - xr[0]) / (xr[1] - xr[0]) * PANEL_W

    def py(v):
        return y0 + PANEL_H - (math.log10(v) - yr[0]) / (yr[1] - yr[0]) * PANEL_H

    out.append(f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" '
               'fill="none" stroke="#333" stroke-width="1"/>')
    for e in range(xr[0], xr[1] + 1):
        x = px(10.0 ** e)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + PANEL_H}" '
                   'stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + PANEL_H + 18}" text-anchor="middle" '
                   f'font-size="12">{label(e)}</text>')
    for e in range(yr[0], yr[1] + 1):
        y = py(10.0 ** e)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PANEL_W}" y2="{y:.1f}" '
                   'stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" '
                   f'font-size="12">{label(e)}</text>')
    t = meta.get("threshold")
    if t and xr[0] <= math.log10(t) <= xr[1]:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + PANEL_H}" '
                   'stroke="#888" stroke-width="1" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{x + 4:.1f}" y="{y0 + 14}" font-size="11" fill="#666">'
                   f'H = {t}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 10}" text-anchor="middle" '
               f'font-size="14" font-weight="bold">{escape(title)}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 40}" text-anchor="middle" '
               'font-size="13">group size (members)</text>')
    cy = y0 + PANEL_H / 2
    out.append(f'<text x="{x0 - 52}" y="{cy}" text-anchor="middle" font-size="13" '
               f'transform="rotate(-90 {x0 - 52} {cy})">{escape(title)}</text>')
    for mode, colour, dash, r in MODES:
        pts = [(d["group_size"], d.get(key)) for d in points.get(mode, [])]
        pts = [(x, y) for x, y in pts if x and y and x > 0 and y > 0]
        if not pts:
            continue
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"{dash_attr}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{r}" fill="{colour}">'
                       f'<title>{mode}, {x} members: {y:g}</title></circle>')


def render(points, meta):
    sizes = [d["group_size"] for ds in points.values() for d in ds]
    xr = decades(sizes)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    sub = ", ".join(f"{k} {meta[k]}" for k in ("entries", "durability", "payload") if k in meta)
    out.append(f'<text x="{W / 2}" y="28" text-anchor="middle" font-size="17" '
               f'font-weight="bold">W5 fanout-sweep: write vs read vs hybrid fan-out</text>')
    out.append(f'<text x="{W / 2}" y="48" text-anchor="middle" font-size="12" fill="#555">'
               f'{escape(sub)} (timeline-bench fanout-sweep --json)</text>')
    for i, (key, title) in enumerate(PANELS):
        panel(out, LEFT + i * (PANEL_W + GAP), TOP, key, title, points, xr, meta)
    lx, ly = LEFT, H - 22
    for mode, colour, dash, r in MODES:
        if mode not in points:
            continue
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 30}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"{dash_attr}/>')
        out.append(f'<circle cx="{lx + 15}" cy="{ly}" r="{r}" fill="{colour}"/>')
        out.append(f'<text x="{lx + 38}" y="{ly + 4}" font-size="13">{mode} fan-out</text>')
        lx += 150
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="JSON lines (default: stdin)")
    ap.add_argument("-o", "--output", default="-", help="SVG file (default: stdout)")
    a = ap.parse_args()
    points, meta = load(a.files)
    if not points:
        sys.exit("plot_sweep.py: no fanout-sweep result lines in the input")
    svg = render(points, meta)
    if a.output == "-":
        sys.stdout.write(svg)
    else:
        with open(a.output, "w") as f:
            f.write(svg)


if __name__ == "__main__":
    main()

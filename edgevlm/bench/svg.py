"""Small inline-SVG charts for report.html: no plotting library, no script, no external asset.

Each function returns an <svg> string with a viewBox (it scales to its container) and its own text, so
the HTML renders the same in a browser with no network and in a headless screenshot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D31", "#000000")  # Okabe-Ito
FONT = "font-family='system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif'"


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About n round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if not math.isfinite(high - low) or high <= low:
        high = low + 1.0
    raw = (high - low) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(low / step) * step
    ticks = []
    t = start
    while t < high + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.3g}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    # No xmlns: inline SVG in HTML5 needs none, and the report then holds no URL at all.
    return (f"<svg viewBox='0 0 {width} {height}' role='img' "
            f"aria-label='{escape(title)}' {FONT} font-size='13'><title>{escape(title)}</title>"
            + "".join(body) + "</svg>")


def _x_axis(body: list[str], ticks: list[float], sx, top: float, bottom: float, label: str) -> None:
    for t in ticks:
        x = sx(t)
        body.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{bottom}' stroke='#e5e7eb'/>")
        body.append(f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle' fill='#4b5563'>{fmt(t)}</text>")
    mid = (sx(ticks[0]) + sx(ticks[-1])) / 2
    body.append(f"<text x='{mid:.1f}' y='{bottom + 36}' text-anchor='middle' fill='#111827'>{escape(label)}</text>")


def _y_axis(body: list[str], ticks: list[float], sy, left: float, right_x: float, top: float, bottom: float,
            label: str) -> None:
    for t in ticks:
        body.append(f"<line x1='{left}' x2='{right_x}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#e5e7eb'/>")
        body.append(f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end' fill='#4b5563'>{fmt(t)}</text>")
    body.append(f"<text transform='translate(14 {(top + bottom) / 2:.0f}) rotate(-90)' text-anchor='middle' "
                f"fill='#111827'>{escape(label)}</text>")


def box_plot(rows: Sequence[tuple[str, Sequence[float]]], xlabel: str, title: str, width: int = 1100,
             marker_q: float = 90) -> str:
    """Horizontal box plots: box p25-p75, line at the median, whiskers min-max, samples as dots and a red
    tick at the `marker_q` percentile (p90: the MLPerf SingleStream figure)."""
    rows = [(label, list(v)) for label, v in rows if len(v)]
    if not rows:
        return ""
    left, right, row_h, top = 230, 30, 46, 30
    height = top + row_h * len(rows) + 50
    hi = max(max(v) for _, v in rows)
    ticks = nice_ticks(0, hi * 1.05)

    def sx(v: float) -> float:
        return left + (width - left - right) * v / ticks[-1]

    body: list[str] = []
    _x_axis(body, ticks, sx, top - 10, top + row_h * len(rows), xlabel)
    rng = np.random.default_rng(0)  # fixed jitter: the same report renders the same picture
    for i, (label, v) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        q = np.percentile(v, [0, 25, 50, 75, marker_q, 100], method="linear")
        c = color(i)
        body.append(f"<text x='{left - 10}' y='{y + 4:.1f}' text-anchor='end' fill='#111827'>{escape(label)}</text>")
        body.append(f"<line x1='{sx(q[0]):.1f}' x2='{sx(q[5]):.1f}' y1='{y}' y2='{y}' stroke='{c}' "
                    "stroke-width='1.5'/>")
        for k in (0, 5):
            body.append(f"<line x1='{sx(q[k]):.1f}' x2='{sx(q[k]):.1f}' y1='{y - 7}' y2='{y + 7}' stroke='{c}'/>")
        body.append(f"<rect x='{sx(q[1]):.1f}' y='{y - 13}' width='{max(sx(q[3]) - sx(q[1]), 1.5):.1f}' height='26' "
                    f"fill='{c}' fill-opacity='0.18' stroke='{c}' stroke-width='1.5' rx='2'/>")
        body.append(f"<line x1='{sx(q[2]):.1f}' x2='{sx(q[2]):.1f}' y1='{y - 13}' y2='{y + 13}' stroke='{c}' "
                    "stroke-width='3'/>")
        for val in v:
            jy = y + rng.uniform(-9, 9)
            body.append(f"<circle cx='{sx(val):.1f}' cy='{jy:.1f}' r='2.2' fill='{c}' fill-opacity='0.55'/>")
        body.append(f"<line x1='{sx(q[4]):.1f}' x2='{sx(q[4]):.1f}' y1='{y - 17}' y2='{y + 17}' stroke='#dc2626' "
                    "stroke-width='2.5'/>")
        body.append(f"<text x='{sx(q[4]) + 5:.1f}' y='{y - 9:.1f}' fill='#dc2626' font-size='11'>p{marker_q:g} "
                    f"{fmt(q[4])}</text>")
    return _svg(width, height, body, title)


def stacked_bars(rows: Sequence[tuple[str, dict[str, float]]], keys: Sequence[str], colors: dict[str, str],
                 xlabel: str, title: str, width: int = 1100) -> str:
    """Horizontal stacked bars (one per row, segments in `keys` order) with a legend on top."""
    rows = [(label, parts) for label, parts in rows if parts]
    if not rows:
        return ""
    left, right, row_h, top = 230, 70, 38, 44
    height = top + row_h * len(rows) + 50
    totals = [sum(p.get(k) or 0 for k in keys) for _, p in rows]
    ticks = nice_ticks(0, max(totals) * 1.02)

    def sx(v: float) -> float:
        return left + (width - left - right) * v / ticks[-1]

    body: list[str] = []
    x = left
    for k in keys:  # legend
        body.append(f"<rect x='{x}' y='6' width='14' height='14' fill='{colors[k]}' rx='2'/>")
        body.append(f"<text x='{x + 20}' y='18' fill='#111827'>{escape(k)}</text>")
        x += 30 + 8 * len(k) + 20
    _x_axis(body, ticks, sx, top - 6, top + row_h * len(rows), xlabel)
    for i, ((label, parts), total) in enumerate(zip(rows, totals, strict=True)):
        y = top + row_h * i + 6
        body.append(f"<text x='{left - 10}' y='{y + 17}' text-anchor='end' fill='#111827'>{escape(label)}</text>")
        acc = 0.0
        for k in keys:
            v = parts.get(k) or 0
            if v > 0:
                body.append(f"<rect x='{sx(acc):.1f}' y='{y}' width='{sx(acc + v) - sx(acc):.1f}' height='24' "
                            f"fill='{colors[k]}'><title>{escape(k)}: {fmt(v)}</title></rect>")
            acc += v
        body.append(f"<text x='{sx(total) + 6:.1f}' y='{y + 17}' fill='#374151'>{fmt(total)}</text>")
    return _svg(width, height, body, title)


def scatter(points: Sequence[dict], xlabel: str, ylabel: str, title: str, width: int = 540, height: int = 340,
            y_range: tuple[float, float] | None = None) -> str:
    """Points (dicts with label, x, y, color) and a legend. Points with a None coordinate are left out."""
    pts = [p for p in points if p["x"] is not None and p["y"] is not None]
    if not pts:
        return ""
    left, right, top, bottom = 64, 24, 16, height - 52
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    xt = nice_ticks(0, max(xs) * 1.15)
    if y_range is not None:  # a bounded metric (F1) on its whole scale: small differences look small
        yt = nice_ticks(y_range[0], y_range[1], 4)
    else:
        yt = nice_ticks(min(ys) - max(0.05 * abs(min(ys)), 0.02), max(ys) + max(0.05 * abs(max(ys)), 0.02), 4)

    def sx(v: float) -> float:
        return left + (width - left - right) * (v - xt[0]) / (xt[-1] - xt[0])

    def sy(v: float) -> float:
        return bottom - (bottom - top) * (v - yt[0]) / (yt[-1] - yt[0])

    body: list[str] = []
    _x_axis(body, xt, sx, top, bottom, xlabel)
    _y_axis(body, yt, sy, left, width - right, top, bottom, ylabel)
    # Points are named by a legend, not by labels beside them: close points would overprint their labels.
    lx, ly = left + 8, top + 14
    for p in pts:
        body.append(f"<circle cx='{sx(p['x']):.1f}' cy='{sy(p['y']):.1f}' r='6' fill='{p['color']}' stroke='white' "
                    "stroke-width='1.5'><title>" + escape(f"{p['label']}: {fmt(p['x'])}, {fmt(p['y'])}") + "</title>"
                    "</circle>")
        body.append(f"<circle cx='{lx}' cy='{ly - 4}' r='5' fill='{p['color']}'/>")
        body.append(f"<text x='{lx + 10}' y='{ly}' fill='#111827' font-size='12'>{escape(p['label'])}</text>")
        ly += 17
    return _svg(width, height, body, title)


def lines(series: Sequence[dict], xlabel: str, ylabel: str, title: str, width: int = 1100, height: int = 300,
          markers: bool = False, x_ticks: Sequence[float] | None = None) -> str:
    """Line chart of series (dicts with label, xs, ys, color); a legend names them."""
    series = [s for s in series if len(s["xs"])]
    if not series:
        return ""
    left, right, top, bottom = 70, 24, 34, height - 52
    xt = list(x_ticks) if x_ticks else nice_ticks(0, max(max(s["xs"]) for s in series))
    yt = nice_ticks(0, max(max(s["ys"]) for s in series) * 1.08, 4)

    def sx(v: float) -> float:
        return left + (width - left - right) * (v - xt[0]) / ((xt[-1] - xt[0]) or 1)

    def sy(v: float) -> float:
        return bottom - (bottom - top) * (v - yt[0]) / (yt[-1] - yt[0])

    body: list[str] = []
    _x_axis(body, xt, sx, top, bottom, xlabel)
    _y_axis(body, yt, sy, left, width - right, top, bottom, ylabel)
    x = left
    for s in series:
        body.append(f"<rect x='{x}' y='8' width='14' height='4' fill='{s['color']}'/>")
        body.append(f"<text x='{x + 20}' y='15' fill='#111827' font-size='12'>{escape(s['label'])}</text>")
        x += 40 + 7 * len(s["label"])
        pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(s["xs"], s["ys"], strict=True))
        body.append(f"<polyline points='{pts}' fill='none' stroke='{s['color']}' stroke-width='2'/>")
        if markers:
            for a, b in zip(s["xs"], s["ys"], strict=True):
                body.append(f"<circle cx='{sx(a):.1f}' cy='{sy(b):.1f}' r='4' fill='{s['color']}'/>")
    return _svg(width, height, body, title)

"""Scatter plots as inline SVG: no plotting library, no network, one self-contained page."""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT, MARGIN = 560, 340, 56


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def scatter(points: list[tuple[float, float, str]], front: list[tuple[float, float, str]], *, x_label: str,
            y_label: str, title: str, x_line: float | None = None, x_line_label: str = "") -> str:
    """An SVG scatter of all points (grey) with the front (blue, joined) and an optional vertical line."""
    everything = [(x, y) for x, y, _ in points + front if math.isfinite(x) and math.isfinite(y)]
    if not everything:
        return f'<p class="empty">{escape(title)}: no evaluated trials yet</p>'
    xs = [x for x, _ in everything] + ([x_line] if x_line is not None else [])
    ys = [y for _, y in everything]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    px = lambda x: MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 1.5 * MARGIN)  # noqa: E731
    py = lambda y: HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 1.5 * MARGIN)  # noqa: E731
    out = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>',
           f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN / 2}" y2="{HEIGHT - MARGIN}" class="axis"/>',
           f'<line x1="{MARGIN}" y1="{MARGIN / 2}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" class="axis"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<text x="{MARGIN - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">'
               f'{escape(y_label)}</text>')
    if x_line is not None:
        out.append(f'<line x1="{px(x_line):.1f}" y1="{MARGIN / 2}" x2="{px(x_line):.1f}" y2="{HEIGHT - MARGIN}" '
                   f'class="budget"/><text x="{px(x_line) - 4:.1f}" y="{MARGIN / 2 + 12}" text-anchor="end" '
                   f'class="budget-label">{escape(x_line_label)}</text>')
    for x, y, label in points:
        if math.isfinite(x) and math.isfinite(y):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" class="trial"><title>{escape(label)}</title></circle>')
    ordered = sorted((p for p in front if math.isfinite(p[0]) and math.isfinite(p[1])), key=lambda p: p[0])
    if len(ordered) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in ordered)
        out.append(f'<polyline points="{path}" class="front-line"/>')
    for x, y, label in ordered:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" class="front"><title>{escape(label)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)

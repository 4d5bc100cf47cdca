"""Small SVG charts drawn on the server, for the GPU page: a utilisation sparkline and a bar chart.

Each function returns the text of one ``<svg>`` element, ready to put in an HTML page: no
script, no stylesheet, no build step. Every chart has ``role="img"``, an ``aria-label`` and a
``<title>`` saying in words what it shows (screen readers read it, browsers show it on hover),
and every text from outside (user names, labels) is escaped.

Pure code: no docker, pynvml, jupyterhub, tornado or database imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

LINE = "#2563eb"
FILL = "#2563eb33"
BAR = "#2563eb"
AXIS = "#9ca3af"
TEXT = "#111827"
MUTED = "#6b7280"
UNKNOWN = "#f3f4f6"  # before readings were kept
CHAR_WIDTH = 7.5  # px per character of the 12 px sans-serif labels, generous enough to size the label column


@dataclass(frozen=True)
class Sample:
    """A reading at Unix time ``t``: a ratio 0..1, or None where there was no reading."""

    t: float
    value: float | None


def text(value: str) -> str:
    """``value`` as XML text or attribute content: ``<``, ``>``, ``&`` and ``"`` escaped."""
    return escape(value, {'"': "&quot;"})


def percent(value: float) -> str:
    return f"{round(value * 100)} %"


def runs(samples: Sequence[Sample], *, gap: float) -> list[list[Sample]]:
    """The samples split where a reading is missing or two readings are more than ``gap`` seconds apart.

    Samples are taken in time order; each run is a stretch the chart draws as one line.
    """
    found: list[list[Sample]] = []
    current: list[Sample] = []
    for s in sorted(samples, key=lambda s: s.t):
        if s.value is None or (current and s.t - current[-1].t > gap):
            if current:
                found.append(current)
            current = []
        if s.value is not None:
            current.append(s)
    if current:
        found.append(current)
    return found


def sparkline(
    samples: Sequence[Sample], *, start: float, end: float, width: int = 160, height: int = 32, gap: float = 90.0,
    label: str = "utilisation", known_from: float | None = None,
) -> str:
    """Utilisation 0..1 from ``start`` to ``end`` (Unix times) as a line over a filled area.

    x is time, so a stretch without readings (before the first, where one is missing, or where
    readings are more than ``gap`` seconds apart) is left blank: the line breaks there. A lone
    reading is a dot. ``known_from``: readings were kept from then on only (the time before it,
    if in the chart, is shaded grey). The title says the latest, mean and highest values, or
    that there are no readings yet.
    """
    pad = 2.0
    span = max(end - start, 1e-9)
    inside = [s for s in samples if start <= s.t <= end]
    values = [min(1.0, max(0.0, s.value)) for s in inside if s.value is not None]

    def x(t: float) -> float:
        return round(pad + (t - start) / span * (width - 2 * pad), 1)

    def y(v: float) -> float:
        return round(height - pad - min(1.0, max(0.0, v)) * (height - 2 * pad), 1)

    if values:
        latest = next(s.value for s in reversed(sorted(inside, key=lambda s: s.t)) if s.value is not None)
        summary = (f"{label}: now {percent(min(1.0, max(0.0, latest)))}, mean {percent(sum(values) / len(values))}, "
                   f"highest {percent(max(values))}")
    else:
        summary = f"{label}: no readings yet"
    shapes = []
    if known_from is not None and known_from > start:
        shapes.append(f'<rect class="unknown" x="{pad}" y="0" width="{round(x(min(known_from, end)) - pad, 1)}" '
                      f'height="{height}" fill="{UNKNOWN}"/>')
    shapes += [f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="{AXIS}" '
              f'stroke-width="1" stroke-dasharray="2 2"/>']
    for run in runs(inside, gap=gap):
        points = [(x(s.t), y(s.value)) for s in run if s.value is not None]
        if len(points) == 1:
            shapes.append(f'<circle class="reading" cx="{points[0][0]}" cy="{points[0][1]}" r="1.5" fill="{LINE}"/>')
            continue
        line = " ".join(f"{px},{py}" for px, py in points)
        area = f"{points[0][0]},{height - pad} {line} {points[-1][0]},{height - pad}"
        shapes.append(f'<polygon class="area" points="{area}" fill="{FILL}" stroke="none"/>')
        shapes.append(f'<polyline class="run" points="{line}" fill="none" stroke="{LINE}" stroke-width="1.5" '
                      f'stroke-linejoin="round"/>')
    return _svg(width, height, summary, shapes)


def bar_chart(
    rows: Sequence[tuple[str, float]], *, width: int = 520, bar_height: int = 18, unit: str = "GPU-hours",
    label: str = "GPU-hours by user", empty: str = "no usage",
) -> str:
    """One horizontal bar per (label, value) row, in the given order, lengths proportional to the values
    (a value above zero is at least 1 px long, so a sliver of use still shows).

    Each bar has its label on the left and its value at its end; hovering a bar shows both.
    Without rows (or without a value above zero) the chart is one line of text, ``empty``.
    """
    shown = [(name, max(0.0, value)) for name, value in rows]
    top = max((v for _, v in shown), default=0.0)
    if top <= 0:
        return _svg(width, bar_height + 12, f"{label}: {empty}",
                    [f'<text x="4" y="{bar_height}" fill="{MUTED}" font-size="13">{text(empty)}</text>'])
    label_width = min(200.0, max(50.0, CHAR_WIDTH * max(len(name) for name, _ in shown) + 10))
    value_width = CHAR_WIDTH * max(len(_number(v)) for _, v in shown) + 12
    room = max(10.0, width - label_width - value_width)
    gap = 6
    shapes = []
    for i, (name, value) in enumerate(shown):
        top_y = i * (bar_height + gap)
        middle = top_y + bar_height / 2 + 4
        length = round(max(value / top * room, 1.0 if value else 0.0), 1)  # a sliver of use still shows
        shown_name = name if CHAR_WIDTH * len(name) + 10 <= label_width else name[: int((label_width - 10) / CHAR_WIDTH) - 1] + "…"
        shapes.append(
            f'<g class="row"><title>{text(f"{name}: {_number(value)} {unit}")}</title>'
            f'<text class="label" x="{label_width - 6}" y="{middle}" text-anchor="end" fill="{TEXT}" font-size="12">'
            f'{text(shown_name)}</text>'
            f'<rect class="bar" x="{label_width}" y="{top_y}" width="{length}" height="{bar_height}" fill="{BAR}" rx="2"/>'
            f'<text class="value" x="{label_width + length + 4}" y="{middle}" fill="{TEXT}" font-size="12">'
            f'{text(_number(value))}</text></g>'
        )
    height = len(shown) * (bar_height + gap) - gap
    summary = f"{label} ({unit}): " + ", ".join(f"{name} {_number(value)}" for name, value in shown)
    return _svg(width, height, summary, shapes)


def _number(value: float) -> str:
    """A value as a bar's label: two decimals under 10, one under 100, none above; "<0.01" for a sliver."""
    if 0 < value < 0.005:
        return "<0.01"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _svg(width: float, height: float, summary: str, shapes: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{text(summary)}" '
            f'font-family="system-ui, sans-serif"><title>{text(summary)}</title>{"".join(shapes)}</svg>')

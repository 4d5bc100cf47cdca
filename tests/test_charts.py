"""The GPU page's charts (gpuspawner.charts), read back as a browser would draw them: SVG parsed, shapes measured."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from gpuspawner.charts import Sample, bar_chart, runs, sparkline

SVG = "{http://www.w3.org/2000/svg}"
HOUR = 3600.0
T0 = 1_763_719_200.0  # the charts' "now" in these tests


def parse(svg: str) -> ET.Element:
    """The chart as an XML tree: it must be well-formed SVG to be parsed at all."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def find(root: ET.Element, tag: str, cls: str | None = None) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if cls is None or e.get("class") == cls]


def title(root: ET.Element) -> str:
    return root.findtext(f"{SVG}title") or ""


def points(line: ET.Element) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in (line.get("points") or "").split())]


# --- bar chart -----------------------------------------------------------------------------------


def test_bars_are_as_long_as_their_values_in_proportion() -> None:
    root = parse(bar_chart([("ada", 12.0), ("bob", 6.0), ("carol", 3.0)]))
    widths = [float(r.get("width") or 0) for r in find(root, "rect", "bar")]
    assert widths[0] > 100
    assert widths[1] == pytest.approx(widths[0] / 2, abs=0.1) and widths[2] == pytest.approx(widths[0] / 4, abs=0.1)
    xs = {r.get("x") for r in find(root, "rect", "bar")}
    assert len(xs) == 1  # every bar starts at the same place


def test_each_bar_shows_its_label_and_value_and_says_both_on_hover() -> None:
    root = parse(bar_chart([("ada", 12.5), ("bob", 0.25)], unit="GPU-hours"))
    assert [t.text for t in find(root, "text", "label")] == ["ada", "bob"]
    assert [t.text for t in find(root, "text", "value")] == ["12.5", "0.25"]
    assert [g.findtext(f"{SVG}title") for g in find(root, "g", "row")] == ["ada: 12.5 GPU-hours", "bob: 0.25 GPU-hours"]


def test_a_user_name_is_text_in_the_chart_never_markup() -> None:
    svg = bar_chart([('<b>"x"</b>', 2.0), ("a&b", 1.0)])
    assert "<b>" not in svg
    root = parse(svg)
    assert [t.text for t in find(root, "text", "label")] == ['<b>"x"</b>', "a&b"]
    assert '<b>"x"</b> 2.00' in (root.get("aria-label") or "")


def test_a_sliver_of_use_is_still_a_visible_bar() -> None:
    root = parse(bar_chart([("ada", 100.0), ("bob", 0.001)]))
    assert [float(r.get("width") or 0) for r in find(root, "rect", "bar")][1] == 1.0
    assert [t.text for t in find(root, "text", "value")] == ["100", "<0.01"]


@pytest.mark.parametrize("rows", [[], [("ada", 0.0)]], ids=["no-rows", "only-zero"])
def test_a_month_without_usage_says_so_instead_of_drawing_bars(rows: list[tuple[str, float]]) -> None:
    root = parse(bar_chart(rows, empty="no usage this month", label="GPU-hours by user, November 2026"))
    assert find(root, "rect", "bar") == []
    assert [t.text for t in find(root, "text")] == ["no usage this month"]
    assert title(root) == "GPU-hours by user, November 2026: no usage this month"


def test_a_long_name_is_shortened_in_the_chart_and_whole_on_hover() -> None:
    name = "a-very-long-user-name-from-the-institution-directory"
    root = parse(bar_chart([(name, 1.0)]))
    (label,) = find(root, "text", "label")
    assert (label.text or "").endswith("…") and name.startswith((label.text or "")[:-1])
    assert find(root, "g", "row")[0].findtext(f"{SVG}title") == f"{name}: 1.00 GPU-hours"


def test_the_bar_chart_is_an_image_with_a_text_alternative() -> None:
    root = parse(bar_chart([("ada", 2.0), ("bob", 1.0)], label="GPU-hours by user"))
    assert root.get("role") == "img"
    assert root.get("aria-label") == title(root) == "GPU-hours by user (GPU-hours): ada 2.00, bob 1.00"


# --- sparkline -------------------------------------------------------------------------------------


def every(seconds: float, values: list[float | None], *, end: float = T0) -> list[Sample]:
    """Readings every `seconds`, the last at `end`."""
    return [Sample(end - (len(values) - 1 - i) * seconds, v) for i, v in enumerate(values)]


def test_a_steady_stretch_of_readings_is_one_line_from_its_first_to_its_last_reading() -> None:
    root = parse(sparkline(every(30, [0.0, 0.5, 1.0, 0.5]), start=T0 - HOUR, end=T0, width=160, height=32))
    (line,) = find(root, "polyline", "run")
    xy = points(line)
    assert len(xy) == 4
    assert xy[-1][0] == pytest.approx(158, abs=0.1)  # the last reading is at the right edge: now
    assert xy[0][0] == pytest.approx(158 - 90 / HOUR * 156, abs=0.1)  # x is time: 90 s before now
    assert xy[2][1] < xy[1][1] < xy[0][1]  # higher utilisation is drawn higher
    assert xy[0][1] == 30 and xy[2][1] == 2  # 0 % on the bottom edge, 100 % on the top


@pytest.mark.parametrize(
    ("samples", "lines"),
    [
        (every(30, [0.2, 0.3, None, 0.4, 0.5]), 2),
        (every(30, [0.2, 0.3]) + every(30, [0.4, 0.5], end=T0 + 600), 2),
        (every(30, [0.2, 0.3, 0.4, 0.5]), 1),
    ],
    ids=["missing-reading", "readings-too-far-apart", "no-gap"],
)
def test_the_line_breaks_where_readings_are_missing(samples: list[Sample], lines: int) -> None:
    root = parse(sparkline(samples, start=T0 - HOUR, end=T0 + 600, gap=90))
    assert len(find(root, "polyline", "run")) == lines


def test_a_lone_reading_is_a_dot() -> None:
    root = parse(sparkline(every(30, [0.2, 0.3, None, 0.9]), start=T0 - HOUR, end=T0))
    assert len(find(root, "polyline", "run")) == 1
    (dot,) = find(root, "circle", "reading")
    assert float(dot.get("cx") or 0) == pytest.approx(158, abs=0.1)


def test_readings_outside_the_window_are_not_drawn() -> None:
    old = [Sample(T0 - 2 * HOUR, 0.9), Sample(T0 - 2 * HOUR + 30, 0.9)]
    root = parse(sparkline(old, start=T0 - HOUR, end=T0))
    assert find(root, "polyline") == [] and title(root) == "utilisation: no readings yet"


def test_the_time_before_readings_were_kept_is_shaded() -> None:
    root = parse(sparkline(every(30, [0.5, 0.5]), start=T0 - HOUR, end=T0, width=160, known_from=T0 - HOUR / 4))
    (shade,) = find(root, "rect", "unknown")
    assert float(shade.get("width") or 0) == pytest.approx(156 * 0.75, abs=0.2)
    assert find(parse(sparkline([], start=T0 - HOUR, end=T0, known_from=T0 - 2 * HOUR)), "rect", "unknown") == []


def test_the_sparkline_says_now_mean_and_highest_in_words() -> None:
    root = parse(sparkline(every(30, [0.1, 0.5, 0.9, 0.3]), start=T0 - HOUR, end=T0, label="GPU-1 utilisation"))
    assert root.get("role") == "img"
    assert root.get("aria-label") == title(root) == "GPU-1 utilisation: now 30 %, mean 45 %, highest 90 %"


def test_readings_out_of_range_are_drawn_at_the_edges() -> None:
    root = parse(sparkline(every(30, [-0.5, 1.7]), start=T0 - HOUR, end=T0, height=32))
    assert [y for _, y in points(find(root, "polyline", "run")[0])] == [30, 2]


def test_runs_sorts_readings_by_time() -> None:
    assert runs([Sample(60, 0.2), Sample(0, 0.1), Sample(30, None)], gap=90) == [[Sample(0, 0.1)], [Sample(60, 0.2)]]

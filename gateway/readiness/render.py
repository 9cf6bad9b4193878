"""Readiness reports for people: Markdown, one self-contained HTML page, and the files on disk.

Everything renders from the plain dict `ReadinessReport.as_json()` returns, so a stored report
renders like a fresh one. The HTML page needs nothing but itself: inline CSS, figures drawn as
hand-written inline SVG, no script and no external resource. Every string taken from the report
is escaped (model names, feature names and error messages are not trusted). A figure that cannot
be drawn becomes a short note on the page, never an exception.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import orjson

from gateway.readiness.report import PHASES

__all__ = ["html", "markdown", "write_reports"]

_STATUS_WORDS = {"pass": "pass", "fail": "FAIL", "not_applicable": "n/a", "skipped": "skipped"}
_STATUS_CLASSES = {"pass": "pass", "fail": "fail", "not_applicable": "na", "skipped": "skipped"}


# ---------------------------------------------------------------------------------------------
# Reading the report (defensively: a hand-edited or older report must still render)
# ---------------------------------------------------------------------------------------------


def _text(value: Any, default: str = "") -> str:
    """A report value as text (None: the default)."""
    return default if value is None else str(value)


def _finite(value: Any) -> float | None:
    """A finite number, or None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _mapping(value: Any) -> dict[str, Any]:
    """A dict from the report, or an empty one when the field is missing or not an object."""
    return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else {}


def _items(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's items (entries that are not objects are left out)."""
    items = report.get("items")
    return [dict(i) for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _by_phase(items: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Items grouped by phase: the checklist's phases in their order, then any others as found."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(_text(item.get("phase")), []).append(item)
    order = [p for p in PHASES if p in groups] + [p for p in groups if p not in PHASES]
    return [(p, groups[p]) for p in order]


def _item_id(item: Mapping[str, Any]) -> str:
    """`phase.key`, as the report's `measured` and `seconds` maps name an item."""
    return f"{_text(item.get('phase'))}.{_text(item.get('key'))}"


def _status_word(status: Any) -> str:
    """pass / FAIL / n/a / skipped (anything else as given)."""
    return _STATUS_WORDS.get(_text(status), _text(status, "unknown"))


def _phase_title(phase: str) -> str:
    """`model_validation` -> `Model validation`."""
    words = phase.replace("_", " ").strip()
    return words[:1].upper() + words[1:] if words else "(no phase)"


def _phase_counts(items: Sequence[Mapping[str, Any]]) -> str:
    """`2 pass · 1 FAIL`: how the phase's items came out."""
    counts: dict[str, int] = {}
    for item in items:
        word = _status_word(item.get("status"))
        counts[word] = counts.get(word, 0) + 1
    return " · ".join(f"{n} {word}" for word, n in counts.items())


def _verdict_parts(report: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the report says ready, and the verdict line's parts after READY / NOT READY."""
    ready = report.get("ready") is True
    score = _finite(report.get("score"))
    parts = [f"score {_fmt(score * 100, 3)} %" if score is not None else "score unknown",
             f"band: {_text(report.get('band'), 'unknown').replace('_', ' ')}"]
    maturity = _mapping(report.get("maturity"))
    level = maturity.get("level")
    name = next((maturity[k] for k in ("name", "label", "title") if maturity.get(k)), None)
    if level is None and name is None:
        parts.append("maturity: not assessed")
    else:
        parts.append("maturity: " + " ".join(
            p for p in (f"level {_text(level)}" if level is not None else "",
                        f"({_text(name)})" if name is not None else "") if p))
    return ready, parts


def _hashes(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of the report's three addresses."""
    return [("report sha256", _text(report.get("sha256"), "-")),
            ("model_sha256", _text(report.get("model_sha256"), "-")),
            ("policy_sha256", _text(report.get("policy_sha256"), "-"))]


def _measured(report: Mapping[str, Any]) -> dict[str, Any]:
    """`phase.key` -> that item's measurements, as the report lists them."""
    return _mapping(report.get("measured"))


def _timing_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows: the report's timings, then the checks' total and slowest time."""
    rows = [(k, _compact(v)) for k, v in _mapping(report.get("timings")).items()]
    seconds = {k: s for k, v in _mapping(report.get("seconds")).items() if (s := _finite(v)) is not None}
    if seconds:
        rows.append(("checks, total", f"{_fmt(sum(seconds.values()), 3)} s"))
        slowest = max(seconds, key=lambda k: seconds[k])
        rows.append(("slowest check", f"{slowest} ({_fmt(seconds[slowest], 3)} s)"))
    return rows


# ---------------------------------------------------------------------------------------------
# Numbers and compact values
# ---------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    """A readable number with `digits` significant digits; plain notation from 0.001 to 10^6."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e6:
        decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in {"-0", ""} else text
    return f"{value:.{digits}g}"


def _compact(value: Any, top: bool = True) -> str:
    """A value on one short line: `p50_ms=3.2, p99_ms=8.1` for a dict, `[1, 2]` for a list."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        return _fmt(value, 4)
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}={_compact(v, top=False)}" for k, v in value.items())
        return inner if top else "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_compact(v, top=False) for v in value) + "]"
    return str(value)


def _pretty(value: Any) -> str:
    """Indented JSON for people (repr when it is not JSON data)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                            default=str).decode()
    except TypeError:  # orjson.JSONEncodeError is one, e.g. an integer wider than 64 bits
        return repr(value)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")
_NEWLINES = re.compile(r"\r\n|\r|\n")


def _md(value: Any) -> str:
    """Text for a Markdown table cell: markup characters backslash-escaped, newlines as `<br>`."""
    text = _MD_SPECIAL.sub(r"\\\1", _text(value)).strip()
    return _NEWLINES.sub("<br>", text)


def _md_line(value: Any) -> str:
    """Text on one Markdown line outside tables (headings, lists): escaped, newlines as spaces."""
    return _NEWLINES.sub(" ", _MD_SPECIAL.sub(r"\\\1", _text(value))).strip()


def _md_code(value: Any) -> str:
    """An inline code span when the text allows one (hashes), else escaped text."""
    text = _text(value)
    if text and not re.search(r"[`|\r\n]", text):
        return f"`{text}`"
    return _md_line(text)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table whose cells cannot break it."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _item_label(item: Mapping[str, Any]) -> str:
    """`Title (key)`, or the key alone without a title."""
    title, key = _text(item.get("title")), _text(item.get("key"))
    return f"{title} ({key})" if title else key


def markdown(report: dict[str, Any]) -> str:
    """Render a readiness report (`ReadinessReport.as_json()`) as GitHub-flavoured Markdown."""
    ready, parts = _verdict_parts(report)
    lines = [f"# Readiness: {_md_line(report.get('model'))} {_md_line(report.get('version'))}", "",
             f"**{'READY' if ready else 'NOT READY'}** · " + " · ".join(_md_line(p) for p in parts), ""]
    lines += [f"- {label}: {_md_code(value)}" for label, value in _hashes(report)]
    for phase, items in _by_phase(_items(report)):
        lines += ["", f"## {_md_line(_phase_title(phase))}", "", _md_line(_phase_counts(items)), ""]
        lines += _md_table(["Item", "Status", "Detail"],
                           [(_item_label(i), _status_word(i.get("status")), _text(i.get("detail"))) for i in items])
    lines += ["", "## Measured", ""]
    measured = _measured(report)
    if measured:
        lines += _md_table(["Item", "Measured"], [(k, _compact(v)) for k, v in measured.items()])
    else:
        lines.append("Nothing measured.")
    lines += ["", "## Timings", ""]
    timings = _timing_rows(report)
    lines += _md_table(["Timing", "Value"], timings) if timings else ["No timings recorded."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures as inline SVG
# ---------------------------------------------------------------------------------------------


class _FigureError(ValueError):
    """A figure whose data cannot be drawn (the page shows the reason instead)."""


_WIDTH, _HEIGHT = 640.0, 320.0
_PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#8c6d00", "#555555")
_CHAR_PX = 6.2  # rough width of a character at the figures' 11px font
_HUGE = 1e15  # an outer histogram edge this far out stands for infinity
_OPEN_RATIO = 100.0  # ... and so does one making its bin this many times wider than all the others together
_INK, _GRID, _AXIS = "#1f2328", "#e5e7eb", "#57606a"


def _num(value: Any, what: str) -> float | None:
    """A number from figure data: None for null or non-finite, an error for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _FigureError(f"{what} is not a number: {_short(repr(value))}")
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _short(text: str, limit: int = 40) -> str:
    """At most `limit` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _p(value: float) -> str:
    """A pixel coordinate for an SVG attribute."""
    return f"{value:.1f}"


def _nice(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    """A range widened to round numbers around [lo, hi], and about `count` round ticks in it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _FigureError("values too large to draw")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        if lo == 0:
            hi = 1.0
        else:
            pad = abs(lo) * 0.1
            lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    if not math.isfinite(raw) or raw <= 0:
        raise _FigureError("values too large or too close together to draw")
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    if not math.isfinite(step) or step <= 0:
        raise _FigureError("values too close together to draw")
    nice_lo = math.floor(lo / step + 1e-9) * step
    nice_hi = math.ceil(hi / step - 1e-9) * step
    if not (math.isfinite(nice_lo) and math.isfinite(nice_hi)):
        raise _FigureError("values too large to draw")
    n = min(round((nice_hi - nice_lo) / step) + 1, 25)
    return nice_lo, nice_hi, [nice_lo + i * step for i in range(n)]


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with 3 significant digits (more when 3 would make two ticks look the same)."""
    for digits in (3, 4, 6):
        labels = [_fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


@dataclass
class _Scale:
    """Maps the data interval [lo, hi] onto the pixel interval [start, end]."""

    lo: float
    hi: float
    start: float
    end: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            raise _FigureError("values too large to draw")
        if self.hi <= self.lo:
            pad = abs(self.lo) * 0.5 or 1.0
            self.lo, self.hi = self.lo - pad, self.hi + pad
        if not math.isfinite(self.hi - self.lo) or self.hi - self.lo <= 0:
            raise _FigureError("values too large to draw")

    def __call__(self, value: float) -> float:
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)


@dataclass
class _Canvas:
    """One figure's drawing area: margins, the plot rectangle, and the SVG elements so far."""

    names: Sequence[str]
    width: float = _WIDTH
    height: float = _HEIGHT
    left: float = 70.0
    right: float = 20.0
    bottom: float = 50.0
    top: float = 16.0
    parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the legend goes above the plot, in as many rows as the names need
        x, row, placed = self.left, 0, []
        for name in self.names:
            label = _short(name)
            needed = 18 + len(label) * _CHAR_PX + 16
            if x + needed > self.width - self.right and x > self.left:
                x, row = self.left, row + 1
            placed.append((x, row, label, name))
            x += needed
        rows = row + 1 if self.names else 0
        self.top = 16.0 + rows * 18.0
        self.height += rows * 18.0
        for k, (lx, lrow, label, name) in enumerate(placed):
            y = 12.0 + lrow * 18.0
            color = _PALETTE[k % len(_PALETTE)]
            self.parts.append(f'<g><title>{escape(name)}</title>'
                              f'<rect x="{_p(lx)}" y="{_p(y - 9)}" width="12" height="12" fill="{color}" '
                              f'fill-opacity="0.6" stroke="{color}"/>'
                              f'<text x="{_p(lx + 18)}" y="{_p(y + 1)}">{escape(label)}</text></g>')

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        """The plot's bottom edge (SVG y grows downwards)."""
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top

    def y_axis(self, lo: float, hi: float, extra: Sequence[float] = ()) -> _Scale:
        """A y scale over [lo, hi] and any extra values, with round gridlines and labels drawn."""
        values = [lo, hi, *extra]
        nice_lo, nice_hi, ticks = _nice(min(values), max(values))
        scale = _Scale(nice_lo, nice_hi, self.y0, self.y1)
        for tick, label in zip(ticks, _tick_labels(ticks), strict=True):
            y = _p(scale(tick))
            self.parts.append(f'<line x1="{_p(self.x0)}" y1="{y}" x2="{_p(self.x1)}" y2="{y}" stroke="{_GRID}"/>'
                              f'<text x="{_p(self.x0 - 6)}" y="{y}" dy="0.35em" text-anchor="end">{label}</text>')
        return scale

    def x_ticks(self, ticks: Sequence[tuple[float, str]], min_gap: float = 40.0) -> None:
        """Tick marks and labels at pixel positions along the x axis (crowded ones left out)."""
        last = -math.inf
        for x, label in ticks:
            if x - last < min_gap:
                continue
            last = x
            self.parts.append(f'<line x1="{_p(x)}" y1="{_p(self.y0)}" x2="{_p(x)}" y2="{_p(self.y0 + 5)}" '
                              f'stroke="{_AXIS}"/><text x="{_p(x)}" y="{_p(self.y0 + 18)}" '
                              f'text-anchor="middle">{escape(label)}</text>')

    def frame(self, x_label: str, y_label: str) -> None:
        """The axis lines and the axes' names."""
        mid_y = (self.y0 + self.y1) / 2
        self.parts.append(
            f'<line x1="{_p(self.x0)}" y1="{_p(self.y0)}" x2="{_p(self.x1)}" y2="{_p(self.y0)}" stroke="{_AXIS}"/>'
            f'<line x1="{_p(self.x0)}" y1="{_p(self.y0)}" x2="{_p(self.x0)}" y2="{_p(self.y1)}" stroke="{_AXIS}"/>')
        if x_label:
            self.parts.append(f'<text x="{_p((self.x0 + self.x1) / 2)}" y="{_p(self.height - 10)}" '
                              f'text-anchor="middle" font-weight="600">{escape(_short(x_label, 90))}</text>')
        if y_label:
            self.parts.append(f'<text x="14" y="{_p(mid_y)}" transform="rotate(-90 14 {_p(mid_y)})" '
                              f'text-anchor="middle" font-weight="600">{escape(_short(y_label, 50))}</text>')

    def limits(self, limits: Sequence[tuple[str, float]], scale: _Scale) -> None:
        """Horizontal dashed lines at the limits, each with its name and value."""
        for name, value in limits:
            y = scale(value)
            self.parts.append(
                f'<g><title>{escape(name)}: {_fmt(value)}</title>'
                f'<line x1="{_p(self.x0)}" y1="{_p(y)}" x2="{_p(self.x1)}" y2="{_p(y)}" stroke="#cf222e" '
                f'stroke-width="1.5" stroke-dasharray="6 4"/>'
                f'<text x="{_p(self.x1 - 4)}" y="{_p(y - 4)}" text-anchor="end" fill="#cf222e">'
                f'{escape(_short(name))} ({_fmt(value)})</text></g>')

    def no_data(self) -> None:
        """A note in the middle of an empty plot."""
        self.parts.append(f'<text x="{_p((self.x0 + self.x1) / 2)}" y="{_p((self.y0 + self.y1) / 2)}" '
                          f'text-anchor="middle" fill="{_AXIS}">no data</text>')

    def svg(self, title: str) -> str:
        """The finished `<svg>` element."""
        w, h = _p(self.width), _p(self.height)
        return (f'<svg class="fig" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
                f'aria-label="{escape(title)}" font-family="system-ui, sans-serif" font-size="11" fill="{_INK}">'
                f'<title>{escape(title)}</title>{"".join(self.parts)}</svg>')


def _series(figure: Mapping[str, Any], data_key: str) -> list[tuple[str, list[Any]]]:
    """(name, data) per series; data is the list under `data_key`."""
    raw = figure.get("series")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _FigureError("series is not a list")
    out: list[tuple[str, list[Any]]] = []
    for k, entry in enumerate(raw, 1):
        if not isinstance(entry, Mapping):
            raise _FigureError(f"series {k} is not an object")
        data = entry.get(data_key)
        if not isinstance(data, list):
            raise _FigureError(f"series {k} has no list of {data_key}")
        name = entry.get("name")
        out.append((_text(name) if name not in (None, "") else f"series {k}", data))
    return out


def _limits(figure: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, value) of the figure's limit lines (ones without a finite value are left out)."""
    raw = figure.get("limits")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _FigureError("limits is not a list")
    out = []
    for k, entry in enumerate(raw, 1):
        if not isinstance(entry, Mapping):
            raise _FigureError(f"limit {k} is not an object")
        value = _num(entry.get("value"), f"limit {k}")
        if value is not None:
            out.append((_text(entry.get("name"), f"limit {k}"), value))
    return out


def _open_edges(edges: list[float | None]) -> list[float | None]:
    """Histogram edges with the outer ones standing for infinity (null, huge or far out) as None."""
    n = len(edges) - 1
    out: list[float | None] = [None if e is None or abs(e) >= _HUGE else e for e in edges]
    core = [e for e in out[1:n] if e is not None]
    span = core[-1] - core[0] if len(core) >= 2 else 0.0
    if span > 0:
        first, last = out[0], out[n]
        if first is not None and core[0] - first > _OPEN_RATIO * span:
            out[0] = None
        if last is not None and last - core[-1] > _OPEN_RATIO * span:
            out[n] = None
    return out


def _histogram(figure: Mapping[str, Any]) -> str:
    """Bars between consecutive edges, series overlaid; open outer bins get a nominal width."""
    raw_edges = figure.get("edges")
    if not isinstance(raw_edges, list) or len(raw_edges) < 2:
        raise _FigureError("a histogram needs a list of at least two edges")
    n = len(raw_edges) - 1
    numbers = [_num(e, f"edge {i}") for i, e in enumerate(raw_edges)]
    if any(e is None for e in numbers[1:n]):
        raise _FigureError("inner edges must be finite numbers")
    edges = _open_edges(numbers)
    finite = [e for e in edges if e is not None]
    if any(b < a for a, b in itertools.pairwise(finite)):
        raise _FigureError("edges must not decrease")
    series = _series(figure, "values")
    values: list[list[float | None]] = []
    for name, data in series:
        if len(data) != n:
            raise _FigureError(f"series {_short(name)!r} has {len(data)} values for {n} bins")
        values.append([_num(v, f"a value of {_short(name)!r}") for v in data])

    closed = [b - a for a, b in itertools.pairwise(edges) if a is not None and b is not None]
    nominal = statistics.median([w for w in closed if w > 0] or [1.0])
    pos: list[float] = []
    if all(e is None for e in edges):  # one bin, open at both ends
        pos = [0.0, nominal]
    else:
        pos = [e if e is not None else 0.0 for e in edges]
        if edges[0] is None:
            pos[0] = pos[1] - nominal
        if edges[n] is None:
            pos[n] = pos[n - 1] + nominal

    canvas = _Canvas([name for name, _ in series])
    xs = _Scale(pos[0], pos[n], canvas.x0, canvas.x1)
    present = [v for row in values for v in row if v is not None]
    ys = canvas.y_axis(min([0.0, *present]), max([0.0, *present]))
    for k, ((name, _), row) in enumerate(zip(series, values, strict=True)):
        color = _PALETTE[k % len(_PALETTE)]
        for j, value in enumerate(row):
            if value is None:
                continue
            left, right = xs(pos[j]), xs(pos[j + 1])
            top, base = ys(max(value, 0.0)), ys(min(value, 0.0))
            low = "−∞" if edges[j] is None else _fmt(pos[j])
            high = "∞" if edges[j + 1] is None else _fmt(pos[j + 1])
            dash = ' stroke-dasharray="3 2"' if edges[j] is None or edges[j + 1] is None else ""
            canvas.parts.append(
                f'<rect x="{_p(left)}" y="{_p(top)}" width="{_p(max(right - left, 0.0))}" '
                f'height="{_p(max(base - top, 0.0))}" fill="{color}" fill-opacity="0.45" stroke="{color}"{dash}>'
                f'<title>{escape(name)}: [{low}, {high}) {_fmt(value, 4)}</title></rect>')
    if not present:
        canvas.no_data()
    canvas.x_ticks([(xs(p), _fmt(e)) for p, e in zip(pos, edges, strict=True) if e is not None], min_gap=36.0)
    canvas.frame(_text(figure.get("x_label")), _text(figure.get("y_label")))
    return canvas.svg(_text(figure.get("title")))


def _bars(figure: Mapping[str, Any]) -> str:
    """Grouped vertical bars per category; nulls show as a gap marked n/a; dashed limit lines."""
    categories = figure.get("categories")
    if not isinstance(categories, list):
        raise _FigureError("bars need a list of categories")
    labels = [_text(c) for c in categories]
    series = _series(figure, "values")
    values: list[list[float | None]] = []
    for name, data in series:
        if len(data) != len(labels):
            raise _FigureError(f"series {_short(name)!r} has {len(data)} values for {len(labels)} categories")
        values.append([_num(v, f"a value of {_short(name)!r}") for v in data])
    limits = _limits(figure)

    canvas = _Canvas([name for name, _ in series])
    present = [v for row in values for v in row if v is not None]
    ys = canvas.y_axis(min([0.0, *present]), max([0.0, *present]), [v for _, v in limits])
    slot = (canvas.x1 - canvas.x0) / max(len(labels), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for i, category in enumerate(labels):
        for k, ((name, _), row) in enumerate(zip(series, values, strict=True)):
            x = canvas.x0 + i * slot + slot * 0.1 + k * bar
            value = row[i]
            if value is None:
                cx, cy = x + bar / 2, ys(0.0) - 4
                turn = f' transform="rotate(-90 {_p(cx)} {_p(cy)})" text-anchor="start"' if bar < 20 else \
                    ' text-anchor="middle"'
                canvas.parts.append(f'<text x="{_p(cx)}" y="{_p(cy)}"{turn} font-size="9" fill="{_AXIS}">'
                                    f'<title>{escape(name)} · {escape(category)}: no value</title>n/a</text>')
                continue
            color = _PALETTE[k % len(_PALETTE)]
            top, base = ys(max(value, 0.0)), ys(min(value, 0.0))
            canvas.parts.append(
                f'<rect x="{_p(x)}" y="{_p(top)}" width="{_p(bar)}" height="{_p(max(base - top, 0.0))}" '
                f'fill="{color}" fill-opacity="0.8"><title>{escape(name)} · {escape(category)}: '
                f'{_fmt(value, 4)}</title></rect>')
    if not present:
        canvas.no_data()
    canvas.limits(limits, ys)
    fits = max(3, int(slot / _CHAR_PX))
    for i, category in enumerate(labels):
        x = canvas.x0 + (i + 0.5) * slot
        canvas.parts.append(f'<text x="{_p(x)}" y="{_p(canvas.y0 + 16)}" text-anchor="middle">'
                            f'<title>{escape(category)}</title>{escape(_short(category, fits))}</text>')
    canvas.frame(_text(figure.get("x_label")), _text(figure.get("y_label")))
    return canvas.svg(_text(figure.get("title")))


def _line(figure: Mapping[str, Any]) -> str:
    """One polyline per series (a null breaks it), round ticks on both axes, dashed limit lines."""
    series = _series(figure, "points")
    lines: list[list[list[tuple[float, float]]]] = []  # per series, its unbroken runs of points
    for name, points in series:
        runs: list[list[tuple[float, float]]] = [[]]
        for j, point in enumerate(points):
            if not isinstance(point, list | tuple) or len(point) != 2:
                raise _FigureError(f"point {j + 1} of {_short(name)!r} is not an [x, y] pair")
            x, y = _num(point[0], f"an x of {_short(name)!r}"), _num(point[1], f"a y of {_short(name)!r}")
            if x is None or y is None:
                runs.append([])
            else:
                runs[-1].append((x, y))
        lines.append([r for r in runs if r])
    limits = _limits(figure)

    canvas = _Canvas([name for name, _ in series])
    xs_all = [x for runs in lines for run in runs for x, _ in run]
    ys_all = [y for runs in lines for run in runs for _, y in run]
    if ys_all:
        ys = canvas.y_axis(min(ys_all), max(ys_all), [v for _, v in limits])
    else:
        ys = canvas.y_axis(0.0, 1.0, [v for _, v in limits])
    x_lo, x_hi, x_ticks = _nice(min(xs_all, default=0.0), max(xs_all, default=1.0))
    xs = _Scale(x_lo, x_hi, canvas.x0, canvas.x1)
    for k, ((name, _), runs) in enumerate(zip(series, lines, strict=True)):
        color = _PALETTE[k % len(_PALETTE)]
        dots = sum(len(r) for r in runs) <= 60
        for run in runs:
            if len(run) > 1:
                coords = " ".join(f"{_p(xs(x))},{_p(ys(y))}" for x, y in run)
                canvas.parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" '
                                    f'stroke-linejoin="round"><title>{escape(name)}</title></polyline>')
            if dots or len(run) == 1:
                canvas.parts += [f'<circle cx="{_p(xs(x))}" cy="{_p(ys(y))}" r="2.5" fill="{color}">'
                                 f'<title>{escape(name)}: ({_fmt(x, 4)}, {_fmt(y, 4)})</title></circle>'
                                 for x, y in run]
    if not ys_all:
        canvas.no_data()
    canvas.limits(limits, ys)
    canvas.x_ticks(list(zip([xs(t) for t in x_ticks], _tick_labels(x_ticks), strict=True)))
    canvas.frame(_text(figure.get("x_label")), _text(figure.get("y_label")))
    return canvas.svg(_text(figure.get("title")))


_DRAW: dict[str, Callable[[Mapping[str, Any]], str]] = {"histogram": _histogram, "bars": _bars, "line": _line}


def _figure(figure: Any) -> str:
    """One figure as a `<figure>` with its SVG, or with a note saying why it could not be drawn."""
    title = _text(figure.get("title")) if isinstance(figure, Mapping) else ""
    try:
        if not isinstance(figure, Mapping):
            raise _FigureError("it is not an object")
        kind = figure.get("kind")
        draw = _DRAW.get(kind) if isinstance(kind, str) else None
        if draw is None:
            raise _FigureError(f"unknown kind {_short(repr(kind))}")
        body = draw(figure)
    except _FigureError as exc:
        body = f'<p class="note">figure could not be drawn: {escape(str(exc))}</p>'
    except Exception as exc:  # a bug or data nobody foresaw must not cost the whole page
        body = f'<p class="note">figure could not be drawn: {escape(_short(f"{type(exc).__name__}: {exc}", 200))}</p>'
    caption = f"<figcaption>{escape(title)}</figcaption>" if title else ""
    return f"<figure>{caption}{body}</figure>"


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light;--pass:#1a7f37;--fail:#cf222e;--na:#6e7781;--skipped:#9a6700}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;
background:#fff;max-width:72rem;margin:2rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin:0 0 .6rem}h2{font-size:1.25rem;margin:2rem 0 .3rem}
.verdict{font-size:1.1rem;padding:.6rem .9rem;border-radius:6px;border-left:6px solid}
.verdict.ready{background:#dafbe1;border-color:var(--pass)}
.verdict.notready{background:#ffebe9;border-color:var(--fail)}
dl.hashes{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem}dl.hashes dd{margin:0}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em}
code{overflow-wrap:anywhere}
.counts{color:#57606a;margin:0 0 .4rem}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem}
th,td{border:1px solid #d0d7de;padding:.4rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.badge{display:inline-block;padding:.05rem .55rem;border-radius:1rem;color:#fff;font-size:.8rem;font-weight:600;
white-space:nowrap;background:#444}
.badge.pass{background:var(--pass)}.badge.fail{background:var(--fail)}
.badge.na{background:var(--na)}.badge.skipped{background:var(--skipped)}
.detail{white-space:pre-wrap;overflow-wrap:anywhere}
details{margin-top:.3rem}summary{cursor:pointer;color:#0969da}
details h4{margin:.5rem 0 .2rem;font-size:.85rem}
pre{background:#f6f8fa;padding:.5rem;max-height:24rem;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
figure{margin:1rem 0 2rem}figcaption{font-weight:600;margin-bottom:.3rem}
svg.fig{max-width:100%;height:auto;display:block}
.note{color:var(--fail);font-style:italic}
@media print{body{margin:0;max-width:none}}
"""


def _badge(status: Any) -> str:
    """A coloured badge with the status in words."""
    css = _STATUS_CLASSES.get(_text(status), "other")
    return f'<span class="badge {css}">{escape(_status_word(status))}</span>'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _item_row(item: Mapping[str, Any], measured: Mapping[str, Any], seconds: Mapping[str, Any]) -> list[str]:
    """The cells of an item's row: name, badge, and the detail with its evidence to expand."""
    ident = _item_id(item)
    title, key = _text(item.get("title")), _text(item.get("key"))
    name = (f"<strong>{escape(title)}</strong><br>" if title else "") + f"<code>{escape(key)}</code>"
    evidence = item.get("evidence")
    inner = ["<h4>Evidence</h4>", f"<pre>{escape(_pretty(evidence))}</pre>" if evidence else "<p>none recorded</p>"]
    if ident in measured:
        inner += ["<h4>Measured</h4>", f"<pre>{escape(_pretty(measured[ident]))}</pre>"]
    took = _finite(seconds.get(ident))
    if took is not None:
        inner.append(f"<p>check took {escape(_fmt(took, 3))} s</p>")
    detail = (f'<span class="detail">{escape(_text(item.get("detail")))}</span>'
              f"<details><summary>evidence</summary>{''.join(inner)}</details>")
    return [name, _badge(item.get("status")), detail]


def html(report: dict[str, Any]) -> str:
    """Render a readiness report (`ReadinessReport.as_json()`) as one self-contained HTML5 page."""
    model, version = _text(report.get("model")), _text(report.get("version"))
    ready, parts = _verdict_parts(report)
    measured, seconds = _measured(report), _mapping(report.get("seconds"))
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Readiness: {escape(model)} {escape(version)}</title>", f"<style>{_CSS}</style>", "</head>",
           "<body>", "<header>",
           f"<h1>Readiness: {escape(model)} <small>version {escape(version)}</small></h1>",
           f'<p class="verdict {"ready" if ready else "notready"}"><strong>{"READY" if ready else "NOT READY"}'
           "</strong> · " + " · ".join(escape(p) for p in parts) + "</p>",
           '<dl class="hashes">' + "".join(f"<dt>{escape(label)}</dt><dd><code>{escape(value)}</code></dd>"
                                           for label, value in _hashes(report)) + "</dl>"]
    maturity, context = _mapping(report.get("maturity")), _mapping(report.get("context"))
    if maturity:
        out.append(f"<details><summary>maturity</summary><pre>{escape(_pretty(maturity))}</pre></details>")
    if context:
        out.append(f"<details><summary>run context</summary><pre>{escape(_pretty(context))}</pre></details>")
    out.append("</header>")
    for phase, items in _by_phase(_items(report)):
        out += [f'<section class="phase"><h2>{escape(_phase_title(phase))}</h2>',
                f'<p class="counts">{escape(_phase_counts(items))}</p>',
                _html_table(["Item", "Status", "Detail"], [_item_row(i, measured, seconds) for i in items]),
                "</section>"]
    out.append("<section><h2>Measured</h2>")
    out.append(_html_table(["Item", "Measured"], [[f"<code>{escape(k)}</code>", escape(_compact(v))]
                                                  for k, v in measured.items()]) if measured
               else "<p>Nothing measured.</p>")
    out.append("</section><section><h2>Timings</h2>")
    timings = _timing_rows(report)
    out.append(_html_table(["Timing", "Value"], [[escape(k), escape(v)] for k, v in timings]) if timings
               else "<p>No timings recorded.</p>")
    out.append("</section>")
    figures = report.get("figures")
    if isinstance(figures, list) and figures:
        out += ["<section><h2>Figures</h2>", *(_figure(f) for f in figures), "</section>"]
    elif figures not in (None, []):
        out.append('<section><h2>Figures</h2><p class="note">figure could not be drawn: '
                   "figures is not a list</p></section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe_name(value: Any, fallback: str) -> str:
    """A name part for a file: characters outside [A-Za-z0-9_.-] become `_`, at most 100 of them."""
    return _UNSAFE.sub("_", _text(value))[:100] or fallback


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (where the platform allows it)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the report as `<model>-<version>-readiness.{json,md,html}` into `out_dir`, atomically.

    All three are rendered before anything is written; the JSON goes last. Returns the paths as
    {"json": ..., "markdown": ..., "html": ...}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_safe_name(report.get('model'), 'model')}-{_safe_name(report.get('version'), 'version')}-readiness"
    contents = {
        "markdown": (out_dir / f"{stem}.md", markdown(report).encode()),
        "html": (out_dir / f"{stem}.html", html(report).encode()),
        "json": (out_dir / f"{stem}.json",
                 orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"),
    }
    for path, data in contents.values():
        _atomic_write(path, data)
    _fsync_dir(out_dir)
    return {"json": contents["json"][0], "markdown": contents["markdown"][0], "html": contents["html"][0]}

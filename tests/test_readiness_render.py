"""Rendering the readiness report: Markdown tables, the self-contained HTML page, the files on disk."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.readiness.render import html, markdown, write_reports
from gateway.readiness.report import PHASES, ItemResult, ReadinessReport

SCRIPT = "<script>alert('x')</script>"

HISTOGRAM: dict[str, Any] = {
    "id": "scores", "title": "Score distribution", "kind": "histogram", "x_label": "score", "y_label": "share",
    "edges": [None, 0.1, 0.25, 0.5, 1.0, None],
    "series": [{"name": "training", "values": [0.1, 0.2, 0.3, 0.3, 0.1]},
               {"name": f"serving {SCRIPT}", "values": [0.05, 0.25, 0.3, 0.25, 0.15]}]}
HISTOGRAM_HUGE_EDGES: dict[str, Any] = {
    "id": "latency", "title": "Latency", "kind": "histogram", "x_label": "ms", "y_label": "n",
    "edges": [-1.7976931348623157e308, 0, 5, 10, 1e300], "series": [{"name": "p", "values": [0, 3, 9, 1]}]}
HISTOGRAM_ZEROS: dict[str, Any] = {
    "id": "zeros", "title": "All zero", "kind": "histogram", "x_label": "x", "y_label": "n",
    "edges": [0, 1, 2], "series": [{"name": "a", "values": [0, 0]}]}
BARS: dict[str, Any] = {
    "id": "fairness", "title": "Metric per group", "kind": "bars", "y_label": "auc",
    "categories": ["age<25", "age 25-60", f"age>60 {SCRIPT}"],
    "series": [{"name": "candidate", "values": [0.71, None, 0.80]}, {"name": "stable", "values": [0.7, 0.75, 0.79]}],
    "limits": [{"name": "threshold", "value": 0.7}]}
BARS_EMPTY: dict[str, Any] = {
    "id": "empty", "title": "Nothing", "kind": "bars", "y_label": "n", "categories": [], "series": []}
LINE: dict[str, Any] = {
    "id": "load", "title": "p99 under load", "kind": "line", "x_label": "rps", "y_label": "ms",
    "series": [{"name": "p99", "points": [[0, 1.5], [0.1, 2.25], [0.2, None], [0.3, 9.0]]},
               {"name": "p50", "points": [[0, 1.0], [0.3, 3.0]]}],
    "limits": [{"name": "slo", "value": 10}]}
WELL_FORMED: list[dict[str, Any]] = [HISTOGRAM, HISTOGRAM_HUGE_EDGES, HISTOGRAM_ZEROS, BARS, BARS_EMPTY, LINE]
MALFORMED: list[Any] = [
    {"id": "pie", "title": "Pie", "kind": "pie"},
    {"id": "short", "title": "Too few values", "kind": "histogram", "edges": [0, 1], "series": [{"values": [1, 2]}]},
    {"id": "text", "title": "Text value", "kind": "line", "series": [{"name": "a", "points": [[0, SCRIPT]]}]},
    {"id": "cats", "title": "No categories", "kind": "bars", "categories": "ab", "series": []},
    {"id": "down", "title": "Edges go down", "kind": "histogram", "edges": [3, 2, 1], "series": []},
    "not a figure",
]

ITEMS = [
    ItemResult("model_validation", "heldout_metric", "Held-out metric", "pass", "auc 0.81 >= 0.70",
               {"auc": 0.81, "threshold": 0.7}, {"rows_per_s": 1234.5678}, 0.52),
    ItemResult("model_validation", "golden", "Golden | examples", "fail", "2 regressions:\nrow 7 | row 9",
               {"ids": [7, 9]}, seconds=0.01),
    # out of the checklist's order on purpose: the renderer orders phases as PHASES does
    ItemResult("governance", "card", f"Model card {SCRIPT}", "not_applicable", SCRIPT, {"feature": SCRIPT}),
    ItemResult("data_pipeline", "skew", "Training-serving skew", "skipped", "not run: phase model_validation failed"),
    ItemResult("infrastructure", "latency", "Latency", "skipped", "not run", measured={"p99_ms": 8.125}),
]


def make_report(figures: list[Any] | None = None, model: str = f"credit {SCRIPT}",
                version: str = "2/beta") -> dict[str, Any]:
    return ReadinessReport(model, version, "a" * 64, "b" * 64, list(ITEMS), {"heldout": "sha-of-heldout"},
                           {"started": "2025-01-01T00:00:00Z", "seconds": 1.5}, {"level": 3, "name": "managed"},
                           [*WELL_FORMED, *MALFORMED] if figures is None else figures).as_json()


def expected_status(item: ItemResult) -> str:
    return {"pass": "pass", "fail": "FAIL", "not_applicable": "n/a", "skipped": "skipped"}[item.status]


# --- Markdown ----------------------------------------------------------------------------------------

UNESCAPED_PIPE = re.compile(r"(?<!\\)(?:\\\\)*\|")


def md_tables(text: str) -> dict[str, list[list[str]]]:
    """Heading -> the rows (cells split on unescaped pipes) of the table under it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|"):
            assert line.endswith("|"), line
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            tables.setdefault(heading, []).append(cells)
    return tables


def test_markdown_has_one_table_per_phase_in_order_with_every_item_and_status() -> None:
    report = make_report()
    text = markdown(report)
    assert text.startswith("# Readiness: credit ") and "2/beta" in text
    assert "**NOT READY** · score 25 % · band: delay · maturity: level 3 (managed)" in text
    for value in (report["sha256"], "a" * 64, "b" * 64):
        assert f"`{value}`" in text
    tables = md_tables(text)
    phase_headings = [h for h in tables if h not in ("Measured", "Timings")]
    assert phase_headings == ["Model validation", "Data pipeline", "Infrastructure", "Governance"]
    assert [p for p in PHASES if any(i.phase == p for i in ITEMS)] == [
        h.lower().replace(" ", "_") for h in phase_headings]
    for item in ITEMS:
        rows = tables[item.phase.replace("_", " ").capitalize()]
        assert rows[0] == ["Item", "Status", "Detail"] and rows[1] == ["---"] * 3
        row = next(r for r in rows[2:] if item.key.replace("_", r"\_") in r[0])
        assert row[1] == expected_status(item)
    # every table row has exactly its columns: escaped pipes and newlines cannot add or break any
    for rows in tables.values():
        assert len({len(r) for r in rows}) == 1


def test_markdown_escapes_pipes_newlines_and_markup_in_cells() -> None:
    text = markdown(make_report())
    assert r"Golden \| examples (golden)" in text
    assert r"2 regressions:<br>row 7 \| row 9" in text
    assert not re.search(r"(?<!\\)</?script", text) and r"\<script\>" in text  # no raw HTML from the report
    for line in text.splitlines():
        if line.startswith("|"):
            assert len(UNESCAPED_PIPE.findall(line)) in (3, 4), line
    measured = md_tables(text)["Measured"]
    assert [r"model\_validation.heldout\_metric", r"rows\_per\_s=1235"] in measured
    assert [r"infrastructure.latency", r"p99\_ms=8.125"] in measured
    timings = md_tables(text)["Timings"]
    assert ["started", "2025-01-01T00:00:00Z"] in timings and ["checks, total", "0.53 s"] in timings


def test_markdown_of_an_empty_report_does_not_fail() -> None:
    text = markdown(ReadinessReport("m", "1", "", "", []).as_json())
    assert "NOT READY" in text and "score 0 %" in text and "Nothing measured." in text
    assert markdown({}).startswith("# Readiness:")


# --- HTML --------------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "poster", "data"}


class PageChecker(HTMLParser):
    """Balanced tags, external references, and what the page shows (badges, svgs, notes)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[str] = []
        self.badges: list[str] = []
        self.notes: list[str] = []
        self.styles: list[str] = []
        self.urls: list[str] = []
        self._capture: list[str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)
            if name == "style" and value is not None:
                self.styles.append(value)
        classes = (dict(attrs).get("class") or "").split()
        if tag == "span" and "badge" in classes:
            self._capture = self.badges
        elif tag == "p" and "note" in classes:
            self._capture = self.notes
        if self._capture is not None:
            self._text = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if self._capture is not None and tag in ("span", "p"):
            self._capture.append("".join(self._text))
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "style":
            self.styles.append(data)
        if self._capture is not None:
            self._text.append(data)


def check_page(page: str) -> PageChecker:
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.problems == [] and checker.stack == [], (checker.problems, checker.stack)
    return checker


def assert_self_contained(checker: PageChecker) -> None:
    assert not [u for u in checker.urls if re.search(r"https?:|//", u, re.I)], checker.urls
    for css in checker.styles:
        assert not re.search(r"url\s*\(\s*['\"]?\s*(https?:)?//", css, re.I), css
        assert "@import" not in css and "@font-face" not in css


def test_html_is_balanced_self_contained_and_escapes_the_report() -> None:
    page = html(make_report())
    checker = check_page(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "script" not in checker.tags and "<script" not in page.lower()
    assert page.count("&lt;script&gt;") >= 5  # model, title, detail, evidence, figure names
    assert_self_contained(checker)
    assert "http://" not in page and "https://" not in page  # not even an xmlns
    assert checker.tags.count("style") == 1 and "link" not in checker.tags


def test_html_shows_every_status_as_a_badge_in_phase_order_with_evidence() -> None:
    report = make_report()
    checker = check_page(html(report))
    ordered = sorted(ITEMS, key=lambda i: PHASES.index(i.phase))
    assert checker.badges == [expected_status(i) for i in ordered]
    assert checker.tags.count("details") >= len(ITEMS)
    page = html(report)
    assert "&quot;threshold&quot;: 0.7" in page  # the evidence, pretty-printed and escaped
    assert "&quot;p99_ms&quot;: 8.125" in page and "check took 0.52 s" in page
    assert 'class="verdict notready"><strong>NOT READY</strong> · score 25 %' in page
    for value in (report["sha256"], "a" * 64, "b" * 64):
        assert value in page


def test_html_draws_one_svg_per_well_formed_figure_and_a_note_for_each_malformed_one() -> None:
    checker = check_page(html(make_report()))
    assert checker.tags.count("svg") == len(WELL_FORMED)
    assert len(checker.notes) == len(MALFORMED)
    assert all(n.startswith("figure could not be drawn: ") for n in checker.notes)
    reasons = " / ".join(checker.notes)
    for expected in ("unknown kind 'pie'", "2 values for 1 bins", "not a number", "list of categories",
                     "must not decrease", "not an object"):
        assert expected in reasons


def coordinates(page: str) -> list[str]:
    """The values of the SVG position and size attributes on the page (each should be a plain number)."""
    return re.findall(r'\s(?:x|y|x1|x2|y1|y2|width|height|cx|cy|r)="([^"]*)"', page)


@pytest.mark.parametrize("figure", WELL_FORMED, ids=[f["id"] for f in WELL_FORMED])
def test_each_figure_is_one_finite_svg_with_readable_ticks(figure: dict[str, Any]) -> None:
    page = html(make_report([figure]))
    checker = check_page(page)
    assert checker.tags.count("svg") == 1 and checker.notes == []
    svg = page[page.index("<svg"):page.index("</svg>")]
    numbers = coordinates(svg)
    assert numbers and all(re.fullmatch(r"-?\d+(\.\d)?", n) for n in numbers), numbers
    assert "nan" not in svg.lower()
    labels = re.findall(r'<text[^>]*text-anchor="(?:end|middle)">(-?[\d.e+]+)</text>', svg)
    assert labels, "no tick labels"
    for label in labels:  # readable: no float noise like 0.30000000000000004
        assert len(label.lstrip("-").replace(".", "").lstrip("0")) <= 4, label


def test_histogram_with_open_edges_labels_only_the_finite_ones() -> None:
    page = html(make_report([HISTOGRAM_HUGE_EDGES]))
    svg = page[page.index("<svg"):page.index("</svg>")]
    x_labels = re.findall(r'text-anchor="middle">(-?[\d.e+]+)</text>', svg)
    assert x_labels == ["0", "5", "10"]
    assert "e+300" not in svg and "e+308" not in svg and "stroke-dasharray" in svg


def test_bars_mark_a_missing_value_and_draw_limits() -> None:
    page = html(make_report([BARS]))
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count(">n/a</text>") == 1
    assert "threshold (0.7)" in svg and 'stroke-dasharray="6 4"' in svg
    assert svg.count("<rect") == 5 + 2  # five bars and two legend swatches


def test_line_breaks_at_a_missing_point_and_has_round_ticks() -> None:
    page = html(make_report([LINE]))
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count("<polyline") == 2  # p99's run before the gap, and p50; p99's last point stands alone
    assert svg.count("<circle") == 3 + 2
    for tick in ("0.1", "0.2", "0.3", "10"):
        assert f">{tick}</text>" in svg
    assert "slo (10)" in svg


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=20)
FIGURE = st.fixed_dictionaries(
    {"kind": st.sampled_from(["histogram", "bars", "line", "other"]), "title": st.text(max_size=10)},
    optional={"edges": st.lists(st.none() | st.floats() | st.integers(-10, 10), max_size=6),
              "categories": st.lists(st.text(max_size=5), max_size=4) | JSON,
              "series": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}, optional={
                  "values": st.lists(st.none() | st.floats() | st.integers(), max_size=6) | JSON,
                  "points": st.lists(st.lists(st.none() | st.floats() | st.integers(), min_size=2, max_size=2),
                                     max_size=6) | JSON}), max_size=3) | JSON,
              "limits": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "value": JSON}), max_size=2),
              "x_label": JSON, "y_label": JSON})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(figure=FIGURE | JSON)
def test_any_figure_data_renders_a_balanced_page_without_raising(figure: Any) -> None:
    page = html(make_report([figure]))
    checker = check_page(page)
    assert checker.tags.count("svg") + len(checker.notes) == 1
    assert all(re.fullmatch(r"-?\d+(\.\d)?", n) for n in coordinates(page))


# --- files -------------------------------------------------------------------------------------------


def test_write_reports_writes_three_sanitised_files_and_the_json_round_trips(tmp_path: Path) -> None:
    report = make_report()
    out = tmp_path / "reports" / "nested"
    paths = write_reports(report, out)
    stem = "credit__script_alert__x____script_-2_beta-readiness"
    assert paths == {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "html": out / f"{stem}.html"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    raw = paths["json"].read_bytes()
    assert raw.endswith(b"}\n") and raw.startswith(b'{\n  "band"')  # indented, keys sorted
    assert orjson.loads(raw) == report
    assert paths["markdown"].read_text(encoding="utf-8") == markdown(report)
    assert paths["html"].read_text(encoding="utf-8") == html(report)
    # again, over the old files: still exactly three
    write_reports(make_report(figures=[]), out)
    assert len(list(out.iterdir())) == 3 and orjson.loads(paths["json"].read_bytes())["figures"] == []


def test_write_reports_leaves_no_temporary_file_when_a_write_fails(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_replace = os.replace

    def failing_replace(src: str, dst: str | Path) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_reports(make_report(model="m", version="1"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["m-1-readiness.md"]  # the first, whole; nothing else


@pytest.mark.parametrize(("model", "version", "stem"), [
    ("credit-risk", "3", "credit-risk-3-readiness"), ("../../etc/passwd", "1.0", ".._.._etc_passwd-1.0-readiness"),
    ("", "", "model-version-readiness"), ("crédit risk", "v 2", "cr_dit_risk-v_2-readiness")])
def test_file_names_keep_only_safe_characters(tmp_path: Path, model: str, version: str, stem: str) -> None:
    paths = write_reports(make_report(figures=[], model=model, version=version), tmp_path)
    assert paths["json"] == tmp_path / f"{stem}.json" and paths["json"].parent == tmp_path

"""The readiness report: phase gating, score, bands and the content address."""

from __future__ import annotations

import itertools

import pytest

from gateway.readiness.report import ItemResult, Phase, ReadinessReport, band, run_phases, score


def passing(detail: str = "fine") -> ItemResult:
    return ItemResult("", "", "", "pass", detail, {"value": 1})


def failing() -> ItemResult:
    return ItemResult("", "", "", "fail", "below the threshold", {"value": 0.5, "limit": 0.7})


def broken() -> ItemResult:
    raise RuntimeError("no held-out data")


def test_a_failed_phase_skips_every_later_phase_and_a_crashing_check_fails() -> None:
    phases = [
        Phase("model_validation", [("golden", "Golden examples", passing), ("heldout", "Held-out metric", broken)]),
        Phase("data_pipeline", [("skew", "Training-serving skew", passing)]),
        Phase("governance", [("card", "Card complete", passing)]),
    ]
    seen: list[str] = []
    items = run_phases(phases, clock=itertools.count().__next__, on_item=lambda i: seen.append(i.key))
    assert [(i.phase, i.key, i.status) for i in items] == [
        ("model_validation", "golden", "pass"), ("model_validation", "heldout", "fail"),
        ("data_pipeline", "skew", "skipped"), ("governance", "card", "skipped")]
    assert "no held-out data" in items[1].detail and items[1].evidence == {"error": "RuntimeError"}
    assert "model_validation failed" in items[2].detail
    assert seen == ["golden", "heldout", "skew", "card"]
    assert items[0].seconds == 1  # the clock ticks once per call


def test_score_leaves_out_what_does_not_apply_and_counts_skipped_as_not_passed() -> None:
    items = [ItemResult("p", str(i), "", s) for i, s in enumerate(["pass", "pass", "fail", "not_applicable",
                                                                   "skipped"])]
    assert score(items) == pytest.approx(2 / 4)
    assert score([ItemResult("p", "x", "", "not_applicable")]) == 0.0


@pytest.mark.parametrize(("value", "expected"), [
    (0.0, "delay"), (0.7999, "delay"), (0.80, "launch_with_extra_monitoring"),
    (0.95, "launch_with_extra_monitoring"), (0.9501, "ready"), (1.0, "ready")])
def test_bands(value: float, expected: str) -> None:
    assert band(value) == expected


def test_ready_needs_the_top_band_and_nothing_failed_or_skipped() -> None:
    good = [ItemResult("p", str(i), "", "pass") for i in range(30)]
    assert ReadinessReport("m", "2", "a", "b", good).ready
    one_bad = [*good, ItemResult("p", "bad", "", "fail")]
    report = ReadinessReport("m", "2", "a", "b", one_bad)
    assert report.band == "ready" and not report.ready  # 30/31 > 95 %, but a failure is a failure


def test_the_address_ignores_timings_and_follows_the_content() -> None:
    items = [ItemResult("p", "x", "X", "pass", "ok", {"auc": 0.81}, seconds=1.5)]
    first = ReadinessReport("m", "2", "a", "b", items, {"data": "sha"}, {"started": "t1"})
    again = ReadinessReport("m", "2", "a", "b", [ItemResult("p", "x", "X", "pass", "ok", {"auc": 0.81}, seconds=9)],
                            {"data": "sha"}, {"started": "t2"})
    assert first.sha256 == again.sha256
    changed = ReadinessReport("m", "2", "a", "b", [ItemResult("p", "x", "X", "pass", "ok", {"auc": 0.8})],
                              {"data": "sha"})
    assert changed.sha256 != first.sha256
    full = first.as_json()
    assert full["sha256"] == first.sha256 and full["seconds"] == {"p.x": 1.5} and full["timings"] == {"started": "t1"}


def test_a_report_read_back_has_the_same_address_and_a_change_that_counts_breaks_it() -> None:
    import orjson

    from gateway.readiness.report import address_of

    items = [ItemResult("model_validation", "heldout", "Held-out metric", "pass", "0.75 >= 0.72",
                        {"auc": 0.75}, measured={"rows_per_s": 1234.5}, seconds=0.4)]
    report = ReadinessReport("m", "2", "a" * 64, "b" * 64, items, maturity={"level": 4})
    back = orjson.loads(orjson.dumps(report.as_json()))
    assert address_of(back) == back["sha256"] == report.sha256
    back["items"][0]["measured"] = {"rows_per_s": 1.0}  # measurements are outside the address
    back["timings"] = {"seconds": 99}
    assert address_of(back) == report.sha256
    back["items"][0]["status"] = "fail"
    assert address_of(back) != report.sha256


def test_the_json_form_keeps_each_item_s_detail_though_the_address_leaves_it_out() -> None:
    from gateway.readiness.report import address_of

    report = ReadinessReport("m", "2", "a" * 64, "b" * 64, [ItemResult("p", "k", "t", "pass", "p99 7.1 ms")])
    document = report.as_json()
    assert document["items"][0]["detail"] == "p99 7.1 ms"
    document["items"][0]["detail"] = "p99 9.8 ms"  # another run's measurement, same verdict
    assert address_of(document) == report.sha256

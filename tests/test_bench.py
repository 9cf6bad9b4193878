"""loadtests.bench: the wrk parser, the round arithmetic, the target checks, the report, the configurations.

No timing is asserted: the wrk outputs below were captured from real runs (wrk 4.1) and are parsed
as text; the servers of the benchmark are not started here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.repository import ModelRepository
from gateway.runtime import RuntimeOptions
from loadtests import bench

WRK_MICROSECONDS = """\
Running 2s test @ http://127.0.0.1:18101/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   149.86us   90.83us   2.42ms   97.48%
    Req/Sec     6.87k   779.91     8.36k    61.90%
  Latency Distribution
     50%  132.00us
     75%  160.00us
     90%  189.00us
     99%  365.00us
  14355 requests in 2.10s, 1.55MB read
Requests/sec:   6836.35
Transfer/sec:    754.40KB
"""

WRK_MILLISECONDS_NON_2XX = """\
Running 1s test @ http://127.0.0.1:18103/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   355.87us  140.29us   2.92ms   90.04%
    Req/Sec     5.72k   162.22     6.06k    81.82%
  Latency Distribution
     50%  348.00us
     75%  368.00us
     90%  398.00us
     99%    0.87ms
  6260 requests in 1.10s, 794.98KB read
  Non-2xx or 3xx responses: 6260
Requests/sec:   5693.75
Transfer/sec:    723.07KB
"""

WRK_GATEWAY_MILLISECONDS = """\
Running 1s test @ http://127.0.0.1:41313/v2/models/credit-risk/infer
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    67.70ms  118.03ms 615.63ms   90.32%
    Req/Sec   597.00    123.37   720.00     80.00%
  Latency Distribution
     50%   45.43ms
     75%   51.08ms
     90%  243.27ms
     99%  607.95ms
  597 requests in 1.03s, 337.74KB read
Requests/sec:    579.40
Transfer/sec:    327.78KB
"""

WRK_SECONDS = """\
Running 3s test @ http://127.0.0.1:18102/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20s     1.01ms   1.20s    75.00%
    Req/Sec    11.00     16.52    30.00     66.67%
  Latency Distribution
     50%    1.20s~
     75%    1.20s~
     90%    1.20s~
     99%    1.20s~
  8 requests in 3.01s, 0.88KB read
Requests/sec:      2.66
Transfer/sec:     300.74B
""".replace("~", " ")  # wrk pads durations in seconds with a trailing blank

WRK_TIMEOUTS = """\
Running 2s test @ http://127.0.0.1:18102/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     5.00      7.07    10.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  2 requests in 2.00s, 226.00B read
  Socket errors: connect 0, read 0, write 0, timeout 2
Requests/sec:      1.00
Transfer/sec:     112.79B
"""


# --- wrk output ---


@pytest.mark.parametrize(("text", "ms"), [("132.00us", 0.132), ("0.87ms", 0.87), ("607.95ms", 607.95),
                                           ("1.20s", 1200.0), ("1.00m", 60_000.0), (" 2.5ms ", 2.5)])
def test_durations_in_every_unit(text: str, ms: float) -> None:
    assert bench.parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "12", "1.2 ms", "fast", "1.2ns"])
def test_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a wrk duration"):
        bench.parse_duration_ms(text)


def test_parse_microseconds() -> None:
    result = bench.parse_wrk(WRK_MICROSECONDS)
    assert result.requests_per_s == pytest.approx(6836.35)
    assert (result.p50_ms, result.p75_ms, result.p90_ms, result.p99_ms) == pytest.approx((0.132, 0.16, 0.189, 0.365))
    assert result.requests == 14355
    assert result.errors == 0


def test_parse_mixed_units_and_non_2xx() -> None:
    result = bench.parse_wrk(WRK_MILLISECONDS_NON_2XX)
    assert result.p50_ms == pytest.approx(0.348)
    assert result.p99_ms == pytest.approx(0.87)
    assert result.non_2xx == 6260
    assert result.errors == 6260


def test_parse_gateway_run() -> None:
    result = bench.parse_wrk(WRK_GATEWAY_MILLISECONDS)
    assert result.requests_per_s == pytest.approx(579.4)
    assert (result.p50_ms, result.p99_ms) == pytest.approx((45.43, 607.95))
    assert result.requests == 597


def test_parse_seconds_with_trailing_blanks() -> None:
    result = bench.parse_wrk(WRK_SECONDS)
    assert result.p50_ms == pytest.approx(1200.0)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.requests_per_s == pytest.approx(2.66)


def test_parse_socket_errors() -> None:
    result = bench.parse_wrk(WRK_TIMEOUTS)
    assert result.socket_errors == {"timeout": 2}
    assert result.errors == 2


def test_output_without_latency_distribution_is_refused() -> None:
    without = WRK_MICROSECONDS.split("  Latency Distribution", maxsplit=1)[0] + "Requests/sec:   6836.35\n"
    with pytest.raises(ValueError, match="--latency"):
        bench.parse_wrk(without)
    with pytest.raises(ValueError, match="Requests/sec"):
        bench.parse_wrk(WRK_MICROSECONDS.replace("Requests/sec:   6836.35\n", ""))


# --- arithmetic ---


def _point(round_no: int, server: str, connections: int, rps: float, p50: float, p99: float,
           clean: bool = True) -> dict[str, Any]:
    return {"round": round_no, "server": server, "connections": connections, "requests_per_s": rps,
            "p50_ms": p50, "p99_ms": p99, "clean": clean}


def test_median_and_ratio() -> None:
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.median([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(bench.median([]))
    assert bench.ratio(3.0, 2.0) == 1.5
    assert math.isnan(bench.ratio(1.0, 0.0))
    assert math.isnan(bench.ratio(math.nan, 1.0))


def test_ratios_are_per_round_then_medianed() -> None:
    # round 0: a/c = 2.0, round 1: a/c = 1.0, round 2: a/c = 4.0 -> median 2.0; the ratio of the medians
    # (300 / 150 = 2.0 here too) would differ if the rounds drifted apart, so make them disagree:
    points = [
        _point(0, "a", 32, 200.0, 1.0, 5.0), _point(0, "c", 32, 100.0, 2.0, 4.0), _point(0, "b", 32, 150.0, 1.5, 3.0),
        _point(1, "a", 32, 300.0, 1.0, 20.0), _point(1, "c", 32, 300.0, 1.0, 4.0), _point(1, "b", 32, 300.0, 1.0, 3.0),
        _point(2, "a", 32, 800.0, 2.0, 8.0), _point(2, "c", 32, 200.0, 4.0, 4.0), _point(2, "b", 32, 100.0, 1.0, 3.0),
    ]
    summary = bench.summarise(points)
    a = summary["servers"]["a"]["32"]
    assert a["requests_per_s"] == 300.0 and a["p50_ms"] == 1.0 and a["p99_ms"] == 8.0 and a["rounds"] == 3
    ratios = summary["ratios"]["32"]
    assert ratios["a_over_c_rps"] == pytest.approx(2.0)  # median of 2.0, 1.0, 4.0
    assert ratios["b_over_c_rps"] == pytest.approx(1.0)  # median of 1.5, 1.0, 0.5
    assert ratios["a_over_b_rps"] == pytest.approx(4 / 3)  # median of 1.33, 1.0, 8.0
    assert ratios["a_over_c_p50"] == pytest.approx(0.5)  # median of 0.5, 1.0, 0.5
    assert ratios["a_p99_over_p50"] == pytest.approx(5.0)  # median of 5, 20, 4


def test_a_round_missing_a_server_is_left_out_of_the_ratio() -> None:
    points = [_point(0, "a", 1, 100.0, 1.0, 2.0), _point(0, "c", 1, 50.0, 2.0, 3.0),
              _point(1, "a", 1, 900.0, 1.0, 2.0)]
    summary = bench.summarise(points)
    assert summary["ratios"]["1"]["a_over_c_rps"] == pytest.approx(2.0)
    assert math.isnan(summary["ratios"]["1"]["b_over_c_rps"])
    assert summary["servers"]["a"]["1"]["rounds"] == 2


def test_unclean_points_mark_the_summary() -> None:
    points = [_point(0, "a", 1, 100.0, 1.0, 2.0, clean=False), _point(1, "a", 1, 100.0, 1.0, 2.0)]
    assert bench.summarise(points)["servers"]["a"]["1"]["clean"] is False


# --- targets ---


def _summary(ratios: dict[str, dict[str, float]], unclean: tuple[str, str] | None = None) -> dict[str, Any]:
    servers: dict[str, dict[str, dict[str, Any]]] = {s: {c: {"clean": True} for c in ratios} for s in "abc"}
    if unclean:
        servers[unclean[0]][unclean[1]]["clean"] = False
    return {"servers": servers, "ratios": ratios}


def _ratios(a_c_rps: float, a_c_p50: float, spread: float) -> dict[str, float]:
    return {"a_over_c_rps": a_c_rps, "b_over_c_rps": 1.0, "a_over_b_rps": 1.0, "a_over_c_p50": a_c_p50,
            "b_over_c_p50": 1.0, "a_p99_over_p50": spread}


def _verdicts(checks: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {(c["model"], c["metric"] + "@" + c["target"].split(" at ")[-1]): c["verdict"] for c in checks}


def test_targets_pass_and_fail_at_their_bounds() -> None:
    credit = _summary({"1": _ratios(1.0, 1.0, 3.0), "32": _ratios(1.5, 1.0, 3.0), "128": _ratios(1.0, 1.0, 10.0)})
    mlp = _summary({"1": _ratios(1.0, 1.01, 3.0), "32": _ratios(1.0, 1.0, 3.0), "128": _ratios(2.49, 1.0, 10.5)})
    checks = bench.target_checks({"credit-risk": credit, "mlp": mlp})
    verdicts = _verdicts(checks)
    assert verdicts == {
        ("credit-risk", "a_over_c_rps@32 connections"): "pass",  # exactly 1.5
        ("credit-risk", "a_over_c_p50@1 connection"): "pass",  # exactly equal
        ("mlp", "a_over_c_p50@1 connection"): "fail",
        ("mlp", "a_over_c_rps@128 connections"): "fail",  # 2.49 < 2.5
        ("credit-risk", "a_p99_over_p50@128 connections"): "pass",  # exactly 10x
        ("mlp", "a_p99_over_p50@128 connections"): "fail",
    }
    assert len(checks) == 6
    first = checks[0]
    assert first["value"] == 1.5 and first["bound"] == 1.5 and first["op"] == ">="


def test_targets_not_measured() -> None:
    only_small = {"credit-risk": _summary({"1": _ratios(0.5, 2.0, 1.0)})}
    checks = bench.target_checks(only_small)
    by = {(c["model"], c["metric"]): c["verdict"] for c in checks}
    assert by[("credit-risk", "a_over_c_rps")] == "not measured"  # no 32-connection point
    assert by[("mlp", "a_over_c_rps")] == "not measured"  # model not measured
    assert by[("credit-risk", "a_over_c_p50")] == "fail"
    assert by[("credit-risk", "a_p99_over_p50")] == "not measured"


def test_a_target_resting_on_an_unclean_point_fails() -> None:
    summary = _summary({"32": _ratios(3.0, 0.5, 2.0)}, unclean=("c", "32"))
    check = next(c for c in bench.target_checks({"credit-risk": summary}) if c["metric"] == "a_over_c_rps")
    assert check["verdict"] == "fail"
    assert "c" in check["note"]


# --- report ---


def _report() -> dict[str, Any]:
    points = [_point(r, s, c, rps, p50, p99) for r in (0, 1) for s, c, rps, p50, p99 in
              [("a", 1, 900.0, 0.9, 2.0), ("b", 1, 1000.0, 0.8, 1.9), ("c", 1, 800.0, 1.1, 2.5),
               ("a", 32, 2400.0, 12.0, 30.0), ("b", 32, 2600.0, 11.0, 25.0), ("c", 32, 1500.0, 21.0, 40.0)]]
    summary = bench.summarise(points)
    return {
        "setup": {"seconds": 5, "rounds": 2, "connections": [1, 32], "pinning": "servers pinned to CPU 0"},
        "configurations": bench.CONFIGURATIONS,
        "notes": ["a run-wide note"],
        "models": {"credit-risk": {"description": "credit-risk v1", "summary": summary,
                                   "notes": ["batching unavailable"],
                                   "floor": {"batch1_calls_per_s": 18456.0, "batch1_us_per_call": 54.2,
                                             "batch32_us_per_row": 2.4, "batch32_rows_per_s": 412791.0}}},
        "targets": bench.target_checks({"credit-risk": summary}),
    }


def test_markdown_report() -> None:
    page = bench.render_markdown(_report())
    assert page.startswith("# Gateway benchmark\n")
    assert "## credit-risk" in page
    assert "| (a) gateway, every net on | 32 | 2,400 | 12.00 | 30.00 |  |" in page
    assert "| (c) bare FastAPI + onnxruntime | 1 | 800 | 1.10 | 2.50 |  |" in page
    assert "| 32 | 1.60 | 1.73 | 0.92 | 0.57 | 0.52 | 2.5 |" in page
    assert "18,456 calls/s at batch 1 (54.2 µs/call); 2.4 µs/row at batch 32" in page
    assert "Note: batching unavailable" in page
    assert "| credit-risk | (a) >= 1.5x (c) req/s at 32 connections | 1.60 | pass |" in page
    assert "| mlp | (a) >= 2.5x (c) req/s at 128 connections | - | not measured |" in page
    assert "- (b) gateway, nets off" in page and "- a run-wide note" in page
    # every table row has the same number of cells as its header
    for block in page.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({row.count("|") for row in rows}) == 1, block


def test_floor_is_the_best_round() -> None:
    quiet = {"batch1_calls_per_s": 2900.0, "batch1_us_per_call": 344.8, "batch32_us_per_row": 30.0,
             "batch32_rows_per_s": 33333.3}
    busy = {"batch1_calls_per_s": 6.4, "batch1_us_per_call": 155476.5, "batch32_us_per_row": 19.1,
            "batch32_rows_per_s": 52515.0}
    assert bench.best_floor([busy, quiet]) == {"batch1_calls_per_s": 2900.0, "batch1_us_per_call": 344.8,
                                               "batch32_us_per_row": 19.1, "batch32_rows_per_s": 52515.0}
    assert bench.best_floor([]) == {}


def test_json_ready_replaces_nan() -> None:
    assert bench.json_ready({"a": [math.nan, 1.0, math.inf], "b": (2, "x")}) == {"a": [None, 1.0, None], "b": [2, "x"]}


# --- configurations ---


def test_v2_body_datatypes() -> None:
    body = bench.v2_body({"age": 41, "income": 58000.0, "has_cosigner": False, "purpose": "car"})
    assert [(t["name"], t["datatype"], t["shape"], t["data"]) for t in body["inputs"]] == [
        ("age", "INT64", [1, 1], [41]), ("income", "FP32", [1, 1], [58000.0]),
        ("has_cosigner", "BOOL", [1, 1], [False]), ("purpose", "BYTES", [1, 1], ["car"])]


def test_nets_off_policy_drops_fallback_and_audit_only() -> None:
    policy = {"model": "m", "schema": {"features": {}}, "guard": {"timeout_ms": 250},
              "fallback": {"default": {}}, "audit": {"on_full": "drop"}, "batching": {"max_batch_size": 8}}
    off = bench.nets_off_policy(policy)
    assert "fallback" not in off and off["audit"] == {"on_full": "drop", "enabled": False}
    assert off["guard"] == policy["guard"] and off["batching"] == policy["batching"]
    assert "fallback" in policy  # the original is untouched


def test_pin_degrades_without_taskset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.pin(0) == []


def test_credit_risk_nets_off_copy_loads_and_passes_policy_check(tmp_path: Path) -> None:
    setup = bench.credit_risk_setup(tmp_path)
    assert bench.policy_problem(setup.policies_off / "credit-risk.yaml", setup.models_off) is None
    entry = ModelRepository(setup.models_off, RuntimeOptions()).load_version("credit-risk", "1")
    assert entry.ready, entry.reason
    assert entry.card is not None and entry.card.reference_profile is None and entry.card.score is None
    off = yaml.safe_load((setup.policies_off / "credit-risk.yaml").read_text())
    assert "fallback" not in off and off["audit"]["enabled"] is False
    assert setup.models_on == bench.ROOT / "models" and setup.policies_on == bench.ROOT / "policies"


def test_mlp_setup_policies_pass_the_gateway_check(tmp_path: Path) -> None:
    setup = bench.mlp_setup(tmp_path, batching=False)
    assert bench.policy_problem(setup.policies_on / "mlp.yaml", setup.models_on) is None
    assert bench.policy_problem(setup.policies_off / "mlp.yaml", setup.models_off) is None
    assert len(setup.body["inputs"]) == 30
    assert all(t["datatype"] == "FP32" and t["shape"] == [1, 1] for t in setup.body["inputs"])
    expected = bench.expected_outputs(setup.onnx, setup.body)
    assert expected["probabilities"].shape == (1, 2) and expected["label"].shape == (1,)

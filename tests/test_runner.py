"""The scenario runner's arithmetic and verdict, and open-loop measurement against a synthetic server."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from aiohttp import web

from loadtests.common import Outcome, drive, percentile, summarise
from loadtests.runner import Phase, Slo, load_scenario, parse_rate, schedule, verdict
from tests.conftest import ROOT

SLO = Slo(p99_ms=50.0, error_rate=0.01, peak_rps=200.0)


def test_rates_resolve_against_the_target() -> None:
    assert parse_rate("target", SLO) == 400.0
    assert parse_rate("0.5 target", SLO) == 200.0
    assert parse_rate(75, SLO) == 75.0
    with pytest.raises(ValueError, match="target"):
        parse_rate("lots", SLO)


def test_schedule_is_constant_rate_per_phase() -> None:
    offsets = schedule([Phase(10, 1.0), Phase(20, 0.5)])
    assert len(offsets) == 20
    assert offsets[:3] == [0.0, 0.1, 0.2]
    assert offsets[10] == 1.0 and offsets[11] == pytest.approx(1.05)


def test_bundled_scenarios_load() -> None:
    for path in sorted((ROOT / "loadtests" / "scenarios").glob("*.yaml")):
        spec, phases = load_scenario(path, SLO, 0.5)
        assert spec.model == "credit-risk" and phases and all(p.rate > 0 and p.seconds > 0 for p in phases)
        assert spec.name == path.stem


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert math.isnan(percentile([], 50))


def test_verdict_judges_p99_error_rate_and_achieved_rate() -> None:
    good = Outcome(latencies_ms=[5.0] * 100, scheduled=100, duration_s=1.0)
    good.statuses[200] = 100
    assert verdict(summarise(good), SLO)["pass"]
    slow = Outcome(latencies_ms=[5.0] * 98 + [80.0, 90.0], scheduled=100, duration_s=1.0)
    slow.statuses[200] = 100
    assert not verdict(summarise(slow), SLO)["checks"]["p99"]["ok"]
    failing = Outcome(latencies_ms=[5.0] * 100, scheduled=100, duration_s=1.0)
    failing.statuses.update({200: 97, 503: 3})
    judged = verdict(summarise(failing), SLO)
    assert not judged["pass"] and not judged["checks"]["error_rate"]["ok"]
    short = Outcome(latencies_ms=[5.0] * 50, scheduled=100, duration_s=1.0)
    short.statuses[200] = 50
    short.errors["ClientConnectorError"] = 0
    assert not verdict(summarise(short), SLO)["checks"]["rate"]["ok"]


def test_a_stall_shows_as_latency_not_as_missing_requests(tmp_path: Path) -> None:
    """Coordinated omission: requests scheduled during a 300 ms stall are measured from their schedule."""

    async def scenario() -> Outcome:
        seen = 0

        async def handler(request: web.Request) -> web.Response:
            nonlocal seen
            await request.read()
            seen += 1
            if seen == 10:
                time.sleep(0.3)  # the whole process stalls (an injected fault, on purpose)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/p", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return await drive(f"http://127.0.0.1:{port}", "/p", b"{}", schedule([Phase(100, 1.0)]))
        finally:
            await runner.cleanup()

    outcome = asyncio.run(scenario())
    assert sum(outcome.statuses.values()) == 100  # every scheduled request was sent and answered
    # the ~30 requests scheduled during the stall carry it in their latency (measured from their
    # scheduled time); a closed-loop client would have sent them late and reported them fast
    delayed = [ms for ms in outcome.latencies_ms if ms > 100]
    assert len(delayed) >= 20 and max(outcome.latencies_ms) >= 250

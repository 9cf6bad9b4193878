"""Version switches under steady load: every answer must be 2xx, and each switch must be quick.

    python -m loadtests.switch_under_load                 # starts its own gateway on a free port
    python -m loadtests.switch_under_load --url http://127.0.0.1:8080 --token TOKEN

Sends open-loop constant-rate load (each request leaves at its scheduled time) while switching
the stable version back and forth through the admin API; reports non-2xx answers, latency, and the
server-side duration of every switch (stored durably, then swapped). Exit 0 when no answer was
non-2xx and every switch finished under --max-switch-ms on the server, else 1.

The gateway it starts has the readiness gate off: this measures switching, not release approval. A
--url gateway whose policy enforces the gate refuses the switches without passing reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from loadtests.common import ROW, drive, require_loopback, spawned_gateway, summarise, ungated_policies
from loadtests.runner import Phase, schedule


async def run(url: str, token: str, model: str, rate: float, seconds: float, every: float) -> dict[str, object]:
    """Load plus switches; returns the report."""
    switches: list[dict[str, float]] = []

    async def switcher() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            versions = ["2", "1"]
            i = 0
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds - every
            while loop.time() < stop:
                await asyncio.sleep(every)
                answer = await client.post(f"/admin/models/{model}/switch", json={"version": versions[i % 2]},
                                           headers={"Authorization": f"Bearer {token}"})
                if answer.status_code != 200:
                    sys.exit(f"switch refused: {answer.status_code} {answer.text}")
                switches.append({"took_ms": answer.json()["took_ms"]})
                i += 1

    body = json.dumps({"instances": [ROW]}).encode()
    load = asyncio.create_task(drive(url, f"/v1/models/{model}:predict", body, schedule([Phase(rate, seconds)])))
    await switcher()
    results = await load
    took = [s["took_ms"] for s in switches]
    return {"load": summarise(results), "switches": len(took),
            "switch_ms": {"median": round(statistics.median(took), 3), "max": round(max(took), 3)} if took else None}


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running gateway (loopback); default: start one")
    parser.add_argument("--token", default="switch-under-load-token", help="admin token of that gateway")
    parser.add_argument("--model", default="credit-risk")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between switches")
    parser.add_argument("--max-switch-ms", type=float, default=10.0)
    args = parser.parse_args()
    if args.url:
        require_loopback(args.url)
        report = asyncio.run(run(args.url, args.token, args.model, args.rate, args.seconds, args.every))
    else:
        with tempfile.TemporaryDirectory(prefix="switch-under-load-") as tmp, \
                spawned_gateway(args.token, policies=ungated_policies(Path(tmp) / "policies")) as url:
            report = asyncio.run(run(url, args.token, args.model, args.rate, args.seconds, args.every))
    print(json.dumps(report, indent=2))
    load = report["load"]
    assert isinstance(load, dict)
    slow = report["switch_ms"] is not None and report["switch_ms"]["max"] > args.max_switch_ms  # type: ignore[index]
    return 0 if load["non_2xx"] == 0 and not slow else 1


if __name__ == "__main__":
    raise SystemExit(main())

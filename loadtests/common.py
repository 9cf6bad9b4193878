"""Shared pieces of the load scripts: a gateway started on a free loopback port, open-loop load, stats."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
ROW = {"age": 41, "income": 58000.0, "loan_amount": 15000.0, "loan_term_months": 36, "credit_history_years": 12.5,
       "num_open_accounts": 4, "debt_to_income": 0.28, "delinquencies_2y": 0, "has_cosigner": False,
       "employment": "salaried", "home_ownership": "mortgage", "purpose": "car"}


def require_loopback(url: str) -> None:
    """Load scripts only ever send traffic to this machine."""
    host = httpx.URL(url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing to send load to {url}: loopback targets only")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Spawned:
    """A gateway started by a load script: its URL and process id (for /proc when /metrics lacks RSS)."""

    url: str
    pid: int


@contextmanager
def gateway_process(token: str, extra_env: dict[str, str] | None = None,
                    policies: Path | None = None, cpu: int | None = None) -> Iterator[Spawned]:
    """`gateway serve` on a free port with a throw-away state directory; yields its URL and pid."""
    port = free_port()
    state = tempfile.mkdtemp(prefix="loadtest-state-")
    env = {**os.environ, "GATEWAY_STATE_DIR": state, "GATEWAY_AUDIT_DIR": state + "-audit",
           "GATEWAY_LOG_LEVEL": "warning",
           "GATEWAY_ADMIN_TOKENS": json.dumps([{"name": "loadtest", "role": "admin", "token": token}]),
           **(extra_env or {})}
    command = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--models", str(ROOT / "models"),
               "--policies", str(policies or ROOT / "policies")]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]  # keep the server off the load generator's CPU
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                sys.exit(f"gateway exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Spawned(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def spawned_gateway(token: str, extra_env: dict[str, str] | None = None,
                    policies: Path | None = None, cpu: int | None = None) -> Iterator[str]:
    """`gateway serve` on a free port with a throw-away state directory; yields its URL."""
    with gateway_process(token, extra_env, policies, cpu) as spawned:
        yield spawned.url


def ungated_policies(target: Path) -> Path:
    """A copy of the bundled policies at `target` with the readiness gate off, for scripts that measure
    switching or rollouts rather than release approval (the gate refuses a version without a passing
    readiness report); returns `target`."""
    import yaml

    shutil.copytree(ROOT / "policies", target, dirs_exist_ok=True)
    for path in sorted(target.glob("*.yaml")):
        policy = yaml.safe_load(path.read_text())
        if isinstance(policy, dict) and isinstance(policy.get("readiness"), dict):
            policy["readiness"]["gate"] = "off"
            path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return target


def v2_body(row: dict[str, Any]) -> dict[str, Any]:
    """One row as an Open Inference Protocol v2 request: a [1, 1] tensor per feature."""
    def datatype(value: Any) -> str:
        if isinstance(value, bool):
            return "BOOL"
        if isinstance(value, int):
            return "INT64"
        return "FP64" if isinstance(value, float) else "BYTES"

    return {"inputs": [{"name": name, "shape": [1, 1], "datatype": datatype(value), "data": [value]}
                       for name, value in row.items()]}


@dataclass
class Outcome:
    """Everything measured in a run."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    timeline: Counter[tuple[int, str]] = field(default_factory=Counter)
    """Answers by (bucket of the scheduled send time, version); see `drive`'s bucket_s."""
    scheduled: int = 0
    duration_s: float = 0.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def summarise(outcome: Outcome) -> dict[str, Any]:
    """Rates, percentiles and shares of a run."""
    answered = sum(outcome.statuses.values())
    failed = sum(n for s, n in outcome.statuses.items() if s >= 500) + sum(outcome.errors.values())
    total = answered + sum(outcome.errors.values())
    return {
        "scheduled": outcome.scheduled, "sent": total, "requests": total,
        "non_2xx": total - sum(n for s, n in outcome.statuses.items() if 200 <= s < 300),
        "versions": dict(outcome.versions), "routes": dict(outcome.routes),
        "achieved_rps": round(total / outcome.duration_s, 2) if outcome.duration_s else 0.0,
        "scheduled_rps": round(outcome.scheduled / outcome.duration_s, 2) if outcome.duration_s else 0.0,
        "latency_ms": {"p50": percentile(outcome.latencies_ms, 50), "p90": percentile(outcome.latencies_ms, 90),
                       "p99": percentile(outcome.latencies_ms, 99), "p99.9": percentile(outcome.latencies_ms, 99.9),
                       "max": max(outcome.latencies_ms, default=math.nan)},
        "errors_by_status": {str(s): n for s, n in sorted(outcome.statuses.items()) if s >= 400},
        "transport_errors": dict(outcome.errors),
        "error_rate": round(failed / total, 6) if total else 0.0,
        "share_by_version": {v: round(n / answered, 4) for v, n in outcome.versions.items()} if answered else {},
        "share_fallback": round(sum(outcome.fallbacks.values()) / answered, 4) if answered else 0.0,
        "fallback_reasons": dict(outcome.fallbacks),
    }


async def drive(url: str, path: str, body: bytes, offsets: list[float], outcome: Outcome | None = None,
                start: float | None = None, bucket_s: float = 1.0) -> Outcome:
    """Send one request per offset, on time, whatever came before; measure each from its scheduled time.

    `outcome` lets a caller watch the run as it fills; `start` (event-loop time) lines the offsets
    up with other timed work (default: 0.1 s from now); answers are also counted per version in
    buckets of `bucket_s` seconds of scheduled time. aiohttp rather than httpx: on a 2-core
    machine the load generator must cost far less CPU than the server it measures.
    """
    import aiohttp

    with _no_collector_pauses():
        return await _drive(aiohttp, url, path, body, offsets, outcome, start, bucket_s)


@contextmanager
def _no_collector_pauses() -> Iterator[None]:
    """The load generator's own garbage collection would show up as server latency (a full pass
    over thousands of pending requests took 100-200 ms): freeze what exists and collect nothing
    during the (bounded) run, then catch up."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def _drive(aiohttp: Any, url: str, path: str, body: bytes, offsets: list[float], outcome: Outcome | None,
                 start: float | None, bucket_s: float) -> Outcome:
    if outcome is None:
        outcome = Outcome()
    outcome.scheduled = len(offsets)
    connector = aiohttp.TCPConnector(limit=2000)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as client:
        loop = asyncio.get_running_loop()
        begin = loop.time() + 0.1 if start is None else start

        async def one(offset: float) -> None:
            at = begin + offset
            await asyncio.sleep(max(0.0, at - loop.time()))
            try:
                async with client.post(path, data=body, headers={"Content-Type": "application/json"}) as answer:
                    await answer.read()
                    outcome.latencies_ms.append((loop.time() - at) * 1000)
                    outcome.statuses[answer.status] += 1
                    version = answer.headers.get("x-model-version", "-")
                    outcome.versions[version] += 1
                    outcome.timeline[int(offset / bucket_s + 1e-9), version] += 1
                    outcome.routes[answer.headers.get("x-route", "-")] += 1
                    if "x-fallback" in answer.headers:
                        outcome.fallbacks[answer.headers["x-fallback"]] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome.errors[type(exc).__name__] += 1

        await asyncio.gather(*(one(o) for o in offsets))
        outcome.duration_s = max(offsets[-1] if offsets else 0.0, loop.time() - begin)
    return outcome

"""Shared pieces of the load scripts: a gateway started on a free loopback port, open-loop load, stats."""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable, Iterator
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


@contextmanager
def spawned_gateway(token: str, extra_env: dict[str, str] | None = None,
                    policies: Path | None = None, cpu: int | None = None) -> Iterator[str]:
    """`gateway serve` on a free port with a throw-away state directory; yields its URL."""
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
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Results:
    """Outcomes of an open-loop run; latency is measured from each request's scheduled time."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def percentile(self, p: float) -> float:
        """Latency percentile in ms (nearest rank)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        total = sum(self.statuses.values()) + sum(self.errors.values())
        return {"requests": total, "statuses": dict(self.statuses), "transport_errors": dict(self.errors),
                "non_2xx": total - sum(n for s, n in self.statuses.items() if 200 <= s < 300),
                "versions": dict(self.versions), "routes": dict(self.routes),
                "latency_ms": {p: round(self.percentile(float(p)), 2) for p in ("50", "90", "99", "99.9")}
                | {"max": round(max(self.latencies_ms, default=math.nan), 2)}}


async def open_loop(url: str, rate: float, seconds: float, path: str, body: dict[str, Any],
                    headers: Callable[[int], dict[str, str]] | None = None, max_in_flight: int = 1000) -> Results:
    """Send requests at `rate` per second for `seconds`, each at its scheduled time, whatever came before.

    aiohttp rather than httpx: on a 2-core machine the load generator must cost far less CPU than
    the server it measures.
    """
    import aiohttp

    results = Results()
    payload = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        count = int(rate * seconds)

        async def one(i: int) -> None:
            at = start + i / rate
            await asyncio.sleep(max(0.0, at - loop.time()))
            extra = {"Content-Type": "application/json", **(headers(i) if headers else {})}
            try:
                async with client.post(path, data=payload, headers=extra) as answer:
                    await answer.read()
                    results.latencies_ms.append((loop.time() - at) * 1000)
                    results.statuses[answer.status] += 1
                    results.versions[answer.headers.get("x-model-version", "-")] += 1
                    results.routes[answer.headers.get("x-route", "-")] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                results.errors[type(exc).__name__] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return results

"""Scenario runner: open-loop load from a declarative file, with an SLA verdict against the policy.

    python -m loadtests.runner loadtests/scenarios/steady.yaml [--url URL] [--out DIR] [--scale 0.25]

Requests leave at their scheduled times whatever happened to earlier ones, and latency is
measured from the scheduled time, so a stalled server shows as latency instead of hiding as
fewer requests (coordinated omission). The verdict compares the run with the model policy's
`slo`: p99 <= slo.p99_ms, error rate <= slo.error_rate, and an achieved rate of at least 95 % of
the scheduled one. `rate: target` means 2 x slo.peak_rps (headroom), `rate: 0.5 target` half of
it, a number is requests per second. Exit 0 pass, 1 fail. JSON and Markdown reports go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loadtests.common import ROOT, ROW, drive, require_loopback, spawned_gateway, summarise


@dataclass(frozen=True)
class Phase:
    """A stretch of constant rate."""

    rate: float
    seconds: float


@dataclass(frozen=True)
class Slo:
    """What the verdict judges against (the model policy's `slo`)."""

    p99_ms: float
    error_rate: float
    peak_rps: float

    @property
    def target_rps(self) -> float:
        """Twice the expected peak: the headroom a release must show."""
        return 2 * self.peak_rps


def parse_rate(text: str | float, slo: Slo) -> float:
    """`120`, `target`, `0.5 target` -> requests per second."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*(?:([0-9.]+)\s*)?target\s*", str(text))
    if match is None:
        raise ValueError(f"rate {text!r}: a number, `target` or `<factor> target`")
    return float(match.group(1) or 1.0) * slo.target_rps


def schedule(phases: list[Phase]) -> list[float]:
    """Send offsets in seconds for a sequence of constant-rate phases."""
    offsets: list[float] = []
    start = 0.0
    for phase in phases:
        count = round(phase.rate * phase.seconds)
        offsets += [start + i / phase.rate for i in range(count)]
        start += phase.seconds
    return offsets


def verdict(summary: dict[str, Any], slo: Slo) -> dict[str, Any]:
    """Pass only when p99, error rate and achieved rate all meet the SLO."""
    checks = {
        "p99": {"value": summary["latency_ms"]["p99"], "limit": slo.p99_ms,
                "ok": summary["latency_ms"]["p99"] <= slo.p99_ms},
        "error_rate": {"value": summary["error_rate"], "limit": slo.error_rate,
                       "ok": summary["error_rate"] <= slo.error_rate},
        "rate": {"value": summary["achieved_rps"], "limit": round(0.95 * summary["scheduled_rps"], 2),
                 "ok": summary["achieved_rps"] >= 0.95 * summary["scheduled_rps"]},
    }
    return {"pass": all(c["ok"] for c in checks.values()), "checks": checks}


def load_scenario(path: Path, slo: Slo, scale: float) -> tuple[dict[str, Any], list[Phase]]:
    """The scenario file and its phases (rates resolved, durations scaled)."""
    spec = yaml.safe_load(path.read_text())
    phases = [Phase(parse_rate(p["rate"], slo), float(p["seconds"]) * scale) for p in spec["phases"]]
    return spec, phases


def policy_slo(model: str) -> Slo:
    """The bundled policy's SLO for `model`."""
    from gateway.policy import load_policy

    policy = load_policy(ROOT / "policies" / f"{model}.yaml").policy
    return Slo(policy.slo.p99_ms, policy.slo.error_rate, policy.slo.peak_rps)


def markdown(name: str, summary: dict[str, Any], judged: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    rows = "\n".join(f"| {k} | {c['value']} | {c['limit']} | {'pass' if c['ok'] else 'FAIL'} |"
                      for k, c in judged["checks"].items())
    lat = summary["latency_ms"]
    return (f"# {name}: {'PASS' if judged['pass'] else 'FAIL'}\n\n| check | value | limit | result |\n"
            f"| --- | --- | --- | --- |\n{rows}\n\nLatency ms: p50 {lat['p50']:.2f}, p90 {lat['p90']:.2f}, "
            f"p99 {lat['p99']:.2f}, p99.9 {lat['p99.9']:.2f}, max {lat['max']:.2f}. Sent {summary['sent']} of "
            f"{summary['scheduled']} scheduled; versions {summary['share_by_version']}; fallback share "
            f"{summary['share_fallback']}.\n")


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--url", help="a running gateway on loopback; default: start one")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's duration")
    args = parser.parse_args()
    spec = yaml.safe_load(args.scenario.read_text())
    slo = policy_slo(spec["model"])
    spec, phases = load_scenario(args.scenario, slo, args.scale)
    path = (f"/v1/models/{spec['model']}:predict" if spec.get("protocol", "v1") == "v1"
            else f"/v2/models/{spec['model']}/infer")
    body = json.dumps({"instances": [ROW]}).encode()
    offsets = schedule(phases)
    if args.url:
        require_loopback(args.url)
        outcome = asyncio.run(drive(args.url, path, body, offsets))
    else:
        with spawned_gateway("runner-token-0123456789") as url:
            outcome = asyncio.run(drive(url, path, body, offsets))
    summary = summarise(outcome)
    judged = verdict(summary, slo)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"scenario": spec["name"], "slo": vars(slo) | {"target_rps": slo.target_rps}, "summary": summary,
              "verdict": judged}
    (args.out / f"{spec['name']}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{spec['name']}.md").write_text(markdown(spec["name"], summary, judged))
    print(markdown(spec["name"], summary, judged))
    return 0 if judged["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Scenario runner: open-loop load from a declarative file, with an SLA verdict against the policy.

    python -m loadtests.runner loadtests/scenarios/steady.yaml [--url URL] [--out DIR] [--scale 0.25]
    python -m loadtests steady | spike | soak | switch | fault | rollout | rollout-bad [options]

Requests leave at their scheduled times whatever happened to earlier ones, and latency is
measured from the scheduled time, so a stalled server shows as latency instead of hiding as
fewer requests (coordinated omission). The verdict compares the run with the model policy's
`slo` (p99 <= slo.p99_ms, error rate <= slo.error_rate, achieved rate >= 95 % of the scheduled
one) plus what the scenario's `expect` adds: non-2xx answers, fallback share, RSS growth, the
rollout's end state; timed admin `actions` must all succeed. `rate: target` means
2 x slo.peak_rps (headroom), `rate: 0.5 target` half of it, a number is requests per second.
Exit 0 pass, 1 fail, 2 the scenario cannot run as asked. JSON and Markdown reports go to --out.
See docs/loadtests.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from loadtests.common import ROOT, ROW, Outcome, drive, gateway_process, require_loopback, summarise, v2_body
from loadtests.scenario import (
    ACTIONS,
    Expect,
    Phase,
    Scenario,
    ScenarioError,
    Slo,
    TimedAction,
    find_scenario,
    parse_rate,
    parse_rss,
    phases_of,
    read_scenario,
    rollout_outcome,
    rss_report,
    schedule,
    shares_over_time,
    timed_actions,
    write_policies,
)

__all__ = ["Phase", "Slo", "load_scenario", "main", "parse_rate", "schedule", "verdict"]

SPAWNED_TOKEN = "runner-token-0123456789"


def _check(value: Any, op: str, limit: Any) -> dict[str, Any]:
    ok = value is not None and {"<=": lambda: value <= limit, ">=": lambda: value >= limit,
                                "==": lambda: value == limit}[op]()
    shown = round(value, 3) if isinstance(value, float) else value
    return {"value": shown, "op": op, "limit": limit, "ok": bool(ok)}


def verdict(summary: dict[str, Any], slo: Slo, expect: Expect | None = None, rss: dict[str, Any] | None = None,
            actions: list[dict[str, Any]] | None = None, rollout: str | None = None) -> dict[str, Any]:
    """Pass only when every check holds: the SLO checks `expect.slo` names (all three by default),
    then each limit `expect` declares, and every timed action answered 2xx."""
    expect = expect or Expect()
    checks: dict[str, dict[str, Any]] = {}
    if "p99" in expect.slo:
        checks["p99"] = _check(summary["latency_ms"]["p99"], "<=", slo.p99_ms)
    if "error_rate" in expect.slo:
        checks["error_rate"] = _check(summary["error_rate"], "<=", slo.error_rate)
    if "rate" in expect.slo:
        checks["rate"] = _check(summary["achieved_rps"], ">=", round(0.95 * summary["scheduled_rps"], 2))
    if expect.max_non_2xx is not None:
        checks["non_2xx"] = _check(summary["non_2xx"], "<=", expect.max_non_2xx)
    if expect.min_fallback_share is not None:
        checks["fallback_share"] = _check(summary["share_fallback"], ">=", expect.min_fallback_share)
    if expect.max_rss_growth_pct is not None:
        checks["rss_growth"] = _check((rss or {}).get("growth_pct"), "<=", expect.max_rss_growth_pct)
    if actions:
        done = sum(1 for a in actions if a["ok"])
        checks["actions"] = _check(done, "==", len(actions))
    if expect.rollout is not None:
        checks["rollout"] = _check(rollout, "==", expect.rollout)
    return {"pass": all(c["ok"] for c in checks.values()), "checks": checks}


def load_scenario(path: Path, slo: Slo, scale: float) -> tuple[Scenario, list[Phase]]:
    """The validated scenario file and its phases (rates resolved, durations scaled)."""
    scenario = read_scenario(path)
    return scenario, phases_of(scenario, slo, scale)


def policy_slo(model: str, policies: Path | None = None) -> Slo:
    """The SLO of `model`'s policy in `policies` (default: the bundled policies)."""
    from gateway.policy import load_policy

    policy = load_policy((policies or ROOT / "policies") / f"{model}.yaml").policy
    return Slo(policy.slo.p99_ms, policy.slo.error_rate, policy.slo.peak_rps)


@dataclass
class Run:
    """What happened besides the answers: admin calls, memory samples, the rollout."""

    outcome: Outcome = field(default_factory=Outcome)
    actions: list[dict[str, Any]] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    rss_source: str | None = None
    rollout: dict[str, Any] | None = None


class Progress:
    """One status line on stderr: redrawn with \\r on a terminal, else a line every `every_s` seconds."""

    def __init__(self, name: str, seconds: float, outcome: Outcome, stream: TextIO | None = None,
                 every_s: float | None = None) -> None:
        self.name = name
        self.seconds = seconds
        self.outcome = outcome
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s or (0.5 if self.tty else 10.0)

    def line(self, elapsed: float) -> str:
        """The status text at `elapsed` seconds."""
        o = self.outcome
        answered = sum(o.statuses.values()) + sum(o.errors.values())
        bad = answered - sum(n for s, n in o.statuses.items() if 200 <= s < 300)
        return (f"{self.name}: {min(elapsed, self.seconds):.1f}/{self.seconds:.1f} s, answered {answered}/"
                f"{o.scheduled}, non-2xx {bad}, fallback {sum(o.fallbacks.values())}")

    def show(self, elapsed: float, final: bool = False) -> None:
        """Write the line (a terminal's line is redrawn; the final one ends it)."""
        text = self.line(elapsed)
        if self.tty:
            self.stream.write("\r" + text.ljust(79) + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    async def run(self, start: float) -> None:
        """Update until cancelled."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start - loop.time()))
        while True:
            await asyncio.sleep(self.every_s)
            self.show(loop.time() - start)


def _proc_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def sample_rss(client: httpx.AsyncClient, pid: int | None, run: Run, start: float) -> None:
    """One resident-memory sample: /metrics `process_resident_memory_bytes`, else /proc/PID/status."""
    value: int | None = None
    source = "metrics"
    if run.rss_source in (None, source):  # once /metrics lacked it, go straight to /proc
        try:
            value = parse_rss((await client.get("/metrics")).text)
        except httpx.HTTPError:
            value = None
    if value is None and pid is not None:
        value, source = _proc_rss(pid), f"/proc/{pid}/status"
    if value is not None:
        run.rss_source = run.rss_source or source
        run.rss_samples.append((round(asyncio.get_running_loop().time() - start, 3), value))


async def rss_loop(client: httpx.AsyncClient, pid: int | None, run: Run, start: float, every_s: float) -> None:
    """Sample at the start and every `every_s` seconds until cancelled."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - loop.time()))
    while True:
        await sample_rss(client, pid, run, start)
        await asyncio.sleep(every_s)


def _detail(reply: Any) -> str:
    if not isinstance(reply, dict):
        return str(reply)[:200]
    if "error" in reply:
        return str(reply["error"])[:200]
    if isinstance(reply.get("rollout"), dict):
        r = reply["rollout"]
        return f"rollout of {r.get('version')} {r.get('status')} at {r.get('percent')} %"
    before, after = reply.get("before") or {}, reply.get("after") or {}
    text = f"stable {before.get('stable')} -> {after.get('stable')}"
    if before.get("canary") or after.get("canary"):
        text += f", canary {after.get('canary')} at {after.get('canary_percent')} %"
    return text


async def run_actions(client: httpx.AsyncClient, model: str, token: str, actions: list[TimedAction],
                      run: Run, start: float) -> None:
    """Each admin call at its time (in order; a slow call delays the next); records every result."""
    loop = asyncio.get_running_loop()
    for action in actions:
        await asyncio.sleep(max(0.0, start + action.at - loop.time()))
        method, path, _ = ACTIONS[action.do]
        began = loop.time()
        record: dict[str, Any] = {"at": action.at, "t": round(began - start, 3), "do": action.do,
                                  "version": action.version, "percent": action.percent}
        try:
            answer = await client.request(method, f"/admin/models/{model}{path}", json=action.body(),
                                          headers={"Authorization": f"Bearer {token}"})
            try:
                reply: Any = answer.json()
            except ValueError:
                reply = answer.text
            record |= {"status": answer.status_code, "ok": 200 <= answer.status_code < 300,
                       "detail": _detail(reply),
                       "server_ms": reply.get("took_ms") if isinstance(reply, dict) else None}
        except httpx.HTTPError as exc:
            record |= {"status": None, "ok": False, "detail": f"{type(exc).__name__}: {exc}", "server_ms": None}
        record["client_ms"] = round((loop.time() - began) * 1000, 2)
        run.actions.append(record)


async def rollout_status(client: httpx.AsyncClient, model: str, token: str) -> dict[str, Any] | None:
    """The admin API's rollout status for `model` (None when it has none or cannot be read)."""
    try:
        answer = await client.get(f"/admin/models/{model}/rollout", headers={"Authorization": f"Bearer {token}"})
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return None
    status = body.get("rollout") if isinstance(body, dict) else None
    return status if isinstance(status, dict) else None


async def execute(url: str, token: str | None, pid: int | None, scenario: Scenario, offsets: list[float],
                  actions: list[TimedAction], progress: bool, bucket_s: float = 1.0) -> Run:
    """The load, the timed admin calls, RSS sampling and the progress line, all on one clock."""
    run = Run()
    path = (f"/v1/models/{scenario.model}:predict" if scenario.protocol == "v1"
            else f"/v2/models/{scenario.model}/infer")
    body = json.dumps({"instances": [ROW]} if scenario.protocol == "v1" else v2_body(ROW)).encode()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    wall_start = time.time() + 0.2
    seconds = offsets[-1] if offsets else 0.0
    bar = Progress(scenario.name, seconds, run.outcome) if progress else None
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        helpers = [loop.create_task(rss_loop(client, pid, run, start, scenario.rss.every_s))]
        if bar is not None:
            helpers.append(loop.create_task(bar.run(start)))
        admin = loop.create_task(run_actions(client, scenario.model, token or "", actions, run, start))
        await drive(url, path, body, offsets, run.outcome, start, bucket_s)
        await admin  # every action is due before the load ends; an action still running finishes
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await sample_rss(client, pid, run, start)
        if bar is not None:
            bar.show(loop.time() - start, final=True)
        if any(a.do.startswith("rollout") for a in actions) and token:
            run.rollout = await rollout_status(client, scenario.model, token)
            for decision in (run.rollout or {}).get("history", []):
                if isinstance(decision.get("time"), (int, float)):
                    decision["t"] = round(decision["time"] - wall_start, 2)
    return run


def _limit(check: dict[str, Any]) -> str:
    return f"{check['op']} {check['limit']}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    name, summary, judged = report["scenario"], report["summary"], report["verdict"]
    rows = "\n".join(f"| {k} | {c['value']} | {_limit(c)} | {'pass' if c['ok'] else 'FAIL'} |"
                     for k, c in judged["checks"].items())
    lat = summary["latency_ms"]
    text = (f"# {name}: {'PASS' if judged['pass'] else 'FAIL'}\n\n| check | value | limit | result |\n"
            f"| --- | --- | --- | --- |\n{rows}\n\nLatency ms: p50 {lat['p50']:.2f}, p90 {lat['p90']:.2f}, "
            f"p99 {lat['p99']:.2f}, p99.9 {lat['p99.9']:.2f}, max {lat['max']:.2f}. Sent {summary['sent']} of "
            f"{summary['scheduled']} scheduled ({summary['achieved_rps']} req/s); non-2xx {summary['non_2xx']}; "
            f"versions {summary['share_by_version']}; fallback share {summary['share_fallback']} "
            f"{summary['fallback_reasons'] or ''}\n")
    rss = report.get("rss")
    if rss and rss["samples"]:
        text += (f"\nRSS ({rss['samples']} samples from {rss['source']}, baseline at {rss['baseline_at_s']} s): "
                 f"start {rss['start_mb']} MB, end {rss['end_mb']} MB, max {rss['max_mb']} MB, growth "
                 f"{rss['growth_mb']:+} MB ({rss['growth_pct']:+} %).\n")
    elif rss is not None:
        text += "\nRSS: no samples (the server exports no `process_resident_memory_bytes`; give --pid).\n"
    if report.get("actions"):
        text += "\n| at s | action | version | status | result | server ms |\n| --- | --- | --- | --- | --- | --- |\n"
        text += "".join(f"| {a['t']} | {a['do']} | {a['version'] or ''} | {a['status']} | {a['detail']} | "
                        f"{a['server_ms'] if a['server_ms'] is not None else ''} |\n" for a in report["actions"])
    if "rollout" in report:
        r = report["rollout"] or {}
        text += f"\nRollout: **{report['rollout_outcome']}** ({r.get('reason') or 'no reason given'}).\n"
        for d in r.get("history", []):
            c = d.get("canary") or {}
            text += (f"- t={d.get('t')} s: step {d.get('step')} at {d.get('percent')} %: {d.get('decision')}"
                     f"{' (' + d['reason'] + ')' if d.get('reason') else ''}; canary {c.get('attempts')} calls, "
                     f"error rate {c.get('error_rate')}, fallback rate {c.get('fallback_rate')}, "
                     f"p99 {c.get('p99_ms')} ms\n")
    if report.get("actions") or report.get("policy_overrides"):
        versions = sorted({v for row in report["shares_over_time"] for v in row["shares"]})
        text += (f"\nAnswer shares by version over time (by scheduled send time, buckets of "
                 f"{report['scale']} s):\n\n| from s | answers | {' | '.join(versions)} |\n"
                 f"| --- | --- |{' --- |' * len(versions)}\n")
        text += "".join(f"| {row['t']} | {row['answers']} | "
                        + " | ".join(f"{row['shares'].get(v, 0):.0%}" for v in versions) + " |\n"
                        for row in report["shares_over_time"])
    return text


@contextmanager
def _target(args: argparse.Namespace, scenario: Scenario) -> Iterator[tuple[str, str | None, int | None, Slo]]:
    """The gateway to load (--url, or one started here, with overridden policies) and its SLO."""
    if args.url:
        require_loopback(args.url)
        yield args.url, args.token, args.pid, policy_slo(scenario.model)
        return
    with tempfile.TemporaryDirectory(prefix="loadtest-policies-") as tmp:
        policies = ROOT / "policies"
        env: dict[str, str] = {}
        if scenario.policy_overrides:
            policies = Path(tmp) / "policies"
            write_policies(scenario, ROOT / "policies", policies)
            if "faults" in scenario.policy_overrides:
                env["GATEWAY_ALLOW_FAULT_INJECTION"] = "1"
        with gateway_process(SPAWNED_TOKEN, env, policies) as spawned:
            yield spawned.url, SPAWNED_TOKEN, spawned.pid, policy_slo(scenario.model, policies)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("scenario", help="a scenario file, or the name of a bundled one (steady, soak, ...)")
    parser.add_argument("--url", help="a running gateway on loopback; default: start one")
    parser.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"),
                        help="admin bearer token for --url (default: $GATEWAY_TOKEN); needed by scenarios with "
                             "actions")
    parser.add_argument("--pid", type=int, help="process id of the --url gateway, to read RSS from /proc when its "
                                                "/metrics has no process_resident_memory_bytes")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for NAME.json and NAME.md")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every duration (phases, action times, RSS warm-up)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every phase's rate")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.rate_scale <= 0:
        parser.error("--scale and --rate-scale must be above 0")
    try:
        scenario = read_scenario(find_scenario(args.scenario))
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.url and scenario.policy_overrides:
        print(f"error: scenario {scenario.name} overrides the policy ({', '.join(scenario.policy_overrides)}), so "
              "it needs a gateway started by the runner: drop --url", file=sys.stderr)
        return 2
    if args.url and scenario.actions and not args.token:
        print(f"error: scenario {scenario.name} calls the admin API: give --token or set GATEWAY_TOKEN",
              file=sys.stderr)
        return 2
    actions = timed_actions(scenario, args.scale)
    bucket = round(args.scale, 6)  # one bucket per second of the unscaled scenario
    try:
        with _target(args, scenario) as (url, token, pid, slo):
            offsets = schedule(phases_of(scenario, slo, args.scale, args.rate_scale))
            run = asyncio.run(execute(url, token, pid, scenario, offsets, actions, not args.no_progress, bucket))
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(run.outcome)
    rss = rss_report(run.rss_samples, scenario.rss.warmup_s * args.scale) | {"source": run.rss_source}
    outcome = rollout_outcome(run.rollout) if any(a.do == "rollout" for a in actions) else None
    judged = verdict(summary, slo, scenario.expect, rss, run.actions, outcome)
    report: dict[str, Any] = {
        "scenario": scenario.name, "description": scenario.description, "scale": args.scale,
        "policy_overrides": scenario.policy_overrides,
        "rate_scale": args.rate_scale, "target": "url" if args.url else "spawned",
        "slo": vars(slo) | {"target_rps": slo.target_rps}, "summary": summary, "rss": rss,
        "rss_series": [{"t": t, "mb": round(b / 2**20, 2)} for t, b in run.rss_samples],
        "actions": run.actions, "shares_over_time": shares_over_time(run.outcome.timeline, bucket),
        "verdict": judged,
    }
    if outcome is not None:
        report |= {"rollout": run.rollout, "rollout_outcome": outcome}
    args.out.mkdir(parents=True, exist_ok=True)
    page = markdown(report)
    (args.out / f"{scenario.name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{scenario.name}.md").write_text(page)
    print(page)
    return 0 if judged["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

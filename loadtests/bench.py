"""Benchmark: what the gateway's safety nets cost, against a bare endpoint and the onnxruntime floor.

    python -m loadtests.bench [--seconds 5] [--rounds 2] [--models credit-risk,mlp]
                              [--connections 1,32,128] [--no-batching] [--out reports]

One command measures, in the same run, on the same model and with the same load generator:

(a) the gateway with every safety net on: validation against the policy schema, routing, circuit
    breaker, deadline, fallback rules (with the low-confidence band), drift windows and feedback
    joins (the card's reference profile and score), audit log (fsync per batch), Prometheus
    metrics, tracing spans (exporter `none`: ids only, as shipped); shadow off. The bundled policy
    for credit-risk; for the MLP a policy written here, with dynamic batching.
(b) the gateway with the nets off, as far as configuration allows: the same policy without
    `fallback` (so no rules and no low-confidence band) and with `audit.enabled: false`; drift and
    feedback joins have no policy or settings switch, so (b) serves a copy of the version whose
    card has no `reference_profile` and no `score` (same model.onnx and sha256). What stays on and
    cannot be switched off: HTTP handling, v2 decoding, validation with the same schema, routing,
    breaker, deadline (same `guard`), request counting and metrics, tracing spans (ids only), the
    per-minute volume count, and the same `batching` section as (a).
(c) the bare endpoint `loadtests/bare_app.py`: FastAPI + pydantic parse + session.run + JSON.
(d) the floor: session.run in a loop in this process (one intra-op thread): calls/s at batch 1,
    and per-row cost at batch 32; measured every round, the best round reported.

Load: wrk (closed loop, one thread, 10 s request timeout) at each connection count for
`--seconds`, with `loadtests/post.lua` POSTing a v2 JSON body read from a file; p50/p99 come from
wrk's `--latency` distribution. Servers run pinned to CPU 0 (`taskset -c 0`), wrk to CPU 1, the
floor on CPU 0 while the servers idle (without taskset, or with one CPU, nothing is pinned and
the report says so). All three servers of a model stay up for all rounds; every round visits
every (connections, server) point, the servers in a rotated order, so noise hits all alike; a
gateway point ends only once its audit and drift queues have drained. Before each point the
server must answer the body correctly (a gateway from its model: waiting, bounded, for a breaker
the last point opened to close); a point with non-2xx answers, socket errors or, on a gateway,
answers other than `ok` (fallbacks, timeouts) is flagged, and a target resting on a flagged
point fails. Reported: medians over rounds, and ratios computed per round and then medianed.

Targets (from the benchmark issue): (a) >= 1.5x (c) req/s at 32 connections on credit-risk;
(a) p50 at 1 connection <= (c)'s; (a) >= 2.5x (c) req/s at 128 connections on the MLP; (a)'s
p99 within 10x its p50 at 128 connections (the two latency targets are checked on every model).
Exit 0 when every checked target holds, 1 otherwise, 2 when the bench cannot run. Loopback
only; a run takes about models x rounds x connections x 3 x seconds, plus start-up and drains.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from loadtests.common import ROOT, ROW, free_port

SERVERS = ("a", "b", "c")
SERVER_NAMES = {"a": "gateway, every net on", "b": "gateway, nets off", "c": "bare FastAPI + onnxruntime"}
MODELS = ("credit-risk", "mlp")
LUA = Path(__file__).resolve().parent / "post.lua"
SERVER_CPU, WRK_CPU = 0, 1
WRK_TIMEOUT_S = 10  # wrk leaves timed-out requests out of its latency distribution: keep them in it
# No queue delay: a lone request runs at once; requests that arrive while a batch runs form the next
# one (adaptive batching), so batches grow with load and low load pays no wait.
MLP_BATCHING = {"max_batch_size": 32, "max_queue_delay_ms": 0}
CREDIT_RISK_VERSION = "1"
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")


class BenchError(Exception):
    """The bench cannot run as asked (a server does not start or answers wrongly)."""


# --- wrk output ------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """What one wrk run reports: throughput, latency percentiles (ms) and errors."""

    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Non-2xx/3xx answers plus socket errors."""
        return self.non_2xx + sum(self.socket_errors.values())


def parse_duration_ms(text: str) -> float:
    """A wrk duration (`812.00us`, `1.25ms`, `2.01s`, `1.00m`) in milliseconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Parse `wrk --latency` output: Requests/sec, the latency distribution, request and error counts."""
    percentiles: dict[str, float] = {}
    in_distribution = False
    rps = math.nan
    requests = 0
    non_2xx = 0
    socket_errors: dict[str, int] = {}
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("Latency Distribution"):
            in_distribution = True
            continue
        if in_distribution:
            match = re.match(r"^([0-9.]+)%\s+(\S+)$", line)
            if match:
                percentiles[f"{float(match.group(1)):g}"] = parse_duration_ms(match.group(2))
                continue
            in_distribution = False
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        elif re.match(r"^\d+ requests in ", line):
            requests = int(line.split()[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            non_2xx = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            for part in line.split(":", 1)[1].split(","):
                name, value = part.split()
                socket_errors[name] = int(value)
    missing = [p for p in ("50", "75", "90", "99") if p not in percentiles]
    if math.isnan(rps) or missing:
        raise ValueError(f"wrk output lacks {'Requests/sec' if math.isnan(rps) else 'percentiles ' + str(missing)} "
                         "(was --latency given?)")
    return WrkResult(rps, percentiles["50"], percentiles["75"], percentiles["90"], percentiles["99"], requests,
                     non_2xx, {k: v for k, v in socket_errors.items() if v})


def pin(cpu: int) -> list[str]:
    """`taskset -c CPU` when taskset exists and the machine has that CPU, else nothing."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu)]
    return []


def run_wrk(url: str, body_file: Path, connections: int, seconds: int) -> tuple[WrkResult, str]:
    """One closed-loop wrk run (one thread, pinned to the load generator's CPU); result and raw output."""
    command = [*pin(WRK_CPU), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT_S}s",
               "--latency", "-s", str(LUA), url, "--", str(body_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout), done.stdout


# --- arithmetic ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return float(statistics.median(finite)) if finite else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (server, connections) and per-round ratios medianed, from the measured points.

    A point is `{"round", "server", "connections", "requests_per_s", "p50_ms", "p99_ms", "clean"}`
    (`clean`: no errors and, for a gateway, every answer from the model).
    """
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        by_key.setdefault((p["server"], p["connections"]), []).append(p)
    servers: dict[str, dict[str, dict[str, Any]]] = {}
    for (server, connections), found in sorted(by_key.items()):
        servers.setdefault(server, {})[str(connections)] = {
            "requests_per_s": median([p["requests_per_s"] for p in found]),
            "p50_ms": median([p["p50_ms"] for p in found]),
            "p99_ms": median([p["p99_ms"] for p in found]),
            "rounds": len(found),
            "clean": all(p["clean"] for p in found),
        }
    index = {(p["round"], p["server"], p["connections"]): p for p in points}
    rounds = sorted({p["round"] for p in points})
    ratios: dict[str, dict[str, float]] = {}
    for connections in sorted({p["connections"] for p in points}):
        def per_round(server: str, other: str, metric: str, c: int = connections) -> float:
            values = [ratio(index[r, server, c][metric], index[r, other, c][metric]) for r in rounds
                      if (r, server, c) in index and (r, other, c) in index]
            return median(values)

        def spread(server: str, c: int = connections) -> float:
            return median([ratio(index[r, server, c]["p99_ms"], index[r, server, c]["p50_ms"]) for r in rounds
                           if (r, server, c) in index])

        ratios[str(connections)] = {
            "a_over_c_rps": per_round("a", "c", "requests_per_s"),
            "b_over_c_rps": per_round("b", "c", "requests_per_s"),
            "a_over_b_rps": per_round("a", "b", "requests_per_s"),
            "a_over_c_p50": per_round("a", "c", "p50_ms"),
            "b_over_c_p50": per_round("b", "c", "p50_ms"),
            "a_p99_over_p50": spread("a"),
        }
    return {"servers": servers, "ratios": ratios}


@dataclass(frozen=True)
class Target:
    """One target of the issue: a ratio of a model's summary compared with a bound."""

    model: str | None  # None: every measured model
    connections: int
    metric: str
    op: str  # ">=" or "<="
    bound: float
    text: str


TARGETS = (
    Target("credit-risk", 32, "a_over_c_rps", ">=", 1.5, "(a) >= 1.5x (c) req/s at 32 connections"),
    Target(None, 1, "a_over_c_p50", "<=", 1.0, "(a) p50 <= (c) p50 at 1 connection"),
    Target("mlp", 128, "a_over_c_rps", ">=", 2.5, "(a) >= 2.5x (c) req/s at 128 connections"),
    Target(None, 128, "a_p99_over_p50", "<=", 10.0, "(a) p99 within 10x its p50 at 128 connections"),
)


def target_checks(summaries: Mapping[str, dict[str, Any]], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Each target per model it applies to: value, verdict (`pass`, `fail`, `not measured`)."""
    checks = []
    for target in targets:
        for model in ([target.model] if target.model else list(summaries)):
            summary = summaries.get(model)
            value = math.nan
            unclean: list[str] = []
            if summary is not None and str(target.connections) in summary["ratios"]:
                value = summary["ratios"][str(target.connections)][target.metric]
                servers = ("a",) if target.metric.startswith("a_p99") else ("a", "c")
                unclean = [s for s in servers
                           if not summary["servers"].get(s, {}).get(str(target.connections), {}).get("clean", True)]
            if math.isnan(value):
                verdict = "not measured"
            elif unclean:
                verdict = "fail"
            else:
                verdict = "pass" if (value >= target.bound if target.op == ">=" else value <= target.bound) else "fail"
            checks.append({"model": model, "target": target.text, "metric": target.metric, "op": target.op,
                           "bound": target.bound, "value": None if math.isnan(value) else round(value, 3),
                           "verdict": verdict,
                           "note": f"errors or fallback answers at that point on {', '.join(unclean)}"
                                   if unclean else ""})
    return checks


# --- Markdown --------------------------------------------------------------------------------------


def json_ready(value: Any) -> Any:
    """The report with NaN and infinities as null (strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: a table per model, its ratios and floor, then the target checks."""
    lines = ["# Gateway benchmark", ""]
    setup = report["setup"]
    lines.append(f"{setup['rounds']} interleaved round(s), {setup['seconds']} s per point, wrk -t1 at "
                 f"{', '.join(map(str, setup['connections']))} connections; {setup['pinning']}.")
    lines.append("")
    for model, result in report["models"].items():
        summary = result["summary"]
        lines += [f"## {model}", "", result["description"], ""]
        lines += ["| server | connections | req/s | p50 ms | p99 ms | note |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for server in SERVERS:
            for connections, s in summary["servers"].get(server, {}).items():
                note = "" if s["clean"] else "errors or fallback answers"
                lines.append(f"| ({server}) {SERVER_NAMES[server]} | {connections} | {_num(s['requests_per_s'])} | "
                             f"{_num(s['p50_ms'], 2)} | {_num(s['p99_ms'], 2)} | {note} |")
        lines += ["", "| connections | (a)/(c) req/s | (b)/(c) req/s | (a)/(b) req/s | (a)/(c) p50 | (b)/(c) p50 "
                      "| (a) p99/p50 |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for connections, r in summary["ratios"].items():
            lines.append(f"| {connections} | {_num(r['a_over_c_rps'], 2)} | {_num(r['b_over_c_rps'], 2)} | "
                         f"{_num(r['a_over_b_rps'], 2)} | {_num(r['a_over_c_p50'], 2)} | "
                         f"{_num(r['b_over_c_p50'], 2)} | {_num(r['a_p99_over_p50'], 1)} |")
        floor = result.get("floor")
        if floor:
            lines += ["", f"(d) in-process onnxruntime floor (one thread): {_num(floor['batch1_calls_per_s'])} "
                          f"calls/s at batch 1 ({_num(floor['batch1_us_per_call'], 1)} µs/call); "
                          f"{_num(floor['batch32_us_per_row'], 1)} µs/row at batch 32 "
                          f"({_num(floor['batch32_rows_per_s'])} rows/s)."]
        for note in result.get("notes", []):
            lines += ["", f"Note: {note}"]
        lines.append("")
    lines += ["## Targets", "", "| model | target | value | verdict |", "| --- | --- | ---: | --- |"]
    for check in report["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:.2f}"
        verdict = check["verdict"] + (f" ({check['note']})" if check["note"] else "")
        lines.append(f"| {check['model']} | {check['target']} | {value} | {verdict} |")
    lines += ["", "## Configurations", ""]
    lines += [f"- ({key}) {text}" if len(key) == 1 else f"- {key}: {text}"
              for key, text in report["configurations"].items()]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# --- models, policies, bodies ----------------------------------------------------------------------


@dataclass
class ModelSetup:
    """Everything the servers of one model need."""

    name: str
    description: str
    onnx: Path
    path: str  # the v2 infer path
    body: dict[str, Any]
    models_on: Path
    policies_on: Path
    models_off: Path
    policies_off: Path
    notes: list[str] = field(default_factory=list)


def v2_body(row: Mapping[str, Any], datatypes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A v2 request with one [1, 1] tensor per field (BOOL, INT64, FP32 or BYTES from the value's type)."""
    def datatype(value: Any) -> str:
        if isinstance(value, bool):
            return "BOOL"
        if isinstance(value, int):
            return "INT64"
        return "FP32" if isinstance(value, float) else "BYTES"

    return {"id": "bench", "inputs": [{"name": name, "shape": [1, 1],
                                       "datatype": (datatypes or {}).get(name, datatype(value)), "data": [value]}
                                      for name, value in row.items()]}


def nets_off_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The same policy without fallback (rules, low-confidence band) and with the audit log off."""
    off = copy.deepcopy(dict(policy))
    off.pop("fallback", None)
    off["audit"] = {**off.get("audit", {}), "enabled": False}
    off["description"] = "Benchmark (b): safety nets off as far as the policy allows."
    return off


def copy_without_monitoring(source: Path, target: Path) -> None:
    """Copy a version directory; its card loses `reference_profile` and `score` (no drift, no feedback joins)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "model.onnx", target / "model.onnx")
    card = yaml.safe_load((source / "model.yaml").read_text())
    card.pop("reference_profile", None)
    card.pop("score", None)
    (target / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def mlp_policy(features: Sequence[str], batching: bool) -> dict[str, Any]:
    """The MLP's policy for (a): ranges per feature, guard, fallback, drift and audit defaults, batching."""
    policy: dict[str, Any] = {
        "model": "mlp",
        "description": "Benchmark MLP (models/build_mlp.py): 30 standardised-ish numeric features.",
        "slo": {"p99_ms": 50, "error_rate": 0.01, "peak_rps": 500},
        "schema": {"unknown_fields": "ignore", "max_batch_size": 256,
                   "features": {name: {"type": "float", "min": -100, "max": 100} for name in features}},
        "routing": {"stable": "1"},
        "guard": {"timeout_ms": 250, "breaker": {"fail_max": 5, "reset_timeout_s": 30}},
        "fallback": {
            "rules": [{"name": "far-outside-reference", "when": "f00 < -20 or f00 > 20 or f01 < -20 or f01 > 20",
                       "output": {"label": 1, "probabilities": [0.4, 0.6]}}],
            "default": {"label": 0, "probabilities": [0.6, 0.4]},
            "low_confidence": {"band": [0.45, 0.55], "action": "review"},
        },
        "audit": {"enabled": True, "on_full": "block"},
    }
    if batching:
        policy["batching"] = dict(MLP_BATCHING)
    return policy


def _write_policy(directory: Path, policy: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{policy['model']}.yaml"
    path.write_text(yaml.safe_dump(dict(policy), sort_keys=False))
    return path


def policy_problem(path: Path, models: Path) -> str | None:
    """Why the gateway in this source tree would refuse a policy file (schema or fit), or None."""
    from gateway.policy_check import check_policy_file

    report = check_policy_file(path, models)
    return "; ".join(p.describe() for p in report.errors) or None


def credit_risk_setup(work: Path) -> ModelSetup:
    """credit-risk v1: (a) serves models/ and policies/ from the repository, (b) a nets-off copy."""
    bundled = yaml.safe_load((ROOT / "policies" / "credit-risk.yaml").read_text())
    models_off = work / "credit-risk-off" / "models"
    copy_without_monitoring(ROOT / "models" / "credit-risk" / CREDIT_RISK_VERSION,
                            models_off / "credit-risk" / CREDIT_RISK_VERSION)
    policies_off = work / "credit-risk-off" / "policies"
    _write_policy(policies_off, nets_off_policy(bundled))
    datatypes = {"has_cosigner": "BOOL", "employment": "BYTES", "home_ownership": "BYTES", "purpose": "BYTES"}
    return ModelSetup("credit-risk", "credit-risk v1 (logistic regression, 12 [N, 1] inputs); (a) bundled "
                      "models/ and policies/credit-risk.yaml.",
                      ROOT / "models" / "credit-risk" / CREDIT_RISK_VERSION / "model.onnx",
                      "/v2/models/credit-risk/infer", v2_body(ROW, datatypes),
                      ROOT / "models", ROOT / "policies", models_off, policies_off)


def mlp_setup(work: Path, batching: bool) -> ModelSetup:
    """The MLP built into `work`, its (a) policy (with batching when the gateway accepts it) and (b) copy."""
    models_on = work / "mlp-on" / "models"
    subprocess.run([sys.executable, str(ROOT / "models" / "build_mlp.py"), "--out", str(models_on)],
                   check=True, capture_output=True, timeout=300)
    version_dir = models_on / "mlp" / "1"
    card = yaml.safe_load((version_dir / "model.yaml").read_text())
    features = [t["name"] for t in card["signature"]["inputs"]]
    notes: list[str] = []
    policies_on = work / "mlp-on" / "policies"
    path = _write_policy(policies_on, mlp_policy(features, batching))
    problem = policy_problem(path, models_on)
    if problem and batching:
        path = _write_policy(policies_on, mlp_policy(features, False))
        notes.append(f"batching unavailable (the gateway refused the `batching` section: {problem}); "
                     "(a) and (b) ran without it")
        batching = False
        problem = policy_problem(path, models_on)
    if problem:
        raise BenchError(f"the MLP policy is refused: {problem}")
    models_off = work / "mlp-off" / "models"
    copy_without_monitoring(version_dir, models_off / "mlp" / "1")
    policies_off = work / "mlp-off" / "policies"
    _write_policy(policies_off, nets_off_policy(mlp_policy(features, batching)))
    row = {name: float(value) for name, value in card["golden"][0]["inputs"].items()}
    batching_text = f"batching {MLP_BATCHING} in (a) and (b)" if batching else "no batching"
    return ModelSetup("mlp", f"MLP 3x512 ReLU over 30 FP32 [N, 1] inputs (models/build_mlp.py, built into a temp "
                      f"dir); {batching_text}.", version_dir / "model.onnx", "/v2/models/mlp/infer",
                      v2_body(row), models_on, policies_on, models_off, policies_off, notes)


# --- servers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(command: list[str], env: Mapping[str, str], ready_path: str, log: Path,
          wait_s: float = 120) -> Iterator[str]:
    """Start a server on loopback pinned to the servers' CPU; yield its URL once `ready_path` answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [*pin(SERVER_CPU), *[part.replace("{port}", str(port)) for part in command]]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if process.poll() is not None:
                    raise BenchError(f"server exited ({process.returncode}): {log.read_text()[-2000:]}")
                try:
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"server not ready after {wait_s:.0f} s: {log.read_text()[-2000:]}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def gateway_command(models: Path, policies: Path) -> list[str]:
    """`gateway serve` on the port placeholder."""
    return [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", "{port}",
            "--models", str(models), "--policies", str(policies)]


def gateway_env(work: Path, name: str, extra: Mapping[str, str]) -> dict[str, str]:
    """Settings of a benchmarked gateway: throw-away state and audit dirs, quiet logs, no exporter."""
    return {"GATEWAY_STATE_DIR": str(work / f"{name}-state"), "GATEWAY_AUDIT_DIR": str(work / f"{name}-audit"),
            "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_TRACE_EXPORTER": "none", **extra}


def bare_command() -> list[str]:
    """uvicorn serving loadtests/bare_app.py on the port placeholder."""
    return [sys.executable, "-m", "uvicorn", "loadtests.bare_app:app", "--host", "127.0.0.1", "--port", "{port}",
            "--log-level", "warning", "--no-access-log"]


def expected_outputs(onnx: Path, body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """What the model file itself answers for the body (onnxruntime in this process)."""
    session = _session(onnx)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds_of(session, body)), strict=True))


def ensure_answering(url: str, path: str, body: Mapping[str, Any], expected: Mapping[str, np.ndarray],
                     gateway: bool, limit_s: float = 45.0) -> tuple[float, str]:
    """Retry `check_answer` (e.g. until a breaker opened by the last point closes again), bounded.

    Returns the seconds waited and the last problem ("" once the server answers correctly).
    """
    started = time.monotonic()
    while True:
        try:
            check_answer(url, path, body, expected, gateway)
            return time.monotonic() - started, ""
        except (BenchError, httpx.HTTPError) as exc:
            if time.monotonic() - started > limit_s:
                return time.monotonic() - started, str(exc)
            time.sleep(0.5)


def check_answer(url: str, path: str, body: Mapping[str, Any], expected: Mapping[str, np.ndarray],
                 gateway: bool) -> None:
    """The server answers 200 with the model's own outputs (a gateway: from the model, not the fallback)."""
    answer = httpx.post(url + path, json=dict(body), timeout=30)
    if answer.status_code != 200:
        raise BenchError(f"{url}{path} answered {answer.status_code}: {answer.text[:500]}")
    payload = answer.json()
    if gateway and (answer.headers.get("x-route") == "fallback" or payload.get("model_version") == "fallback"):
        raise BenchError(f"{url}{path} answered from the fallback: {payload.get('parameters')}")
    got = {o["name"]: np.asarray(o["data"], dtype=np.float64) for o in payload.get("outputs", [])}
    for name, want in expected.items():
        if name not in got or not np.allclose(got[name], want.astype(np.float64).ravel(), rtol=1e-4, atol=1e-5):
            raise BenchError(f"{url}{path}: output {name!r} is {got.get(name)}, the model gives {want.ravel()}")


def gateway_counts(url: str, model: str) -> Counter[str]:
    """The gateway's answered requests for `model` by outcome, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter[str] = Counter()
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels.get("model") == model:
                counts[sample.labels.get("outcome", "")] += int(sample.value)
    return counts


def wait_quiet(url: str, limit_s: float = 15.0) -> None:
    """Wait until the gateway's audit backlog, drift queue and in-flight calls are empty (bounded)."""
    from prometheus_client.parser import text_string_to_metric_families

    watched = {"gateway_audit_backlog", "gateway_drift_queue_depth", "gateway_inferences_in_flight"}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        busy = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in watched)
        if busy == 0:
            return
        time.sleep(0.1)


# --- floor -----------------------------------------------------------------------------------------


def _session(onnx: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx), sess_options=options, providers=["CPUExecutionProvider"])


def feeds_of(session: Any, body: Mapping[str, Any], repeat: int = 1) -> dict[str, np.ndarray]:
    """Feeds for the session from a v2 body (bare_app's conversion), the rows repeated `repeat` times."""
    kinds = {i.name: (object if i.type == "tensor(string)" else np.float32) for i in session.get_inputs()}
    feeds = {}
    for tensor in body["inputs"]:
        array = np.array(tensor["data"], dtype=kinds[tensor["name"]]).reshape(tensor["shape"])
        feeds[tensor["name"]] = np.repeat(array, repeat, axis=0)
    return feeds


def _calls_per_s(session: Any, feeds: Mapping[str, np.ndarray], seconds: float) -> float:
    for _ in range(50):
        session.run(None, feeds)
    calls = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feeds)
        calls += 1
    return calls / elapsed


def floor(onnx: Path, body: Mapping[str, Any], seconds: float = 1.0) -> dict[str, float]:
    """session.run in a loop in this process (pinned to the servers' CPU while they idle)."""
    session = _session(onnx)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and SERVER_CPU in affinity and shutil.which("taskset"):
        os.sched_setaffinity(0, {SERVER_CPU})
    try:
        one = _calls_per_s(session, feeds_of(session, body), seconds)
        many = _calls_per_s(session, feeds_of(session, body, 32), seconds)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    return {"batch1_calls_per_s": round(one, 1), "batch1_us_per_call": round(1e6 / one, 2),
            "batch32_us_per_row": round(1e6 / (many * 32), 2), "batch32_rows_per_s": round(many * 32, 1)}


def best_floor(floors: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The floor over rounds: each batch size's best round (the least a call can cost; a busy CPU only adds)."""
    if not floors:
        return {}
    one = max(floors, key=lambda f: f["batch1_calls_per_s"])
    many = max(floors, key=lambda f: f["batch32_rows_per_s"])
    return {"batch1_calls_per_s": one["batch1_calls_per_s"], "batch1_us_per_call": one["batch1_us_per_call"],
            "batch32_us_per_row": many["batch32_us_per_row"], "batch32_rows_per_s": many["batch32_rows_per_s"]}


# --- the run ---------------------------------------------------------------------------------------


def bench_model(setup: ModelSetup, work: Path, seconds: int, rounds: int, connections: Sequence[int],
                extra_env: Mapping[str, str], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start (a), (b), (c) for one model, check their answers, measure interleaved rounds; the model's result."""
    body_file = work / f"{setup.name}-body.json"
    body_file.write_text(json.dumps(setup.body))
    expected = expected_outputs(setup.onnx, setup.body)
    points: list[dict[str, Any]] = []
    floors: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        urls = {
            "a": stack.enter_context(serve(gateway_command(setup.models_on, setup.policies_on),
                                           gateway_env(work, f"{setup.name}-a", extra_env), "/v2/health/ready",
                                           work / f"{setup.name}-a.log")),
            "b": stack.enter_context(serve(gateway_command(setup.models_off, setup.policies_off),
                                           gateway_env(work, f"{setup.name}-b", extra_env), "/v2/health/ready",
                                           work / f"{setup.name}-b.log")),
            "c": stack.enter_context(serve(bare_command(), {"MODEL_PATH": str(setup.onnx)}, "/openapi.json",
                                           work / f"{setup.name}-c.log")),
        }
        for server, url in urls.items():
            check_answer(url, setup.path, setup.body, expected, gateway=server != "c")
            run_wrk(url + setup.path, body_file, max(connections), 1)  # warm-up
            if server != "c":
                wait_quiet(url)
        for round_no in range(rounds):
            floors.append(floor(setup.onnx, setup.body))
            order = list(SERVERS[round_no % 3:] + SERVERS[:round_no % 3])
            for n in connections:
                for server in order:
                    url = urls[server]
                    waited, problem = ensure_answering(url, setup.path, setup.body, expected, server != "c")
                    before = gateway_counts(url, setup.name) if server != "c" else Counter()
                    result, raw = run_wrk(url + setup.path, body_file, n, seconds)
                    outcomes: dict[str, int] = {}
                    if server != "c":
                        wait_quiet(url)
                        outcomes = {k: v for k, v in (gateway_counts(url, setup.name) - before).items() if v}
                    clean = result.errors == 0 and set(outcomes) <= {"ok"} and not problem
                    points.append({"round": round_no, "server": server, "connections": n, **asdict(result),
                                   "gateway_outcomes": outcomes, "clean": clean, "waited_s": round(waited, 2),
                                   "problem_before": problem, "wrk_output": raw})
                    log(f"  {setup.name} round {round_no + 1}/{rounds} ({server}) c={n}: "
                        f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
                        + (f"  [waited {waited:.1f} s for a correct answer first]" if waited > 1 else "")
                        + ("" if clean else f"  [errors {result.errors}, outcomes {outcomes} {problem}]"))
        for server in SERVERS:  # still answering correctly after the load (a breaker may need to close first)
            _, problem = ensure_answering(urls[server], setup.path, setup.body, expected, server != "c")
            if problem:
                setup.notes.append(f"({server}) did not answer correctly after the load: {problem}")
    return {"description": setup.description, "summary": summarise(points), "floor": best_floor(floors),
            "floors": floors, "points": points, "notes": setup.notes}


CONFIGURATIONS = {
    "a": "gateway, every safety net on: validation (policy schema), routing, breaker, deadline (guard), fallback "
         "rules + low-confidence band, drift windows + feedback joins (card reference profile and score), audit "
         "log (fsync per batch), metrics, tracing spans (exporter none); shadow off.",
    "b": "gateway, nets off as far as configuration allows: no `fallback`, `audit.enabled: false`, and a copy of "
         "the version whose card has no reference_profile/score (no policy or settings switch turns drift or "
         "feedback joins off). Still on: HTTP + v2 decoding, validation with the same schema, routing, breaker, "
         "deadline, request metrics, tracing spans (ids only), the volume count, the same batching section.",
    "c": "bare endpoint loadtests/bare_app.py: FastAPI, pydantic parse of the v2 body, session.run, JSON answer.",
    "d": "floor: session.run in a loop in the bench process, one intra-op thread, pinned like the servers.",
    "settings": "both gateways run with the shipped settings (e.g. GATEWAY_INFERENCE_THREADS 2, one onnxruntime "
                "thread per session, audit fsync per batch) except: throw-away state and audit directories, log "
                "level warning, GATEWAY_TRACE_EXPORTER none, plus any --gateway-env.",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per point (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: credit-risk,mlp")
    parser.add_argument("--connections", default="1,32,128", help="comma-separated wrk connection counts")
    parser.add_argument("--no-batching", action="store_true", help="leave `batching` out of the MLP policy")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra GATEWAY_* setting for both gateways (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where bench.json and bench.md go")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    try:
        connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        connections = []
    if unknown or not models or not connections or min(connections) < 1 or args.seconds < 1 or args.rounds < 1:
        parser.error(f"models from {list(MODELS)}, connections positive integers, seconds and rounds >= 1")
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if any("=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes KEY=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    notes: list[str] = []
    if not shutil.which("taskset"):
        pinning = "nothing pinned (taskset not found): servers and wrk share the CPUs"
    elif (os.cpu_count() or 1) <= WRK_CPU:
        pinning = "nothing pinned (one CPU): servers and wrk share it"
    else:
        pinning = f"servers pinned to CPU {SERVER_CPU} (taskset -c {SERVER_CPU}), wrk to CPU {WRK_CPU}"
    if extra_env:
        notes.append(f"extra gateway settings: {extra_env}")
    report: dict[str, Any] = {
        "setup": {"seconds": args.seconds, "rounds": args.rounds, "connections": connections, "models": models,
                  "pinning": pinning, "cpus": os.cpu_count(), "python": sys.version.split()[0],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "configurations": CONFIGURATIONS, "notes": notes, "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        for model in models:
            print(f"{model}: starting (a), (b), (c)", flush=True)
            setup = credit_risk_setup(work) if model == "credit-risk" else mlp_setup(work, not args.no_batching)
            report["models"][model] = bench_model(setup, work, args.seconds, args.rounds, connections, extra_env,
                                                  log=lambda line: print(line, flush=True))
    except BenchError as exc:
        print(f"bench cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = target_checks({m: r["summary"] for m, r in report["models"].items()})
    page = render_markdown(report)
    print(page)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(json_ready(report), indent=2))
    (args.out / "bench.md").write_text(page)
    return 0 if all(c["verdict"] == "pass" for c in report["targets"] if c["verdict"] != "not measured") else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Phases 2, 3 and 5 on the staging gateway: the served path, load, memory, health and rollback.

Everything here talks HTTP to a real server started for the run: what is judged is what a
client would get. Load comes from the bundled open-loop generator (`loadtests.common.drive`),
measured from each request's scheduled send time so a slow server cannot hide behind its own
backlog.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from gateway.audit import records, verify
from gateway.readiness import metrics
from gateway.readiness.checks_model import same_output
from gateway.readiness.context import Context, item, outputs_of, rounded
from gateway.readiness.evaluate import score_of
from gateway.readiness.report import ItemResult
from gateway.readiness.staging import StagingError, StagingGateway

#: rows per request when sending a whole table through the staging gateway
TABLE_BATCH = 256
#: latency histogram edges (ms) for the report's plot
LATENCY_EDGES = [0.0, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000]


# --- phase 2: data pipeline -----------------------------------------------------------------------


def served_reference(ctx: Context) -> ItemResult:
    """The served path gives the card's golden outputs and the offline scores (no training-serving skew)."""
    spec = ctx.readiness
    card = ctx.require_card()
    staging = ctx.staging()
    evidence: dict[str, Any] = {"tolerance": spec.golden_tolerance}
    problems: list[str] = []
    with httpx.Client(base_url=staging.url, timeout=60) as client:
        if card.golden:
            answer = client.post(ctx.infer_path(), json=ctx.v2_body([dict(g.inputs) for g in card.golden]))
            if answer.status_code != 200:
                problems.append(f"the card's golden inputs got {answer.status_code}: {answer.text[:200]}")
            else:
                got = outputs_of(answer.json())
                mismatched = [f"{example.id}.{name}" for i, example in enumerate(card.golden)
                              for name, expected in example.outputs.items()
                              if name not in got or not same_output(got[name][i], expected, spec.golden_tolerance)]
                evidence["card_golden"] = {"examples": len(card.golden), "mismatched": mismatched[:20]}
                if mismatched:
                    problems.append(f"{len(mismatched)} served golden outputs differ from the card's "
                                    f"(first: {mismatched[0]})")
        served = []
        rows = ctx.table_rows(ctx.heldout)
        for start in range(0, len(rows), TABLE_BATCH):
            answer = client.post(ctx.infer_path(), json=ctx.v2_body(rows[start:start + TABLE_BATCH]))
            if answer.status_code != 200:
                problems.append(f"held-out rows {start}-{start + TABLE_BATCH} got {answer.status_code}: "
                                f"{answer.text[:200]}")
                break
            outputs = {k: v for k, v in outputs_of(answer.json()).items() if v.dtype != object}
            served.append(score_of(outputs, card.score) if card.score else np.zeros(0))
    if served and not problems and card.score is not None:
        scores = np.concatenate(served)
        offline = ctx.candidate_heldout.scores
        skew = float(np.abs(scores - offline).max()) if len(scores) == len(offline) else math.inf
        evidence["heldout_skew"] = {"rows": len(scores), "max_abs_diff": rounded(skew, 9)}
        if skew > spec.golden_tolerance:
            problems.append(f"served held-out scores differ from the offline ones by up to {skew:.2e}")
        reference = card.reference_profile.prediction if card.reference_profile else None
        if reference is not None:
            psi = metrics.score_shift(reference.frequencies, scores, reference.bin_edges)["psi"]
            limit = ctx.policy.drift.prediction.alert
            evidence["served_score_psi"] = {"psi": rounded(psi), "drift_alert_at": limit,
                                            "metric_note": "PSI of served held-out scores vs the card's reference"}
            if psi >= limit:
                problems.append(f"served held-out scores are already in drift alert against the card's reference "
                                f"(PSI {psi:.3f} >= {limit}): monitoring would alarm on day one")
    if problems:
        return item("fail", "; ".join(problems), evidence)
    return item("pass", "the served path reproduces the card's golden outputs and the offline held-out scores",
                evidence)


def schema_handling(ctx: Context) -> ItemResult:
    """A new column is ignored (or refused, as the policy says), a missing one refused loudly, a safe type
    change coerced and an unsafe one refused."""
    features = ctx.policy.input_schema.features
    base = ctx.table_rows(ctx.heldout, 0, 1)[0]
    staging = ctx.staging()
    cases: list[tuple[str, dict[str, Any], str, str | None]] = []  # name, row, expectation, field named
    extra = "readiness_probe_new_column"
    cases.append(("new column", {**base, extra: 1.0},
                  "reject" if ctx.policy.input_schema.unknown_fields == "reject" else "same", extra))
    required = [n for n, f in features.items() if f.required and n in base]
    if required:
        row = {k: v for k, v in base.items() if k != required[0]}
        cases.append((f"missing {required[0]}", row, "reject", required[0]))
    ints = [n for n, f in features.items() if f.type == "int" and isinstance(base.get(n), int)]
    floats = [n for n, f in features.items() if f.type == "float" and isinstance(base.get(n), (int, float))]
    if ints:
        cases.append((f"{ints[0]} sent as a float ({float(base[ints[0]])})", {**base, ints[0]: float(base[ints[0]])},
                      "same", None))
        cases.append((f"{ints[0]} sent with a fraction", {**base, ints[0]: base[ints[0]] + 0.5}, "reject", ints[0]))
    if floats:
        whole = int(base[floats[0]]) if float(base[floats[0]]).is_integer() else None
        if whole is not None:
            cases.append((f"{floats[0]} sent as an integer", {**base, floats[0]: whole}, "same", None))
        cases.append((f"{floats[0]} sent as text", {**base, floats[0]: str(base[floats[0]])}, "reject", floats[0]))
    results = []
    with httpx.Client(base_url=staging.url, timeout=30) as client:
        reference = client.post(ctx.infer_path(), json=ctx.v2_body([base]))
        expected = outputs_of(reference.json()) if reference.status_code == 200 else {}
        for name, row, expectation, field in cases:
            answer = client.post(ctx.infer_path(), json=ctx.v2_body([row]))
            ok, why = _judge_schema_case(answer, expectation, field, expected)
            results.append({"case": name, "expected": expectation, "status": answer.status_code, "ok": ok,
                            "why": why})
    failed = [r for r in results if not r["ok"]]
    evidence = {"cases": results, "unknown_fields": ctx.policy.input_schema.unknown_fields}
    if reference.status_code != 200:
        return item("fail", f"a clean held-out row got {reference.status_code}", evidence)
    if failed:
        return item("fail", "; ".join(f"{r['case']}: {r['why']}" for r in failed), evidence)
    return item("pass", f"{len(results)} schema changes handled as the policy says", evidence)


def _judge_schema_case(answer: httpx.Response, expectation: str, field: str | None,
                       expected: dict[str, Any]) -> tuple[bool, str]:
    if expectation == "reject":
        if not 400 <= answer.status_code < 500:
            return False, f"expected a 4xx naming {field}, got {answer.status_code}"
        named = [v.get("field") for v in (answer.json().get("violations") or [])]
        return (field in named, "refused, naming the field" if field in named
                else f"refused, but the violations name {named}, not {field}")
    if answer.status_code != 200:
        return False, f"expected the same answer, got {answer.status_code}: {answer.text[:160]}"
    got = outputs_of(answer.json())
    same = all(np.array_equal(np.asarray(got.get(k)), np.asarray(v)) for k, v in expected.items())
    return same, "coerced: same answer" if same else "answered, but differently from the original row"


# --- phase 3: infrastructure ----------------------------------------------------------------------


def _load(ctx: Context, rate: float, seconds: float, path: str, rss_every_s: float | None = None,
          actions: list[tuple[float, str, str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Open-loop load on the staging gateway; optional RSS sampling and timed admin calls."""
    from loadtests.common import Outcome, drive, summarise
    from loadtests.scenario import parse_rss

    staging = ctx.staging()
    body = json.dumps(ctx.v2_body(ctx.table_rows(ctx.heldout, 0, 1))).encode()
    count = max(1, int(rate * seconds))
    offsets = [i / rate for i in range(count)]
    outcome = Outcome()
    samples: list[tuple[float, int]] = []
    done_actions: list[dict[str, Any]] = []

    async def sample(start: float) -> None:
        async with httpx.AsyncClient(base_url=staging.url, timeout=5) as client:
            while True:
                try:
                    rss = parse_rss((await client.get("/metrics")).text)
                    if rss is not None:
                        samples.append((asyncio.get_running_loop().time() - start, rss))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(rss_every_s or 1.0)

    async def act(start: float) -> None:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(base_url=staging.url, timeout=10,
                                     headers={"Authorization": f"Bearer {staging.token}"}) as client:
            for at, method, url, payload in actions or []:
                await asyncio.sleep(max(0.0, start + at - loop.time()))
                began = loop.time()
                answer = await client.request(method, url, json=payload)
                took = (loop.time() - began) * 1000
                reply = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
                done_actions.append({"action": url.rsplit("/", 1)[-1], "status": answer.status_code,
                                     "round_trip_ms": round(took, 2), "server_ms": reply.get("took_ms"),
                                     "error": reply.get("error")})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        helpers = []
        if rss_every_s:
            helpers.append(loop.create_task(sample(start)))
        acting = loop.create_task(act(start))
        await drive(staging.url, path, body, offsets, outcome, start)
        await acting
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)

    ctx.say(f"  {rate:g} req/s for {seconds:g} s")
    before = cpu_times()
    asyncio.run(main())
    return {"summary": summarise(outcome), "latencies": outcome.latencies_ms, "rss": samples,
            "actions": done_actions, "steal": steal_share(before, cpu_times())}


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat's `cpu` line), None where there is no /proc."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields[1:]] if fields and fields[0] == "cpu" else None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to others between two samples (the `steal` column)."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    spent = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(spent[:8])
    return round(spent[7] / total, 4) if total > 0 else None


def latency_figure(latencies: list[float], title: str, name: str, p99_limit_ms: float) -> dict[str, Any]:
    """Requests per latency bucket as bars: the buckets are far from equal in width (sub-millisecond
    to a second), so they are drawn side by side, not on a linear axis where the body would vanish."""
    edges = LATENCY_EDGES
    counts, _ = np.histogram(np.clip(latencies, 0, edges[-1]), bins=[*edges, np.inf])
    labels = [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)] + [f">={edges[-1]:g}"]
    last = max((i for i, c in enumerate(counts) if c), default=0)
    shown = max(last + 1, next((i for i, e in enumerate(edges) if e >= p99_limit_ms), len(labels)), 1)
    total = max(int(counts.sum()), 1)
    return {"id": "latency", "kind": "bars", "title": title, "y_label": "share of requests",
            "categories": [f"{label} ms" for label in labels[:shown]],
            "series": [{"name": name, "values": [round(c / total, 4) for c in counts[:shown].tolist()]}],
            "limits": []}


def load_test(ctx: Context) -> ItemResult:
    """Twice the policy's peak rate: p99 and error rate within the SLO.

    Latency counts from each request's scheduled send time, so a server (or a generator) that
    falls behind the rate shows in p99: no separate throughput criterion is needed, and none would
    be fair to a short run, whose last answers' tail stretches its duration.
    """
    slo = ctx.policy.slo
    seconds = max(1.0, ctx.readiness.load_seconds * ctx.target.scale)
    rate = 2 * slo.peak_rps
    _load(ctx, rate, min(2.0, seconds / 4), ctx.infer_path())  # warm-up (caches, pools, first allocations)
    run = _load(ctx, rate, seconds, ctx.infer_path())
    summary = run["summary"]
    p99 = summary["latency_ms"]["p99"]
    error_rate = summary["error_rate"]
    ctx.figures.append(latency_figure(run["latencies"], f"Latency at {rate:g} req/s (2 x peak)",
                                      f"v{ctx.target.version}", slo.p99_ms))
    evidence = {"rate_rps": rate, "seconds": seconds, "p99_limit_ms": slo.p99_ms, "error_rate_limit": slo.error_rate,
                "path": ctx.infer_path()}
    measured = {"latency_ms": {k: rounded(v, 3) for k, v in summary["latency_ms"].items()},
                "error_rate": error_rate, "achieved_rps": summary["achieved_rps"], "requests": summary["requests"],
                "errors_by_status": summary["errors_by_status"], "transport_errors": summary["transport_errors"],
                "cpu_steal": run["steal"]}
    problems = []
    if not p99 <= slo.p99_ms:
        problems.append(f"p99 {p99:.1f} ms > {slo.p99_ms} ms")
    if error_rate > slo.error_rate:
        problems.append(f"error rate {error_rate:.4f} > {slo.error_rate}")
    if problems:
        steal = run["steal"]
        if steal is not None and steal > 0.1:  # say so: the verdict stands, but the reader should know why
            problems.append(f"the hypervisor took {steal:.0%} of the CPU time during the run")
        return item("fail", f"at {rate:g} req/s: " + "; ".join(problems), evidence, measured)
    return item("pass", f"at {rate:g} req/s for {seconds:g} s: p99 {p99:.1f} ms <= {slo.p99_ms} ms, "
                        f"error rate {error_rate:.4f}", evidence, measured)


def soak(ctx: Context) -> ItemResult:
    """Memory levels off under steady load: the last third's resident memory is within bounds of the first's."""
    seconds = max(3.0, ctx.readiness.soak_seconds * ctx.target.scale)
    rate = ctx.policy.slo.peak_rps
    run = _load(ctx, rate, seconds, ctx.infer_path(), rss_every_s=max(0.25, seconds / 30))
    samples = sorted(run["rss"])
    limit = ctx.readiness.max_rss_growth
    evidence = {"rate_rps": rate, "seconds": seconds, "max_growth": limit}
    if len(samples) < 3:
        return item("fail", f"only {len(samples)} memory samples: /metrics does not export "
                            f"process_resident_memory_bytes", evidence)
    third = max(1, len(samples) // 3)
    first = float(np.median([b for _, b in samples[:third]]))
    last = float(np.median([b for _, b in samples[-third:]]))
    growth = (last - first) / first
    ctx.figures.append({"id": "rss", "kind": "line", "title": f"Resident memory during the soak ({rate:g} req/s)",
                        "x_label": "seconds", "y_label": "MiB",
                        "series": [{"name": "RSS", "points": [[round(t, 2), round(b / 2**20, 2)] for t, b in samples]}],
                        "limits": []})
    measured = {"first_third_mib": round(first / 2**20, 2), "last_third_mib": round(last / 2**20, 2),
                "growth": round(growth, 4), "samples": len(samples),
                "error_rate": run["summary"]["error_rate"]}
    if growth > limit:
        return item("fail", f"resident memory grew {growth:.1%} (> {limit:.0%}) over {seconds:g} s", evidence,
                    measured)
    return item("pass", f"resident memory {growth:+.1%} over {seconds:g} s at {rate:g} req/s (limit {limit:.0%})",
                evidence, measured)


def health(ctx: Context) -> ItemResult:
    """Liveness and readiness answer, and the version's readiness turns false when it is unloaded."""
    staging = ctx.staging()
    model, version = ctx.target.model, ctx.target.version
    steps: list[dict[str, Any]] = []
    with staging.client() as client:
        def step(name: str, method: str, path: str, want: int) -> bool:
            answer = client.request(method, path)
            steps.append({"step": name, "status": answer.status_code, "want": want})
            return answer.status_code == want

        ok = step("live", "GET", "/v2/health/live", 200)
        ok &= step("ready", "GET", "/v2/health/ready", 200)
        ok &= step("version ready", "GET", f"/v2/models/{model}/versions/{version}/ready", 200)
        view = client.get(f"/admin/models/{model}").json()
        held = sorted(k for k, v in (view.get("aliases") or {}).items() if v == version)
        if held:  # unloading a version an alias points at is refused, rightly: that is not the check here
            steps.append({"step": "unload", "note": f"not unloaded: the policy routes to it ({', '.join(held)})"})
        else:
            ok &= step("unload", "POST", f"/v2/repository/models/{model}/unload?version={version}", 200)
            ok &= step("version not ready after unload", "GET", f"/v2/models/{model}/versions/{version}/ready", 503)
            ok &= step("reload", "POST", f"/v2/repository/models/{model}/load?version={version}", 200)
            ok &= step("version ready again", "GET", f"/v2/models/{model}/versions/{version}/ready", 200)
    evidence = {"steps": steps}
    if not ok:
        wrong = [s for s in steps if "want" in s and s["status"] != s["want"]]
        return item("fail", "; ".join(f"{s['step']}: {s['status']} (want {s['want']})" for s in wrong), evidence)
    return item("pass", "live and ready answer; the version's readiness follows unload and reload", evidence)


# --- phase 5: rollback ----------------------------------------------------------------------------


def rehearsal(ctx: Context) -> ItemResult:
    """Under load: switch to the candidate, then roll back; zero failed requests, both timed."""
    stable = ctx.stable_version
    if stable is None:
        return item("not_applicable", "no other stable version to switch from and back to")
    seconds = max(3.0, 6.0 * min(1.0, ctx.target.scale * 2))
    rate = ctx.policy.slo.peak_rps
    model = ctx.target.model
    # forced: the gate would refuse a version whose report is still being written (an audited force)
    actions: list[tuple[float, str, str, dict[str, Any]]] = [
        (seconds / 3, "POST", f"/admin/models/{model}/switch", {"version": ctx.target.version, "force": True}),
        (2 * seconds / 3, "POST", f"/admin/models/{model}/rollback", {"reason": "readiness rehearsal"})]
    staging = ctx.staging()
    aliases = staging.admin("GET", f"/admin/models/{model}").json().get("aliases") or {}
    if aliases.get("stable") != stable:  # production's stable is not the policy's: start where production is
        moved = staging.admin("POST", f"/admin/models/{model}/switch", json={"version": stable, "force": True})
        if moved.status_code != 200:
            return item("fail", f"cannot set up the rehearsal (switch the staging gateway to v{stable}): "
                                f"{moved.status_code} {moved.text[:200]}")
    run = _load(ctx, rate, seconds, ctx.infer_path(pinned=False), actions=actions)
    summary = run["summary"]
    done = run["actions"]
    failed = summary["non_2xx"] + sum(summary["transport_errors"].values())
    versions = summary["versions"]
    evidence = {"rate_rps": rate, "seconds": seconds, "from": stable, "to": ctx.target.version,
                "actions": [{"action": a["action"], "status": a["status"]} for a in done]}
    measured = {"actions": done, "versions_answering": versions, "requests": summary["requests"],
                "failed": failed, "fallback_answers": summary["fallback_reasons"]}
    problems = [f"{a['action']} answered {a['status']}: {a['error']}" for a in done if a["status"] != 200]
    if failed:
        problems.append(f"{failed} requests failed during the rehearsal")
    if not problems and ctx.target.version not in versions:
        problems.append("no request was answered by the candidate between switch and rollback")
    if problems:
        return item("fail", "; ".join(problems), evidence, measured)
    took = ", ".join(f"{a['action']} {a['server_ms']} ms" for a in done)
    return item("pass", f"switch and rollback under {rate:g} req/s with zero failed requests ({took})", evidence,
                measured)


def fallback_reasons(ctx: Context) -> ItemResult:
    """With faults injected on a second staging gateway, the fallback answers for every failure reason."""
    if ctx.policy.fallback is None:
        return item("fail", "the policy has no fallback: a failing model means 503/504 for clients")
    stable = ctx.stable_version
    version = ctx.target.version
    timeout_ms = ctx.policy.guard.timeout_ms
    faults = [{"version": version, "error_percent": 100.0}]
    if stable is not None:
        faults.append({"version": stable, "delay_ms": timeout_ms * 4 + 50, "delay_percent": 100.0})
    workdir = Path(tempfile.mkdtemp(prefix="gateway-readiness-faults-"))
    try:
        policies = workdir / "policies"
        shutil.copytree(ctx.target.policies_dir, policies)
        path = Path(ctx.loaded.source)
        document = yaml.safe_load(path.read_text())
        document["faults"] = faults
        document["readiness"] = {**(document.get("readiness") or {}), "gate": "off"}
        document["batching"] = None
        (policies / path.name).write_text(yaml.safe_dump(document, sort_keys=False))
        gateway = StagingGateway(ctx.target.models_dir, policies, {"GATEWAY_ALLOW_FAULT_INJECTION": "true",
                                                                  "GATEWAY_MAX_QUEUED_INFERENCES": "1",
                                                                  "GATEWAY_INFERENCE_THREADS": "1"})
        ctx.say("starting a second staging gateway with faults injected")
        try:
            gateway.start()
        except StagingError as exc:
            return item("fail", f"the fault-injection gateway did not start: {exc}")
        try:
            seen = _provoke(ctx, gateway, stable)
        finally:
            gateway.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wanted = ["runtime_error", "circuit_open", "unavailable"] + (["timeout", "overloaded"] if stable else [])
    missing = [r for r in wanted if not seen.get(r, {}).get("answered")]
    evidence = {"answered": sorted(r for r in wanted if r not in missing), "faults": faults,
                "not_provoked": [] if stable else ["timeout", "overloaded (need a second version to slow down)"]}
    measured = {"answers_by_reason": {r: v["count"] for r, v in seen.items()}}
    if missing:
        return item("fail", f"no valid fallback answer for: {', '.join(missing)}", evidence, measured)
    untested = "" if stable else " (timeout and overloaded need a second version to slow down: not provoked)"
    return item("pass", f"the fallback answered for {', '.join(wanted)}{untested}", evidence, measured)


def _provoke(ctx: Context, gateway: StagingGateway, stable: str | None) -> dict[str, dict[str, Any]]:
    """Send requests that fail in each way; record per reason whether a valid fallback answer came."""
    model, version = ctx.target.model, ctx.target.version
    body = ctx.v2_body(ctx.table_rows(ctx.heldout, 0, 1))
    seen: dict[str, dict[str, Any]] = {}
    outputs = {t.name for t in ctx.require_card().signature.outputs}

    def note(answer: httpx.Response) -> None:
        reason = answer.headers.get("x-fallback")
        if answer.status_code != 200 or not reason:
            return
        got = outputs_of(answer.json())
        valid = set(got) == outputs and all(v.dtype == object or np.all(np.isfinite(v.astype(np.float64)))
                                            for v in got.values())
        entry = seen.setdefault(reason, {"answered": False, "count": 0})
        entry["count"] += 1
        entry["answered"] = entry["answered"] or valid

    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for _ in range(ctx.policy.guard.breaker.fail_max + 2):
            note(client.post(ctx.infer_path(), json=body))
        if stable is not None:
            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as pool:
                    path = f"/v2/models/{model}/versions/{stable}/infer"
                    return list(await asyncio.gather(*(pool.post(path, json=body) for _ in range(6))))
            for answer in asyncio.run(burst()):
                note(answer)
        admin = {"Authorization": f"Bearer {gateway.token}"}
        client.post(f"/v2/repository/models/{model}/unload?version={version}", headers=admin)
        note(client.post(ctx.infer_path(), json=body))
    return {k: seen[k] for k in sorted(seen)}


def audit_verifies(ctx: Context) -> ItemResult:
    """The staging gateway's audit log holds the rehearsal's decisions and its hash chain verifies."""
    staging = ctx.staging()
    deadline = time.monotonic() + 10
    actions: list[str] = []
    while time.monotonic() < deadline:  # the writer fsyncs in batches: wait for the rehearsal's records
        actions = [r.get("action", "") for r in records(staging.audit_dir) if r.get("kind") == "control"]
        if ctx.stable_version is None or ("switch" in actions and "rollback" in actions):
            break
        time.sleep(0.25)
    verdict = verify(staging.audit_dir)
    evidence = {"control_actions": sorted(set(actions)), "findings": [str(f) for f in verdict.findings[:5]]}
    if not verdict.ok:
        return item("fail", f"the audit chain does not verify: {verdict.findings[0]}", evidence)
    if ctx.stable_version is not None and not {"switch", "rollback"} <= set(actions):
        return item("fail", "the rehearsal's switch and rollback are not in the audit log", evidence)
    return item("pass", f"{verdict.records} records in {verdict.files} files verify, including the rehearsal",
                evidence, {"records": verdict.records, "files": verdict.files})


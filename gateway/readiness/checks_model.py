"""Phase 1, model validation: is the candidate good enough, honestly measured, and fair?

Metrics are computed here, on the held-out (time-split) table, by the candidate's own session
behind the server's validator; the card's claims are reported next to them, never trusted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np

from gateway.readiness import metrics
from gateway.readiness.context import Context, item, outputs_of, rounded
from gateway.readiness.data import DataError, labels
from gateway.readiness.evaluate import decisions_of, score_of
from gateway.readiness.report import ItemResult
from gateway.validation import Column, RequestValidator

#: the largest over-the-limit batch the edge probes build
MAX_PROBE_ROWS = 10_000


def loads(ctx: Context) -> ItemResult:
    """The file matches its card's sha256 and signature, loads, and reproduces the card's goldens."""
    candidate = ctx.candidate
    evidence = {"sha256": ctx.model_sha256, "golden_checked_at_load": candidate.golden_checked}
    if not candidate.ready:
        return item("fail", f"the repository refused the version: {candidate.reason}", evidence)
    return item("pass", f"verified against its card, loaded, {candidate.golden_checked} golden examples of the "
                        f"card reproduced at load", evidence, {"load_ms": round(candidate.load_ms, 1)})


def heldout_metric(ctx: Context) -> ItemResult:
    """The policy's metric on the held-out rows meets the threshold (the card's claim is only shown)."""
    spec = ctx.readiness
    truth = labels(ctx.heldout, ctx.label_column)
    scored = ctx.candidate_heldout
    value = metrics.metric(spec.metric, truth, scored.scores, scored.decisions)
    card = ctx.require_card()
    claimed = (card.metrics.get("heldout") or {}).get(spec.metric)
    evidence: dict[str, Any] = {
        "metric": spec.metric, "value": rounded(value), "threshold": spec.threshold,
        "rows": ctx.heldout.rows, "positives": int(truth.sum()), "file": ctx.readiness.data.heldout,
        "card_claims": claimed}
    reference = card.reference_profile.prediction if card.reference_profile else None
    if reference is not None:
        shift = metrics.score_shift(reference.frequencies, scored.scores, reference.bin_edges)
        ctx.figures.append({
            "id": "score-distribution", "kind": "histogram",
            "title": "Score distribution: card reference (training rows) vs candidate (held-out rows)",
            "x_label": "score", "y_label": "share of rows", "edges": [None, *reference.bin_edges, None],
            "series": [{"name": "reference (card)", "values": list(reference.frequencies)},
                       {"name": f"v{ctx.target.version} on held-out", "values": shift["shares"]}]})
        evidence["score_psi_vs_reference"] = rounded(shift["psi"])
    if isinstance(claimed, (int, float)) and abs(claimed - value) > 0.005:
        evidence["note"] = f"the card claims {claimed}, measured {value:.4f}"
    met = metrics.meets(spec.metric, value, spec.threshold)
    verdict = "meets" if met else "misses"
    return item("pass" if met else "fail",
                f"held-out {spec.metric} {value:.4f} {verdict} the threshold {spec.threshold} "
                f"({ctx.heldout.rows} rows, time split)", evidence)


def leakage(ctx: Context) -> ItemResult:
    """A random split scoring much better than the time split signals leakage or a drifting outcome."""
    spec = ctx.readiness
    every = ctx.all_rows
    if every is None:
        return item("not_applicable", "the policy names no file of every row (readiness.data.rows)")
    size = min(ctx.heldout.rows, every.rows)
    sample = every.take(metrics.random_split(every.rows, size, spec.data.random_seed))
    model = ctx.require_model().model
    assert model is not None
    scored = ctx.evaluator.run(model, sample)
    random_value = metrics.metric(spec.metric, labels(sample, ctx.label_column), scored.scores, scored.decisions)
    time_scored = ctx.candidate_heldout
    time_value = metrics.metric(spec.metric, labels(ctx.heldout, ctx.label_column), time_scored.scores,
                                time_scored.decisions)
    gap = metrics.improvement(spec.metric, random_value, time_value)
    evidence = {"metric": spec.metric, "time_split": rounded(time_value), "random_split": rounded(random_value),
                "gap": rounded(gap), "max_gap": spec.max_leakage_gap, "random_rows": size,
                "seed": spec.data.random_seed, "file": spec.data.rows}
    if spec.data.time_column and spec.data.time_column in ctx.heldout.columns:
        times = ctx.heldout.column(spec.data.time_column)
        evidence["time_split_range"] = f"{min(times)} .. {max(times)}"
    ok = gap <= spec.max_leakage_gap + 1e-12
    return item("pass" if ok else "fail",
                f"random split {random_value:.4f} vs time split {time_value:.4f}: gap {gap:+.4f} "
                f"{'within' if ok else 'beyond'} {spec.max_leakage_gap}", evidence)


def _golden_inputs(ctx: Context, examples: list[dict[str, Any]]) -> dict[str, Column]:
    names = list(ctx.policy.input_schema.features) or list(examples[0])
    return {name: Column(name, [e.get(name) for e in examples]) for name in names if any(name in e for e in examples)}


def golden(ctx: Context) -> ItemResult:
    """The candidate reproduces its golden examples, and gets no example wrong that stable gets right."""
    spec = ctx.readiness
    card = ctx.require_card()
    model = ctx.require_model().model
    assert model is not None
    own = {g.example.id: g.example for g in ctx.golden if g.version == ctx.target.version}
    for example in card.golden:
        own.setdefault(example.id, example)
    if not own:
        return item("fail", "no golden examples for this version (in the card or golden.jsonl): nothing pins "
                            "its behaviour")
    examples = list(own.values())
    feeds = ctx.evaluator.validator.validate(_golden_inputs(ctx, [e.inputs for e in examples])).feeds
    outputs = model.run(feeds)
    mismatches = []
    for i, example in enumerate(examples):
        for name, expected in example.outputs.items():
            got = outputs[name][i] if name in outputs else None
            if got is None or not same_output(got, expected, spec.golden_tolerance):
                mismatches.append({"id": example.id, "output": name, "expected": expected,
                                   "got": None if got is None else np.asarray(got).tolist()})
    evidence: dict[str, Any] = {"examples": len(examples), "tolerance": spec.golden_tolerance,
                                "mismatches": mismatches[:20], "mismatch_count": len(mismatches)}
    regressions = _regressions(ctx, evidence)
    problems = []
    if mismatches:
        problems.append(f"{len(mismatches)} golden outputs not reproduced within {spec.golden_tolerance}")
    if regressions is not None and regressions > spec.max_golden_regressions:
        problems.append(f"{regressions} golden examples regressed against stable v{ctx.stable_version} "
                        f"(at most {spec.max_golden_regressions})")
    if problems:
        return item("fail", "; ".join(problems), evidence)
    against = ""
    if regressions is not None:
        allowed = f" (allowed: {spec.max_golden_regressions})" if regressions else ""
        against = (f"; {regressions or 'no'} regression{'s' if regressions != 1 else ''} against stable "
                   f"v{ctx.stable_version} on {evidence['judged']} labelled examples{allowed}")
    return item("pass", f"{len(examples)} golden examples reproduced within {spec.golden_tolerance}{against}",
                evidence)


def same_output(got: Any, expected: Any, tolerance: float) -> bool:
    """A served or computed output equals a recorded one: numbers within `tolerance`, text exactly."""
    got_array, expected_array = np.asarray(got), np.asarray(expected)
    if got_array.shape != expected_array.shape and got_array.size != expected_array.size:
        return False
    if got_array.dtype.kind in "iufb" and expected_array.dtype.kind in "iufb":
        return bool(np.allclose(got_array.astype(np.float64).ravel(), expected_array.astype(np.float64).ravel(),
                                atol=tolerance, rtol=0))
    decoded = [v.decode() if isinstance(v, bytes) else str(v) for v in got_array.ravel().tolist()]
    return decoded == [str(v) for v in expected_array.ravel().tolist()]


def _regressions(ctx: Context, evidence: dict[str, Any]) -> int | None:
    """Labelled golden examples (of any version) stable decides right and the candidate wrong."""
    stable = ctx.stable()
    if ctx.stable_version is None:
        evidence["regressions"] = "not judged: no other stable version"
        return None
    if stable is None or stable.model is None or stable.card is None or stable.card.score is None:
        raise DataError(f"stable v{ctx.stable_version} cannot be judged against: "
                        f"{'it did not load' if stable is None else 'its card declares no score'}")
    labelled = {g.example.id: g.example for g in ctx.golden if g.example.expected and "label" in g.example.expected}
    if not labelled:
        evidence["regressions"] = "not judged: no golden example records its true label (`expected`)"
        return None
    examples = list(labelled.values())
    score = ctx.require_card().score
    positive = score.positive_label if score is not None else None
    truth = np.array([_truth(e.expected["label"], positive) for e in examples if e.expected])
    threshold = ctx.readiness.fairness.decision_threshold
    decided = {}
    for name, version in (("candidate", ctx.candidate), ("stable", stable)):
        assert version.model is not None and version.card is not None and version.card.score is not None
        validator = RequestValidator(version.card.signature, ctx.policy.input_schema)  # each its own inputs
        feeds = validator.validate(_golden_inputs(ctx, [e.inputs for e in examples])).feeds
        outputs = version.model.run(feeds)
        scores = score_of(outputs, version.card.score)
        decided[name] = decisions_of(outputs, scores, version.card.score, threshold)
    regressed = [examples[i].id for i in np.flatnonzero((decided["stable"] == truth) & (decided["candidate"] != truth))]
    improved = [examples[i].id for i in np.flatnonzero((decided["stable"] != truth) & (decided["candidate"] == truth))]
    evidence.update({"judged": len(examples), "regressed": regressed, "improved": improved,
                     "stable_version": ctx.stable_version})
    return len(regressed)


def _truth(label: Any, positive: Any) -> int:
    """A recorded true label as 0/1: equal to the card's positive label (compared as text too), else
    the number itself."""
    if positive is not None and (label == positive or str(label) == str(positive)):
        return 1
    if positive is not None and isinstance(label, str):
        return 0
    return int(label)


def _edge_probes(ctx: Context, base: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, request body) pairs: boundaries, extremes, missing values, unseen categories, empty."""
    probes: list[tuple[str, Any]] = []
    for name, spec in ctx.policy.input_schema.features.items():
        if spec.type in ("float", "int"):
            lowest = spec.min if spec.min is not None else -1e6
            highest = spec.max if spec.max is not None else 1e6
            cast = int if spec.type == "int" else float
            for label, value in (("min", lowest), ("max", highest), ("below_min", lowest - 1),
                                 ("far_above_max", highest * 10 + 1), ("huge", 1e308), ("tiny", -1e308)):
                sent: Any = cast(value)
                if spec.type == "int" and abs(value) > 2**62:
                    sent = 2**63 if value > 0 else -(2**63) - 1  # past int64: must be refused, not wrap
                probes.append((f"{name}={label}", {**base, name: sent}))
        elif spec.type in ("category", "string"):
            probes.append((f"{name}=unseen", {**base, name: "zz-never-seen-category"}))
            probes.append((f"{name}=empty", {**base, name: ""}))
            probes.append((f"{name}=long", {**base, name: "x" * 10_000}))
        probes.append((f"{name}=null", {**base, name: None}))
        probes.append((f"{name}=wrong_type", {**base, name: [1, 2] if spec.type != "bool" else "yes"}))
    bodies: list[tuple[str, Any]] = [(label, ctx.v2_body([row])) for label, row in probes]
    bodies.append(("empty_batch", {"inputs": [{"name": n, "shape": [0, 1], "datatype": "FP64", "data": []}
                                              for n in base]}))
    bodies.append(("no_inputs", {"inputs": []}))
    numeric = [n for n, f in ctx.policy.input_schema.features.items() if f.type == "float"]
    if numeric:  # JSON has no NaN; Python's encoder writes the literal anyway, as some clients do
        bodies.append(("nan_literal", json.dumps(ctx.v2_body([{**base, numeric[0]: math.nan}])).encode()))
    too_many = ctx.policy.input_schema.max_batch_size + 1
    if too_many <= MAX_PROBE_ROWS:  # bigger batches test the body-size limit, not the batch limit
        bodies.append((f"batch_of_{too_many}", ctx.v2_body([base] * too_many)))
    return bodies


def edge_inputs(ctx: Context) -> ItemResult:
    """Hostile and boundary inputs get finite answers from the model or a 4xx, never a crash."""
    ctx.require_model()  # a refused version is not served: nothing to probe
    base = ctx.table_rows(ctx.heldout, 0, 1)[0]
    staging = ctx.staging()
    outcomes: dict[str, int] = {"answered": 0, "rejected": 0}
    failures: list[dict[str, Any]] = []
    probes = _edge_probes(ctx, base)
    with httpx.Client(base_url=staging.url, timeout=30) as client:
        for label, body in probes:
            if isinstance(body, bytes):
                answer = client.post(ctx.infer_path(), content=body, headers={"Content-Type": "application/json"})
            else:
                answer = client.post(ctx.infer_path(), json=body)
            verdict = _judge_edge(answer)
            if verdict is None:
                outcomes["answered" if answer.status_code == 200 else "rejected"] += 1
            else:
                failures.append({"probe": label, "status": answer.status_code, "problem": verdict})
    evidence = {"probes": len(probes), **outcomes, "failures": failures}
    if failures:
        return item("fail", f"{len(failures)} of {len(probes)} edge inputs crashed or gave non-finite answers "
                            f"(first: {failures[0]['probe']}: {failures[0]['problem']})", evidence)
    return item("pass", f"{len(probes)} edge inputs: {outcomes['answered']} answered with finite outputs, "
                        f"{outcomes['rejected']} rejected with a 4xx", evidence)


def _judge_edge(answer: httpx.Response) -> str | None:
    """None when the answer is acceptable, else what is wrong with it."""
    if answer.status_code >= 500:
        return f"server error {answer.status_code}: {answer.text[:200]}"
    try:
        body = answer.json()
    except ValueError:
        return "the answer is not JSON"
    if 400 <= answer.status_code < 500:
        return None if isinstance(body, dict) and body.get("error") else "a 4xx without an error message"
    if answer.status_code != 200:
        return f"unexpected status {answer.status_code}"
    fallback = answer.headers.get("x-fallback")
    if fallback and fallback != "low_confidence":
        return f"the model failed and the fallback answered ({fallback})"
    for name, values in outputs_of(body).items():
        if values.dtype != object and values.size and not np.all(np.isfinite(values.astype(np.float64))):
            return f"output {name} is not finite"
    return None


def fairness(ctx: Context) -> ItemResult:
    """Favourable-decision rates alike across the policy's protected groups, and equal opportunity."""
    spec = ctx.readiness.fairness
    if not spec.groups:
        return item("not_applicable", "the policy names no protected groups (readiness.fairness.groups)")
    truth = labels(ctx.heldout, ctx.label_column)
    decisions = ctx.candidate_heldout.decisions
    favourable = decisions if spec.favourable == "positive" else 1 - decisions
    evidence: dict[str, Any] = {"decision": (f"score >= {spec.decision_threshold}" if spec.decision_threshold
                                             is not None else "the label output"),
                                "favourable": spec.favourable, "groups": {}}
    problems: list[str] = []
    categories: list[str] = []
    rates: list[float | None] = []
    tprs: list[float | None] = []
    for group in spec.groups:
        raw = ctx.heldout.column(group.column)
        if group.bins is not None:
            values = np.array([_number_or_nan(v) for v in raw])
            names = metrics.bands(values, group.bins)
        else:
            names = np.array([v if v != "" else metrics.MISSING for v in raw])
        per_group = metrics.group_rates(names, truth, decisions, group.min_rows)
        favoured = {r["group"]: r["positive_rate"] for r in metrics.group_rates(names, truth, favourable,
                                                                                group.min_rows)}
        for rate in per_group:
            rate["favourable_rate"] = favoured[rate["group"]]
        summary = metrics.fairness([{**r, "positive_rate": r["favourable_rate"]} for r in per_group],
                                   spec.min_positive_rate_ratio, spec.max_tpr_gap)
        evidence["groups"][group.column] = {"rates": _rounded_rates(per_group), **_rounded_summary(summary)}
        for rate in per_group:
            categories.append(f"{group.column}={rate['group']}")
            rates.append(rounded(rate["favourable_rate"]))
            tprs.append(rounded(rate["tpr"]))
        if not summary["ratio_ok"]:
            problems.append(f"{group.column}: favourable-rate ratio {summary['positive_rate_ratio']:.3f} < "
                            f"{spec.min_positive_rate_ratio} ({summary['lowest_group']} vs {summary['highest_group']})")
        if not summary["tpr_ok"]:
            problems.append(f"{group.column}: true-positive-rate gap {summary['tpr_gap']:.3f} > {spec.max_tpr_gap}")
    ctx.figures.append({"id": "group-rates", "kind": "bars", "title": "Per-group rates on the held-out rows",
                        "y_label": "rate", "categories": categories,
                        "series": [{"name": f"favourable decision ({spec.favourable})", "values": rates},
                                   {"name": "true-positive rate", "values": tprs}],
                        "limits": []})
    if problems:
        return item("fail", "; ".join(problems), evidence)
    shown = ", ".join(f"{c}: ratio {v['positive_rate_ratio']}, TPR gap {v['tpr_gap']}"
                      for c, v in evidence["groups"].items())
    return item("pass", f"within bounds ({shown})", evidence)


def _number_or_nan(text: str) -> float:
    """A CSV cell as a number; anything that is not one (empty, NA, n/a) counts as missing."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _rounded_rates(rates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: rounded(v) if isinstance(v, float) else v for k, v in r.items()} for r in rates]


def _rounded_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: rounded(v) if isinstance(v, float) else v for k, v in summary.items()}


def beats_baselines(ctx: Context) -> ItemResult:
    """Better than the fallback rules and the current stable by the policy's margins."""
    spec = ctx.readiness
    truth = labels(ctx.heldout, ctx.label_column)
    scored = ctx.candidate_heldout
    mine = metrics.metric(spec.metric, truth, scored.scores, scored.decisions)
    evidence: dict[str, Any] = {"metric": spec.metric, "candidate": rounded(mine)}
    problems: list[str] = []
    passed: list[str] = []
    baselines: list[tuple[str, float, Any]] = []
    if ctx.policy.fallback is not None:
        fallback = ctx.evaluator.run_fallback(ctx.heldout)
        baselines.append(("fallback", spec.margin_over_fallback,
                          metrics.metric(spec.metric, truth, fallback.scores, fallback.decisions)))
    stable = ctx.stable()
    if ctx.stable_version is not None:
        if stable is None or stable.model is None or stable.card is None:
            problems.append(f"stable v{ctx.stable_version} could not be compared: it did not load")
        else:
            try:
                from gateway.readiness.evaluate import Evaluator

                judge = Evaluator.for_card(ctx.policy, stable.card, spec.fairness.decision_threshold)
                other = judge.run(stable.model, ctx.heldout)
                baselines.append((f"stable v{ctx.stable_version}", spec.margin_over_stable,
                                  metrics.metric(spec.metric, truth, other.scores, other.decisions)))
            except DataError as exc:
                problems.append(f"stable v{ctx.stable_version} could not be compared: {exc}")
    if not baselines and not problems:
        return item("not_applicable", "no fallback rules and no other stable version to compare with", evidence)
    for name, margin, value in baselines:
        gain = metrics.improvement(spec.metric, mine, value)
        evidence[name] = {"value": rounded(value), "improvement": rounded(gain), "margin": margin}
        text = f"{name} {value:.4f} ({gain:+.4f}, margin {margin:+})"
        (passed if gain >= margin - 1e-12 else problems).append(text)
    if problems:
        return item("fail", f"{spec.metric} {mine:.4f} does not beat " + "; ".join(problems), evidence)
    return item("pass", f"{spec.metric} {mine:.4f} beats " + "; ".join(passed), evidence)

"""Drift, outcome and volume monitoring end to end: real `gateway serve` processes, real traffic.

Traffic is drawn from models/credit-risk/data/heldout.csv (nearly the reference distribution) and
sent through the v1 API; reports are read with GET /v2/models/credit-risk/drift?fresh=1, which
waits for queued batches and recomputes. Each test runs its own server over a repository copy
whose policy has a small, fast drift section (edited with PyYAML).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score

from gateway.monitoring import Monitoring
from gateway.telemetry import Metrics
from tests.conftest import MODEL, MODELS, RunningServer, good_row, make_client

pytestmark = pytest.mark.e2e

PREDICT = f"/v1/models/{MODEL}:predict"
DRIFT = f"/v2/models/{MODEL}/drift?fresh=1"
FEEDBACK = f"/v2/models/{MODEL}/feedback"
WINDOW = 2000
BATCH = 50
FAST_DRIFT: dict[str, Any] = {"window": WINDOW, "sub_windows": 10, "min_rows": 300, "score_every_s": 0.2}
INTEGERS = ("age", "loan_term_months", "num_open_accounts", "delinquencies_2y")
FLOATS = ("income", "loan_amount", "credit_history_years", "debt_to_income")
CATEGORIES = ("employment", "home_ownership", "purpose")
FEATURES = (*INTEGERS, *FLOATS, "has_cosigner", *CATEGORIES)
STATE_CODES = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}


@cache
def heldout() -> pd.DataFrame:
    return pd.read_csv(MODELS / MODEL / "data" / "heldout.csv")


@cache
def heldout_rows() -> tuple[dict[str, Any], ...]:
    """Held-out applications as v1 instances (ints as ints, missing history as null, cosigner as bool)."""
    rows = []
    for record in heldout().to_dict("records"):
        row: dict[str, Any] = {name: int(record[name]) for name in INTEGERS}
        row |= {name: None if pd.isna(record[name]) else float(record[name]) for name in FLOATS}
        row["has_cosigner"] = bool(record["has_cosigner"])
        row |= {name: str(record[name]) for name in CATEGORIES}
        rows.append(row)
    return tuple(rows)


def sample(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """n held-out rows drawn with replacement (fresh dicts: safe to change)."""
    rows = heldout_rows()
    return [dict(rows[i]) for i in rng.integers(0, len(rows), n)]


def write_policy(policies: Path, drift: dict[str, Any] | None = None, feedback: dict[str, Any] | None = None,
                 features: dict[str, Any] | None = None) -> None:
    """Give the copied credit-risk policy a fast drift section (and optional feedback / feature changes)."""
    path = policies / f"{MODEL}.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["drift"] = {**FAST_DRIFT, **(drift or {})}
    if feedback is not None:
        doc["feedback"] = feedback
    doc["schema"]["features"].update(features or {})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class Api:
    """A keep-alive client of one running gateway."""

    http: httpx.Client

    def predict(self, rows: list[dict[str, Any]]) -> tuple[str, list[float]]:
        """Request id and positive-class scores of one v1 request."""
        answer = self.http.post(PREDICT, json={"instances": rows})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["id"] == answer.headers["x-request-id"]
        return body["id"], [p["probabilities"][1] for p in body["predictions"]]

    def send(self, rows: list[dict[str, Any]]) -> None:
        for start in range(0, len(rows), BATCH):
            self.predict(rows[start:start + BATCH])

    def report(self) -> dict[str, Any]:
        answer = self.http.get(DRIFT)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def version(self, version: str = "1") -> dict[str, Any]:
        """The fresh report of one version: {"version", "drift", "outcome"}."""
        return dict(next(v for v in self.report()["versions"] if v["version"] == version))

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of /metrics as (name, labels, value)."""
        answer = self.http.get("/metrics")
        assert answer.status_code == 200
        return [(s.name, dict(s.labels), float(s.value)) for family in text_string_to_metric_families(answer.text)
                for s in family.samples]


def sample_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (other labels may exist)."""
    found = [value for n, have, value in samples if n == name and labels.items() <= have.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def serve(repo_copy: tuple[Path, Path], start_server: Callable[..., RunningServer]) -> Iterator[Callable[..., Api]]:
    """Start a gateway over the repository copy with a policy edited by `write_policy(**changes)`."""
    clients: list[httpx.Client] = []

    def start(**changes: Any) -> Api:
        models, policies = repo_copy
        write_policy(policies, **changes)
        server = start_server(models, policies)
        client = httpx.Client(base_url=server.url, timeout=30.0)
        clients.append(client)
        return Api(client)

    yield start
    for client in clients:
        client.close()


def states(drift: dict[str, Any]) -> dict[str, str]:
    return {name: entry["state"] for name, entry in drift["features"].items()}


# ---------------------------------------------------------------- drift


def test_reference_traffic_stays_ok_over_many_windows(serve: Callable[..., Api]) -> None:
    api = serve()
    rejected = api.http.post(PREDICT, json={"instances": [dict(heldout_rows()[0], employment="astronaut")]})
    assert rejected.status_code == 422  # a category outside the policy's values never reaches a window
    assert api.version()["drift"]["window"]["rows"] == 0
    rng = np.random.default_rng(20240601)
    api.send(sample(rng, BATCH))  # ?fresh=1 folds what is queued and recomputes, even right after a report
    assert api.version()["drift"]["window"]["rows"] == BATCH
    windows, observations, not_ok, prediction_not_ok = 8, 0, 0, 0
    for w in range(windows):
        api.send(sample(rng, WINDOW - BATCH if w == 0 else WINDOW))  # each window: 2000 rows, all new
        report = api.report()
        assert report["dropped_batches"] == 0 and report["queued_batches"] == 0
        drift = next(v for v in report["versions"] if v["version"] == "1")["drift"]
        assert drift["window"] == {"rows": WINDOW, "capacity": WINDOW, "sub_windows": 10}
        found = states(drift)
        assert set(found) == set(FEATURES) and "insufficient" not in found.values()
        observations += len(found)
        not_ok += sum(state != "ok" for state in found.values())
        prediction_not_ok += drift["prediction"]["state"] != "ok"
    rate = not_ok / observations
    print(f"\nfalse-alarm rate: {rate:.2%} ({not_ok} of {observations} feature-windows not ok over {windows} "
          f"windows of {WINDOW} rows); prediction not ok in {prediction_not_ok} of {windows} windows")
    assert rate <= 0.05
    assert prediction_not_ok <= 1


def test_a_shifted_feature_alerts_within_one_window_and_leads_top_drifting(serve: Callable[..., Api]) -> None:
    api = serve()
    rng = np.random.default_rng(7)
    api.send(sample(rng, WINDOW))
    before = api.version()["drift"]
    assert set(states(before).values()) == {"ok"}
    shifted = sample(rng, WINDOW)
    for row in shifted:
        row["income"] = row["income"] * 1.8
    api.send(shifted)
    drift = api.version()["drift"]
    income = drift["features"]["income"]
    assert income["state"] == "alert", income
    assert income["scores"]["psi"] >= 0.25 and any(r.startswith("psi") for r in income["reasons"])
    assert {n: s for n, s in states(drift).items() if n != "income"} == {n: "ok" for n in FEATURES if n != "income"}
    assert drift["top_drifting"][0]["feature"] == "income"
    assert drift["top_drifting"][0]["state"] == "alert"
    assert drift["state"] == "alert"
    assert api.version("2")["drift"]["state"] == "insufficient"  # version 2 saw none of it


def test_unseen_categories_and_a_null_flood_alert(serve: Callable[..., Api]) -> None:
    # `employment` as a free string: "astronaut" is accepted, and unseen by the reference profile
    api = serve(features={"employment": {"type": "string", "max_length": 40}})
    rng = np.random.default_rng(11)
    rows = sample(rng, WINDOW)
    for i, row in enumerate(rows):
        if i % 10 == 3:
            row["employment"] = "astronaut"
        if i % 5 < 3:
            row["credit_history_years"] = None
    api.send(rows)
    drift = api.version()["drift"]
    employment, history = drift["features"]["employment"], drift["features"]["credit_history_years"]
    unseen = sum(r["employment"] == "astronaut" for r in rows) / WINDOW
    missing = sum(r["credit_history_years"] is None for r in rows) / WINDOW
    assert employment["unseen_rate"] == pytest.approx(unseen, abs=1e-6) and unseen == pytest.approx(0.1)
    assert employment["state"] == "alert"
    assert f"unseen-category rate {unseen:.3f}" in employment["reasons"]
    assert history["missing_rate"] == pytest.approx(missing, abs=1e-6) and missing >= 0.6
    assert history["state"] == "alert"
    assert any(r.startswith(f"missing rate {missing:.3f}") for r in history["reasons"])
    others = {n: s for n, s in states(drift).items() if n not in ("employment", "credit_history_years")}
    assert set(others.values()) == {"ok"}


def test_prometheus_gauges_reflect_the_json_report(serve: Callable[..., Api]) -> None:
    api = serve()
    rng = np.random.default_rng(5)
    rows = sample(rng, WINDOW)
    for row in rows[: WINDOW // 2]:
        row["loan_amount"] = row["loan_amount"] * 3.0
        row["purpose"] = "business"
    api.send(rows)
    report = api.report()
    samples = api.metrics()
    seen_states = set()
    for version in report["versions"]:
        drift = version["drift"]
        v = version["version"]
        assert sample_value(samples, "gateway_drift_window_rows", model=MODEL, version=v) == drift["window"]["rows"]
        entries = [*drift["features"].items(), ("_score", drift["prediction"])]
        for feature, entry in entries:
            state = sample_value(samples, "gateway_drift_state", model=MODEL, version=v, feature=feature)
            assert state == STATE_CODES[entry["state"]], (v, feature)
            seen_states.add(entry["state"])
            for metric, value in (entry["scores"] or {}).items():
                gauge = sample_value(samples, "gateway_drift_score", model=MODEL, version=v, feature=feature,
                                     metric=metric)
                assert math.isclose(gauge, value, rel_tol=1e-12, abs_tol=1e-300), (v, feature, metric)
    assert {"ok", "alert", "insufficient"} <= seen_states  # the comparison covered distinct states
    drift1 = next(v for v in report["versions"] if v["version"] == "1")["drift"]
    assert drift1["features"]["loan_amount"]["state"] != "ok" and drift1["features"]["purpose"]["state"] == "alert"


# ---------------------------------------------------------------- outcomes


def test_feedback_labels_give_online_metrics_matching_a_direct_computation(serve: Callable[..., Api]) -> None:
    api = serve(feedback={"min_labels": 100, "accuracy_below": 0.99, "auc_below": 0.5})
    data = heldout()
    rows, truth = list(heldout_rows()[:400]), data["default"].to_numpy(dtype=np.int64)[:400]
    items, scores = [], []
    for start in range(0, len(rows), BATCH):
        request_id, batch_scores = api.predict(rows[start:start + BATCH])
        scores += batch_scores
        items.append({"id": request_id, "labels": [int(v) for v in truth[start:start + BATCH]]})
    single_id, single_score = api.predict([rows[0]])
    items.append({"id": single_id, "label": int(truth[0])})
    items += [{"id": "no-such-request", "label": 1}, {"label": 0}, {"id": single_id, "label": 1}]
    answer = api.http.post(FEEDBACK, json={"labels": items})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["accepted"] == 401 and body["by_version"] == {"1": 401}
    assert body["unknown"] == ["no-such-request", single_id]  # the second label for single_id is unknown
    assert [entry["index"] for entry in body["invalid"]] == [len(items) - 2]
    labels = np.append(truth, truth[0])
    probabilities = np.array([*scores, *single_score], dtype=np.float64)
    outcome = api.version()["outcome"]
    assert outcome["labels"] == 401
    assert outcome["accuracy"] == pytest.approx(accuracy_score(labels, probabilities >= 0.5), abs=1e-6)
    assert outcome["auc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-5)
    assert outcome["brier"] == pytest.approx(brier_score_loss(labels, probabilities), abs=1e-5)
    assert outcome["auc"] > 0.5 and outcome["accuracy"] < 0.99
    assert outcome["state"] == "alert" and [r.split()[0] for r in outcome["reasons"]] == ["accuracy"]
    assert api.version("2")["outcome"]["state"] == "insufficient"
    samples = api.metrics()
    for metric in ("accuracy", "auc", "brier"):
        gauge = sample_value(samples, "gateway_outcome_quality", model=MODEL, version="1", metric=metric)
        assert gauge == pytest.approx(outcome[metric])
    assert sample_value(samples, "gateway_outcome_state", model=MODEL, version="1") == 2
    assert sample_value(samples, "gateway_feedback_labels_total", model=MODEL, version="1") == 401
    assert sample_value(samples, "gateway_feedback_unmatched_total", model=MODEL, reason="unknown") == 2
    again = api.http.post(FEEDBACK, json={"labels": items[:1]}).json()
    assert again["accepted"] == 0 and again["unknown"] == [items[0]["id"]]


# ---------------------------------------------------------------- volume


def test_requests_are_counted_per_minute(serve: Callable[..., Api]) -> None:
    api = serve(drift={"volume": {"max_per_minute": 5}})
    minutes: list[tuple[int, int]] = []  # per request: the wall-clock minute before and after it
    for _ in range(8):
        before = int(time.time() // 60)
        api.predict([good_row()])
        minutes.append((before, int(time.time() // 60)))
    before = int(time.time() // 60)
    volume = api.report()["volume"]
    per_minute = sample_value(api.metrics(), "gateway_requests_per_minute", model=MODEL)
    after = int(time.time() // 60)
    assert volume["band"] == [None, 5]
    assert volume["state"] in ("insufficient", "ok", "anomaly")
    if volume["last_minute"] is None:
        assert volume["state"] == "insufficient"
    else:
        assert volume["state"] == ("anomaly" if volume["last_minute"] > 5 else "ok")
    if before == after:  # the report's minute is known: count the requests that surely / maybe fell in it
        assert per_minute == (volume["last_minute"] or 0)
        surely = sum(b == before for b, _ in minutes)
        maybe = sum(a == before for _, a in minutes)
        assert surely <= volume["this_minute"] <= maybe
        if volume["last_minute"] is not None:  # only once the gateway has watched a whole minute
            assert sum(a == before - 1 for _, a in minutes) <= volume["last_minute"]
            assert volume["last_minute"] <= sum(b == before - 1 for b, _ in minutes)


class Clock:
    """A settable clock for Monitoring."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def volume_monitor(repo_copy: tuple[Path, Path]) -> Iterator[Callable[[float], tuple[Monitoring, Clock, Metrics]]]:
    """Monitoring instances over a real snapshot (band 2..5 per minute) with an injected clock."""
    models, policies = repo_copy
    write_policy(policies, drift={"volume": {"min_per_minute": 2, "max_per_minute": 5}})
    with make_client(models, policies) as client:
        gateway = client.app.state.gateway

        def build(start: float, judge_volume: bool = True) -> tuple[Monitoring, Clock, Metrics]:
            clock, metrics = Clock(start), Metrics()
            return (Monitoring(lambda: gateway.snapshot, metrics, clock=clock, judge_volume=judge_volume), clock,
                    metrics)

        yield build


def volume_at(monitor: Monitoring, clock: Clock, t: float, requests: int = 0) -> dict[str, Any]:
    clock.now = t
    for _ in range(requests):
        monitor.count(MODEL)
    return dict(monitor.report(MODEL)["volume"])


def test_volume_state_follows_the_last_full_minute(
        volume_monitor: Callable[[float], tuple[Monitoring, Clock, Metrics]]) -> None:
    monitor, clock, metrics = volume_monitor(-1.0)  # started before minute 0: minute 0 is observed whole

    def gauges() -> tuple[float | None, float | None]:
        return (metrics.registry.get_sample_value("gateway_requests_per_minute", {"model": MODEL}),
                metrics.registry.get_sample_value("gateway_volume_anomaly", {"model": MODEL}))

    first = volume_at(monitor, clock, 10.0, requests=3)
    assert first == {"last_minute": None, "this_minute": 3, "band": [2, 5], "state": "insufficient"}
    assert volume_at(monitor, clock, 59.9)["this_minute"] == 3
    second = volume_at(monitor, clock, 61.0, requests=7)
    assert second == {"last_minute": 3, "this_minute": 7, "band": [2, 5], "state": "ok"}
    assert gauges() == (3.0, 0.0)
    for bound, value in (("min", 2.0), ("max", 5.0)):  # the band, for the alert on the sum over replicas
        assert metrics.registry.get_sample_value("gateway_volume_band", {"model": MODEL, "bound": bound}) == value
    third = volume_at(monitor, clock, 125.0)  # minute 1 had 7 > 5
    assert third == {"last_minute": 7, "this_minute": 0, "band": [2, 5], "state": "anomaly"}
    assert gauges() == (7.0, 1.0)
    fourth = volume_at(monitor, clock, 185.0)  # minute 2 had none < 2
    assert fourth["last_minute"] == 0 and fourth["state"] == "anomaly"
    fifth = volume_at(monitor, clock, 190.0, requests=4)  # a gap of one empty minute before this one
    assert fifth == {"last_minute": 0, "this_minute": 4, "band": [2, 5], "state": "anomaly"}
    sixth = volume_at(monitor, clock, 240.0)
    assert sixth == {"last_minute": 4, "this_minute": 0, "band": [2, 5], "state": "ok"}
    assert gauges() == (4.0, 0.0)
    late = volume_at(monitor, clock, 600.0)
    assert late["last_minute"] == 0 and late["state"] == "anomaly"


def test_a_partly_observed_first_minute_is_not_judged(
        volume_monitor: Callable[[float], tuple[Monitoring, Clock, Metrics]]) -> None:
    """(At b90c275 the minute the monitor started in counted as a full one: a restart mid-minute alarmed.)"""
    monitor, clock, _ = volume_monitor(50.0)  # started 50 s into minute 0
    volume_at(monitor, clock, 55.0, requests=1)  # one request in the 10 s observed (a rate of 6 per minute)
    volume = volume_at(monitor, clock, 65.0)
    assert volume["state"] == "insufficient" and volume["last_minute"] is None
    assert volume_at(monitor, clock, 125.0)["state"] == "anomaly"  # minute 1 was watched whole: 0 < 2


def test_no_traffic_at_all_is_a_volume_anomaly(
        volume_monitor: Callable[[float], tuple[Monitoring, Clock, Metrics]]) -> None:
    """(At b90c275 a model that never got a request stayed `insufficient` forever, despite min_per_minute.)"""
    monitor, clock, _ = volume_monitor(0.0)
    volume = volume_at(monitor, clock, 185.0)  # minutes 0, 1 and 2 observed whole, not one request
    assert volume["last_minute"] == 0
    assert volume["state"] == "anomaly"


def test_a_process_sharing_the_traffic_leaves_the_band_to_the_alert_over_the_fleet(
        volume_monitor: Callable[..., tuple[Monitoring, Clock, Metrics]]) -> None:
    """With replicas or workers, one process's count is a share: judged against the model's band,
    every replica would report an anomaly for good. The alert judges the sum instead."""
    monitor, clock, metrics = volume_monitor(-1.0, judge_volume=False)
    volume_at(monitor, clock, 10.0, requests=1)
    volume = volume_at(monitor, clock, 65.0)  # 1 < 2: an anomaly for a single process
    assert volume == {"last_minute": 1, "this_minute": 0, "band": [2, 5], "state": "fleet"}
    assert metrics.registry.get_sample_value("gateway_volume_anomaly", {"model": MODEL}) is None
    assert metrics.registry.get_sample_value("gateway_requests_per_minute", {"model": MODEL}) == 1.0
    assert metrics.registry.get_sample_value("gateway_volume_band", {"model": MODEL, "bound": "min"}) == 2.0

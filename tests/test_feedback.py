"""Delayed-label feedback: joins by request id, bounded store, online metrics against sklearn."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score

from gateway.feedback import FeedbackStore, auc
from gateway.policy import Feedback
from tests.conftest import MODEL, MODELS, make_client

M = "m"


def labelled_data(n: int = 600, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Real outcomes (held-out `default`) and a score that partly predicts them."""
    heldout = pd.read_csv(MODELS / MODEL / "data" / "heldout.csv")
    labels = heldout["default"].to_numpy(dtype=np.int64)[:n]
    rng = np.random.default_rng(seed)
    dti = heldout["debt_to_income"].to_numpy(dtype=np.float64)[:n]
    scores = 1 / (1 + np.exp(-(4 * dti - 2.5 + 1.2 * labels + rng.normal(0, 0.8, n))))
    return labels, scores


def fill(store: FeedbackStore, policy: Feedback, labels: np.ndarray, scores: np.ndarray, version: str = "1",
         batch: int = 3, prefix: str = "r") -> dict[str, Any]:
    """Remember predictions in batches of `batch` rows, then label all of them; the accept answer."""
    items: list[dict[str, Any]] = []
    for i, start in enumerate(range(0, len(scores), batch)):
        request_id = f"{prefix}{i}"
        store.remember(M, policy, request_id, version, scores[start:start + batch])
        chunk = [int(v) for v in labels[start:start + batch]]
        items.append({"id": request_id, "label": chunk[0]} if len(chunk) == 1 else {"id": request_id, "labels": chunk})
    return store.accept(M, policy, items)


def test_online_metrics_match_sklearn() -> None:
    labels, scores = labelled_data()
    policy = Feedback(window=1000, min_labels=100)
    store = FeedbackStore()
    answer = fill(store, policy, labels, scores, batch=7)
    assert answer["accepted"] == len(labels) and answer["by_version"] == {"1": len(labels)}
    assert answer["unknown"] == answer["expired"] == answer["invalid"] == []
    report = store.report(M, "1", policy)
    assert report["labels"] == len(labels) and report["state"] == "ok" and report["reasons"] == []
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, scores >= 0.5), abs=1e-6)
    assert report["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert report["brier"] == pytest.approx(brier_score_loss(labels, scores), abs=1e-6)
    assert 0.6 < report["auc"] < 1.0  # the data is informative, not degenerate


def test_metrics_are_over_the_last_window_labels_of_each_version() -> None:
    labels, scores = labelled_data(300)
    policy = Feedback(window=100, min_labels=10)
    store = FeedbackStore()
    fill(store, policy, labels[:200], scores[:200], version="1", batch=1, prefix="a")
    fill(store, policy, labels[200:], scores[200:], version="2", batch=5, prefix="b")
    one, two = store.report(M, "1", policy), store.report(M, "2", policy)
    assert one["labels"] == two["labels"] == 100
    assert one["auc"] == pytest.approx(roc_auc_score(labels[100:200], scores[100:200]), abs=1e-6)
    assert two["auc"] == pytest.approx(roc_auc_score(labels[200:], scores[200:]), abs=1e-6)
    assert one["brier"] == pytest.approx(brier_score_loss(labels[100:200], scores[100:200]), abs=1e-6)
    assert store.report(M, "3", policy) == {"labels": 0, "state": "insufficient", "accuracy": None, "auc": None,
                                            "brier": None}
    assert store.report("other", "1", policy)["state"] == "insufficient"


@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_auc_counts_ties_half_like_sklearn(decimals: int) -> None:
    labels, scores = labelled_data(400, seed=11)
    tied = np.round(scores, decimals)
    assert len(np.unique(tied)) < len(tied)  # there are ties
    got = auc(labels.astype(np.float64), tied)
    assert got == pytest.approx(roc_auc_score(labels, tied), abs=1e-12)


def test_auc_edge_cases() -> None:
    y = np.array([0, 0, 1, 1], dtype=np.float64)
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(y, np.full(4, 0.5)) == 0.5
    assert auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(roc_auc_score(y, [0.1, 0.5, 0.5, 0.9]))
    assert auc(np.ones(3), np.array([0.1, 0.2, 0.3])) is None
    assert auc(np.zeros(3), np.array([0.1, 0.2, 0.3])) is None


def test_auc_of_one_class_is_none_in_the_report() -> None:
    policy = Feedback(window=100, min_labels=10)
    store = FeedbackStore()
    fill(store, policy, np.zeros(20, dtype=np.int64), np.linspace(0.1, 0.9, 20), batch=4)
    report = store.report(M, "1", policy)
    assert report["auc"] is None and report["state"] == "ok"
    assert report["accuracy"] == pytest.approx(accuracy_score(np.zeros(20), np.linspace(0.1, 0.9, 20) >= 0.5))


def test_the_store_is_bounded_oldest_first_and_expired_ids_are_told_apart() -> None:
    policy = Feedback(store=3, window=100, min_labels=1)
    store = FeedbackStore()
    for i in range(7):
        store.remember(M, policy, f"id{i}", "1", np.array([0.7]))
    # recent: id4..id6; expired (bounded to `store` as well): id1..id3; id0 is forgotten entirely
    answer = store.accept(M, policy, [{"id": f"id{i}", "label": 1} for i in range(7)] + [{"id": "never", "label": 0}])
    assert answer["accepted"] == 3
    assert answer["expired"] == ["id1", "id2", "id3"]
    assert answer["unknown"] == ["id0", "never"]
    assert answer["invalid"] == []


def test_a_second_label_for_the_same_id_is_unknown() -> None:
    policy = Feedback(window=100, min_labels=1)
    store = FeedbackStore()
    store.remember(M, policy, "x", "1", np.array([0.2]))
    first = store.accept(M, policy, [{"id": "x", "label": 0}, {"id": "x", "label": 1}])
    assert first["accepted"] == 1 and first["unknown"] == ["x"]
    again = store.accept(M, policy, [{"id": "x", "label": 1}])
    assert again["accepted"] == 0 and again["unknown"] == ["x"] and again["expired"] == []
    report = store.report(M, "1", policy)
    assert report["labels"] == 1 and report["accuracy"] == 1.0  # the first label (0) counted, once


def test_predictions_of_another_model_are_unknown() -> None:
    policy = Feedback(window=100, min_labels=1)
    store = FeedbackStore()
    store.remember("a", policy, "x", "1", np.array([0.2]))
    assert store.accept("b", policy, [{"id": "x", "label": 0}])["unknown"] == ["x"]
    assert store.accept("a", policy, [{"id": "x", "label": 0}])["accepted"] == 1


def test_invalid_items_are_reported_with_their_index_and_never_crash() -> None:
    policy = Feedback(window=100, min_labels=1)
    store = FeedbackStore()
    store.remember(M, policy, "one", "1", np.array([0.8]))
    store.remember(M, policy, "two", "1", np.array([0.3, 0.6]))
    store.remember(M, policy, "three", "1", np.array([0.1]))
    items: list[Any] = [
        {"label": 1},  # 0: no id
        "one",  # 1: not an object
        {"id": 7, "label": 1},  # 2: id not a string
        {"id": "one", "label": 2},  # 3: label 2
        {"id": "two", "label": 1},  # 4: one label for two rows
        {"id": "two", "labels": [1, 0, 1]},  # 5: three labels for two rows
        {"id": "one", "label": 1.0},  # 6: a float
        {"id": "one", "label": None},  # 7: null
        {"id": "one", "label": "1"},  # 8: a string
        {"id": "one", "label": [1]},  # 9: a list where a label goes
        {"id": "one"},  # 10: no label at all
        {"id": "two", "labels": "10"},  # 11: labels not a list
        {"id": "two", "labels": [1, {"x": 1}]},  # 12: junk inside the list
        None,  # 13
        {"id": "three", "label": 0},  # 14: valid
    ]
    answer = store.accept(M, policy, items)
    assert [entry["index"] for entry in answer["invalid"]] == list(range(14))
    assert all(isinstance(entry["error"], str) and entry["error"] for entry in answer["invalid"])
    assert {entry.get("id") for entry in answer["invalid"][3:13]} == {"one", "two"}
    assert answer["accepted"] == 1 and answer["unknown"] == [] and answer["expired"] == []
    # invalid feedback does not use up the prediction: a correct label afterwards joins
    later = store.accept(M, policy, [{"id": "one", "label": 1}, {"id": "two", "labels": [0, 1]}])
    assert later["accepted"] == 3 and later["invalid"] == []
    report = store.report(M, "1", policy)
    assert report["labels"] == 4 and report["accuracy"] == 1.0


def test_min_labels_gives_insufficient() -> None:
    labels, scores = labelled_data(60)
    policy = Feedback(window=100, min_labels=50)
    store = FeedbackStore()
    fill(store, policy, labels[:49], scores[:49], batch=7, prefix="a")
    assert store.report(M, "1", policy) == {"labels": 49, "state": "insufficient", "accuracy": None, "auc": None,
                                            "brier": None}
    fill(store, policy, labels[49:50], scores[49:50], prefix="b")
    report = store.report(M, "1", policy)
    assert report["labels"] == 50 and report["state"] == "ok" and report["accuracy"] is not None


@pytest.mark.parametrize(("limits", "expect"), [
    ({}, []),
    ({"accuracy_below": 0.99}, ["accuracy"]),
    ({"auc_below": 0.99}, ["AUC"]),
    ({"brier_above": 0.01}, ["Brier"]),
    ({"accuracy_below": 0.99, "auc_below": 0.99, "brier_above": 0.01}, ["accuracy", "AUC", "Brier"]),
    ({"accuracy_below": 0.01, "auc_below": 0.01, "brier_above": 0.99}, []),
])
def test_thresholds_alert_with_reasons(limits: dict[str, float], expect: list[str]) -> None:
    labels, scores = labelled_data(300)
    policy = Feedback(window=1000, min_labels=100, **limits)
    store = FeedbackStore()
    fill(store, policy, labels, scores)
    report = store.report(M, "1", policy)
    assert report["state"] == ("alert" if expect else "ok")
    assert [reason.split()[0] for reason in report["reasons"]] == expect
    accuracy = accuracy_score(labels, scores >= 0.5)
    if "accuracy" in expect:
        assert report["reasons"][0] == f"accuracy {accuracy:.3f} < 0.99"


def test_feedback_route_rejects_malformed_bodies_and_unknown_models() -> None:
    with make_client() as client:
        url = f"/v2/models/{MODEL}/feedback"
        assert client.post(url, content=b"{not json").status_code == 400
        assert client.post(url, json={"labels": "nope"}).status_code == 400
        assert client.post(url, json=[1, 2]).status_code == 400
        assert client.post("/v2/models/nope/feedback", json={"labels": []}).status_code == 404
        answer = client.post(url, json={"labels": [{"id": "never-seen", "label": 1}, {"label": 1}]})
        assert answer.status_code == 200
        body = answer.json()
        assert body["unknown"] == ["never-seen"] and [i["index"] for i in body["invalid"]] == [1]
        assert body["accepted"] == 0


def test_shared_predictions_drop_the_oldest_when_the_buffer_is_full_and_count_it_under_its_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from gateway import feedback_shared

    dropped: list[tuple[str, int]] = []
    monkeypatch.setattr(feedback_shared, "BUFFER", 2)
    shared = feedback_shared.SharedPredictions("redis://127.0.0.1:1/0", "t",
                                               on_dropped=lambda model, n: dropped.append((model, n)))
    for model, request_id in (("a", "1"), ("b", "2"), ("c", "3")):
        shared.offer(model, 10, request_id, "1", np.array([0.5]))
    assert dropped == [("a", 1)]  # the oldest went, counted for its own model

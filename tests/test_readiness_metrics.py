"""Readiness metrics against independent computations.

Held-out metrics are checked against scikit-learn on random data with many tied scores; fairness on
hand-made groups whose rates are known (a four-fifths violation, a TPR gap, a group too small to
judge) and per group against sklearn's recall; score shares against the online drift windows fed
the same scores over the real card's prediction profile.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from sklearn.metrics import accuracy_score, brier_score_loss, recall_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from gateway.card import PredictionProfile, ReferenceProfile, load_card
from gateway.drift import VersionDrift, psi
from gateway.policy import Drift, ProtectedGroup, Readiness
from gateway.readiness.metrics import (
    HIGHER_IS_BETTER,
    accuracy,
    auc,
    bands,
    brier,
    fairness,
    group_rates,
    histogram_shares,
    improvement,
    log_loss,
    meets,
    metric,
    random_split,
    score_shift,
)
from tests.conftest import MODEL, MODELS

# ---------------------------------------------------------------- data


@cache
def card() -> tuple[ReferenceProfile, PredictionProfile]:
    """credit-risk version 1's reference profile and its prediction profile."""
    profile = load_card(MODELS / MODEL / "1" / "model.yaml").reference_profile
    assert profile is not None and profile.prediction is not None
    return profile, profile.prediction


def both_classes(draw: st.DrawFn, n: int) -> NDArray[np.int64]:
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64)
    labels[0], labels[-1] = 0, 1  # AUC needs both classes
    return labels


@st.composite
def scored(draw: st.DrawFn, grid: bool = True) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Labels with both classes, and scores in [0, 1] (on a coarse grid when `grid`: many ties)."""
    n = draw(st.integers(2, 60))
    labels = both_classes(draw, n)
    if grid:
        scores = [draw(st.integers(0, 4)) / 4 for _ in range(n)]
    else:
        scores = draw(st.lists(st.floats(1e-6, 1 - 1e-6), min_size=n, max_size=n))
    return labels, np.array(scores, dtype=np.float64)


def rng_data(seed: int, n: int = 2000) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(2)  # rounded: plenty of ties
    return labels, scores


# ---------------------------------------------------------------- held-out metrics vs sklearn


@settings(max_examples=200, deadline=None)
@given(scored())
def test_auc_matches_sklearn_with_ties(data: tuple[NDArray[np.int64], NDArray[np.float64]]) -> None:
    labels, scores = data
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_on_random_data(seed: int) -> None:
    labels, scores = rng_data(seed)
    decisions = (scores >= 0.5).astype(int)
    assert len(np.unique(scores)) < len(scores) / 5  # the ties are real
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert accuracy(labels, decisions) == pytest.approx(accuracy_score(labels, decisions), abs=1e-15)
    assert brier(labels, scores) == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    inside = np.clip(scores, 1e-3, 1 - 1e-3)  # away from 0/1, where sklearn clips at its own eps
    assert log_loss(labels, inside) == pytest.approx(sk_log_loss(labels, inside, labels=[0, 1]), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(scored(grid=False))
def test_scalar_metrics_match_sklearn(data: tuple[NDArray[np.int64], NDArray[np.float64]]) -> None:
    labels, scores = data
    decisions = (scores >= 0.5).astype(np.int64)
    assert accuracy(labels, decisions) == pytest.approx(accuracy_score(labels, decisions), abs=1e-15)
    assert brier(labels, scores) == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    assert log_loss(labels, scores) == pytest.approx(sk_log_loss(labels, scores, labels=[0, 1]), rel=1e-9)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_known_values() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5  # all tied: one half
    assert auc(np.array([0, 1, 1]), np.array([0.3, 0.3, 0.7])) == 0.75  # one tie pair out of two
    assert auc(np.array([False, True]), np.array([0.2, 0.4])) == 1.0  # bool labels


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_auc_needs_both_classes(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="only one class"):
        auc(np.array(labels), np.linspace(0, 1, len(labels)))


def test_log_loss_clips_certain_mistakes() -> None:
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.0, 1.0, 1.0, 0.0])
    eps = 1e-15
    expected = -(2 * math.log(eps) + 2 * math.log1p(-eps)) / 4  # two certain mistakes, two certain hits
    assert log_loss(labels, scores) == pytest.approx(expected, rel=1e-3)  # 1 - eps is rounded in floats
    assert math.isfinite(log_loss(labels, scores))
    assert log_loss(labels, scores, eps=1e-3) == pytest.approx(-(math.log(1e-3) + math.log(0.999)) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="eps"):
        log_loss(labels, scores, eps=0)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: auc(np.array([0, 1]), np.array([0.5])), "different lengths"),
    (lambda: accuracy(np.array([0, 1, 1]), np.array([0, 1])), "different lengths"),
    (lambda: brier(np.array([], dtype=int), np.array([])), "empty input"),
    (lambda: log_loss(np.array([], dtype=int), np.array([])), "empty input"),
    (lambda: accuracy(np.array([0, 2]), np.array([0, 1])), "only 0/1"),
    (lambda: auc(np.array([0.0, np.nan]), np.array([0.1, 0.2])), "only 0/1"),
    (lambda: auc(np.array(["no", "yes"]), np.array([0.1, 0.2])), "0/1 values"),
    (lambda: auc(np.array([0, 1]), np.array([0.1, np.nan])), "missing"),
    (lambda: brier(np.array([0, 1]), np.array([0.1, 1.2])), r"\[0, 1\]"),
    (lambda: log_loss(np.array([0, 1]), np.array([-0.1, 0.5])), r"\[0, 1\]"),
    (lambda: auc(np.array([[0, 1]]), np.array([[0.1, 0.2]])), "1-d"),
])
def test_bad_input_is_a_clear_value_error(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_metric_names_are_the_policys() -> None:
    assert set(HIGHER_IS_BETTER) == set(get_args(Readiness.model_fields["metric"].annotation))
    labels, scores = rng_data(11, 300)
    decisions = (scores >= 0.5).astype(int)
    assert metric("auc", labels, scores, decisions) == auc(labels, scores)
    assert metric("accuracy", labels, scores, decisions) == accuracy(labels, decisions)
    assert metric("accuracy", labels, None, decisions) == accuracy(labels, decisions)
    assert metric("brier", labels, scores, None) == brier(labels, scores)
    assert metric("log_loss", labels, scores, decisions) == log_loss(labels, scores)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        metric("f1", labels, scores, decisions)
    with pytest.raises(ValueError, match="needs decisions"):
        metric("accuracy", labels, scores, None)
    with pytest.raises(ValueError, match="needs scores"):
        metric("auc", labels, None, decisions)


def test_meets_and_improvement_follow_the_metrics_direction() -> None:
    assert meets("auc", 0.7, 0.7) and meets("auc", 0.71, 0.7) and not meets("auc", 0.69, 0.7)
    assert meets("accuracy", 0.9, 0.8) and not meets("accuracy", 0.79, 0.8)
    assert meets("brier", 0.2, 0.2) and meets("brier", 0.1, 0.2) and not meets("brier", 0.21, 0.2)
    assert meets("log_loss", 0.4, 0.5) and not meets("log_loss", 0.6, 0.5)
    assert not meets("auc", math.nan, 0.7) and not meets("brier", math.nan, 0.2)
    assert improvement("auc", 0.8, 0.75) == pytest.approx(0.05)
    assert improvement("accuracy", 0.7, 0.75) == pytest.approx(-0.05)
    assert improvement("brier", 0.15, 0.2) == pytest.approx(0.05)  # lower is better: positive
    assert improvement("log_loss", 0.5, 0.4) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="unknown metric"):
        meets("recall", 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown metric"):
        improvement("recall", 0.5, 0.5)


# ---------------------------------------------------------------- bands


def test_bands_put_an_edge_in_the_band_above_it() -> None:
    values = np.array([-math.inf, 0, 24.999, 25, 25.001, 61.999, 62, 62.5, 100, math.inf, math.nan])
    assert bands(values, [25, 62]).tolist() == ["<25", "<25", "<25", "25-62", "25-62", "25-62", ">=62", ">=62",
                                                ">=62", ">=62", "missing"]


def test_bands_follow_the_policy_bins() -> None:
    group = ProtectedGroup(column="age", bins=[25, 62])
    assert group.bins is not None
    assert sorted(set(bands(np.array([18.0, 30, 70]), group.bins).tolist())) == ["25-62", "<25", ">=62"]


def test_bands_labels_and_missing_values() -> None:
    assert bands(np.array([0.2, 0.5, 0.7]), [0.5]).tolist() == ["<0.5", ">=0.5", ">=0.5"]
    assert bands(np.array([1, 2, 2.5, 4]), np.array([1.5, 2.25, 3.0])).tolist() == ["<1.5", "1.5-2.25", "2.25-3",
                                                                                  ">=3"]
    assert bands(np.array([None, 30, None], dtype=object), [25]).tolist() == ["missing", ">=25", "missing"]
    assert bands(np.array([], dtype=float), [25]).tolist() == []
    assert bands(np.array([-3.0, -1.0, 2.0]), [-2, 0]).tolist() == ["<-2", "-2-0", ">=0"]


@pytest.mark.parametrize("edges", [[], [62, 25], [25, 25], [25, math.nan]])
def test_bands_need_strictly_ascending_edges(edges: list[float]) -> None:
    with pytest.raises(ValueError, match="edge"):
        bands(np.array([1.0]), edges)


def test_bands_refuse_text_values() -> None:
    with pytest.raises(ValueError, match="values"):
        bands(np.array(["young", "old"]), [25])


# ---------------------------------------------------------------- group rates and fairness


def make_group(name: str, rows: int, positives: int, true_pos: int, false_pos: int) -> dict[str, NDArray[Any]]:
    """`rows` rows of a group: `positives` true labels 1, of which `true_pos` decided 1, plus `false_pos`
    negatives decided 1."""
    labels = np.r_[np.ones(positives, dtype=int), np.zeros(rows - positives, dtype=int)]
    decisions = np.r_[np.ones(true_pos, dtype=int), np.zeros(positives - true_pos, dtype=int),
                      np.ones(false_pos, dtype=int), np.zeros(rows - positives - false_pos, dtype=int)]
    return {"groups": np.full(rows, name), "labels": labels, "decisions": decisions}


def combine(*parts: dict[str, NDArray[Any]], seed: int = 3) -> dict[str, NDArray[Any]]:
    """The groups' rows concatenated and shuffled (row order must not matter)."""
    order = np.random.default_rng(seed).permutation(sum(len(p["labels"]) for p in parts))
    return {key: np.concatenate([p[key] for p in parts])[order] for key in ("groups", "labels", "decisions")}


def test_four_fifths_violation_and_tpr_gap() -> None:
    data = combine(make_group("b", 40, 20, 12, 0),    # positive rate 12/40 = 0.3, TPR 12/20 = 0.6
                   make_group("a", 50, 20, 18, 7),    # positive rate 25/50 = 0.5, TPR 18/20 = 0.9
                   make_group("c", 5, 2, 0, 0))       # too small to judge; its zero rate must not count
    rates = group_rates(data["groups"], data["labels"], data["decisions"], min_rows=30)
    assert rates == [
        {"group": "a", "rows": 50, "positives": 20, "positive_rate": 0.5, "tpr": 0.9, "judged": True},
        {"group": "b", "rows": 40, "positives": 20, "positive_rate": 0.3, "tpr": 0.6, "judged": True},
        {"group": "c", "rows": 5, "positives": 2, "positive_rate": 0.0, "tpr": 0.0, "judged": False},
    ]
    verdict = fairness(rates, min_ratio=0.8, max_tpr_gap=0.1)
    assert verdict["positive_rate_ratio"] == pytest.approx(0.6)
    assert verdict["tpr_gap"] == pytest.approx(0.3)
    assert (verdict["ratio_ok"], verdict["tpr_ok"], verdict["ok"]) == (False, False, False)
    assert (verdict["lowest_group"], verdict["highest_group"]) == ("b", "a")
    assert any("'c'" in note and "5 rows" in note for note in verdict["notes"])
    # looser bounds pass both
    assert fairness(rates, min_ratio=0.6, max_tpr_gap=0.3)["ok"] is True
    # with a smaller min_rows group c is judged: its zero rate makes the ratio 0
    small = fairness(group_rates(data["groups"], data["labels"], data["decisions"], min_rows=5), 0.8, 0.1)
    assert small["positive_rate_ratio"] == 0.0 and small["lowest_group"] == "c"
    assert small["tpr_gap"] == pytest.approx(0.9)


def test_bounds_exactly_met_pass_despite_rounding() -> None:
    data = combine(make_group("x", 100, 10, 8, 32),   # positive rate 0.4, TPR 0.8
                   make_group("y", 100, 10, 7, 43))   # positive rate 0.5, TPR 0.7
    verdict = fairness(group_rates(data["groups"], data["labels"], data["decisions"], 30), 0.8, 0.1)
    assert verdict["tpr_gap"] > 0.1  # 0.8 - 0.7 in floating point
    assert verdict["positive_rate_ratio"] == pytest.approx(0.8)
    assert verdict["ok"] is True


def test_single_judged_group_is_noted_not_failed() -> None:
    data = combine(make_group("only", 60, 30, 10, 0), make_group("tiny", 3, 1, 1, 2))
    rates = group_rates(data["groups"], data["labels"], data["decisions"], min_rows=30)
    assert [r["judged"] for r in rates] == [True, False]
    verdict = fairness(rates, 0.8, 0.1)
    assert verdict["positive_rate_ratio"] is None and verdict["tpr_gap"] is None
    assert verdict["ratio_ok"] is verdict["tpr_ok"] is verdict["ok"] is True
    assert verdict["lowest_group"] is None and verdict["highest_group"] is None
    assert any("ratio not judged" in n for n in verdict["notes"])
    assert any("TPR gap not judged" in n for n in verdict["notes"])


def test_zero_positive_decisions() -> None:
    data = combine(make_group("a", 40, 10, 0, 0), make_group("b", 40, 20, 0, 0))
    rates = group_rates(data["groups"], data["labels"], data["decisions"], min_rows=30)
    assert [(r["positive_rate"], r["tpr"]) for r in rates] == [(0.0, 0.0), (0.0, 0.0)]
    verdict = fairness(rates, 0.8, 0.1)
    assert verdict["positive_rate_ratio"] == 1.0 and verdict["tpr_gap"] == 0.0 and verdict["ok"] is True
    assert any("no judged group has a positive decision" in n for n in verdict["notes"])


def test_group_without_true_positives_has_no_tpr() -> None:
    data = combine(make_group("a", 40, 0, 0, 10), make_group("b", 40, 10, 5, 5), make_group("c", 40, 10, 10, 0))
    rates = group_rates(data["groups"], data["labels"], data["decisions"], min_rows=30)
    assert [r["tpr"] for r in rates] == [None, 0.5, 1.0]
    verdict = fairness(rates, 0.8, 0.1)
    assert verdict["tpr_gap"] == 0.5  # over b and c only
    assert verdict["positive_rate_ratio"] == pytest.approx(0.25 / 0.25) and verdict["ratio_ok"] is True
    one_tpr = fairness(rates[:2], 0.8, 0.1)  # a (no TPR) and b: one TPR, the gap is not judged
    assert one_tpr["tpr_gap"] is None and one_tpr["tpr_ok"] is True


@pytest.mark.parametrize("seed", range(3))
def test_group_rates_match_sklearn_per_group(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    age = np.where(rng.random(n) < 0.05, np.nan, rng.uniform(18, 80, n))
    groups = bands(age, [25, 62])
    labels = rng.integers(0, 2, n)
    decisions = (rng.random(n) < 0.3 + 0.4 * labels).astype(int)
    rates = group_rates(groups, labels, decisions, min_rows=30)
    assert [r["group"] for r in rates] == sorted(set(groups.tolist()))
    assert sum(r["rows"] for r in rates) == n
    for r in rates:
        mask = groups == r["group"]
        assert r["positives"] == int(labels[mask].sum())
        assert r["positive_rate"] == pytest.approx(decisions[mask].mean())
        assert r["tpr"] == pytest.approx(recall_score(labels[mask], decisions[mask]))
        assert r["judged"] == (mask.sum() >= 30)


def test_group_rates_input_checks() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        group_rates(np.array(["a", "b"]), np.array([0, 1]), np.array([1]), 1)
    with pytest.raises(ValueError, match="empty input"):
        group_rates(np.array([], dtype=str), np.array([], dtype=int), np.array([], dtype=int), 1)
    with pytest.raises(ValueError, match="min_rows"):
        group_rates(np.array(["a"]), np.array([0]), np.array([1]), 0)
    with pytest.raises(ValueError, match="min_ratio"):
        fairness([], 1.5, 0.1)


# ---------------------------------------------------------------- score shares and shift


def test_histogram_shares_bin_like_the_drift_window() -> None:
    profile, prediction = card()
    edges = np.array(prediction.bin_edges)
    rng = np.random.default_rng(5)
    scores = np.r_[rng.beta(1.2, 6, 960), edges, edges, edges, edges, [np.nan] * 4]  # edges exactly, missing
    window = VersionDrift(profile, Drift(window=1000, sub_windows=10, min_rows=10), prediction.index)
    window.add({}, scores)
    assert window.score is not None
    counts = window.score.counts.sum(axis=0)
    shares = histogram_shares(scores, prediction.bin_edges)
    assert len(shares) == len(edges) + 1
    np.testing.assert_allclose(shares, counts / counts.sum(), rtol=0, atol=1e-15)
    shift = score_shift(prediction.frequencies, scores, prediction.bin_edges)
    report = window.report()["prediction"]
    assert report is not None
    assert round(shift["psi"], 6) == report["scores"]["psi"]
    assert shift["shares"] == shares


def test_histogram_shares_edge_goes_to_the_lower_bin() -> None:
    assert histogram_shares(np.array([1.0, 2.0, 2.5, 3.0, 9.0]), [1.0, 3.0]) == [0.2, 0.6, 0.2]
    assert histogram_shares(np.array([np.nan, np.nan]), [0.5]) == [0.0, 0.0]
    assert histogram_shares(np.array([], dtype=float), [0.5]) == [0.0, 0.0]
    assert histogram_shares(np.array([0.2, 0.9]), []) == [1.0]
    with pytest.raises(ValueError, match="ascending"):
        histogram_shares(np.array([0.2]), [0.5, 0.1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), max_size=200),
       st.lists(st.floats(0, 1), max_size=12).map(sorted))
def test_histogram_shares_sum_to_one(values: list[float], edges: list[float]) -> None:
    shares = histogram_shares(np.array(values, dtype=float), edges)
    assert len(shares) == len(edges) + 1 and all(s >= 0 for s in shares)
    present = sum(not math.isnan(v) for v in values)
    assert math.fsum(shares) == (pytest.approx(1.0) if present else 0.0)


def test_score_shift() -> None:
    _, prediction = card()
    edges = np.array(prediction.bin_edges)
    middles = np.r_[edges[0] / 2, (edges[:-1] + edges[1:]) / 2, (edges[-1] + 1) / 2]
    same = np.repeat(middles, 7)  # the reference's shares exactly (one tenth per bin)
    assert score_shift(prediction.frequencies, same, prediction.bin_edges)["psi"] == pytest.approx(0.0, abs=1e-12)
    high = np.full(50, 0.9)  # everything in the last bin
    shift = score_shift(prediction.frequencies, high, prediction.bin_edges)
    assert shift["shares"] == [0.0] * 9 + [1.0]
    assert shift["psi"] == pytest.approx(psi(np.array(prediction.frequencies), np.array(shift["shares"])))
    assert shift["psi"] > 1
    with pytest.raises(ValueError, match="bins expected"):
        score_shift([0.5, 0.5], high, prediction.bin_edges)
    with pytest.raises(ValueError, match="no non-missing"):
        score_shift(prediction.frequencies, np.array([np.nan]), prediction.bin_edges)


# ---------------------------------------------------------------- random split


def test_random_split_is_deterministic_and_distinct() -> None:
    first = random_split(1000, 200, seed=42)
    assert np.array_equal(first, random_split(1000, 200, seed=42))
    assert not np.array_equal(first, random_split(1000, 200, seed=43))
    assert len(first) == 200 and len(np.unique(first)) == 200
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < 1000
    assert np.array_equal(first, np.sort(np.random.default_rng(42).choice(1000, size=200, replace=False)))
    assert random_split(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.integers(0, 2**32))
def test_random_split_never_repeats_a_row(sizes: tuple[int, int], seed: int) -> None:
    n_rows, size = sizes
    picks = random_split(n_rows, size, seed)
    assert len(set(picks.tolist())) == size and picks.min() >= 0 and picks.max() < n_rows


@pytest.mark.parametrize(("n_rows", "size"), [(0, 0), (10, 0), (10, 11), (10, -1)])
def test_random_split_checks_its_sizes(n_rows: int, size: int) -> None:
    with pytest.raises(ValueError, match=r"n_rows|size"):
        random_split(n_rows, size, seed=0)

"""Evaluation metrics of the release readiness checklist, in plain numpy.

Inputs are 1-d numpy arrays of one row each: `labels` and `decisions` are 0/1 (ints, bools or
0.0/1.0 floats), `scores` are the positive class's probability in [0, 1]. Functions that reduce
rows to a number raise `ValueError` on empty input or on arrays of different lengths.

- Held-out metrics: `auc` (Mann-Whitney U over average ranks, so ties count one half), `accuracy`,
  `brier`, `log_loss`; `metric` dispatches by the policy's `readiness.metric` name, `meets` judges a
  value against `readiness.threshold` and `improvement` measures a candidate against a baseline
  (stable version, fallback rules, random split), both in the direction `HIGHER_IS_BETTER` says.
- Fairness: `bands` cuts a numeric protected column at `ProtectedGroup.bins`, `group_rates` counts
  each group's positive-decision and true-positive rates, `fairness` judges them against the
  `Fairness` bounds (four-fifths ratio, equal-opportunity gap) over the groups with enough rows.
- Score shift: `histogram_shares` bins values exactly as online drift does (`gateway.drift`: inner
  edges, `searchsorted(side="left")`, so a value equal to an edge falls in the lower bin) and
  `score_shift` scores them with drift's PSI against the card's reference shares.
- `random_split`: the seeded random held-out sample the leakage check compares the time split with.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.drift import psi

HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "accuracy": True, "brier": False, "log_loss": False}
"""Direction of each metric a readiness policy may name."""

TOLERANCE = 1e-9
"""Slack on the fairness bounds so a ratio or gap exactly at the bound passes despite float rounding
(e.g. 0.8 - 0.7 == 0.10000000000000009)."""

MISSING = "missing"
"""The band of a missing (NaN / None) value."""


# ---------------------------------------------------------------- input checks


def _vector(name: str, values: NDArray[Any], dtype: type[np.generic] | None = None) -> NDArray[Any]:
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be read as {np.dtype(dtype).name} values ({exc})") from None
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {array.shape}")
    return array


def _binary(name: str, values: NDArray[Any]) -> NDArray[np.int64]:
    array = _vector(name, values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected 0/1 values, got dtype {array.dtype}")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        odd = np.unique(array[bad])[:5].tolist()
        raise ValueError(f"{name}: expected only 0/1 values, found {odd}")
    return array.astype(np.int64)


def _probabilities(name: str, values: NDArray[Any]) -> NDArray[np.float64]:
    array = _vector(name, values, np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{name}: {int(np.isnan(array).sum())} missing (NaN) values")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{name}: probabilities must lie in [0, 1], found [{array.min():g}, {array.max():g}]")
    return array


def _same_length(**arrays: NDArray[Any]) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("arrays of different lengths: " + ", ".join(f"{n}={k}" for n, k in lengths.items()))
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"empty input: {', '.join(lengths)} have no rows")
    return n


def _known(name: str) -> bool:
    if name not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[name]


def _edges(values: NDArray[Any] | list[float], strict: bool) -> NDArray[np.float64]:
    edges = _vector("edges", np.asarray(values), np.float64)
    if not np.isfinite(edges).all():
        raise ValueError(f"edges: must be finite numbers, got {edges.tolist()}")
    steps = np.diff(edges)
    if (steps <= 0).any() if strict else (steps < 0).any():
        order = "strictly ascending" if strict else "ascending"
        raise ValueError(f"edges: must be {order}, got {edges.tolist()}")
    return edges


# ---------------------------------------------------------------- held-out metrics


def auc(labels: NDArray[Any], scores: NDArray[Any]) -> float:
    """ROC AUC: the Mann-Whitney U of the positives' average ranks over n_pos * n_neg (ties count 1/2)."""
    y = _binary("labels", labels)
    s = _vector("scores", scores, np.float64)
    n = _same_length(labels=y, scores=s)
    if np.isnan(s).any():
        raise ValueError(f"scores: {int(np.isnan(s).sum())} missing (NaN) values")
    positives = int(y.sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        only = "positive (1)" if negatives == 0 else "negative (0)"
        raise ValueError(f"AUC is undefined when only one class is present: all {n} labels are {only}")
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of ties
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # 1-based ranks, averaged over ties
    u = float(ranks[y == 1].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def accuracy(labels: NDArray[Any], decisions: NDArray[Any]) -> float:
    """Share of rows whose 0/1 decision equals the label."""
    y = _binary("labels", labels)
    d = _binary("decisions", decisions)
    _same_length(labels=y, decisions=d)
    return float(np.mean(y == d))


def brier(labels: NDArray[Any], scores: NDArray[Any]) -> float:
    """Brier score: mean squared difference of the positive-class probability and the label."""
    y = _binary("labels", labels)
    p = _probabilities("scores", scores)
    _same_length(labels=y, scores=p)
    return float(np.mean((p - y) ** 2))


def log_loss(labels: NDArray[Any], scores: NDArray[Any], eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of the labels, scores clipped to [eps, 1 - eps] so it stays finite."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _binary("labels", labels)
    p = np.clip(_probabilities("scores", scores), eps, 1 - eps)
    _same_length(labels=y, scores=p)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def metric(name: str, labels: NDArray[Any], scores: NDArray[Any] | None,
           decisions: NDArray[Any] | None) -> float:
    """The named metric (`auc`, `brier`, `log_loss` from the scores; `accuracy` from the decisions)."""
    _known(name)
    if name == "accuracy":
        if decisions is None:
            raise ValueError("accuracy needs decisions")
        return accuracy(labels, decisions)
    if scores is None:
        raise ValueError(f"{name} needs scores")
    if name == "auc":
        return auc(labels, scores)
    return brier(labels, scores) if name == "brier" else log_loss(labels, scores)


def meets(name: str, value: float, threshold: float) -> bool:
    """Whether a metric value reaches the threshold (>= for auc/accuracy, <= for brier/log_loss)."""
    return bool(value >= threshold) if _known(name) else bool(value <= threshold)


def improvement(name: str, candidate: float, baseline: float) -> float:
    """How much better the candidate is than the baseline, in the metric's units (negative: worse)."""
    return candidate - baseline if _known(name) else baseline - candidate


# ---------------------------------------------------------------- fairness


def _edge_label(edge: float) -> str:
    return np.format_float_positional(edge, trim="-")


def bands(values: NDArray[Any], edges: NDArray[Any] | list[float]) -> NDArray[np.str_]:
    """Band labels of a numeric column cut at strictly ascending edges; missing values are "missing".

    Edges [25, 62] give "<25" (v < 25), "25-62" (25 <= v < 62) and ">=62" (v >= 62): a value equal to
    an edge belongs to the band above it, as the labels say (unlike drift's bins, where it goes below).
    Edges are written in their shortest exact decimal form (25.0 -> "25", 0.5 -> "0.5"). Empty values
    give an empty array.
    """
    cuts = _edges(edges, strict=True)
    if cuts.size == 0:
        raise ValueError("edges: at least one edge is needed to cut bands")
    data = _vector("values", values, np.float64)
    names = [_edge_label(float(e)) for e in cuts]
    labels = np.array([f"<{names[0]}", *(f"{a}-{b}" for a, b in pairwise(names)),
                       f">={names[-1]}", MISSING])
    index = np.searchsorted(cuts, data, side="right")  # number of edges <= value
    index[np.isnan(data)] = len(labels) - 1
    return labels[index]


def group_rates(groups: NDArray[Any], labels: NDArray[Any], decisions: NDArray[Any],
                min_rows: int) -> list[dict[str, Any]]:
    """Per group (sorted by name; names compared as strings): rows, true positives' count, the share of
    positive decisions, the true-positive rate (None without true positives), and whether the group has
    the `min_rows` rows needed to be judged."""
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")
    g = _vector("groups", groups).astype(np.str_)
    y = _binary("labels", labels)
    d = _binary("decisions", decisions)
    _same_length(groups=g, labels=y, decisions=d)
    out: list[dict[str, Any]] = []
    for name in np.unique(g):
        mask = g == name
        rows = int(mask.sum())
        positives = int(y[mask].sum())
        hits = int((d[mask] & y[mask]).sum())
        out.append({"group": str(name), "rows": rows, "positives": positives,
                    "positive_rate": float(d[mask].sum()) / rows,
                    "tpr": hits / positives if positives else None,
                    "judged": rows >= min_rows})
    return out


def fairness(rates: list[dict[str, Any]], min_ratio: float, max_tpr_gap: float) -> dict[str, Any]:
    """Judge `group_rates` output over its judged groups: lowest over highest positive-decision rate
    (at least `min_ratio`) and largest true-positive rate gap (at most `max_tpr_gap`). A bound that
    cannot be measured (fewer than two judged groups, or with a TPR) is None and counts as ok, noted."""
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if max_tpr_gap < 0:
        raise ValueError(f"max_tpr_gap must be at least 0, got {max_tpr_gap}")
    notes = [f"group {r['group']!r} has {r['rows']} rows: reported, not judged" for r in rates if not r["judged"]]
    judged = [r for r in rates if r["judged"]]
    ratio: float | None = None
    lowest = highest = None
    if len(judged) < 2:
        notes.append(f"positive-rate ratio not judged: {len(judged)} group(s) with enough rows, 2 needed")
    else:
        low = min(judged, key=lambda r: r["positive_rate"])
        high = max(judged, key=lambda r: r["positive_rate"])
        lowest, highest = low["group"], high["group"]
        if high["positive_rate"] == 0:
            ratio = 1.0
            notes.append("no judged group has a positive decision: ratio taken as 1")
        else:
            ratio = low["positive_rate"] / high["positive_rate"]
    tprs = [r["tpr"] for r in judged if r["tpr"] is not None]
    gap: float | None = None
    if len(tprs) < 2:
        notes.append(f"TPR gap not judged: {len(tprs)} judged group(s) with true positives, 2 needed")
    else:
        gap = max(tprs) - min(tprs)
    ratio_ok = ratio is None or ratio >= min_ratio - TOLERANCE
    tpr_ok = gap is None or gap <= max_tpr_gap + TOLERANCE
    return {"positive_rate_ratio": ratio, "tpr_gap": gap, "ratio_ok": ratio_ok, "tpr_ok": tpr_ok,
            "ok": ratio_ok and tpr_ok, "lowest_group": lowest, "highest_group": highest, "notes": notes}


# ---------------------------------------------------------------- score shift and splits


def histogram_shares(values: NDArray[Any], edges: NDArray[Any] | list[float]) -> list[float]:
    """Shares of the non-NaN values in the n + 1 bins of n ascending inner edges, binned as online drift
    bins them (a value equal to an edge goes to the lower bin); all zeros when there are no values."""
    cuts = _edges(edges, strict=False)
    data = _vector("values", values, np.float64)
    present = data[~np.isnan(data)]
    counts = np.bincount(np.searchsorted(cuts, present, side="left"), minlength=len(cuts) + 1)
    if present.size == 0:
        return [0.0] * (len(cuts) + 1)
    return [float(c) / present.size for c in counts]


def score_shift(reference_shares: NDArray[Any] | list[float], values: NDArray[Any],
                edges: NDArray[Any] | list[float]) -> dict[str, Any]:
    """PSI of the values' binned shares against the reference shares (a card's prediction profile)."""
    reference = _vector("reference_shares", np.asarray(reference_shares), np.float64)
    if len(reference) != len(edges) + 1:
        raise ValueError(f"reference_shares: {len(reference)} shares for {len(edges)} edges "
                         f"({len(edges) + 1} bins expected)")
    data = _vector("values", values, np.float64)
    if not (~np.isnan(data)).any():
        raise ValueError(f"values: no non-missing values to compare ({len(data)} rows)")
    shares = histogram_shares(data, edges)
    return {"psi": psi(reference, np.array(shares)), "shares": shares}


def random_split(n_rows: int, size: int, seed: int) -> NDArray[np.int64]:
    """`size` distinct row indices out of `n_rows`, sorted; the same for the same seed."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    if not 1 <= size <= n_rows:
        raise ValueError(f"size must lie in [1, n_rows={n_rows}], got {size}")
    picks = np.random.default_rng(seed).choice(n_rows, size=size, replace=False)
    return np.sort(picks).astype(np.int64)

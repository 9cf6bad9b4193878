"""Online drift: sliding-window histograms over the reference bins, and the scores that compare them.

Per model version and per feature (and for the prediction score), the last `window` rows are
kept as bin counts in `sub_windows` pieces: when the newest piece is full the oldest is cleared
and reused, so old data ages out a piece at a time and memory is O(bins), never O(rows). Batches
are folded in with one `searchsorted` + `bincount` per feature, by a background task fed through
a bounded queue (full: the batch is dropped and counted), never on the request path.

Scores (all on the binned distributions, reference frequencies `e`, window frequencies `a`):
- PSI = sum((a - e) * ln(a / e)), both clipped at 1e-4 so empty bins stay finite;
- KS = max |cumsum(a) - cumsum(e)| at the bin edges (numeric): a lower bound of the sample KS
  distance, below it by at most the largest bin share of either side (binning error);
- JS = sqrt of the Jensen-Shannon divergence in bits (0 same, 1 disjoint);
- chi2_p = p-value of Pearson's chi-square test of the window's counts against the reference
  shares (categorical; the unseen-category bucket is reported as its own rate instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gateway.card import CategoricalProfile, NumericProfile, PredictionProfile, ReferenceProfile
from gateway.policy import Drift, DriftRule

State = Literal["insufficient", "ok", "warn", "alert"]
STATE_CODES: dict[str, int] = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}
EPSILON = 1e-4
SCORE = "_score"


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors."""
    e = np.clip(expected, EPSILON, None)
    a = np.clip(actual, EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(expected: np.ndarray, actual: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of two binned distributions (evaluated at the bin edges)."""
    return float(np.max(np.abs(np.cumsum(actual) - np.cumsum(expected))))


def js(expected: np.ndarray, actual: np.ndarray) -> float:
    """Jensen-Shannon distance in bits (square root of the divergence)."""
    p = expected / expected.sum() if expected.sum() else expected
    q = actual / actual.sum() if actual.sum() else actual
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / m[mask])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def chi2_p(expected: np.ndarray, counts: np.ndarray) -> float:
    """p-value of Pearson's chi-square goodness-of-fit test (bins with no expected share are skipped)."""
    mask = expected > 0
    observed = counts[mask].astype(np.float64)
    total = observed.sum()
    if total == 0 or mask.sum() < 2:
        return 1.0
    wanted = expected[mask] / expected[mask].sum() * total
    statistic = float(np.sum((observed - wanted) ** 2 / wanted))
    return float(upper_gamma_regularized(float(mask.sum() - 1) / 2, statistic / 2))


def upper_gamma_regularized(a: float, x: float) -> float:
    """Q(a, x) = 1 - P(a, x), the chi-square survival function's core (series / continued fraction)."""
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P(a, x)
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000 + int(10 * math.sqrt(a))):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300  # continued fraction for Q(a, x) (modified Lentz)
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000 + int(10 * math.sqrt(a))):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


@dataclass
class _Ring:
    """Row counts of the sub-windows, and which one is current."""

    pieces: int
    capacity: int  # rows per piece
    rows: np.ndarray = field(init=False)
    current: int = 0

    def __post_init__(self) -> None:
        self.rows = np.zeros(self.pieces, dtype=np.int64)

    def room(self) -> int:
        return int(self.capacity - self.rows[self.current])

    def advance(self) -> int:
        """Move to the next piece (clearing it); returns its index."""
        self.current = (self.current + 1) % self.pieces
        self.rows[self.current] = 0
        return self.current


class _Histogram:
    """One feature's window: bin counts per sub-window plus missing and out-of-range counts."""

    def __init__(self, name: str, profile: NumericProfile | CategoricalProfile | PredictionProfile,
                 pieces: int) -> None:
        self.name = name
        self.numeric = not isinstance(profile, CategoricalProfile)
        if isinstance(profile, CategoricalProfile):
            self.categories = list(profile.frequencies)
            self.index = {c: i for i, c in enumerate(self.categories)}
            self.expected = np.array([*profile.frequencies.values(), 0.0])  # last bucket: unseen
            self.ref_missing = profile.missing_rate
        else:
            self.edges = np.array(profile.bin_edges, dtype=np.float64)
            self.expected = np.array(profile.frequencies, dtype=np.float64)
            self.ref_missing = getattr(profile, "missing_rate", 0.0)
            self.low = getattr(profile, "min", None)
            self.high = getattr(profile, "max", None)
        self.counts = np.zeros((pieces, len(self.expected)), dtype=np.int64)
        self.missing = np.zeros(pieces, dtype=np.int64)
        self.odd = np.zeros(pieces, dtype=np.int64)  # out of range (numeric) or unseen (categorical)

    def clear(self, piece: int) -> None:
        self.counts[piece] = 0
        self.missing[piece] = 0
        self.odd[piece] = 0

    def add(self, piece: int, values: np.ndarray) -> None:
        if self.numeric:
            data = values.astype(np.float64, copy=False)
            nan = np.isnan(data)
            present = data[~nan]
            self.missing[piece] += int(nan.sum())
            bins = np.searchsorted(self.edges, present, side="left")
            self.counts[piece] += np.bincount(bins, minlength=len(self.expected))
            if self.low is not None and self.high is not None:
                self.odd[piece] += int(((present < self.low) | (present > self.high)).sum())
            return
        missing = 0
        unseen_bucket = len(self.categories)
        codes = np.empty(len(values), dtype=np.int64)
        n = 0
        for value in values:
            if value is None or value == "":
                missing += 1
                continue
            codes[n] = self.index.get(value, unseen_bucket)
            n += 1
        counted = np.bincount(codes[:n], minlength=len(self.expected))
        self.counts[piece] += counted
        self.missing[piece] += missing
        self.odd[piece] += int(counted[unseen_bucket])

    def report(self, rule: DriftRule, policy: Drift) -> dict[str, Any]:
        counts = self.counts.sum(axis=0)
        present = int(counts.sum())
        rows = present + int(self.missing.sum())
        out: dict[str, Any] = {"kind": "numeric" if self.numeric else "categorical", "rows": rows}
        if rows < policy.min_rows:
            return {**out, "state": "insufficient", "scores": None}
        if present == 0:  # every value missing: no distribution to score, and the worst missing-value drift
            return {**out, "state": "alert", "scores": None, "reasons": ["every value is missing"],
                    "missing_rate": 1.0}
        actual = counts / present
        scores: dict[str, float] = {"psi": round(psi(self.expected, actual), 6),
                                    "js": round(js(self.expected, actual), 6)}
        if self.numeric:
            scores["ks"] = round(ks(self.expected, actual), 6)
        else:
            scores["chi2_p"] = chi2_p(self.expected, counts)
        missing_rate = float(self.missing.sum()) / rows
        odd_rate = float(self.odd.sum()) / max(present, 1)
        state, reasons = _judge(rule, scores)
        decided_by = rule.metric if rule.metric in scores else "psi"
        if missing_rate - self.ref_missing > policy.missing_rate_alert:
            state, reasons = "alert", [*reasons, f"missing rate {missing_rate:.3f} vs {self.ref_missing:.3f} "
                                                 "in the reference"]
        if odd_rate > policy.unseen_rate_alert:
            what = "out-of-range" if self.numeric else "unseen-category"
            state, reasons = "alert", [*reasons, f"{what} rate {odd_rate:.3f}"]
        label = "out_of_range_rate" if self.numeric else "unseen_rate"
        return {**out, "state": state, "scores": scores, "decided_by": decided_by, "reasons": reasons,
                "missing_rate": round(missing_rate, 6), label: round(odd_rate, 6)}


def _judge(rule: DriftRule, scores: dict[str, float]) -> tuple[State, list[str]]:
    metric = rule.metric if rule.metric in scores else "psi"
    value = scores[metric]
    if metric == "chi2_p":
        state: State = "alert" if value <= rule.alert else "warn" if value <= rule.warn else "ok"
        why = f"chi-square p-value {value:.2e}"
    else:
        state = "alert" if value >= rule.alert else "warn" if value >= rule.warn else "ok"
        why = f"{metric} {value:.3f}"
    return state, ([why] if state != "ok" else [])


class VersionDrift:
    """The drift windows of one model version."""

    def __init__(self, profile: ReferenceProfile, policy: Drift, score_index: int | None) -> None:
        self.policy = policy
        self.ring = _Ring(policy.sub_windows, max(policy.window // policy.sub_windows, 1))
        self.features = {name: _Histogram(name, p, policy.sub_windows) for name, p in profile.features.items()}
        self.score = _Histogram(SCORE, profile.prediction, policy.sub_windows) if profile.prediction else None
        self.score_index = score_index

    def add(self, columns: dict[str, np.ndarray], scores: np.ndarray | None) -> None:
        """Fold one batch in (split across sub-windows when it does not fit the current one)."""
        rows = len(next(iter(columns.values()))) if columns else (len(scores) if scores is not None else 0)
        start = 0
        while start < rows:
            if self.ring.room() == 0:
                piece = self.ring.advance()
                for histogram in self._all():
                    histogram.clear(piece)
            take = min(self.ring.room(), rows - start)
            piece = self.ring.current
            for name, histogram in self.features.items():
                if name in columns:
                    histogram.add(piece, columns[name][start:start + take])
            if self.score is not None and scores is not None:
                self.score.add(piece, scores[start:start + take])
            self.ring.rows[piece] += take
            start += take

    def _all(self) -> list[_Histogram]:
        return [*self.features.values(), *([self.score] if self.score else [])]

    def report(self) -> dict[str, Any]:
        """Scores and states of every feature and of the score, plus the window's size."""
        p = self.policy
        features = {name: h.report(p.numeric if h.numeric else p.categorical, p) for name, h in self.features.items()}
        prediction = self.score.report(p.prediction, p) if self.score else None
        ranked = sorted(((n, r) for n, r in features.items() if r["scores"]),
                        key=lambda item: (-STATE_CODES[item[1]["state"]], -item[1]["scores"]["psi"]))
        states = [r["state"] for r in features.values()] + ([prediction["state"]] if prediction else [])
        known = [s for s in states if s != "insufficient"]
        overall = max(known, key=lambda s: STATE_CODES[s]) if known else "insufficient"
        null_rate = None
        if self.score is not None:
            total = int(self.score.counts.sum()) + int(self.score.missing.sum())
            null_rate = round(float(self.score.missing.sum()) / total, 6) if total else None
        return {"state": overall, "window": {"rows": int(self.ring.rows.sum()), "capacity": p.window,
                                             "sub_windows": p.sub_windows},
                "top_drifting": [{"feature": n, "state": r["state"], "psi": r["scores"]["psi"]}
                                 for n, r in ranked[:5]],
                "features": features, "prediction": prediction, "null_prediction_rate": null_rate}

"""Per-version traffic counters for rollout decisions: cumulative, diffed over an interval.

Memory is O(latency buckets) per version, never O(requests): latencies go into fixed
log-spaced buckets, and an interval's p99 is read from the difference of two snapshots.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

#: latency bucket upper bounds in seconds: 0.1 ms .. ~60 s, 10 buckets per decade
BOUNDS = np.array([1e-4 * 10 ** (i / 10) for i in range(58)])
_BOUNDS_LIST = BOUNDS.tolist()  # bisect on a list: a tenth of numpy's per-call cost for one value


@dataclass
class Counts:
    """Cumulative counts of one version's traffic (or of its shadow comparisons)."""

    attempts: int = 0
    failures: int = 0
    fallbacks: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(BOUNDS) + 1, dtype=np.int64))
    shadow_rows: int = 0
    shadow_disagreements: int = 0
    shadow_abs_diff_sum: float = 0.0
    shadow_abs_diff_max: float = 0.0

    def copy(self) -> Counts:
        """A frozen copy (the baseline of an interval)."""
        return Counts(self.attempts, self.failures, self.fallbacks, self.latency.copy(), self.shadow_rows,
                      self.shadow_disagreements, self.shadow_abs_diff_sum, self.shadow_abs_diff_max)


@dataclass(frozen=True)
class Interval:
    """What happened between two snapshots."""

    attempts: int
    failures: int
    fallbacks: int
    p99_ms: float | None
    shadow_rows: int
    shadow_disagreements: int

    @property
    def error_rate(self) -> float:
        """Failed calls over attempts (0 when there were none)."""
        return self.failures / self.attempts if self.attempts else 0.0

    @property
    def fallback_rate(self) -> float:
        """Fallback answers over attempts."""
        return self.fallbacks / self.attempts if self.attempts else 0.0

    @property
    def shadow_disagreement(self) -> float:
        """Rows where the shadow's labels differed, over compared rows."""
        return self.shadow_disagreements / self.shadow_rows if self.shadow_rows else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form for decisions and status."""
        return {"attempts": self.attempts, "error_rate": round(self.error_rate, 6),
                "fallback_rate": round(self.fallback_rate, 6),
                "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 3),
                "shadow_rows": self.shadow_rows, "shadow_disagreement": round(self.shadow_disagreement, 6)}


def between(before: Counts, after: Counts) -> Interval:
    """The interval from `before` to `after` (same version)."""
    latency = after.latency - before.latency
    total = int(latency.sum())
    p99 = None
    if total:
        rank = math.ceil(0.99 * total)
        index = int(np.searchsorted(np.cumsum(latency), rank))
        p99 = float(BOUNDS[min(index, len(BOUNDS) - 1)] * 1000)
    return Interval(after.attempts - before.attempts, after.failures - before.failures,
                    after.fallbacks - before.fallbacks, p99, after.shadow_rows - before.shadow_rows,
                    after.shadow_disagreements - before.shadow_disagreements)


class TrafficStats:
    """Counts per (model, version), updated on the event loop (no locks needed)."""

    def __init__(self) -> None:
        self._counts: defaultdict[tuple[str, str], Counts] = defaultdict(Counts)

    def record(self, model: str, version: str, latency_s: float, failed: bool, fallback: bool) -> None:
        """One routed call's outcome."""
        counts = self._counts[(model, version)]
        counts.attempts += 1
        counts.failures += failed
        counts.fallbacks += fallback
        counts.latency[bisect.bisect_left(_BOUNDS_LIST, latency_s)] += 1

    def record_shadow(self, model: str, version: str, rows: int, disagreements: int, diffs: np.ndarray) -> None:
        """One shadow comparison (`diffs`: absolute score differences per row)."""
        counts = self._counts[(model, version)]
        counts.shadow_rows += rows
        counts.shadow_disagreements += disagreements
        if diffs.size:
            counts.shadow_abs_diff_sum += float(diffs.sum())
            counts.shadow_abs_diff_max = max(counts.shadow_abs_diff_max, float(diffs.max()))

    def snapshot(self, model: str, version: str) -> Counts:
        """A copy of the cumulative counts now."""
        return self._counts[(model, version)].copy()

    def shadow_summary(self, model: str, version: str) -> dict[str, float | int]:
        """Cumulative shadow comparison figures for status."""
        counts = self._counts[(model, version)]
        rows = counts.shadow_rows
        return {"rows": rows, "disagreement_rate": round(counts.shadow_disagreements / rows, 6) if rows else 0.0,
                "mean_abs_score_diff": round(counts.shadow_abs_diff_sum / rows, 6) if rows else 0.0,
                "max_abs_score_diff": round(counts.shadow_abs_diff_max, 6)}

"""Delayed labels joined to recent predictions by request id: online accuracy, AUC and Brier score.

Recent predictions are kept in a bounded store per model (oldest out first); ids that fell out
are remembered, as many again, so late feedback is reported back as `expired` rather than
`unknown`. Each version keeps its last `window` labelled rows.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.policy import Feedback

THRESHOLD = 0.5  # a score at or above it predicts the positive class


@dataclass(frozen=True)
class _Prediction:
    version: str
    scores: np.ndarray


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class FeedbackStore:
    """Recent predictions of every model and the labelled outcomes of every version."""

    def __init__(self) -> None:
        self._recent: dict[str, OrderedDict[str, _Prediction]] = {}
        self._expired: dict[str, OrderedDict[str, None]] = {}
        self._outcomes: dict[tuple[str, str], deque[tuple[int, float]]] = {}

    def remember(self, model: str, policy: Feedback, request_id: str, version: str, scores: np.ndarray) -> None:
        """Keep a prediction for later feedback (bounded: the oldest expires)."""
        recent = self._recent.setdefault(model, OrderedDict())
        recent[request_id] = _Prediction(version, scores)
        recent.move_to_end(request_id)
        expired = self._expired.setdefault(model, OrderedDict())
        while len(recent) > policy.store:
            old, _ = recent.popitem(last=False)
            expired[old] = None
            while len(expired) > policy.store:
                expired.popitem(last=False)

    def known(self, model: str, request_ids: list[str]) -> list[str]:
        """Those of the ids whose prediction is kept here (still open for a label)."""
        recent: OrderedDict[str, _Prediction] = self._recent.get(model, OrderedDict())
        return [i for i in request_ids if i in recent]

    def accept(self, model: str, policy: Feedback, items: list[Any]) -> dict[str, Any]:
        """Join labels to predictions; report what could not be joined and why."""
        accepted: dict[str, int] = {}
        unknown: list[str] = []
        expired: list[str] = []
        invalid: list[dict[str, Any]] = []
        recent = self._recent.get(model, OrderedDict())
        gone = self._expired.get(model, OrderedDict())
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                invalid.append({"index": i, "error": "expected {\"id\": \"...\", \"label\": 0|1} or \"labels\": [...]"})
                continue
            request_id = item["id"]
            labels = item.get("labels", [item["label"]] if "label" in item else None)
            if request_id not in recent:
                (expired if request_id in gone else unknown).append(request_id)
                continue
            prediction = recent[request_id]
            if (not isinstance(labels, list) or len(labels) != len(prediction.scores)
                    or any(label not in (0, 1) or isinstance(label, (float, bool)) for label in labels)):
                invalid.append({"index": i, "id": request_id,
                                "error": f"expected {len(prediction.scores)} label(s), each 0 or 1"})
                continue
            outcomes = self._outcomes.setdefault((model, prediction.version), deque(maxlen=policy.window))
            for label, score in zip(labels, prediction.scores, strict=True):
                outcomes.append((int(label), float(score)))
            accepted[prediction.version] = accepted.get(prediction.version, 0) + len(labels)
            del recent[request_id]  # one label per prediction: a second one is `unknown`
        return {"accepted": sum(accepted.values()), "by_version": accepted, "unknown": unknown,
                "expired": expired, "invalid": invalid}

    def report(self, model: str, version: str, policy: Feedback) -> dict[str, Any]:
        """Online accuracy, AUC and Brier over the version's window, and the resulting state."""
        outcomes = self._outcomes.get((model, version))
        rows = len(outcomes) if outcomes else 0
        if not outcomes or rows < policy.min_labels:
            return {"labels": rows, "state": "insufficient", "accuracy": None, "auc": None, "brier": None}
        data = np.array(outcomes, dtype=np.float64)
        labels, scores = data[:, 0], data[:, 1]
        accuracy = float(((scores >= THRESHOLD) == (labels == 1)).mean())
        area = auc(labels, scores)
        brier = float(np.mean((scores - labels) ** 2))
        reasons = []
        if policy.accuracy_below is not None and accuracy < policy.accuracy_below:
            reasons.append(f"accuracy {accuracy:.3f} < {policy.accuracy_below}")
        if policy.auc_below is not None and area is not None and area < policy.auc_below:
            reasons.append(f"AUC {area:.3f} < {policy.auc_below}")
        if policy.brier_above is not None and brier > policy.brier_above:
            reasons.append(f"Brier {brier:.3f} > {policy.brier_above}")
        return {"labels": rows, "state": "alert" if reasons else "ok", "reasons": reasons,
                "accuracy": round(accuracy, 6), "auc": None if area is None else round(area, 6),
                "brier": round(brier, 6)}

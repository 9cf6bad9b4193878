"""Offline scoring for the readiness checklist: a version, or the fallback rules, on a data table.

Rows go through the same validator the server uses (the policy's schema, the version's
signature), so what is judged here is what would be served; then through the version's
onnxruntime session, or through the policy's fallback rules. The card's `score` says which
output element is the score, and the decision is the label output (or the score against the
policy's decision threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.card import ModelCard, ScoreSpec, Signature
from gateway.errors import SchemaViolation
from gateway.fallback import FallbackRules
from gateway.policy import Policy
from gateway.readiness.data import DataError, Table, request_columns
from gateway.runtime import OnnxModel
from gateway.validation import Column, RequestValidator


@dataclass(frozen=True)
class Scored:
    """Per row: the score, the 0/1 decision, and the raw outputs."""

    scores: NDArray[np.float64]
    decisions: NDArray[np.int64]
    outputs: dict[str, NDArray[Any]]


def score_of(outputs: dict[str, NDArray[Any]], spec: ScoreSpec) -> NDArray[np.float64]:
    """The score column (e.g. the positive-class probability) from a batch's outputs."""
    if spec.output not in outputs:
        raise DataError(f"the card's score output {spec.output!r} is not among the outputs {sorted(outputs)}")
    values = np.asarray(outputs[spec.output], dtype=np.float64)
    rows = values.shape[0] if values.ndim else 1
    values = values.reshape(rows, -1)
    return values[:, spec.index if spec.index is not None else 0]


def decisions_of(outputs: dict[str, NDArray[Any]], scores: NDArray[np.float64], spec: ScoreSpec,
                 threshold: float | None) -> NDArray[np.int64]:
    """1 where the answer is a positive decision: score >= threshold, else the label output."""
    if threshold is None and spec.positive_label is not None:
        for name, values in outputs.items():
            flat = np.asarray(values).reshape(len(scores), -1)
            if name != spec.output and flat.shape[1] == 1:
                column = flat[:, 0]
                if column.dtype.kind in "iubf":
                    hits: NDArray[np.int64] = (column == spec.positive_label).astype(np.int64)
                    return hits
                return np.array([v == spec.positive_label or str(v) == str(spec.positive_label)
                                 for v in column], dtype=np.int64)
    return (scores >= (0.5 if threshold is None else threshold)).astype(np.int64)


class Evaluator:
    """Scores tables with one model's versions and its fallback, as the server would."""

    def __init__(self, policy: Policy, signature: Signature, score: ScoreSpec, threshold: float | None) -> None:
        self.policy = policy
        self.signature = signature
        self.score = score
        self.threshold = threshold
        self.validator = RequestValidator(signature, policy.input_schema)
        self.chunk = policy.input_schema.max_batch_size

    @classmethod
    def for_card(cls, policy: Policy, card: ModelCard, threshold: float | None) -> Evaluator:
        """An evaluator for the version a card describes (it must declare its score)."""
        if card.score is None:
            raise DataError(f"the card of {card.name} v{card.version} declares no `score`: "
                            f"no metric can be computed")
        return cls(policy, card.signature, card.score, threshold)

    def feeds(self, table: Table) -> list[tuple[dict[str, NDArray[Any]], int]]:
        """The table's rows as validated model feeds, in chunks of the schema's batch limit."""
        columns = request_columns(table, self.policy.input_schema.features)
        chunks = []
        for start in range(0, table.rows, self.chunk):
            stop = min(start + self.chunk, table.rows)
            part = {name: Column(name, column.values[start:stop]) for name, column in columns.items()}
            try:
                batch = self.validator.validate(part)
            except SchemaViolation as exc:
                listed = "; ".join(v.describe() for v in exc.violations.items[:5])
                raise DataError(f"{table.path}: rows {start + 2}-{stop + 1} fail the policy's schema: "
                                f"{listed}") from None
            chunks.append((batch.feeds, batch.rows))
        return chunks

    def run(self, model: OnnxModel, table: Table) -> Scored:
        """Score every row with a version's session."""
        return self._collect([model.run(feeds) for feeds, _ in self.feeds(table)])

    def run_fallback(self, table: Table) -> Scored:
        """Score every row with the policy's fallback rules (DataError when it has none)."""
        if self.policy.fallback is None:
            raise DataError("the policy has no fallback section")
        rules = FallbackRules(self.policy.fallback, self.signature.outputs, self.policy.input_schema.features)
        return self._collect([rules.answer(feeds, rows).outputs for feeds, rows in self.feeds(table)])

    def _collect(self, parts: list[dict[str, NDArray[Any]]]) -> Scored:
        outputs = {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}
        scores = score_of(outputs, self.score)
        return Scored(scores, decisions_of(outputs, scores, self.score, self.threshold), outputs)

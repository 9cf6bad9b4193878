"""The rule-based fallback: answers in the model's output shape when the model cannot answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.card import TensorSpec
from gateway.policy import Fallback, FeatureSpec
from gateway.rules import Node, evaluate, parse_condition
from gateway.tensors import FLOAT_TYPES, INT_TYPES, NUMPY_DTYPES


def output_problems(values: Mapping[str, Any], outputs: list[TensorSpec]) -> list[tuple[str, str]]:
    """(output name, problem) for every way `values` does not fit one row of the output signature."""
    problems = []
    known = {t.name for t in outputs}
    for name in values:
        if name not in known:
            problems.append((name, f"the model has no output {name!r}; outputs: {sorted(known)}"))
    for tensor in outputs:
        if tensor.name not in values:
            problems.append((tensor.name, f"missing: every model output needs a value ({tensor.datatype} "
                                          f"{_row_shape_text(tensor)} per row)"))
            continue
        problem = _value_problem(values[tensor.name], tensor)
        if problem:
            problems.append((tensor.name, problem))
    return problems


def _row_shape_text(tensor: TensorSpec) -> str:
    shape = tensor.shape[1:]
    return "scalar" if not shape else "shape " + str(shape)


def _value_problem(value: Any, tensor: TensorSpec) -> str | None:
    try:
        array = np.array(value, dtype=object)
    except ValueError:
        return "ragged list"
    want = tensor.shape[1:]
    if array.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True)):
        return f"has shape {list(array.shape)}, a row of {tensor.name!r} is {_row_shape_text(tensor)}"
    for item in array.reshape(-1):
        if tensor.datatype == "BYTES":
            ok = isinstance(item, str)
        elif tensor.datatype == "BOOL":
            ok = isinstance(item, bool)
        elif tensor.datatype in INT_TYPES:
            info = np.iinfo(NUMPY_DTYPES[tensor.datatype])
            ok = isinstance(item, int) and not isinstance(item, bool) and info.min <= item <= info.max
        else:
            limit = float(np.finfo(NUMPY_DTYPES[tensor.datatype]).max)
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) and abs(item) <= limit
        if not ok:
            return f"{item!r} is not a {tensor.datatype} value"
    return None


def choices_problems(choices: list[tuple[object, Mapping[str, Any]]],
                     outputs: list[TensorSpec]) -> list[tuple[object, str, str]]:
    """(choice key, output name, problem) for every rule output and the default, checked together.

    Besides each choice fitting a row of the signature, all choices must agree on the length of
    any variable per-row dimension (they are stacked into one table).
    """
    problems = [(key, name, message) for key, values in choices for name, message in output_problems(values, outputs)]
    if problems:
        return problems
    for tensor in outputs:
        shapes = {np.array(values[tensor.name], dtype=object).shape for _, values in choices}
        if len(shapes) > 1:
            key = choices[-1][0]
            problems.append((key, tensor.name, f"rules and default give {tensor.name!r} different shapes "
                                               f"{sorted(shapes)}; every choice must have the same"))
    return problems


@dataclass(frozen=True)
class FallbackAnswer:
    """Outputs for every row, and which rule answered each row."""

    outputs: dict[str, np.ndarray]
    rules: list[str]


class FallbackRules:
    """Compiled fallback rules of one model: conditions parsed once, outputs as ready-made tables."""

    def __init__(self, spec: Fallback, outputs: list[TensorSpec], features: Mapping[str, FeatureSpec]) -> None:
        self.spec = spec
        self.outputs = outputs
        self.conditions: list[Node] = [parse_condition(rule.when) for rule in spec.rules]
        self.labels = [rule.name or f"rules[{i}]" for i, rule in enumerate(spec.rules)] + ["default"]
        self.sources = {name: feature.input or name for name, feature in features.items()}
        self.string_features = {name for name, f in features.items() if f.type in ("category", "string")}
        choices = [*(rule.output for rule in spec.rules), spec.default]
        self.tables = {t.name: np.array([c[t.name] for c in choices], dtype=_dtype(t)) for t in outputs}

    def answer(self, feeds: Mapping[str, np.ndarray], rows: int, wanted: list[str] | None = None) -> FallbackAnswer:
        """Evaluate the rules on validated feeds (first matching rule wins, else the default)."""
        columns = self._columns(feeds, rows)
        chosen = np.full(rows, len(self.conditions), dtype=np.intp)
        open_rows = np.ones(rows, dtype=bool)
        for i, condition in enumerate(self.conditions):
            hit = evaluate(condition, columns, rows) & open_rows
            chosen[hit] = i
            open_rows &= ~hit
        names = wanted if wanted is not None else [t.name for t in self.outputs]
        outputs = {name: self.tables[name][chosen] for name in names}
        return FallbackAnswer(outputs, [self.labels[i] for i in chosen])

    def _columns(self, feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        columns = {}
        for name, source in self.sources.items():
            if source not in feeds:
                continue
            flat = feeds[source].reshape(rows, -1)[:, 0]
            # numbers keep their float width (constants follow it); integers become float64
            columns[name] = flat if name in self.string_features or flat.dtype.kind == "f" else flat.astype(np.float64)
        return columns


def _dtype(tensor: TensorSpec) -> np.dtype[Any]:
    if tensor.datatype in FLOAT_TYPES or tensor.datatype in INT_TYPES or tensor.datatype == "BOOL":
        return NUMPY_DTYPES[tensor.datatype]
    return np.dtype(object)

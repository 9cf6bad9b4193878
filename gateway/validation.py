"""Request columns -> a validated numpy batch for one model version, or every violation found.

A `RequestValidator` is compiled once per (signature, policy) pair. It works on whole columns
with numpy; only a column that fails the fast type check is walked element by element, and then
only to name the offending rows. It never stops at the first problem: the client gets all of them
(up to a listing limit; the total is always counted).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.card import Signature, TensorSpec
from gateway.errors import SchemaViolation, Violation, ViolationList
from gateway.policy import FeatureSpec, FeatureType, InputSchema
from gateway.tensors import FLOAT_TYPES, INT_TYPES, NUMPY_DTYPES, is_safe_cast

_NUMBER_TYPES = (int, float)
_INFINITIES = (float("inf"), float("-inf"))
_SMALL = 32  # below this many values, plain Python checks beat numpy's per-call overhead


@dataclass
class Column:
    """One field of a request, decoded but not yet validated.

    `values` is flat (row-major). `shape` is the client's declared shape (None for row-oriented
    requests, where each row holds one value). `declared` is the client's datatype, if it gave one.
    """

    name: str
    values: list[Any] | np.ndarray
    shape: tuple[int, ...] | None = None
    declared: str | None = None
    absent_rows: list[int] | None = None
    """Rows of a row-oriented request that lack this field (their value is None)."""


@dataclass
class ValidatedBatch:
    """Model feeds ready for onnxruntime, plus what validation noticed but did not reject."""

    feeds: dict[str, np.ndarray]
    rows: int
    ignored_fields: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    """How one model input is filled: from which request field, under which constraints."""

    input: TensorSpec
    source: str
    feature: FeatureSpec
    per_row: bool  # the input holds one value per row ([-1] or [-1, 1])


class RequestValidator:
    """Validates request columns against a model signature and the policy's input schema."""

    def __init__(self, signature: Signature, schema: InputSchema | None, max_listed: int = 100) -> None:
        self.signature = signature
        self.schema = schema
        self.max_listed = max_listed
        self.max_batch_size = schema.max_batch_size if schema else None
        self.reject_unknown = bool(schema and schema.unknown_fields == "reject")
        by_input = {(spec.input or name): (name, spec) for name, spec in (schema.features if schema else {}).items()}
        plans = []
        for tensor in signature.inputs:
            source, spec = by_input.get(tensor.name, (tensor.name, _implicit_feature(tensor)))
            per_row = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
            plans.append(_Plan(tensor, source, spec, per_row))
        self.plans = plans
        self.known_fields = frozenset(p.source for p in plans)

    def validate(self, columns: dict[str, Column]) -> ValidatedBatch:
        """Return the feeds, or raise SchemaViolation listing every problem."""
        problems = ViolationList(limit=self.max_listed)
        ignored = [name for name in columns if name not in self.known_fields]
        if ignored and self.reject_unknown:
            for name in ignored:
                problems.add(Violation(name, "unknown_field", "no such field in the schema", "a value"))

        rows = self._batch_rows(columns, problems)
        feeds: dict[str, np.ndarray] = {}
        if rows is not None:
            for plan in self.plans:
                column = columns.get(plan.source)
                if column is None:
                    if plan.feature.required:
                        problems.add(Violation(plan.source, "missing", f"{plan.feature.type} field",
                                               "nothing (field absent)"))
                        continue
                    # An absent optional field takes its default (or null when it has none).
                    column = Column(plan.source, [plan.feature.default] * rows * _width(plan.input))
                elif column.absent_rows and not plan.feature.required:
                    if plan.feature.default is not None and isinstance(column.values, list):
                        values = list(column.values)
                        for row in column.absent_rows:
                            values[row] = plan.feature.default
                        column = Column(column.name, values, column.shape, column.declared)
                elif column.absent_rows:
                    room = max(problems.limit - len(problems.items), 0)
                    for row in column.absent_rows[:room]:
                        problems.add(Violation(plan.source, "missing", f"{plan.feature.type} field",
                                               "nothing (field absent)", row=row))
                    problems.count_unlisted("missing", len(column.absent_rows) - room)
                    continue
                array = self._convert(plan, column, rows, problems)
                if array is not None:
                    feeds[plan.input.name] = array
        if rows == 0 and not problems:
            problems.add(Violation("*", "empty", "at least one row", "no input fields"))
        if problems:
            raise SchemaViolation(problems)
        return ValidatedBatch(feeds=feeds, rows=rows or 0, ignored_fields=ignored)

    def _batch_rows(self, columns: dict[str, Column], problems: ViolationList) -> int | None:
        """The batch size all fields agree on, or None when the batch's structure is wrong."""
        before = problems.total
        counts: dict[str, int] = {}
        for plan in self.plans:
            column = columns.get(plan.source)
            if column is not None:
                n = self._rows_of(plan, column, problems)
                if n is not None:
                    counts[plan.source] = n
        if not counts:
            return None if problems.total > before else 0
        batch = Counter(counts.values()).most_common(1)[0][0]
        for name, n in counts.items():
            if n != batch:
                problems.add(Violation(name, "rows_mismatch", f"{batch} rows like the other fields", f"{n} rows"))
        if batch == 0:
            problems.add(Violation("*", "empty", "at least one row", "0 rows"))
        elif self.max_batch_size is not None and batch > self.max_batch_size:
            problems.add(Violation("*", "batch_size", f"at most {self.max_batch_size} rows", f"{batch} rows"))
        return None if problems.total > before else batch

    def _rows_of(self, plan: _Plan, column: Column, problems: ViolationList) -> int | None:
        if column.shape is None:
            return len(column.values) // max(_width(plan.input), 1)
        shape = column.shape
        expected = plan.input.shape
        if plan.per_row and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            return shape[0] if shape else None
        fits = len(shape) == len(expected) and all(e in (-1, s) for e, s in zip(expected, shape, strict=True))
        if not fits:
            problems.add(Violation(column.name, "shape", _shape_text(expected), _shape_text(shape)))
            return None
        return shape[0] if shape else 1

    def _convert(self, plan: _Plan, column: Column, rows: int, problems: ViolationList) -> np.ndarray | None:
        target = plan.input.datatype
        name = column.name
        if column.declared is not None and not is_safe_cast(column.declared, target):
            problems.add(Violation(name, "datatype", f"{target} (or a type that converts safely)", column.declared))
            return None
        before = problems.total
        if plan.feature.type in ("category", "string"):
            array = _strings(column.values, plan.feature, name, problems)
        else:
            array = _numbers(column.values, plan.feature, target, name, problems, _width(plan.input))
        if array is None or problems.total > before:
            return None
        if plan.per_row:
            shape: tuple[int, ...] = (rows, 1) if len(plan.input.shape) == 2 else (rows,)
        elif column.shape is not None:
            shape = column.shape
        else:
            problems.add(Violation(name, "shape", f"a tensor of shape {_shape_text(plan.input.shape)}",
                                   "one value per row (send this input as a v2 tensor)"))
            return None
        return array.reshape(shape)


def _implicit_feature(tensor: TensorSpec) -> FeatureSpec:
    """The constraints of an input no policy feature describes: its signature's type, nothing more."""
    kind: FeatureType
    if tensor.datatype == "BYTES":
        kind = "string"
    elif tensor.datatype == "BOOL":
        kind = "bool"
    elif tensor.datatype in INT_TYPES:
        kind = "int"
    else:
        kind = "float"
    return FeatureSpec(type=kind)


def _width(tensor: TensorSpec) -> int:
    """Values per row of an input (product of the fixed non-batch dimensions)."""
    width = 1
    for d in tensor.shape[1:]:
        width *= max(d, 1)
    return width


def _shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, dict)):
        return type(value).__name__
    return repr(value)


def _add_rows(problems: ViolationList, name: str, reason: str, expected: str,
              indices: np.ndarray, values: Any, width: int = 1) -> None:
    """Record one violation per offending element, listing up to the limit and counting the rest."""
    room = max(problems.limit - len(problems.items), 0)
    for index in indices[:room]:
        problems.add(Violation(name, reason, expected, _describe(_item(values, int(index))), row=int(index) // width))
    problems.count_unlisted(reason, len(indices) - room)


def _item(values: Any, index: int) -> Any:
    value = values[index]
    return value.item() if isinstance(value, np.generic) else value


def _numbers(values: list[Any] | np.ndarray, spec: FeatureSpec, target: str, name: str,
             problems: ViolationList, width: int) -> np.ndarray | None:
    """Numbers (and booleans) checked against the spec, then cast to the target datatype.

    Clean columns take a fast path (plain Python for a few values, where numpy's per-call
    overhead would dominate; one combined mask for many); only a column with a problem is
    examined in detail to name every offending row.
    """
    if target in FLOAT_TYPES and isinstance(values, list) and len(values) <= _SMALL and _small_clean(values, spec):
        return np.array(values, dtype=NUMPY_DTYPES[target])
    null = None
    data: np.ndarray | None
    if isinstance(values, np.ndarray):
        data = values.astype(np.float64)
    elif spec.type != "bool" and all(type(v) in _NUMBER_TYPES for v in values):
        data = np.array(values, dtype=np.float64)
    else:
        data, null = _numbers_slow(values, spec, name, problems, width)
    if data is None:
        return None
    if null is None and target in FLOAT_TYPES and spec.type != "bool" and _clean(data, spec):
        return data.astype(NUMPY_DTYPES[target])

    if spec.type == "int":
        fractional = np.flatnonzero(np.isfinite(data) & (data != np.floor(data)))
        _add_rows(problems, name, "type", "an integer", fractional, values, width)
    if spec.type == "bool" and isinstance(values, np.ndarray):
        not_bool = np.flatnonzero((data != 0) & (data != 1))
        _add_rows(problems, name, "type", "true/false or 0/1", not_bool, values, width)

    nan = np.isnan(data) if null is None else np.isnan(data) & ~null
    if not spec.allow_nan and nan.any():
        _add_rows(problems, name, "nan", "a finite number (NaN not allowed)", np.flatnonzero(nan), values, width)
    inf = np.isinf(data)
    if not spec.allow_inf and inf.any():
        _add_rows(problems, name, "inf", "a finite number (infinity not allowed)", np.flatnonzero(inf), values, width)
    finite = np.isfinite(data)
    if spec.min is not None:
        _add_rows(problems, name, "range", f">= {spec.min:g}", np.flatnonzero(finite & (data < spec.min)),
                  values, width)
    if spec.max is not None:
        _add_rows(problems, name, "range", f"<= {spec.max:g}", np.flatnonzero(finite & (data > spec.max)),
                  values, width)

    if null is not None and null.any():
        if not spec.nullable:
            _add_rows(problems, name, "null", f"a {spec.type} (field is not nullable)", np.flatnonzero(null),
                      values, width)
        elif spec.default is not None:
            data[null] = float(spec.default)
        elif target not in FLOAT_TYPES:
            problems.add(Violation(name, "null", f"a value (model input is {target}; give the feature a default)",
                                   "null"))
    if target in INT_TYPES or target == "BOOL":
        info = np.iinfo(NUMPY_DTYPES[target]) if target != "BOOL" else None
        if info is not None:
            out = np.flatnonzero(np.isfinite(data) & ((data < info.min) | (data > info.max)))
            _add_rows(problems, name, "range", f"within {target} range", out, values, width)
        if not np.isfinite(data).all():
            return None
    return data.astype(NUMPY_DTYPES[target])


def _small_clean(values: list[Any], spec: FeatureSpec) -> bool:
    """Whether a short list is all plain numbers within the spec (no NaN, inf, null or bool)."""
    lo, hi = spec.min, spec.max
    whole = spec.type == "int"
    for v in values:
        kind = type(v)
        if kind is float:
            if math.isnan(v) or v in _INFINITIES or (whole and not v.is_integer()):
                return False
        elif kind is not int or spec.type == "bool":
            return kind is bool and spec.type == "bool" and all(type(x) is bool for x in values)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return False
    return True


def _clean(data: np.ndarray, spec: FeatureSpec) -> bool:
    """Whether a float64 column has nothing to report (one pass of combined masks)."""
    finite = np.isfinite(data)
    if not finite.all():
        return False
    if spec.min is not None and (data < spec.min).any():
        return False
    if spec.max is not None and (data > spec.max).any():
        return False
    return not (spec.type == "int" and (data != np.floor(data)).any())


def _numbers_slow(values: list[Any], spec: FeatureSpec, name: str, problems: ViolationList,
                  width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    data = np.empty(len(values), dtype=np.float64)
    null = np.zeros(len(values), dtype=bool)
    expected = "true/false or 0/1" if spec.type == "bool" else "a number"
    bad = False
    for i, value in enumerate(values):
        kind = type(value)
        if value is None:
            null[i] = True
            data[i] = np.nan
        elif kind is bool:
            if spec.type == "bool":
                data[i] = 1.0 if value else 0.0
            else:
                bad = True
                problems.add(Violation(name, "type", expected, _describe(value), row=i // width))
        elif kind in _NUMBER_TYPES:
            if spec.type == "bool" and value not in (0, 1):
                bad = True
                problems.add(Violation(name, "type", expected, _describe(value), row=i // width))
            data[i] = value
        else:
            bad = True
            problems.add(Violation(name, "type", expected, _describe(value), row=i // width))
    return (None, None) if bad else (data, null)


def _strings(values: list[Any] | np.ndarray, spec: FeatureSpec, name: str,
             problems: ViolationList) -> np.ndarray | None:
    items = values.tolist() if isinstance(values, np.ndarray) else values
    out: list[str] = []
    allowed = frozenset(spec.values) if spec.values is not None else None
    expected_category = f"one of {spec.values}" if spec.values is not None else ""
    for i, item in enumerate(items):
        value = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
        if value is None:
            if not spec.nullable:
                problems.add(Violation(name, "null", f"a {spec.type} (field is not nullable)", "null", row=i))
                continue
            out.append(spec.default if isinstance(spec.default, str) else "")
            continue
        if not isinstance(value, str):
            problems.add(Violation(name, "type", "a string", _describe(value), row=i))
            continue
        if allowed is not None and value not in allowed:
            problems.add(Violation(name, "category", expected_category, _describe(value), row=i))
        elif spec.max_length is not None and len(value) > spec.max_length:
            problems.add(Violation(name, "length", f"at most {spec.max_length} characters",
                                   f"{len(value)} characters", row=i))
        out.append(value)
    return np.array(out, dtype=object) if len(out) == len(items) else None

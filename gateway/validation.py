"""Request columns -> a validated numpy batch for one model version, or every violation found.

A `RequestValidator` is compiled once per (signature, policy) pair. It works on whole columns
with numpy; only a column that fails the fast type check is walked element by element, and then
only to name the offending rows. It never stops at the first problem: the client gets all of them
(up to a listing limit; the total is always counted).
"""

from __future__ import annotations

import math
import sys
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
#: largest finite value of the narrower float targets (FP64's range is float64's own)
_FLOAT_LIMITS = {"FP16": float(np.finfo(np.float16).max), "FP32": float(np.finfo(np.float32).max)}


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
        self._quick = _quick_plans(plans)
        self._row = _RowPlan.of(plans)

    def validate(self, columns: dict[str, Column]) -> ValidatedBatch:
        """Return the feeds, or raise SchemaViolation listing every problem."""
        quick = self._validate_quick(columns) if self._quick is not None else None
        if quick is not None:
            return quick
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

    def _validate_quick(self, columns: dict[str, Column]) -> ValidatedBatch | None:
        """The common case in a fraction of the time: a few rows, every field present as plain
        values that pass their checks. None means "not that case": the full path then decides,
        with its messages. Both paths accept exactly the same requests, with the same feeds."""
        assert self._quick is not None
        ignored = [name for name in columns if name not in self.known_fields]
        if ignored and self.reject_unknown:
            return None
        if self._row is not None:
            feeds = self._row.feeds(columns)
            if feeds is not None:
                return ValidatedBatch(feeds=feeds, rows=1, ignored_fields=ignored)
        rows = -1
        feeds = {}
        for source, name, rank2, accepts, convert in self._quick:
            column = columns.get(source)
            if column is None or column.absent_rows or type(column.values) is not list:
                return None
            if column.declared is not None and column.declared not in accepts:
                return None
            shape = column.shape
            n = len(column.values)
            if shape is not None and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                return None
            if rows < 0:
                rows = n
                if not 0 < rows <= _SMALL or (self.max_batch_size is not None and rows > self.max_batch_size):
                    return None
            elif n != rows:
                return None
            array = convert(column.values)
            if array is None:
                return None
            feeds[name] = array.reshape((rows, 1) if rank2 else (rows,))
        return ValidatedBatch(feeds=feeds, rows=rows, ignored_fields=ignored) if rows > 0 else None

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
            array = _strings(column.values, plan.feature, name, problems, _width(plan.input))
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


class _RowPlan:
    """One row of many numeric features, checked as one vector: for models with dozens of float
    inputs, per-column work dominated. Same acceptance and same feeds as the per-column paths;
    anything else (several rows, a string, a bool, null, a bound broken) returns None."""

    _EXACT = 2**53  # ints beyond this would round differently via float64

    def __init__(self, plans: list[_Plan]) -> None:
        target = plans[0].input.datatype
        self.sources = [p.source for p in plans]
        self.names = [p.input.name for p in plans]
        self.shapes = [(1, 1) if len(p.input.shape) == 2 else (1,) for p in plans]
        self.same_rank = len(set(self.shapes)) == 1
        self.accepts = frozenset(d for d in NUMPY_DTYPES if is_safe_cast(d, target))
        self.low = np.array([p.feature.min if p.feature.min is not None else -math.inf for p in plans])
        self.high = np.array([p.feature.max if p.feature.max is not None else math.inf for p in plans])
        self.limit = _FLOAT_LIMITS.get(target, sys.float_info.max)
        self.whole = np.array([p.feature.type == "int" for p in plans])
        self.any_whole = bool(self.whole.any())
        self.dtype = NUMPY_DTYPES[target]

    @classmethod
    def of(cls, plans: list[_Plan]) -> _RowPlan | None:
        """A plan when every input is a per-row float input fed by a float or int feature of one type."""
        if not plans or len({p.input.datatype for p in plans}) != 1 or plans[0].input.datatype not in FLOAT_TYPES:
            return None
        if not all(p.per_row and p.feature.type in ("float", "int") for p in plans):
            return None
        return cls(plans)

    def feeds(self, columns: dict[str, Column]) -> dict[str, np.ndarray] | None:
        """The feeds of a one-row request that passes every check, else None."""
        values = []
        exact = self._EXACT
        for source in self.sources:
            column = columns.get(source)
            if column is None or column.absent_rows or type(column.values) is not list or len(column.values) != 1:
                return None
            if column.declared is not None and column.declared not in self.accepts:
                return None
            shape = column.shape
            if shape is not None and shape not in ((1,), (1, 1)):
                return None
            value = column.values[0]
            kind = type(value)
            if kind is not float and (kind is not int or not -exact <= value <= exact):
                return None
            values.append(value)
        row = np.array(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # NaN compares false: it fails the bounds and leaves
            if not ((self.low <= row) & (row <= self.high) & (np.abs(row) <= self.limit)).all():
                return None
        if self.any_whole and not (row[self.whole] == np.floor(row[self.whole])).all():
            return None
        cast = row.astype(self.dtype)
        if self.same_rank:  # one view per input, made by numpy's own iteration
            return dict(zip(self.names, cast.reshape(len(self.names), *self.shapes[0]), strict=True))
        return {name: cast[i:i + 1].reshape(shape) for i, (name, shape) in enumerate(zip(self.names, self.shapes,
                                                                                            strict=True))}


#: (field, model input, input is [-1, 1], client datatypes that convert safely, list -> array or None)
_QuickPlan = tuple[str, str, bool, frozenset[str], "Any"]


def _quick_plans(plans: list[_Plan]) -> list[_QuickPlan] | None:
    """Per input, a converter for small clean lists; None when some input is outside the quick path."""
    quick: list[_QuickPlan] = []
    for plan in plans:
        target, spec = plan.input.datatype, plan.feature
        if not plan.per_row:
            return None
        accepts = frozenset(d for d in NUMPY_DTYPES if is_safe_cast(d, target))
        if spec.type in ("category", "string"):
            if target != "BYTES":
                return None
            convert = _quick_strings(spec)
        elif target in FLOAT_TYPES:
            convert = _quick_floats(spec, target)
        elif target in INT_TYPES and spec.type == "int":
            convert = _quick_ints(spec, target)
        else:
            return None
        quick.append((plan.source, plan.input.name, len(plan.input.shape) == 2, accepts, convert))
    return quick


def _quick_floats(spec: FeatureSpec, target: str) -> Any:
    """`_small_clean` specialised to one feature (no per-call lookups), then the cast."""
    dtype = NUMPY_DTYPES[target]
    if spec.type == "bool":
        def convert_bools(values: list[Any]) -> np.ndarray | None:
            for v in values:
                if type(v) is not bool:
                    return None
            return np.array(values, dtype=dtype)
        return convert_bools
    lo = spec.min if spec.min is not None else -math.inf
    hi = spec.max if spec.max is not None else math.inf
    whole = spec.type == "int"
    limit = _FLOAT_LIMITS.get(target, sys.float_info.max)

    def convert(values: list[Any]) -> np.ndarray | None:
        for v in values:
            kind = type(v)
            if kind is float:  # NaN fails every comparison, so it leaves here too
                if not lo <= v <= hi or not abs(v) <= limit or (whole and not v.is_integer()):
                    return None
            elif kind is not int or not lo <= v <= hi or not abs(v) <= limit:
                return None
        return np.array(values, dtype=dtype)
    return convert


def _quick_ints(spec: FeatureSpec, target: str) -> Any:
    dtype = NUMPY_DTYPES[target]
    info = np.iinfo(dtype)
    # within +-2**53 the full path's float64 comparisons are exact; beyond, it decides
    lo = max(int(info.min), -(2**53), math.ceil(spec.min) if spec.min is not None else -(2**53))
    hi = min(int(info.max), 2**53, math.floor(spec.max) if spec.max is not None else 2**53)

    def convert(values: list[Any]) -> np.ndarray | None:
        for v in values:
            if type(v) is not int or not lo <= v <= hi:
                return None
        return np.array(values, dtype=dtype)
    return convert


def _quick_strings(spec: FeatureSpec) -> Any:
    allowed = frozenset(spec.values) if spec.values is not None else None
    longest = spec.max_length

    def convert(values: list[Any]) -> np.ndarray | None:
        for v in values:
            if type(v) is not str or (allowed is not None and v not in allowed) or (
                    longest is not None and len(v) > longest):
                return None
        return np.array(values, dtype=object)
    return convert


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
    examined in detail, to name every offending row.
    """
    dtype = NUMPY_DTYPES[target]
    if target in FLOAT_TYPES and isinstance(values, list) and len(values) <= _SMALL and \
            _small_clean(values, spec, target):
        return np.array(values, dtype=dtype)
    before = problems.total
    skip = None  # elements already reported as the wrong type, or null: no value checks for them
    null = None
    data = values.astype(np.float64) if isinstance(values, np.ndarray) else _plain_numbers(values, spec)
    if data is None:
        assert isinstance(values, list)
        data, null, invalid = _numbers_slow(values, spec, name, problems, width)
        skip = null | invalid
    elif target in FLOAT_TYPES and spec.type != "bool" and _clean(data, spec, target):
        return data.astype(dtype)

    checked = ~skip if skip is not None else np.ones(len(data), dtype=bool)
    finite = np.isfinite(data) & checked

    def report(reason: str, expected: str, mask: np.ndarray) -> None:
        _add_rows(problems, name, reason, expected, np.flatnonzero(mask), values, width)

    if spec.type == "int":
        report("type", "an integer", finite & (data != np.floor(data)))
    if spec.type == "bool" and isinstance(values, np.ndarray):
        report("type", "true/false or 0/1", (data != 0) & (data != 1))
    if not spec.allow_nan:
        report("nan", "a finite number (NaN not allowed)", np.isnan(data) & checked)
    if not spec.allow_inf:
        report("inf", "a finite number (infinity not allowed)", np.isinf(data) & checked)
    in_range = finite.copy()
    if spec.min is not None:
        report("range", f">= {spec.min:g}", finite & (data < spec.min))
        in_range &= data >= spec.min
    if spec.max is not None:
        report("range", f"<= {spec.max:g}", finite & (data > spec.max))
        in_range &= data <= spec.max
    if target in INT_TYPES:  # only values the policy allows can still overflow the model's type
        info = np.iinfo(dtype)
        # float(info.max) rounds up to 2**63 for 64-bit types; `>=` that bound is exact for every width
        report("range", f"within {target} range", in_range & ((data < info.min) | (data >= float(info.max) + 1)))
    elif target in _FLOAT_LIMITS:
        report("range", f"within {target} range", in_range & (np.abs(data) > _FLOAT_LIMITS[target]))

    if null is not None and null.any():
        if not spec.nullable:
            report("null", f"a {spec.type} (field is not nullable)", null)
        elif spec.default is not None:
            data[null] = float(spec.default)
        elif target not in FLOAT_TYPES:
            problems.add(Violation(name, "null", f"a value (model input is {target}; give the feature a default)",
                                   "null"))
    if problems.total > before:
        return None
    if target in INT_TYPES and null is None and isinstance(values, list):
        return np.array(values, dtype=dtype)  # exact: integers above 2**53 do not survive float64
    return data.astype(dtype)


def _plain_numbers(values: list[Any], spec: FeatureSpec) -> np.ndarray | None:
    """float64 array of a list of plain ints and floats; None when anything else (or too large) is in it."""
    if spec.type == "bool" or not all(type(v) in _NUMBER_TYPES for v in values):
        return None
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float64: the slow path names it
        return None


def _small_clean(values: list[Any], spec: FeatureSpec, target: str) -> bool:
    """Whether a short list is all plain values within the spec and the target type's range."""
    if spec.type == "bool":
        return all(type(v) is bool for v in values)
    lo, hi = spec.min, spec.max
    whole = spec.type == "int"
    limit = _FLOAT_LIMITS.get(target, sys.float_info.max)  # never inf: infinities take the full path
    for v in values:
        kind = type(v)
        if kind is float:
            if math.isnan(v) or not abs(v) <= limit or (whole and not v.is_integer()):
                return False
        elif kind is not int or not abs(v) <= limit:
            return False
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return False
    return True


def _clean(data: np.ndarray, spec: FeatureSpec, target: str) -> bool:
    """Whether a float64 column has nothing to report (one pass of combined masks)."""
    if not np.isfinite(data).all():
        return False
    if target in _FLOAT_LIMITS and (np.abs(data) > _FLOAT_LIMITS[target]).any():
        return False
    if spec.min is not None and (data < spec.min).any():
        return False
    if spec.max is not None and (data > spec.max).any():
        return False
    return not (spec.type == "int" and (data != np.floor(data)).any())


def _numbers_slow(values: list[Any], spec: FeatureSpec, name: str, problems: ViolationList,
                  width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Element by element: float64 data, the null mask, and the mask of elements reported here."""
    data = np.full(len(values), np.nan, dtype=np.float64)
    null = np.zeros(len(values), dtype=bool)
    invalid = np.zeros(len(values), dtype=bool)
    expected = "true/false or 0/1" if spec.type == "bool" else "a number"
    for i, value in enumerate(values):
        kind = type(value)
        if value is None:
            null[i] = True
        elif kind is bool and spec.type == "bool":
            data[i] = 1.0 if value else 0.0
        elif kind in _NUMBER_TYPES and (spec.type != "bool" or value in (0, 1)):
            try:
                data[i] = value
            except OverflowError:
                invalid[i] = True
                problems.add(Violation(name, "range", "a number within float64 range", "a larger integer",
                                       row=i // width))
        else:
            invalid[i] = True
            problems.add(Violation(name, "type", expected, _describe(value), row=i // width))
    return data, null, invalid


def _strings(values: list[Any] | np.ndarray, spec: FeatureSpec, name: str,
             problems: ViolationList, width: int) -> np.ndarray | None:
    items = values.tolist() if isinstance(values, np.ndarray) else values
    out: list[str] = []
    allowed = frozenset(spec.values) if spec.values is not None else None
    expected_category = f"one of {spec.values}" if spec.values is not None else ""
    for i, item in enumerate(items):
        value = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
        if value is None:
            if not spec.nullable:
                problems.add(Violation(name, "null", f"a {spec.type} (field is not nullable)", "null", row=i // width))
                continue
            out.append(spec.default if isinstance(spec.default, str) else "")
            continue
        if not isinstance(value, str):
            problems.add(Violation(name, "type", "a string", _describe(value), row=i // width))
            continue
        if allowed is not None and value not in allowed:
            problems.add(Violation(name, "category", expected_category, _describe(value), row=i // width))
        elif spec.max_length is not None and len(value) > spec.max_length:
            problems.add(Violation(name, "length", f"at most {spec.max_length} characters",
                                   f"{len(value)} characters", row=i // width))
        out.append(value)
    return np.array(out, dtype=object) if len(out) == len(items) else None

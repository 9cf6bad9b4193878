"""The fallback rule language: conditions over a row's features, parsed once, never `eval`-ed.

Grammar (keywords are lower case; `null`, `true` and `false` are literals):

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | test
    test       := operand [compare operand | ["not"] "in" list | "is" ["not"] "null"]
    compare    := "<" | "<=" | ">" | ">=" | "==" | "!="
    operand    := NUMBER | STRING | "true" | "false" | FEATURE | "(" condition ")"
    list       := "[" [literal ("," literal)*] "]"

Examples: `income < 10000 and employment in ["unemployed", "student"]`,
`credit_history_years is null or not (debt_to_income <= 0.6)`.

There are no calls, attributes, indexing or arithmetic, so nothing but feature values can be
read. Conditions evaluate on whole validated columns at once (numpy); a comparison with a
null (NaN) value is false, as in SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["number", "string", "bool"]
Scalar = float | str | bool


class RuleError(ValueError):
    """A condition that does not parse or does not fit the features; `column` is 1-based."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} (at column {column})")
        self.column = column


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>|\(|\)|\[|\]|,)
""", re.VERBOSE)
_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
_COMPARE = frozenset({"<", "<=", ">", ">=", "==", "!="})
MAX_NESTING = 50


@dataclass(frozen=True)
class _Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    column: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:  # reported by the parser when it gets there, after any earlier problem
            out.append(_Token("bad", text[position], position + 1))
            position += 1
            continue
        kind = match.lastgroup or ""
        if kind != "space":
            value = match.group()
            if kind == "name" and value in _KEYWORDS:
                kind = "keyword"
            out.append(_Token(kind, value, position + 1))
        position = match.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


# --- the syntax tree --------------------------------------------------------------------------

@dataclass(frozen=True)
class Constant:
    """A number, string or boolean constant."""

    value: Scalar
    column: int = field(default=1, compare=False)


@dataclass(frozen=True)
class Feature:
    """A reference to a feature's value in the current row."""

    name: str
    column: int


@dataclass(frozen=True)
class Compare:
    """`left op right`."""

    op: str
    left: Constant | Feature
    right: Constant | Feature


@dataclass(frozen=True)
class In:
    """`feature [not] in [literals]`."""

    operand: Constant | Feature
    items: tuple[Constant, ...]
    negated: bool

    @property
    def values(self) -> tuple[Scalar, ...]:
        """The listed constants' values."""
        return tuple(item.value for item in self.items)


@dataclass(frozen=True)
class IsNull:
    """`feature is [not] null`."""

    operand: Feature
    negated: bool


@dataclass(frozen=True)
class BoolOp:
    """`and` / `or` over two or more conditions."""

    op: Literal["and", "or"]
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    """`not condition`."""

    item: Node


@dataclass(frozen=True)
class Truth:
    """A bare operand used as a condition (a bool feature, or `true` / `false`)."""

    operand: Constant | Feature


Node = Compare | In | IsNull | BoolOp | Not | Truth


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.depth = 0

    def take(self) -> _Token:
        token = self.peek()
        self.at += 1
        return token

    def peek(self) -> _Token:
        token = self.tokens[self.at]
        if token.kind == "bad":
            what = "unterminated string" if token.text in "\"'" else f"unexpected character {token.text!r}"
            raise RuleError(what, token.column)
        return token

    def accept(self, text: str) -> bool:
        token = self.peek()
        if token.kind in ("keyword", "op") and token.text == text:
            self.at += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            token = self.peek()
            found = token.text or "the end"
            raise RuleError(f"expected {text!r}, found {found!r}", token.column)

    def parse(self) -> Node:
        node = self.or_()
        token = self.peek()
        if token.kind != "end":
            hint = " (calls are not allowed)" if token.text == "(" else ""
            raise RuleError(f"unexpected {token.text!r}{hint}", token.column)
        return node

    def or_(self) -> Node:
        items = [self.and_()]
        while self.accept("or"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def and_(self) -> Node:
        items = [self.not_()]
        while self.accept("and"):
            items.append(self.not_())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def not_(self) -> Node:
        column = self.peek().column
        if self.accept("not"):
            self._enter(column)
            inner = Not(self.not_())
            self.depth -= 1
            return inner
        return self.test()

    def _enter(self, column: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise RuleError(f"nested more than {MAX_NESTING} levels deep", column)

    def test(self) -> Node:
        column = self.peek().column
        if self.accept("("):
            self._enter(column)
            inner = self.or_()
            self.expect(")")
            self.depth -= 1
            return inner
        left = self.operand()
        token = self.peek()
        if token.kind == "op" and token.text in _COMPARE:
            self.take()
            return Compare(token.text, left, self.operand())
        if self.accept("is"):
            negated = self.accept("not")
            self.expect("null")
            if not isinstance(left, Feature):
                raise RuleError("`is null` applies to a feature", token.column)
            return IsNull(left, negated)
        if token.kind == "keyword" and token.text in ("in", "not"):
            negated = self.accept("not")
            self.expect("in")
            return In(left, self.literal_list(), negated)
        return Truth(left)

    def operand(self) -> Constant | Feature:
        token = self.take()
        if token.kind == "number":
            return Constant(float(token.text), token.column)
        if token.kind == "string":
            return Constant(_unquote(token.text), token.column)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Constant(token.text == "true", token.column)
        if token.kind == "name":
            if self.peek().text == "(":
                raise RuleError(f"calls are not allowed ({token.text!r} is followed by '(')", self.peek().column)
            return Feature(token.text, token.column)
        found = token.text or "the end"
        raise RuleError(f"expected a feature, number or string, found {found!r}", token.column)

    def literal_list(self) -> tuple[Constant, ...]:
        self.expect("[")
        values: list[Constant] = []
        if not self.accept("]"):
            while True:
                item = self.operand()
                if not isinstance(item, Constant):
                    raise RuleError(f"a list holds constants, not the feature {item.name!r}", item.column)
                values.append(item)
                if self.accept("]"):
                    break
                self.expect(",")
        return tuple(values)


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def parse_condition(text: str) -> Node:
    """Parse a condition, or raise RuleError naming the column of the problem."""
    if len(text) > 2000:
        raise RuleError("condition is longer than 2000 characters", 1)
    return _Parser(text).parse()


# --- checking against the features ------------------------------------------------------------

def check_condition(node: Node, features: Mapping[str, Kind]) -> None:
    """Raise RuleError if the condition names an unknown feature or compares unlike kinds."""
    _kind_of_node(node, features)


def _operand_kind(operand: Constant | Feature, features: Mapping[str, Kind]) -> Kind:
    if isinstance(operand, Feature):
        if operand.name not in features:
            raise RuleError(f"unknown feature {operand.name!r}; features: {sorted(features)}", operand.column)
        return features[operand.name]
    value = operand.value
    return "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


def _kind_of_node(node: Node, features: Mapping[str, Kind]) -> None:
    if isinstance(node, BoolOp):
        for item in node.items:
            _kind_of_node(item, features)
    elif isinstance(node, Not):
        _kind_of_node(node.item, features)
    elif isinstance(node, IsNull):
        _operand_kind(node.operand, features)
    elif isinstance(node, Truth):
        if _operand_kind(node.operand, features) != "bool":
            raise RuleError("only a bool feature or true/false can stand alone as a condition", _col(node.operand))
    elif isinstance(node, In):
        kind = _operand_kind(node.operand, features)
        for listed in node.items:
            if _operand_kind(listed, features) != kind:
                raise RuleError(f"list value {listed.value!r} is not a {kind}", listed.column)
    else:
        left, right = _operand_kind(node.left, features), _operand_kind(node.right, features)
        if left != right:
            raise RuleError(f"cannot compare a {left} with a {right}", _col(node.left))
        if left != "number" and node.op not in ("==", "!="):
            raise RuleError(f"{node.op} compares numbers; use == or != for {left} values", _col(node.left))


def _col(operand: Constant | Feature) -> int:
    return operand.column


# --- evaluation -------------------------------------------------------------------------------

Columns = Mapping[str, np.ndarray]
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def evaluate(node: Node, columns: Columns, rows: int) -> np.ndarray:
    """A boolean mask over the rows: where the condition holds (null comparisons are false).

    Constants take the dtype of the feature they are compared with, so `x > 0.6` means the same
    whether `x` reached the rules as float32 (the model's feed) or float64.
    """
    if isinstance(node, BoolOp):
        masks = [evaluate(item, columns, rows) for item in node.items]
        return _mask(np.logical_and.reduce(masks) if node.op == "and" else np.logical_or.reduce(masks))
    if isinstance(node, Not):
        return _mask(~evaluate(node.item, columns, rows))
    if isinstance(node, IsNull):
        nulls = _nulls(columns[node.operand.name])
        return _mask(~nulls if node.negated else nulls)
    if isinstance(node, Truth):
        value = _values(node.operand, columns, rows, None)
        return _mask(np.asarray(value == 1, dtype=bool) & ~_nulls(value))
    if isinstance(node, In):
        values = _values(node.operand, columns, rows, None)
        listed = np.array(node.values, dtype=values.dtype if values.dtype.kind != "O" else object)
        found = np.isin(values, listed) & ~_nulls(values)
        return _mask(~found & ~_nulls(values) if node.negated else found)
    like = _feature_dtype(node.left, columns) or _feature_dtype(node.right, columns)
    left, right = _values(node.left, columns, rows, like), _values(node.right, columns, rows, like)
    known = ~_nulls(left) & ~_nulls(right)
    if node.op == "==":
        return _mask(np.asarray(left == right, dtype=bool) & known)
    if node.op == "!=":
        return _mask(np.asarray(left != right, dtype=bool) & known)
    with np.errstate(invalid="ignore"):
        return _mask(np.asarray(_OPS[node.op](left, right), dtype=bool) & known)


def _feature_dtype(operand: Constant | Feature, columns: Columns) -> np.dtype[Any] | None:
    return columns[operand.name].dtype if isinstance(operand, Feature) else None


def _mask(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=bool)


def _values(operand: Constant | Feature, columns: Columns, rows: int, like: np.dtype[Any] | None) -> np.ndarray:
    if isinstance(operand, Feature):
        return columns[operand.name]
    value = operand.value
    if isinstance(value, str):
        return np.full(rows, value, dtype=object)
    dtype = like if like is not None and like.kind == "f" else np.dtype(np.float64)
    return np.full(rows, float(value), dtype=dtype)


def _nulls(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return _mask(np.isnan(values))
    if values.dtype.kind == "O":
        return np.array([v is None or v == "" for v in values], dtype=bool)
    return np.zeros(values.shape, dtype=bool)

"""The fallback rule language: parsing, checking against the features, and vectorised evaluation."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules import (
    MAX_NESTING,
    BoolOp,
    Compare,
    Constant,
    Feature,
    In,
    IsNull,
    Kind,
    Node,
    Not,
    RuleError,
    Truth,
    check_condition,
    evaluate,
    parse_condition,
)

FEATURES: dict[str, Kind] = {
    "income": "number", "age": "number", "employment": "string", "purpose": "string",
    "has_cosigner": "bool", "a": "bool", "b": "bool", "c": "bool",
}


def parse(text: str) -> Node:
    return parse_condition(text)


def checked(text: str, features: Mapping[str, Kind] = FEATURES) -> Node:
    node = parse_condition(text)
    check_condition(node, features)
    return node


def rule_error(text: str, features: Mapping[str, Kind] = FEATURES) -> RuleError:
    with pytest.raises(RuleError) as caught:
        checked(text, features)
    return caught.value


def mask(text: str, columns: Mapping[str, np.ndarray]) -> list[bool]:
    rows = len(next(iter(columns.values())))
    result = evaluate(checked(text), columns, rows)
    assert result.dtype == np.bool_ and result.shape == (rows,)
    return [bool(v) for v in result]


def col(text: str, fragment: str) -> int:
    """1-based column of the first occurrence of `fragment` in `text`."""
    assert fragment in text
    return text.index(fragment) + 1


# --- parsing ----------------------------------------------------------------------------------

def test_and_binds_tighter_than_or_and_not_tighter_than_and() -> None:
    text = "a or b and not c"
    assert parse(text) == BoolOp("or", (
        Truth(Feature("a", 1)),
        BoolOp("and", (Truth(Feature("b", 6)), Not(Truth(Feature("c", 16))))),
    ))


def test_not_applies_to_a_whole_comparison() -> None:
    assert parse("not income > 5") == Not(Compare(">", Feature("income", 5), Constant(5.0)))


def test_not_not() -> None:
    assert parse("not not a") == Not(Not(Truth(Feature("a", 9))))


def test_parentheses_override_precedence() -> None:
    assert parse("(a or b) and c") == BoolOp("and", (
        BoolOp("or", (Truth(Feature("a", 2)), Truth(Feature("b", 7)))),
        Truth(Feature("c", 14)),
    ))
    assert parse("not (a and b)") == Not(BoolOp("and", (Truth(Feature("a", 6)), Truth(Feature("b", 12)))))
    assert parse("((a))") == Truth(Feature("a", 3))


def test_chains_of_one_operator_are_flat() -> None:
    node = parse("a or b or c")
    assert isinstance(node, BoolOp) and node.op == "or" and len(node.items) == 3
    node = parse("a and b and c")
    assert isinstance(node, BoolOp) and node.op == "and" and len(node.items) == 3


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_operator(op: str) -> None:
    assert parse(f"income {op} 10") == Compare(op, Feature("income", 1), Constant(10.0))
    assert parse(f"10{op}income") == Compare(op, Constant(10.0), Feature("income", 3 + len(op)))


def _in(text: str) -> tuple[Feature | Constant, tuple[object, ...], bool]:
    node = parse(text)
    assert isinstance(node, In)
    return node.operand, node.values, node.negated


def test_in_and_not_in_lists() -> None:
    assert _in('employment in ["a", \'b\']') == (Feature("employment", 1), ("a", "b"), False)
    assert _in("age not in [1, 2.5, -3]") == (Feature("age", 1), (1.0, 2.5, -3.0), True)
    assert _in("age in []") == (Feature("age", 1), (), False)
    assert _in("a in [true, false]") == (Feature("a", 1), (True, False), False)


def test_is_null_and_is_not_null() -> None:
    assert parse("income is null") == IsNull(Feature("income", 1), negated=False)
    assert parse("income is not null") == IsNull(Feature("income", 1), negated=True)


@pytest.mark.parametrize(("literal", "value"), [
    ('"plain"', "plain"),
    ("'single'", "single"),
    ('"it\'s"', "it's"),
    ("'say \"hi\"'", 'say "hi"'),
    (r'"esc \"quote\""', 'esc "quote"'),
    (r"'it\'s'", "it's"),
    (r'"back\\slash"', "back\\slash"),
    ('""', ""),
    ('"and or not in is null"', "and or not in is null"),
    ('"ünïcödé ✓"', "ünïcödé ✓"),
])
def test_strings_with_both_quote_kinds_and_escapes(literal: str, value: str) -> None:
    assert parse(f"employment == {literal}") == Compare("==", Feature("employment", 1), Constant(value))


@pytest.mark.parametrize(("literal", "value"), [
    ("0", 0.0), ("42", 42.0), ("-7", -7.0), ("3.25", 3.25), (".5", 0.5), ("7.", 7.0),
    ("1e3", 1000.0), ("2.5E-2", 0.025), ("-1.5e+3", -1500.0), ("-.5", -0.5),
])
def test_numbers_including_negative_and_exponent(literal: str, value: float) -> None:
    node = parse(f"income > {literal}")
    assert node == Compare(">", Feature("income", 1), Constant(value))
    assert isinstance(node, Compare) and isinstance(node.right, Constant) and type(node.right.value) is float


def test_numbers_need_no_spaces_around_operators() -> None:
    assert parse("income>-1") == Compare(">", Feature("income", 1), Constant(-1.0))


def test_true_and_false() -> None:
    assert parse("true") == Truth(Constant(True))
    assert parse("has_cosigner == false") == Compare("==", Feature("has_cosigner", 1), Constant(False))
    node = parse("true")
    assert isinstance(node, Truth) and isinstance(node.operand, Constant) and node.operand.value is True


def test_keywords_are_lower_case_only() -> None:
    # `AND` is a name, so it is trailing junk after a complete condition
    error = rule_error("a AND b")
    assert error.column == 3


def test_whitespace_of_any_kind_is_ignored() -> None:
    assert parse("\tincome\n>\r\n 5 ") == Compare(">", Feature("income", 2), Constant(5.0))


def test_the_bundled_examples_parse_and_check() -> None:
    kinds: dict[str, Kind] = {"income": "number", "employment": "string", "credit_history_years": "number",
                              "debt_to_income": "number"}
    checked('income < 10000 and employment in ["unemployed", "student"]', kinds)
    checked("credit_history_years is null or not (debt_to_income <= 0.6)", kinds)


# --- errors, with the column of the problem ---------------------------------------------------

@pytest.mark.parametrize(("text", "column", "fragment"), [
    ("__import__('os')", 11, "calls are not allowed ('__import__' is followed by '(')"),
    ('open("x")', 5, "calls are not allowed ('open' is followed by '(')"),
    ("f(income)", 2, "calls are not allowed ('f' is followed by '(')"),
    ("income > 0 and __class__()", 25, "calls are not allowed"),
    ("income.real > 0", 7, "unexpected character '.'"),
    ("x[0]", 2, "unexpected '['"),
    ("a + 1", 3, "unexpected character '+'"),
    ("income * 2 > 1", 8, "unexpected character '*'"),
    ("lambda: 1", 7, "unexpected character ':'"),
    ("lambda x: x", 8, "unexpected 'x'"),
    ("income > 1; import os", 11, "unexpected character ';'"),
    ("`income` > 1", 1, "unexpected character '`'"),
    ('employment == "abc', 15, "unterminated string"),
    ("employment == 'abc", 15, "unterminated string"),
    ("income > 1 income", 12, "unexpected 'income'"),
    ("income > 1)", 11, "unexpected ')'"),
    ("(income > 1", 12, "expected ')', found 'the end'"),
    ("income >", 9, "expected a feature, number or string, found 'the end'"),
    ("income is", 10, "expected 'null', found 'the end'"),
    ("income not 5", 12, "expected 'in', found '5'"),
    ("employment in [purpose]", 16, "a list holds constants, not the feature 'purpose'"),
    ("employment in ['a' 'b']", 20, "expected ',', found \"'b'\""),
    ("employment in 'a'", 15, "expected '[', found \"'a'\""),
    ("income > 1 and", 15, "found 'the end'"),
    ("income == = 1", 11, "unexpected character '='"),
    ("income == < 1", 11, "expected a feature, number or string, found '<'"),
    ("5 is null", 3, "`is null` applies to a feature"),
    ("income > 1 @", 12, "unexpected character '@'"),
])
def test_syntax_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_condition(text)
    error = caught.value
    assert error.column == column, str(error)
    assert fragment in str(error)
    assert str(error).endswith(f"(at column {column})")
    assert isinstance(error, ValueError)  # pydantic reports ValueErrors at the field


def test_the_first_problem_is_reported() -> None:
    # a bad character late in the text does not hide an earlier syntax error, and vice versa
    assert rule_error("income > > 1 $").column == 10
    assert rule_error("income $ > > 1").column == 8


def test_a_call_error_column_points_at_the_parenthesis() -> None:
    text = "income > 0 or __import__('os').system('touch x')"
    error = rule_error(text)
    assert error.column == col(text, "(")
    assert "calls are not allowed ('__import__' is followed by '(')" in str(error)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_an_empty_condition(text: str) -> None:
    error = rule_error(text)
    assert error.column == len(text) + 1
    assert "expected a feature, number or string, found 'the end'" in str(error)


def test_a_dunder_name_is_just_an_unknown_feature() -> None:
    text = "income > 0 and __class__ == 1"
    error = rule_error(text)
    assert error.column == col(text, "__class__")
    assert "unknown feature '__class__'" in str(error)


def test_unknown_feature_names_the_column_and_the_known_features() -> None:
    text = "income > 0 and salary > 1"
    error = rule_error(text)
    assert error.column == col(text, "salary")
    assert f"unknown feature 'salary'; features: {sorted(FEATURES)}" in str(error)


@pytest.mark.parametrize("text", [
    "salary is null", "salary in [1]", "salary", "not salary", "income > 0 or 1 < salary",
])
def test_unknown_features_are_found_everywhere(text: str) -> None:
    error = rule_error(text)
    assert error.column == col(text, "salary")
    assert "unknown feature 'salary'" in str(error)


@pytest.mark.parametrize(("text", "left", "message"), [
    ('income == "x"', "income", "cannot compare a number with a string"),
    ("employment != 5", "employment", "cannot compare a string with a number"),
    ("income > 0 and employment == 5", "employment", "cannot compare a string with a number"),
    ("has_cosigner == 1", "has_cosigner", "cannot compare a bool with a number"),
    ("income == true", "income", "cannot compare a number with a bool"),
    ("income > 0 and income == employment", "income ==", "cannot compare a number with a string"),
])
def test_comparing_unlike_kinds(text: str, left: str, message: str) -> None:
    error = rule_error(text)
    assert message in str(error)
    assert error.column == text.index(left) + 1


@pytest.mark.parametrize(("text", "feature", "op"), [
    ('employment < "b"', "employment", "<"),
    ('income > 0 and purpose >= "car"', "purpose", ">="),
    ("has_cosigner > false", "has_cosigner", ">"),
])
def test_order_comparisons_are_for_numbers_only(text: str, feature: str, op: str) -> None:
    error = rule_error(text)
    assert f"{op} compares numbers; use == or != for" in str(error)
    assert error.column == col(text, feature)


def test_string_equality_is_allowed() -> None:
    checked('employment == "salaried" and purpose != employment')


@pytest.mark.parametrize(("text", "value", "token"), [
    ('income > 0 and employment in ["a", 1]', "1.0", "1]"),
    ("income > 0 and age not in [1, 'two']", "'two'", "'two'"),
    ("income > 0 and has_cosigner in [true, 0]", "0.0", "0]"),
])
def test_in_lists_with_values_of_another_kind(text: str, value: str, token: str) -> None:
    error = rule_error(text)
    assert f"list value {value} is not a" in str(error)
    assert error.column == text.rindex(token) + 1  # the offending value itself


@pytest.mark.parametrize(("text", "at"), [
    ("income", "income"),
    ("age > 1 and income", "income"),
    ("not employment", "employment"),
    ("employment or a", "employment"),
])
def test_a_bare_non_bool_feature_is_not_a_condition(text: str, at: str) -> None:
    error = rule_error(text)
    assert "only a bool feature or true/false can stand alone as a condition" in str(error)
    assert error.column == text.rindex(at) + 1


def test_bare_bool_features_and_constants_are_conditions() -> None:
    checked("has_cosigner and not a or true")


@pytest.mark.parametrize(("text", "at"), [
    ("income > 0 and 5 == employment", "5 =="),
    ("income > 0 and 'x' < 'y'", "'x'"),
    ("income > 0 and 5", "5"),
])
def test_errors_about_a_constant_point_at_the_constant(text: str, at: str) -> None:
    assert rule_error(text).column == col(text, at)


def test_over_long_conditions_are_refused() -> None:
    base = "income > 1"
    exact = base + " " * (2000 - len(base))
    assert parse(exact) == Compare(">", Feature("income", 1), Constant(1.0))
    error = rule_error(exact + " ")
    assert error.column == 1
    assert "longer than 2000 characters" in str(error)
    with pytest.raises(RuleError, match="longer than 2000"):
        parse_condition(" or ".join(["income > 1"] * 10_000))


def test_a_chain_of_not_parses_and_evaluates_up_to_the_nesting_limit() -> None:
    text = "not " * (MAX_NESTING - 1) + "a"
    node = checked(text)
    assert mask(text, {"a": numbers(0.0, 1.0)}) == [True, False]
    assert isinstance(node, Not)
    error = rule_error("not " * (MAX_NESTING + 1) + "a")
    assert f"nested more than {MAX_NESTING} levels" in str(error)


def test_deep_nesting_within_the_length_limit_is_a_rule_error_not_a_crash() -> None:
    text = "(" * 500 + "a" + ")" * 500
    assert len(text) <= 2000
    try:
        node = parse_condition(text)
    except RuleError:
        return  # refusing it (e.g. "nested too deeply") is fine
    assert node == Truth(Feature("a", 501))


# --- evaluation -------------------------------------------------------------------------------

NAN = math.nan


def numbers(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def strings(*values: str | None) -> np.ndarray:
    return np.array(values, dtype=object)


@pytest.mark.parametrize(("op", "expected"), [
    ("<", [True, False, False, False]),
    ("<=", [True, True, False, False]),
    (">", [False, False, True, False]),
    (">=", [False, True, True, False]),
    ("==", [False, True, False, False]),
    ("!=", [True, False, True, False]),
])
def test_numeric_comparisons_are_false_for_null(op: str, expected: list[bool]) -> None:
    columns = {"income": numbers(1.0, 2.0, 3.0, NAN)}
    assert mask(f"income {op} 2", columns) == expected
    mirrored = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[op]
    assert mask(f"2 {mirrored} income", columns) == expected


def test_comparisons_between_two_features() -> None:
    columns = {"income": numbers(1, 5, NAN, 3), "age": numbers(2, 5, 1, NAN)}
    assert mask("income < age", columns) == [True, False, False, False]
    assert mask("income == age", columns) == [False, True, False, False]
    assert mask("income != age", columns) == [True, False, False, False]


def test_string_comparisons_treat_empty_and_none_as_null() -> None:
    columns = {"employment": strings("salaried", "", None, "student")}
    assert mask('employment == "salaried"', columns) == [True, False, False, False]
    assert mask('employment != "salaried"', columns) == [False, False, False, True]
    assert mask('employment == ""', columns) == [False, False, False, False]


def test_is_null_on_numbers_and_strings() -> None:
    columns = {"income": numbers(NAN, 0.0, 1.0), "employment": strings("", None, "x")}
    assert mask("income is null", columns) == [True, False, False]
    assert mask("income is not null", columns) == [False, True, True]
    assert mask("employment is null", columns) == [True, True, False]
    assert mask("employment is not null", columns) == [False, False, True]


def test_not_is_plain_negation_of_a_false_null_comparison() -> None:
    # two-valued logic: a comparison with null is false, so its negation is true
    columns = {"income": numbers(NAN, 1.0, 5.0)}
    assert mask("not (income > 2)", columns) == [True, True, False]
    assert mask("income <= 2", columns) == [False, True, False]


def test_in_and_not_in_exclude_nulls() -> None:
    columns = {"income": numbers(1, 2, 3, NAN), "employment": strings("a", "b", "", None)}
    assert mask("income in [1, 3]", columns) == [True, False, True, False]
    assert mask("income not in [1, 3]", columns) == [False, True, False, False]
    assert mask('employment in ["a", "x"]', columns) == [True, False, False, False]
    assert mask('employment not in ["a", "x"]', columns) == [False, True, False, False]
    assert mask("income in []", columns) == [False] * 4
    assert mask("income not in []", columns) == [True, True, True, False]


def test_in_with_a_long_list_and_null_strings() -> None:
    values = [f"v{i}" for i in range(60)]
    listed = ", ".join(f'"{v}"' for v in values)
    column = strings(*values, "", None, "other")
    result = mask(f"employment in [{listed}]", {"employment": column})
    assert result == [True] * 60 + [False] * 3
    result = mask(f"employment not in [{listed}]", {"employment": column})
    assert result == [False] * 62 + [True]


def test_bool_features_stored_as_floats() -> None:
    columns = {"has_cosigner": numbers(0.0, 1.0, NAN, 1.0)}
    assert mask("has_cosigner", columns) == [False, True, False, True]
    assert mask("has_cosigner == true", columns) == [False, True, False, True]
    assert mask("has_cosigner == false", columns) == [True, False, False, False]
    assert mask("has_cosigner != false", columns) == [False, True, False, True]
    assert mask("has_cosigner in [true]", columns) == [False, True, False, True]
    assert mask("has_cosigner not in [true]", columns) == [True, False, False, False]
    assert mask("has_cosigner is null", columns) == [False, False, True, False]


def test_bool_features_stored_as_numpy_bools() -> None:
    columns = {"has_cosigner": np.array([False, True])}
    assert mask("has_cosigner", columns) == [False, True]
    assert mask("not has_cosigner", columns) == [True, False]
    assert mask("has_cosigner == true", columns) == [False, True]


def test_constant_conditions() -> None:
    columns = {"income": numbers(1, 2, 3)}
    assert mask("true", columns) == [True] * 3
    assert mask("false", columns) == [False] * 3
    assert mask("1 < 2", columns) == [True] * 3
    assert mask("'a' == 'b'", columns) == [False] * 3


def test_and_or_not_combine_masks() -> None:
    columns = {"a": numbers(0, 0, 1, 1), "b": numbers(0, 1, 0, 1)}
    assert mask("a and b", columns) == [False, False, False, True]
    assert mask("a or b", columns) == [False, True, True, True]
    assert mask("not a or b", columns) == [True, True, False, True]
    assert mask("not (a or b)", columns) == [True, False, False, False]


def test_the_bundled_policy_rules_on_a_few_rows() -> None:
    columns = {
        "debt_to_income": numbers(0.7, 0.2, 0.2, 0.2, 0.2),
        "delinquencies_2y": numbers(0, 3, 0, 0, 0),
        "credit_history_years": numbers(5, 5, NAN, 0.5, 5),
        "employment": strings("salaried", "salaried", "salaried", "salaried", "unemployed"),
        "has_cosigner": numbers(0, 0, 0, 0, 0),
    }
    kinds: dict[str, Kind] = {"debt_to_income": "number", "delinquencies_2y": "number",
                              "credit_history_years": "number", "employment": "string", "has_cosigner": "bool"}

    def run(text: str) -> list[bool]:
        node = parse_condition(text)
        check_condition(node, kinds)
        return [bool(v) for v in evaluate(node, columns, 5)]

    assert run("debt_to_income > 0.6 or delinquencies_2y >= 2") == [True, True, False, False, False]
    assert run("credit_history_years is null or credit_history_years < 1") == [False, False, True, True, False]
    assert run('employment == "unemployed" and not has_cosigner') == [False, False, False, False, True]


def test_zero_rows() -> None:
    result = evaluate(checked("income > 1 and employment in ['a']"),
                      {"income": numbers(), "employment": strings()}, 0)
    assert result.shape == (0,) and result.dtype == np.bool_


def test_many_rows_match_a_row_by_row_loop() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    income = rng.choice([NAN, 0.0, 5_000.0, 10_000.0, 50_000.0], size=n)
    employment = rng.choice(np.array(["salaried", "student", "unemployed", "", None], dtype=object), size=n)
    cosigner = rng.choice([0.0, 1.0], size=n)
    text = 'income < 10000 and employment in ["unemployed", "student"] or has_cosigner and income is null'
    result = evaluate(checked(text), {"income": income, "employment": employment, "has_cosigner": cosigner}, n)
    expected = [
        (not math.isnan(i) and i < 10_000 and e in ("unemployed", "student")) or (c == 1.0 and math.isnan(i))
        for i, e, c in zip(income.tolist(), employment.tolist(), cosigner.tolist(), strict=True)
    ]
    assert result.tolist() == expected
    assert 0 < result.sum() < n


# --- property: the vectorised evaluator agrees with a row-by-row interpretation ----------------

NUMBER_FEATURES = ("n1", "n2")
STRING_FEATURES = ("s1", "s2")
BOOL_FEATURES = ("flag",)
PROPERTY_KINDS: dict[str, Kind] = {
    **dict.fromkeys(NUMBER_FEATURES, "number"), **dict.fromkeys(STRING_FEATURES, "string"),
    **dict.fromkeys(BOOL_FEATURES, "bool"),
}
NUMBER_POOL = (-2.0, -0.5, 0.0, 1.0, 2.5, 1000.0)
STRING_POOL = ("x", "y", "it's", 'say "hi"', "back\\slash")

# A tree is a tuple: ("cmp", op, left, right) | ("in", operand, values, negated) | ("null", name, negated)
# | ("truth", operand) | ("not", tree) | ("and", [trees]) | ("or", [trees]); operands are
# ("feature", name) or ("const", value).
Tree = tuple[Any, ...]


def quote(value: str, single: bool) -> str:
    q = "'" if single else '"'
    return q + value.replace("\\", "\\\\").replace(q, "\\" + q) + q


def render_number(value: float, style: int) -> str:
    if style == 1 and value != 0:
        return f"{value:e}"
    return repr(value) if style == 2 else f"{value:g}"


number_operand = st.one_of(
    st.sampled_from(NUMBER_FEATURES).map(lambda n: ("feature", n)),
    st.sampled_from(NUMBER_POOL).map(lambda v: ("const", v)),
)
string_operand = st.one_of(
    st.sampled_from(STRING_FEATURES).map(lambda n: ("feature", n)),
    st.sampled_from((*STRING_POOL, "")).map(lambda v: ("const", v)),
)
bool_operand = st.one_of(
    st.sampled_from(BOOL_FEATURES).map(lambda n: ("feature", n)),
    st.booleans().map(lambda v: ("const", v)),
)

leaves = st.one_of(
    st.tuples(st.just("cmp"), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), number_operand, number_operand),
    st.tuples(st.just("cmp"), st.sampled_from(["==", "!="]), string_operand, string_operand),
    st.tuples(st.just("cmp"), st.sampled_from(["==", "!="]), bool_operand, bool_operand),
    st.tuples(st.just("in"), number_operand, st.lists(st.sampled_from(NUMBER_POOL), max_size=4), st.booleans()),
    st.tuples(st.just("in"), string_operand, st.lists(st.sampled_from(STRING_POOL), max_size=4), st.booleans()),
    st.tuples(st.just("null"), st.sampled_from(NUMBER_FEATURES + STRING_FEATURES + BOOL_FEATURES), st.booleans()),
    st.tuples(st.just("truth"), bool_operand),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.just("and"), st.lists(inner, min_size=2, max_size=3)),
        st.tuples(st.just("or"), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=10,
)


def render(tree: Tree, draw_style: Callable[[], int]) -> str:
    """Condition text with only the parentheses precedence needs (plus some redundant ones)."""
    kind = tree[0]

    def operand(op: tuple[str, Any]) -> str:
        if op[0] == "feature":
            return str(op[1])
        value = op[1]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return quote(value, single=draw_style() % 2 == 1)
        return render_number(value, draw_style())

    def literal(value: Any) -> str:
        return operand(("const", value))

    def wrap(sub: Tree, needs: bool) -> str:
        text = render(sub, draw_style)
        return f"({text})" if needs or draw_style() == 0 else text

    if kind == "cmp":
        return f"{operand(tree[2])} {tree[1]} {operand(tree[3])}"
    if kind == "in":
        values = ", ".join(literal(v) for v in tree[2])
        return f"{operand(tree[1])} {'not in' if tree[3] else 'in'} [{values}]"
    if kind == "null":
        return f"{tree[1]} is {'not ' if tree[2] else ''}null"
    if kind == "truth":
        return operand(tree[1])
    if kind == "not":
        return "not " + wrap(tree[1], needs=tree[1][0] in ("and", "or"))
    joiner = f" {kind} "
    return joiner.join(wrap(sub, needs=kind == "and" and sub[0] == "or") for sub in tree[1])


def is_null(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def reference(tree: Tree, row: Mapping[str, Any]) -> bool:
    """The straightforward meaning of a tree for one row (SQL-like: comparisons with null are false)."""
    kind = tree[0]

    def value(op: tuple[str, Any]) -> Any:
        if op[0] == "feature":
            return row[op[1]]
        return float(op[1]) if isinstance(op[1], bool) else op[1]

    if kind == "cmp":
        ops: dict[str, Callable[[Any, Any], bool]] = {
            "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
            "==": operator.eq, "!=": operator.ne}
        left, right = value(tree[2]), value(tree[3])
        return not is_null(left) and not is_null(right) and ops[tree[1]](left, right)
    if kind == "in":
        v = value(tree[1])
        if is_null(v):
            return False
        found = any(v == (float(x) if isinstance(x, bool) else x) for x in tree[2])
        return not found if tree[3] else found
    if kind == "null":
        return is_null(row[tree[1]]) != tree[2]
    if kind == "truth":
        v = value(tree[1])
        return not is_null(v) and v == 1
    if kind == "not":
        return not reference(tree[1], row)
    results = [reference(sub, row) for sub in tree[1]]
    return all(results) if kind == "and" else any(results)


row_strategy = st.fixed_dictionaries({
    **{name: st.sampled_from((*NUMBER_POOL, NAN)) for name in NUMBER_FEATURES},
    **{name: st.sampled_from((*STRING_POOL, "", None)) for name in STRING_FEATURES},
    **{name: st.sampled_from((0.0, 1.0, NAN)) for name in BOOL_FEATURES},
})


def columns_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, kind in PROPERTY_KINDS.items():
        values = [r[name] for r in rows]
        out[name] = np.array(values, dtype=object if kind == "string" else np.float64)
    return out


@settings(max_examples=300, deadline=None)
@given(tree=trees, rows=st.lists(row_strategy, min_size=1, max_size=25), styles=st.randoms(use_true_random=False))
def test_vectorised_evaluation_agrees_with_a_row_by_row_reference(
        tree: Tree, rows: list[dict[str, Any]], styles: Any) -> None:
    text = render(tree, lambda: int(styles.randrange(4)))
    node = parse_condition(text)
    check_condition(node, PROPERTY_KINDS)
    got = evaluate(node, columns_of(rows), len(rows))
    assert got.dtype == np.bool_ and got.shape == (len(rows),)
    expected = [reference(tree, row) for row in rows]
    assert got.tolist() == expected, text

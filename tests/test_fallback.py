"""Rule-based fallback: output checks, answers in the model's output shape, and policy-level checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.card import ScoreSpec, TensorSpec, load_card
from gateway.cli import EXIT_INVALID, main
from gateway.fallback import FallbackRules, choices_problems, output_problems
from gateway.policy import Fallback, FallbackRule, FeatureSpec, Policy, PolicyError, load_policy
from gateway.policy_fit import Misfit, feature_signature, policy_misfits
from gateway.validation import Column, RequestValidator
from tests.conftest import MODEL, MODELS, POLICIES, good_row

CARD = load_card(MODELS / MODEL / "1" / "model.yaml")
OUTPUTS = CARD.signature.outputs
BUNDLED = POLICIES / f"{MODEL}.yaml"
BUNDLED_TEXT = BUNDLED.read_text(encoding="utf-8")
GOOD = {"label": 1, "probabilities": [0.3, 0.7]}


def test_the_card_outputs_are_what_these_tests_assume() -> None:
    assert [(t.name, t.datatype, t.shape) for t in OUTPUTS] == [("label", "INT64", [-1]),
                                                                ("probabilities", "FP32", [-1, 2])]
    assert CARD.score == ScoreSpec(output="probabilities", index=1, positive_label=1)


# --- output_problems --------------------------------------------------------------------------

def test_a_fitting_row_has_no_problems() -> None:
    assert output_problems(GOOD, OUTPUTS) == []
    assert output_problems({"label": 0, "probabilities": [1, 0]}, OUTPUTS) == []  # ints are numbers


def test_a_missing_output() -> None:
    assert output_problems({"label": 1}, OUTPUTS) == [
        ("probabilities", "missing: every model output needs a value (FP32 shape [2] per row)")]
    assert output_problems({"probabilities": [0.5, 0.5]}, OUTPUTS) == [
        ("label", "missing: every model output needs a value (INT64 scalar per row)")]


def test_an_unknown_output() -> None:
    assert output_problems({**GOOD, "score": 0.7}, OUTPUTS) == [
        ("score", "the model has no output 'score'; outputs: ['label', 'probabilities']")]


def test_every_problem_is_listed() -> None:
    found = output_problems({"label": "yes", "score": 1}, OUTPUTS)
    assert sorted(name for name, _ in found) == ["label", "probabilities", "score"]


@pytest.mark.parametrize(("values", "name", "message"), [
    ({"label": 1, "probabilities": 0.7}, "probabilities", "has shape [], a row of 'probabilities' is shape [2]"),
    ({"label": 1, "probabilities": [0.2, 0.3, 0.5]}, "probabilities",
     "has shape [3], a row of 'probabilities' is shape [2]"),
    ({"label": 1, "probabilities": [[0.3, 0.7]]}, "probabilities",
     "has shape [1, 2], a row of 'probabilities' is shape [2]"),
    ({"label": [1], "probabilities": [0.3, 0.7]}, "label", "has shape [1], a row of 'label' is scalar"),
    ({"label": 1, "probabilities": []}, "probabilities", "has shape [0], a row of 'probabilities' is shape [2]"),
])
def test_a_wrong_per_row_shape(values: dict[str, Any], name: str, message: str) -> None:
    assert output_problems(values, OUTPUTS) == [(name, message)]


@pytest.mark.parametrize(("datatype", "good", "bad"), [
    ("INT64", [0, -5, 2**40], [1.0, 1.5, True, "1", None]),
    ("INT32", [7], [7.0, False]),
    ("FP32", [0.5, 1, -2, 1e10], [True, "0.5", None]),
    ("FP64", [0.25], [False, "x"]),
    ("BYTES", ["yes", ""], [1, 0.5, True, None, b"raw"]),
    ("BOOL", [True, False], [1, 0, "true", None]),
])
def test_element_types(datatype: str, good: list[Any], bad: list[Any]) -> None:
    outputs = [TensorSpec(name="y", datatype=datatype, shape=[-1])]
    for value in good:
        assert output_problems({"y": value}, outputs) == [], value
    for value in bad:
        assert output_problems({"y": value}, outputs) == [("y", f"{value!r} is not a {datatype} value")], value


def test_element_types_inside_a_row_shape() -> None:
    assert output_problems({"label": 1, "probabilities": [0.3, "0.7"]}, OUTPUTS) == [
        ("probabilities", "'0.7' is not a FP32 value")]
    assert output_problems({"label": 1, "probabilities": [True, False]}, OUTPUTS) == [
        ("probabilities", "True is not a FP32 value")]


@pytest.mark.parametrize("value", [[[0.1], [0.2, 0.3]], [0.1, [0.2]], [[0.1, 0.2], 0.3], [[1, 2], [3]]])
def test_ragged_lists_are_problems(value: Any) -> None:
    outputs = [TensorSpec(name="m", datatype="FP32", shape=[-1, 2, 2]),
               TensorSpec(name="v", datatype="FP32", shape=[-1, 2])]
    for tensor in outputs:
        found = output_problems({tensor.name: value}, [tensor])
        assert len(found) == 1 and found[0][0] == tensor.name, (tensor, found)


def test_variable_row_dimensions_accept_any_length() -> None:
    outputs = [TensorSpec(name="v", datatype="FP32", shape=[-1, -1])]
    for value in ([], [0.5], [0.1, 0.2, 0.3]):
        assert output_problems({"v": value}, outputs) == []
    assert output_problems({"v": [[0.5]]}, outputs) == [("v", "has shape [1, 1], a row of 'v' is shape [-1]")]


@pytest.mark.parametrize(("datatype", "value"), [("INT64", 2**63), ("UINT8", 256), ("UINT8", -1), ("FP32", 1e300)])
def test_values_out_of_the_datatype_range_are_problems(datatype: str, value: float) -> None:
    outputs = [TensorSpec(name="y", datatype=datatype, shape=[-1])]
    assert output_problems({"y": value}, outputs) != []


def test_choices_must_agree_on_a_variable_row_dimension() -> None:
    outputs = [TensorSpec(name="v", datatype="FP32", shape=[-1, -1])]
    # each choice fits a row on its own ...
    assert all(output_problems(choice, outputs) == [] for choice in ({"v": [0.1, 0.2]}, {"v": [0.5]}))
    # ... but they are stacked into one table, so together they must have one shape
    problems = choices_problems([(0, {"v": [0.1, 0.2]}), ("default", {"v": [0.5]})], outputs)
    assert [(name, "different shapes" in message) for _, name, message in problems] == [("v", True)]
    agreeing = Fallback(rules=[FallbackRule(when="x > 1", output={"v": [0.1, 0.2]})], default={"v": [0.5, 0.5]})
    assert choices_problems([(0, {"v": [0.1, 0.2]}), ("default", {"v": [0.5, 0.5]})], outputs) == []
    FallbackRules(agreeing, outputs, {"x": FeatureSpec(type="float")})


# --- FallbackRules.answer ---------------------------------------------------------------------

FEATURES = {
    "income": FeatureSpec(type="float"),
    "employment": FeatureSpec(type="category", values=["salaried", "unemployed", "student"]),
    "has_cosigner": FeatureSpec(type="bool", required=False, default=False),
    "debt": FeatureSpec(type="float", input="debt_to_income"),
}
FALLBACK = Fallback(
    rules=[
        FallbackRule(name="low-income", when="income < 10000", output={"label": 1, "probabilities": [0.2, 0.8]}),
        FallbackRule(when="debt > 0.5", output={"label": 1, "probabilities": [0.35, 0.65]}),
        FallbackRule(name="jobless", when='employment == "unemployed" and not has_cosigner',
                     output={"label": 1, "probabilities": [0.4, 0.6]}),
    ],
    default={"label": 0, "probabilities": [0.9, 0.1]},
)


def feeds(rows: list[tuple[float, str, float, float]], dtype: type[np.floating[Any]] = np.float64
          ) -> dict[str, np.ndarray]:
    """Model-input feeds ([N, 1] each) for rows of (income, employment, has_cosigner, debt)."""
    income, employment, cosigner, debt = zip(*rows, strict=True)
    return {
        "income": np.array(income, dtype=dtype).reshape(-1, 1),
        "employment": np.array(employment, dtype=object).reshape(-1, 1),
        "has_cosigner": np.array(cosigner, dtype=dtype).reshape(-1, 1),
        "debt_to_income": np.array(debt, dtype=dtype).reshape(-1, 1),
    }


ROWS = [
    (5_000.0, "unemployed", 0.0, 0.9),   # every rule matches: the first wins
    (50_000.0, "unemployed", 0.0, 0.9),  # the second and third match: the second wins
    (50_000.0, "unemployed", 0.0, 0.1),  # only the third
    (50_000.0, "unemployed", 1.0, 0.1),  # nothing: the cosigner saves it
    (np.nan, "salaried", 0.0, 0.1),      # null income: comparisons are false
    (50_000.0, "student", 0.0, 0.5),     # 0.5 is not > 0.5
]


def test_first_matching_rule_wins_and_the_default_takes_the_rest() -> None:
    rules = FallbackRules(FALLBACK, OUTPUTS, FEATURES)
    answer = rules.answer(feeds(ROWS), len(ROWS))
    assert answer.rules == ["low-income", "rules[1]", "jobless", "default", "default", "default"]
    assert answer.outputs["label"].tolist() == [1, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(answer.outputs["probabilities"],
                               [[0.2, 0.8], [0.35, 0.65], [0.4, 0.6], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]],
                               rtol=1e-6)


def test_outputs_have_the_signature_dtypes_and_shapes() -> None:
    answer = FallbackRules(FALLBACK, OUTPUTS, FEATURES).answer(feeds(ROWS), len(ROWS))
    assert list(answer.outputs) == ["label", "probabilities"]
    assert answer.outputs["label"].dtype == np.int64 and answer.outputs["label"].shape == (6,)
    assert answer.outputs["probabilities"].dtype == np.float32
    assert answer.outputs["probabilities"].shape == (6, 2)


def test_rows_are_independent_copies_of_the_rule_outputs() -> None:
    rules = FallbackRules(FALLBACK, OUTPUTS, FEATURES)
    first = rules.answer(feeds(ROWS), len(ROWS))
    first.outputs["probabilities"][:] = -1  # a caller editing its answer (e.g. low-confidence patching)
    again = rules.answer(feeds(ROWS), len(ROWS))
    assert again.outputs["probabilities"][0].tolist() == pytest.approx([0.2, 0.8])


def test_wanted_selects_outputs() -> None:
    rules = FallbackRules(FALLBACK, OUTPUTS, FEATURES)
    only_probabilities = rules.answer(feeds(ROWS), len(ROWS), wanted=["probabilities"])
    assert list(only_probabilities.outputs) == ["probabilities"]
    assert only_probabilities.rules[0] == "low-income"
    assert list(rules.answer(feeds(ROWS), len(ROWS), wanted=["label"]).outputs) == ["label"]


def test_a_feature_is_read_from_the_model_input_it_feeds() -> None:
    rules = FallbackRules(FALLBACK, OUTPUTS, FEATURES)
    wrong_name = feeds(ROWS[1:2])
    wrong_name["debt"] = np.array([[0.1]])  # a tensor named after the feature is not what it reads
    assert rules.answer(wrong_name, 1).rules == ["rules[1]"]


def test_a_single_row_and_many_rows() -> None:
    rules = FallbackRules(FALLBACK, OUTPUTS, FEATURES)
    assert rules.answer(feeds([ROWS[3]]), 1).rules == ["default"]
    many = ROWS * 500
    answer = rules.answer(feeds(many), len(many))
    assert answer.rules == [
        "low-income", "rules[1]", "jobless", "default", "default", "default"] * 500
    assert answer.outputs["probabilities"].shape == (3000, 2)


def test_no_rules_means_the_default_for_every_row() -> None:
    rules = FallbackRules(Fallback(default={"label": 0, "probabilities": [1, 0]}), OUTPUTS, FEATURES)
    answer = rules.answer(feeds(ROWS), len(ROWS))
    assert answer.rules == ["default"] * len(ROWS)
    assert answer.outputs["label"].tolist() == [0] * len(ROWS)


def validated(row: dict[str, Any], model_signature: bool) -> tuple[dict[str, np.ndarray], int]:
    """The feeds a request row becomes: for the model (its input types) or for the fallback alone."""
    policy = load_policy(BUNDLED).policy
    features = policy.input_schema.features
    signature = CARD.signature if model_signature else feature_signature(features)
    batch = RequestValidator(signature, policy.input_schema).validate({k: Column(k, [v]) for k, v in row.items()})
    return batch.feeds, batch.rows


def bundled_rules() -> FallbackRules:
    policy = load_policy(BUNDLED).policy
    assert policy.fallback is not None
    return FallbackRules(policy.fallback, OUTPUTS, policy.input_schema.features)


@pytest.mark.parametrize("model_signature", [False, True], ids=["features", "model-inputs"])
@pytest.mark.parametrize(("change", "rule"), [
    ({}, "default"),
    ({"debt_to_income": 0.8}, "heavy-debt"),
    ({"delinquencies_2y": 2}, "heavy-debt"),
    ({"credit_history_years": None}, "thin-file"),
    ({"credit_history_years": 0.5}, "thin-file"),
    ({"employment": "unemployed"}, "unemployed-alone"),
    ({"employment": "unemployed", "has_cosigner": True}, "default"),
])
def test_the_bundled_rules_on_validated_requests(change: dict[str, Any], rule: str, model_signature: bool) -> None:
    row = {**good_row(), **change}
    if "has_cosigner" not in change:
        del row["has_cosigner"]  # optional: its default (false) applies
    answer = bundled_rules().answer(*validated(row, model_signature))
    assert answer.rules == [rule]


def test_a_boundary_value_gets_the_same_rule_whichever_feeds_the_fallback_sees() -> None:
    row = {**good_row(), "debt_to_income": 0.6}  # the rule is `debt_to_income > 0.6`
    without_model = bundled_rules().answer(*validated(row, model_signature=False)).rules
    after_model_failure = bundled_rules().answer(*validated(row, model_signature=True)).rules
    assert without_model == ["default"]
    assert after_model_failure == without_model


# --- policy level: rules are checked at load time ---------------------------------------------

POLICY_HEAD = """\
model: m
schema:
  features:
    income: {type: float}
    employment: {type: category, values: [a, b]}
    flag: {type: bool}
fallback:
  rules:
    - name: fine
      when: income < 10
      output: {y: 1}
    - name: under-test
      when: WHEN
      output: {y: 2}
  default: {y: 0}
"""


def policy_with_when(tmp_path: Path, when: str) -> tuple[Path, int]:
    """A policy file whose second rule has condition `when`, and the line of that condition."""
    text = POLICY_HEAD.replace("WHEN", json.dumps(when))  # a JSON string is a YAML scalar
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index(f"      when: {json.dumps(when)}") + 1
    return path, line


def load_problems(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value


def test_a_valid_rule_set_loads(tmp_path: Path) -> None:
    path, _ = policy_with_when(tmp_path, 'employment == "a" and not flag or income is null')
    fallback = load_policy(path).policy.fallback
    assert fallback is not None and [r.name for r in fallback.rules] == ["fine", "under-test"]


@pytest.mark.parametrize(("when", "message"), [
    ("salary > 1", "unknown feature 'salary'; features: ['employment', 'flag', 'income'] (at column 1)"),
    ("income > 1 and salary is null", "unknown feature 'salary'"),
    ('income == "a"', "cannot compare a number with a string (at column 1)"),
    ("flag == 1", "cannot compare a bool with a number"),
    ('employment < "b"', "< compares numbers; use == or != for string values"),
    ('employment in ["a", 2]', "list value 2.0 is not a string"),
    ("income", "only a bool feature or true/false can stand alone as a condition"),
])
def test_a_rule_that_does_not_fit_the_features_is_a_positioned_problem(
        tmp_path: Path, when: str, message: str) -> None:
    path, line = policy_with_when(tmp_path, when)
    error = load_problems(path)
    (problem,) = error.problems
    assert problem.path == "fallback.rules[1].when"
    assert problem.line == line
    assert problem.file == str(path)
    assert message in problem.message
    assert error.model == "m"


@pytest.mark.parametrize(("when", "message"), [
    ("income >", "found 'the end' (at column 9)"),
    ("income > 1)", "unexpected ')' (at column 11)"),
    ("income.real > 1", "unexpected character '.' (at column 7)"),
])
def test_a_rule_that_does_not_parse_is_a_positioned_problem(tmp_path: Path, when: str, message: str) -> None:
    path, line = policy_with_when(tmp_path, when)
    (problem,) = load_problems(path).problems
    assert problem.path == "fallback.rules[1].when"
    assert problem.line == line
    assert message in problem.message


def test_an_empty_condition_is_refused(tmp_path: Path) -> None:
    path, line = policy_with_when(tmp_path, "")
    (problem,) = load_problems(path).problems
    assert problem.path == "fallback.rules[1].when"
    assert problem.line == line


INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "open('{marker}', 'w')",
    "income < 10 or __import__('pathlib').Path('{marker}').touch()",
    "exec(\"open('{marker}', 'w')\")",
    "eval(\"open('{marker}', 'w')\")",
    "[open('{marker}', 'w') for _ in 'x']",
    "(lambda: open('{marker}', 'w'))()",
    "income.__class__.__subclasses__()",
    "income < 10; open('{marker}', 'w')",
    "income if open('{marker}', 'w') else flag",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_code_in_a_condition_is_refused_and_never_runs(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    path, line = policy_with_when(tmp_path, template.format(marker=marker))
    error = load_problems(path)
    (problem,) = error.problems
    assert problem.path == "fallback.rules[1].when"
    assert problem.line == line
    assert "(at column " in problem.message
    assert any(reason in problem.message for reason in (
        "calls are not allowed", "unexpected character", "unexpected", "expected a feature"))
    assert not marker.exists()


def test_a_call_is_named_as_such(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path, _ = policy_with_when(tmp_path, f"__import__('os').system('touch {marker}')")
    (problem,) = load_problems(path).problems
    assert "calls are not allowed ('__import__' is followed by '(') (at column 11)" in problem.message
    assert not marker.exists()


def test_a_deeply_nested_condition_is_a_policy_error(tmp_path: Path) -> None:
    path, _ = policy_with_when(tmp_path, "(" * 500 + "flag" + ")" * 500)
    try:
        load_policy(path)
    except PolicyError:
        return
    # parsing it is fine too


def test_rule_problems_lists_every_bad_rule() -> None:
    policy = Policy.model_validate({
        "model": "m",
        "schema": {"features": {"income": {"type": "float"}}},
        "fallback": {"rules": [{"when": "x > 1", "output": {}}, {"when": "income > 1", "output": {}},
                               {"when": "income == 'a'", "output": {}}], "default": {}},
    })
    problems = policy.rule_problems()
    assert [loc for loc, _ in problems] == [("fallback", "rules", 0, "when"), ("fallback", "rules", 2, "when")]
    assert "unknown feature 'x'" in problems[0][1]
    assert "cannot compare a number with a string" in problems[1][1]


def test_a_policy_without_a_fallback_has_no_rule_problems() -> None:
    policy = Policy.model_validate({"model": "m", "schema": {"features": {"income": {"type": "float"}}}})
    assert policy.rule_problems() == []


# --- policy_misfits: fallback outputs and low_confidence against the card -----------------------

def bundled_with(**fallback: Any) -> Policy:
    data = yaml.safe_load(BUNDLED_TEXT)
    data["fallback"].update(fallback)
    return Policy.model_validate(data)


def fallback_misfits(misfits: list[Misfit]) -> list[Misfit]:
    return [m for m in misfits if m.loc[0] == "fallback"]


def test_the_bundled_policy_fits_its_card() -> None:
    policy = load_policy(BUNDLED).policy
    assert [m for m in policy_misfits(policy, CARD.signature, CARD.score) if m.error] == []


def test_fallback_outputs_that_do_not_fit_the_signature() -> None:
    data = yaml.safe_load(BUNDLED_TEXT)
    rules = data["fallback"]["rules"]
    rules[0]["output"] = {"label": "yes", "probabilities": [0.3, 0.7]}
    rules[1]["output"] = {"label": 1, "probabilities": [0.45]}
    rules[2]["output"] = {"label": 1}
    data["fallback"]["default"] = {"label": 0, "probabilities": [0.88, 0.12], "score": 0.12}
    misfits = fallback_misfits(policy_misfits(Policy.model_validate(data), CARD.signature, CARD.score))
    assert misfits == [
        Misfit(("fallback", "rules", 0, "output", "label"), "'yes' is not a INT64 value"),
        Misfit(("fallback", "rules", 1, "output", "probabilities"),
               "has shape [1], a row of 'probabilities' is shape [2]"),
        Misfit(("fallback", "rules", 2, "output"),
               "missing: every model output needs a value (FP32 shape [2] per row)"),
        Misfit(("fallback", "default", "score"),
               "the model has no output 'score'; outputs: ['label', 'probabilities']"),
    ]
    assert all(m.error for m in misfits)


def test_low_confidence_needs_a_card_score() -> None:
    policy = load_policy(BUNDLED).policy
    assert fallback_misfits(policy_misfits(policy, CARD.signature, None)) == [
        Misfit(("fallback", "low_confidence"), "the model card names no `score` output, so there is no score to band")]


def test_low_confidence_needs_the_score_output_in_the_signature() -> None:
    policy = load_policy(BUNDLED).policy
    assert fallback_misfits(policy_misfits(policy, CARD.signature, ScoreSpec(output="proba", index=1))) == [
        Misfit(("fallback", "low_confidence"), "the card's score output 'proba' is not a model output")]


def test_without_low_confidence_a_card_needs_no_score() -> None:
    policy = bundled_with(low_confidence=None)
    assert fallback_misfits(policy_misfits(policy, CARD.signature, None)) == []


def test_low_confidence_needs_a_score_index_inside_the_score_output() -> None:
    policy = load_policy(BUNDLED).policy
    misfits = fallback_misfits(policy_misfits(policy, CARD.signature, ScoreSpec(output="probabilities", index=2)))
    assert [m.loc for m in misfits] == [("fallback", "low_confidence")]


# --- `gateway policy check` -------------------------------------------------------------------

def check(capsys: pytest.CaptureFixture[str], path: Path, models: Path = MODELS) -> tuple[int, str]:
    code = main(["policy", "check", "--models", str(models), str(path)])
    out, _ = capsys.readouterr()
    return code, out


def variant(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = BUNDLED_TEXT
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "credit-risk.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, fragment: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def test_policy_check_reports_fallback_outputs_that_do_not_fit(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path,
                   ("output: {label: 1, probabilities: [0.3, 0.7]}", "output: {label: one, probabilities: [0.3, 0.7]}"),
                   ("default: {label: 0, probabilities: [0.88, 0.12]}", "default: {label: 0, probabilities: [0.88]}"))
    code, out = check(capsys, path)
    assert code == EXIT_INVALID == 1
    label_line = line_of(path, "label: one")
    default_line = line_of(path, "probabilities: [0.88]")
    assert (f"{path}:{label_line}:" in out
            and "fallback.rules[0].output.label: 'one' is not a INT64 value (versions 1, 2)" in out)
    assert (f"{path}:{default_line}:" in out and "fallback.default.probabilities: has shape [1], a row of "
            "'probabilities' is shape [2] (versions 1, 2)" in out)
    assert out.endswith(f"{path}: 2 errors\n")


def test_policy_check_reports_low_confidence_without_a_card_score(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    version = tmp_path / "models" / MODEL / "1"
    version.mkdir(parents=True)
    shutil.copy(MODELS / MODEL / "1" / "model.onnx", version / "model.onnx")
    card = (MODELS / MODEL / "1" / "model.yaml").read_text(encoding="utf-8")
    score_block = "score:\n  output: probabilities\n  index: 1\n  positive_label: 1\n"
    assert score_block in card
    (version / "model.yaml").write_text(card.replace(score_block, ""), encoding="utf-8")
    path = variant(tmp_path)
    code, out = check(capsys, path, models=tmp_path / "models")
    assert code == EXIT_INVALID
    line = line_of(path, "low_confidence:")
    assert (f"{path}:{line}:" in out and "fallback.low_confidence: the model card names no `score` output, "
            "so there is no score to band (version 1)" in out)
    assert out.endswith(f"{path}: 1 error\n")


def test_policy_check_reports_a_rule_naming_an_unknown_feature(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, ("when: debt_to_income > 0.6", "when: debt_ratio > 0.6"))
    code, out = check(capsys, path)
    assert code == EXIT_INVALID
    line = line_of(path, "debt_ratio")
    assert f"{path}:{line}:" in out
    assert "fallback.rules[0].when: unknown feature 'debt_ratio'" in out
    assert out.endswith(f"{path}: 1 error\n")


def test_policy_check_refuses_code_in_a_condition(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = variant(tmp_path, ("when: debt_to_income > 0.6 or delinquencies_2y >= 2",
                              f"when: \"__import__('os').system('touch {marker}')\""))
    code, out = check(capsys, path)
    assert code == EXIT_INVALID
    assert "fallback.rules[0].when:" in out and "calls are not allowed" in out
    assert not marker.exists()

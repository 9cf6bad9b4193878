"""The policy schema: loading, positioned problems, and the committed JSON Schema."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.policy import Policy, PolicyError, json_schema, load_policy, policy_files
from gateway.yamldoc import Problem
from tests.conftest import MODEL, POLICIES

BUNDLED = POLICIES / f"{MODEL}.yaml"
SCHEMA_FILE = POLICIES / "policy.schema.json"

HEAD = "model: m\nschema:\n  features:\n"


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[Problem]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert all(p.file == str(path) for p in caught.value.problems)
    return caught.value.problems


def only(tmp_path: Path, text: str) -> Problem:
    (problem,) = problems(tmp_path, text)
    return problem


# --- the bundled policy -----------------------------------------------------------------------

def test_the_bundled_policy_loads() -> None:
    loaded = load_policy(BUNDLED)
    policy = loaded.policy
    assert policy.model == MODEL
    assert policy.routing.stable == "1"
    assert policy.slo.p99_ms == 50 and policy.slo.peak_rps == 200
    assert policy.input_schema.unknown_fields == "ignore" and policy.input_schema.max_batch_size == 1024
    features = policy.input_schema.features
    assert len(features) == 12
    assert features["age"].type == "int" and (features["age"].min, features["age"].max) == (18, 120)
    assert features["credit_history_years"].nullable is True
    assert features["has_cosigner"].required is False and features["has_cosigner"].default is False
    assert features["purpose"].values is not None and "car" in features["purpose"].values
    assert loaded.source == str(BUNDLED)
    assert loaded.sha256 == hashlib.sha256(BUNDLED.read_bytes()).hexdigest()


def test_every_policy_file_in_the_policy_directory_loads() -> None:
    files = policy_files(POLICIES)
    assert BUNDLED in files
    for path in files:
        load_policy(path)


def test_policy_files_lists_yaml_files_in_name_order(tmp_path: Path) -> None:
    for name in ("b.yml", "a.yaml", "c.json", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "d.yaml").mkdir()
    assert [p.name for p in policy_files(tmp_path)] == ["a.yaml", "b.yml"]
    assert policy_files(tmp_path / "missing") == []


def test_routing_stable_may_be_written_as_a_number(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "    a: {type: float}\nrouting: {stable: 2}\n")
    assert load_policy(path).policy.routing.stable == "2"


# --- positioned problems ----------------------------------------------------------------------

def test_unknown_key(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    age:\n      type: int\n      minimum: 18\n")
    assert problem.path == "schema.features.age.minimum"
    assert problem.message == "unknown key (not in the schema)"
    assert problem.line == 6
    assert problem.column in (7, 16)  # the key or its value
    assert problem.describe() == f"{problem.file}:6:{problem.column}: schema.features.age.minimum: {problem.message}"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    a: {type: float}\nroute: {stable: '1'}\n")
    assert (problem.line, problem.path) == (5, "route")
    assert "unknown key" in problem.message


def test_wrong_type(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    age: {type: int, min: abc}\n")
    assert (problem.line, problem.column, problem.path) == (4, 27, "schema.features.age.min")
    assert "valid number" in problem.message and "(got 'abc')" in problem.message


def test_wrong_type_in_a_list_names_the_index(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    job:\n      type: category\n      values: [a, [b], c]\n")
    assert (problem.line, problem.column, problem.path) == (6, 19, "schema.features.job.values[1]")
    assert "valid string" in problem.message


def test_unknown_feature_type(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    a: {type: decimal}\n")
    assert (problem.line, problem.column, problem.path) == (4, 15, "schema.features.a.type")
    assert "'category'" in problem.message and "(got 'decimal')" in problem.message


def test_min_greater_than_max(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    income:\n      type: float\n      min: 5\n      max: 1\n")
    assert (problem.line, problem.column, problem.path) == (5, 7, "schema.features.income")
    assert "min (5.0) is greater than max (1.0)" in problem.message


def test_category_without_values(tmp_path: Path) -> None:
    for text in ("    job: {type: category}\n", "    job: {type: category, values: []}\n"):
        problem = only(tmp_path, HEAD + text)
        assert (problem.line, problem.column, problem.path) == (4, 10, "schema.features.job")
        assert "needs a non-empty `values` list" in problem.message


@pytest.mark.parametrize(("spec", "message"), [
    ("{type: int, allow_nan: true}", "allow_nan/allow_inf apply to float features only"),
    ("{type: string, min: 1}", "min/max apply to float and int features, not string"),
    ("{type: float, values: [a]}", "`values` applies to category features, not float"),
    ("{type: category, values: [a, a]}", "`values` lists a value twice"),
    ("{type: int, min: 18, default: 5}", "default 5 is not a valid value: below min 18"),
    ("{type: bool, default: 1}", "default 1 is not a valid value: expected true or false"),
    ("{type: category, values: [a], default: b}", "default 'b' is not a valid value"),
    ("{type: float, default: .nan}", "not finite"),
    ("{type: string, max_length: 0}", "greater than or equal to 1"),
])
def test_inconsistent_feature_specs(tmp_path: Path, spec: str, message: str) -> None:
    problem = only(tmp_path, HEAD + f"    f: {spec}\n")
    assert problem.line == 4
    assert problem.path.startswith("schema.features.f")
    assert message in problem.message


def test_two_features_feeding_one_input(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    age: {type: int}\n    years: {type: int, input: age}\n")
    assert problem.path == "schema"
    assert "features 'age' and 'years' both feed model input 'age'" in problem.message


@pytest.mark.parametrize(("text", "path", "fragment"), [
    ("schema:\n  features: {}\n", "model", "Field required"),
    ("model: m\n", "schema", "Field required"),
    ("model: 'bad name'\nschema: {features: {}}\n", "model", "should match pattern"),
    (HEAD + "    a: {type: float}\n  unknown_fields: drop\n", "schema.unknown_fields", "'ignore' or 'reject'"),
    (HEAD + "    a: {type: float}\n  max_batch_size: 0\n", "schema.max_batch_size", "greater than or equal to 1"),
    (HEAD + "    a: {type: float}\nslo: {error_rate: 2}\n", "slo.error_rate", "less than or equal to 1"),
    (HEAD + "    a: {type: float}\nslo: {p99_ms: 0}\n", "slo.p99_ms", "greater than 0"),
])
def test_other_schema_errors(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    problem = only(tmp_path, text)
    assert problem.path == path
    assert fragment in problem.message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    problem = only(tmp_path, HEAD + "    a: {type: float}\n    b: {type: int}\n    a: {type: int}\n")
    assert (problem.line, problem.column, problem.path, problem.message) == (
        6, 5, "schema.features.a", "duplicate key")


def test_every_duplicate_key_is_reported(tmp_path: Path) -> None:
    listed = problems(tmp_path, "model: m\nmodel: n\nschema:\n  features:\n    a: {type: float, type: int}\n")
    assert {(p.line, p.path) for p in listed} == {(2, "model"), (5, "schema.features.a.type")}


@pytest.mark.parametrize(("text", "line", "column"), [
    ("model: m\nschema: [\n", 3, 1),
    ("model: m\n  bad: indent\n", 2, 6),
    ("model: m\n---\nmodel: n\n", 2, 1),
    ("model: 'unterminated\n", 2, 1),
])
def test_invalid_yaml_syntax(tmp_path: Path, text: str, line: int, column: int) -> None:
    problem = only(tmp_path, text)
    assert problem.message.startswith("invalid YAML: ")
    assert (problem.line, problem.column, problem.path) == (line, column, "")
    assert problem.describe() == f"{problem.file}:{line}:{column}: {problem.message}"


@pytest.mark.parametrize("text", ["- model: m\n", "just a string\n", "42\n", "", "# only a comment\n"])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    problem = only(tmp_path, text)
    assert (problem.line, problem.column, problem.message) == (1, 1, "a policy must be a YAML mapping")


@pytest.mark.parametrize("name", ["latin1.yaml", "missing.yaml"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "latin1.yaml":
        path.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.column) == (str(path), 1, 1)
    assert problem.message.startswith("cannot read file")


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    text = (HEAD + "    age: {type: int, minimum: 18}\n    income: {type: float, min: 5, max: 1}\n"
            "    job: {type: category}\n    n: {type: int, max: many}\n  max_batch_size: -1\n")
    listed = problems(tmp_path, text)
    assert {(p.line, p.path) for p in listed} == {
        (4, "schema.features.age.minimum"), (5, "schema.features.income"), (6, "schema.features.job"),
        (7, "schema.features.n.max"), (8, "schema.max_batch_size")}


def test_policy_error_message_and_model(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "    age: {type: int, minimum: 18}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.model == "m"
    assert str(caught.value) == caught.value.problems[0].describe()
    assert str(caught.value).startswith(f"{path}:4:")


def test_a_default_of_the_wrong_shape_is_one_problem_at_its_path(tmp_path: Path) -> None:
    listed = problems(tmp_path, HEAD + "    age: {type: int, default: [1]}\n")
    assert [(p.line, p.path) for p in listed] == [(4, "schema.features.age.default")]


# --- the JSON Schema --------------------------------------------------------------------------

def test_the_committed_json_schema_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema(), (
        f"{SCHEMA_FILE.relative_to(POLICIES.parent)} is out of date with gateway/policy.py: run `make schema`")


def test_the_json_schema_describes_a_policy() -> None:
    schema = json.loads(json_schema())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Gateway model policy"
    assert set(schema["required"]) == {"model", "schema"}
    assert schema["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(schema)


def _json_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def _bundled_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(BUNDLED.read_text(encoding="utf-8"))
    return data


def test_the_json_schema_accepts_the_bundled_policy() -> None:
    _json_validator().validate(_bundled_data())


@pytest.mark.parametrize(("change", "path"), [
    (lambda d: d["schema"]["features"]["age"].update(minimum=18), ["schema", "features", "age"]),
    (lambda d: d["schema"]["features"]["age"].update(min="abc"), ["schema", "features", "age", "min"]),
    (lambda d: d["schema"]["features"]["age"].update(type="decimal"), ["schema", "features", "age", "type"]),
    (lambda d: d.pop("schema"), []),
    (lambda d: d["slo"].update(error_rate=2), ["slo", "error_rate"]),
    (lambda d: d["schema"].update(unknown_fields="drop"), ["schema", "unknown_fields"]),
])
def test_the_json_schema_rejects_a_bad_policy(change: Any, path: list[str]) -> None:
    data = _bundled_data()
    change(data)
    errors = list(_json_validator().iter_errors(data))
    assert errors
    assert path in [list(e.absolute_path) for e in errors]


@pytest.mark.parametrize("routing", [
    {"stable": "2"},
    {},
    {"stable": 2},
])
def test_policies_that_load_also_pass_the_json_schema(tmp_path: Path, routing: dict[str, Any]) -> None:
    data = {**_bundled_data(), "routing": routing}
    path = write(tmp_path, yaml.safe_dump(data))
    assert isinstance(load_policy(path).policy, Policy)
    _json_validator().validate(data)


def test_an_impossible_date_in_a_policy_is_a_positioned_problem_not_a_crash(tmp_path: Path) -> None:
    from gateway.policy import PolicyError, load_policy

    path = tmp_path / "p.yaml"
    path.write_text("model: m\ndescription: x\nschema:\n  features: {}\nnote: 2026-02-30\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    problem = caught.value.problems[0]
    assert (problem.line, problem.column, problem.path) == (5, 7, "note") and "not a valid date" in problem.message


@pytest.mark.parametrize(("written", "gate"), [("off", "off"), ("'off'", "off"), ("enforce", "enforce"),
                                               ("on", "enforce")])
def test_a_bare_yaml_off_turns_the_readiness_gate_off(tmp_path: Path, written: str, gate: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"model: m\nschema: {{features: {{}}}}\nreadiness: {{gate: {written}}}\n")
    policy = load_policy(path).policy
    assert policy.readiness is not None and policy.readiness.gate == gate

"""RequestValidator: request columns -> model feeds, or every violation found."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.card import Signature, TensorSpec, load_card
from gateway.codec import decode_v2
from gateway.errors import SchemaViolation, Violation
from gateway.policy import FeatureSpec, InputSchema, load_policy
from gateway.validation import Column, RequestValidator, ValidatedBatch
from tests.conftest import DATATYPES, MODEL, MODELS, POLICIES, good_row, v2_body

CARD_SIGNATURE = load_card(MODELS / MODEL / "1" / "model.yaml").signature
SCHEMA = load_policy(POLICIES / f"{MODEL}.yaml").policy.input_schema
NUMERIC_INPUTS = [t.name for t in CARD_SIGNATURE.inputs if t.datatype == "FP32"]
STRING_INPUTS = [t.name for t in CARD_SIGNATURE.inputs if t.datatype == "BYTES"]
REQUIRED = sorted(name for name, spec in SCHEMA.features.items() if spec.required)


def validator(schema: InputSchema | None = SCHEMA, signature: Signature = CARD_SIGNATURE,
              max_listed: int = 100) -> RequestValidator:
    return RequestValidator(signature, schema, max_listed=max_listed)


def rows(n: int = 3, **changes: Any) -> list[dict[str, Any]]:
    """`n` good rows; `changes` maps a field to a list of per-row values (a missing row index keeps it)."""
    out = []
    for i in range(n):
        row = good_row()
        for name, values in changes.items():
            if i < len(values):
                row[name] = values[i]
        out.append(row)
    return out


def v2_columns(batch: list[dict[str, Any]], shape: str = "[N,1]",
               declared: dict[str, str] | None = None) -> dict[str, Column]:
    """Tensor-style columns (as decode_v2 makes them) with the datatypes conftest.v2_body declares."""
    names = list(dict.fromkeys(k for r in batch for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in batch]
        datatype = DATATYPES.get(name, "INT64" if all(type(v) is int for v in values) else "FP64")
        if declared and name in declared:
            datatype = declared[name]
        dims = (len(batch), 1) if shape == "[N,1]" else (len(batch),)
        columns[name] = Column(name, values, dims, datatype)
    return columns


def v1_columns(instances: Sequence[dict[str, Any]]) -> dict[str, Column]:
    """Row-style columns (as decode_v1 makes them): absent values are None and listed in absent_rows."""
    names = list(dict.fromkeys(k for r in instances for k in r))
    columns = {}
    for name in names:
        absent = [i for i, r in enumerate(instances) if name not in r]
        columns[name] = Column(name, [r.get(name) for r in instances], None, None, absent or None)
    return columns


def violations(columns: dict[str, Column], v: RequestValidator | None = None) -> list[Violation]:
    with pytest.raises(SchemaViolation) as caught:
        (v or validator()).validate(columns)
    return caught.value.violations.items


def found(columns: dict[str, Column], v: RequestValidator | None = None) -> set[tuple[str, int | None, str]]:
    """(field, row, reason) of every violation."""
    return {(x.field, x.row, x.reason) for x in violations(columns, v)}


def signature(*inputs: tuple[str, str, list[int]]) -> Signature:
    return Signature(inputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in inputs],
                     outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])])


def one_input(spec: FeatureSpec | None, datatype: str = "FP32", shape: list[int] | None = None,
              **schema: Any) -> RequestValidator:
    """A validator for a model with one input `x` described by `spec` (or by nothing)."""
    features = {"x": spec} if spec is not None else {}
    return RequestValidator(signature(("x", datatype, shape or [-1, 1])), InputSchema(features=features, **schema))


def x(values: list[Any] | np.ndarray, declared: str | None = None) -> dict[str, Column]:
    shape = (len(values), 1)
    return {"x": Column("x", values, shape, declared)}


# --- the good path ----------------------------------------------------------------------------

def test_good_batch_gives_feeds_with_the_signature_dtypes_and_shapes() -> None:
    batch = validator().validate(v2_columns(rows(3)))
    assert isinstance(batch, ValidatedBatch)
    assert batch.rows == 3
    assert batch.ignored_fields == []
    assert list(batch.feeds) == [t.name for t in CARD_SIGNATURE.inputs]
    for name in NUMERIC_INPUTS:
        assert batch.feeds[name].dtype == np.float32, name
        assert batch.feeds[name].shape == (3, 1), name
    for name in STRING_INPUTS:
        assert batch.feeds[name].dtype == object, name
        assert batch.feeds[name].shape == (3, 1), name
    assert batch.feeds["age"][:, 0].tolist() == [41.0, 41.0, 41.0]
    assert batch.feeds["has_cosigner"][:, 0].tolist() == [0.0, 0.0, 0.0]
    assert batch.feeds["employment"][:, 0].tolist() == ["salaried"] * 3


def test_row_oriented_columns_validate_too() -> None:
    batch = validator().validate(v1_columns(rows(2, age=[30, 50])))
    assert batch.rows == 2
    assert batch.feeds["age"].shape == (2, 1)
    assert batch.feeds["age"][:, 0].tolist() == [30.0, 50.0]


def test_a_v2_body_from_conftest_decodes_and_validates() -> None:
    decoded = decode_v2(orjson.dumps(v2_body(rows(2))), None)
    assert validator().validate(decoded.columns).rows == 2


@pytest.mark.parametrize("version", ["1", "2"])
def test_every_bundled_version_accepts_a_good_row(version: str) -> None:
    sig = load_card(MODELS / MODEL / version / "model.yaml").signature
    assert validator(signature=sig).validate(v2_columns(rows(1))).rows == 1


# --- types ------------------------------------------------------------------------------------

def test_ints_are_coerced_to_float_inputs() -> None:
    batch = validator().validate(v2_columns(rows(2, income=[58000, 1]), declared={"income": "INT64"}))
    assert batch.feeds["income"].dtype == np.float32
    assert batch.feeds["income"][:, 0].tolist() == [58000.0, 1.0]


def test_whole_floats_are_accepted_for_int_features() -> None:
    batch = validator().validate(v2_columns(rows(2, age=[41.0, 60.0])))
    assert batch.feeds["age"][:, 0].tolist() == [41.0, 60.0]


def test_a_string_where_a_number_belongs_is_rejected() -> None:
    (problem,) = violations(v2_columns(rows(3, income=[58000.0, "58000"])))
    assert (problem.field, problem.row, problem.reason) == ("income", 1, "type")
    assert problem.expected == "a number"
    assert problem.got == "string '58000'"


@pytest.mark.parametrize("field", ["income", "age"])
def test_a_bool_where_a_number_belongs_is_rejected(field: str) -> None:
    (problem,) = violations(v2_columns(rows(2, **{field: [good_row()[field], True]})))
    assert (problem.field, problem.row, problem.reason) == (field, 1, "type")
    assert problem.got == "boolean true"


def test_a_fractional_value_for_an_int_feature_is_rejected() -> None:
    (problem,) = violations(v2_columns(rows(3, age=[41, 41, 41.5])))
    assert (problem.field, problem.row, problem.reason) == ("age", 2, "type")
    assert problem.expected == "an integer"
    assert problem.got == "41.5"


def test_a_fractional_value_in_binary_float_data_for_an_int_feature_is_rejected() -> None:
    columns = v2_columns(rows(3))
    columns["age"] = Column("age", np.array([41, 41.25, 30], dtype=np.float32), (3, 1), "FP32")
    (problem,) = violations(columns)
    assert (problem.field, problem.row, problem.reason, problem.got) == ("age", 1, "type", "41.25")


def test_bool_features_take_booleans_and_zero_or_one() -> None:
    batch = validator().validate(v2_columns(rows(4, has_cosigner=[True, False, 1, 0])))
    assert batch.feeds["has_cosigner"][:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert found(v2_columns(rows(3, has_cosigner=[2, "yes", 0.5]))) == {
        ("has_cosigner", 0, "type"), ("has_cosigner", 1, "type"), ("has_cosigner", 2, "type")}


def test_bool_features_take_binary_bool_data() -> None:
    columns = v2_columns(rows(2))
    columns["has_cosigner"] = Column("has_cosigner", np.array([True, False]), (2, 1), "BOOL")
    assert validator().validate(columns).feeds["has_cosigner"][:, 0].tolist() == [1.0, 0.0]


def test_a_number_where_a_category_belongs_is_rejected() -> None:
    (problem,) = violations(v2_columns(rows(2, employment=["salaried", 3])))
    assert (problem.field, problem.row, problem.reason) == ("employment", 1, "type")


def test_int_features_feed_int64_inputs_as_int64() -> None:
    v = one_input(FeatureSpec(type="int", min=0), datatype="INT64")
    feed = v.validate(x([1, 2.0, 3], "INT64")).feeds["x"]
    assert feed.dtype == np.int64
    assert feed[:, 0].tolist() == [1, 2, 3]


def test_int_values_outside_the_input_type_range_are_rejected() -> None:
    v = one_input(FeatureSpec(type="int"), datatype="INT8")
    assert found(x([127, 128, -129], "INT64"), v) == {("x", 1, "range"), ("x", 2, "range")}


# --- NaN and infinity -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "reason"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "inf")])
def test_nan_and_infinity_are_rejected_by_default(value: float, reason: str) -> None:
    (problem,) = violations(x([1.0, value]), one_input(FeatureSpec(type="float")))
    assert (problem.field, problem.row, problem.reason) == ("x", 1, reason)


def test_nan_in_binary_data_is_rejected_by_default() -> None:
    v = one_input(FeatureSpec(type="float"))
    assert found(x(np.array([np.nan, 1.0], dtype=np.float32), "FP32"), v) == {("x", 0, "nan")}


def test_nan_is_rejected_for_a_bundled_feature() -> None:
    assert found(v2_columns(rows(2, income=[1.0, math.nan]))) == {("income", 1, "nan")}


def test_nan_is_accepted_with_allow_nan() -> None:
    v = one_input(FeatureSpec(type="float", allow_nan=True))
    feed = v.validate(x([1.0, math.nan])).feeds["x"]
    assert math.isnan(feed[1, 0])
    assert found(x([math.inf]), v) == {("x", 0, "inf")}


def test_infinity_is_accepted_with_allow_inf() -> None:
    v = one_input(FeatureSpec(type="float", allow_inf=True))
    assert v.validate(x([math.inf, -math.inf])).feeds["x"][:, 0].tolist() == [math.inf, -math.inf]
    assert found(x([math.nan]), v) == {("x", 0, "nan")}


# --- ranges and categories --------------------------------------------------------------------

def test_min_and_max_are_inclusive() -> None:
    batch = validator().validate(v2_columns(rows(2, age=[18, 120])))
    assert batch.feeds["age"][:, 0].tolist() == [18.0, 120.0]


def test_values_outside_min_and_max_are_rejected() -> None:
    listed = violations(v2_columns(rows(4, age=[17, 41, 121], debt_to_income=[0.1, -0.5])))
    assert {(v.field, v.row, v.reason, v.expected) for v in listed} == {
        ("age", 0, "range", ">= 18"), ("age", 2, "range", "<= 120"), ("debt_to_income", 1, "range", ">= 0")}


def test_a_category_outside_the_allowed_set_is_rejected() -> None:
    (problem,) = violations(v2_columns(rows(2, employment=["salaried", "astronaut"])))
    assert (problem.field, problem.row, problem.reason) == ("employment", 1, "category")
    assert "salaried" in problem.expected and "student" in problem.expected
    assert problem.got == "string 'astronaut'"


def test_category_values_in_binary_bytes_data_are_checked() -> None:
    columns = v2_columns(rows(2))
    columns["purpose"] = Column("purpose", np.array(["car", "yacht"], dtype=object), (2, 1), "BYTES")
    assert found(columns) == {("purpose", 1, "category")}


def test_string_max_length() -> None:
    v = one_input(FeatureSpec(type="string", max_length=3), datatype="BYTES")
    assert v.validate(x(["abc", ""])).feeds["x"][:, 0].tolist() == ["abc", ""]
    (problem,) = violations(x(["abc", "abcd"]), v)
    assert (problem.row, problem.reason, problem.got) == (1, "length", "4 characters")


# --- nulls ------------------------------------------------------------------------------------

def test_null_on_a_non_nullable_feature_is_rejected() -> None:
    assert found(v2_columns(rows(2, income=[None], purpose=["car", None]))) == {
        ("income", 0, "null"), ("purpose", 1, "null")}


def test_null_on_a_nullable_float_feature_becomes_nan() -> None:
    batch = validator().validate(v2_columns(rows(2, credit_history_years=[None, 3.5])))
    feed = batch.feeds["credit_history_years"][:, 0]
    assert math.isnan(feed[0]) and feed[1] == 3.5


def test_null_on_a_nullable_feature_with_a_default_takes_the_default() -> None:
    v = one_input(FeatureSpec(type="float", nullable=True, default=0.25))
    assert v.validate(x([None, 1.0])).feeds["x"][:, 0].tolist() == [0.25, 1.0]
    c = one_input(FeatureSpec(type="category", values=["a", "b"], nullable=True, default="b"), datatype="BYTES")
    assert c.validate(x([None, "a"])).feeds["x"][:, 0].tolist() == ["b", "a"]


def test_nullable_nan_is_still_rejected_when_nan_is_not_allowed() -> None:
    v = one_input(FeatureSpec(type="float", nullable=True))
    assert found(x([None, math.nan]), v) == {("x", 1, "nan")}


def test_null_for_an_int_input_without_a_default_is_rejected() -> None:
    v = one_input(FeatureSpec(type="int", nullable=True), datatype="INT64")
    (problem,) = violations(x([1, None]), v)
    assert (problem.field, problem.reason) == ("x", "null")
    assert "default" in problem.expected


# --- missing, optional and unknown fields -----------------------------------------------------

def test_a_missing_required_column_is_reported_once() -> None:
    batch = rows(3)
    for row in batch:
        del row["age"]
    (problem,) = violations(v2_columns(batch))
    assert (problem.field, problem.row, problem.reason) == ("age", None, "missing")


def test_rows_lacking_a_required_field_are_each_reported() -> None:
    batch = rows(4)
    del batch[1]["income"]
    del batch[3]["income"]
    assert found(v1_columns(batch)) == {("income", 1, "missing"), ("income", 3, "missing")}


def test_an_absent_optional_column_takes_its_default() -> None:
    batch = rows(2)
    for row in batch:
        del row["has_cosigner"]
    assert validator().validate(v2_columns(batch)).feeds["has_cosigner"][:, 0].tolist() == [0.0, 0.0]


def test_rows_lacking_an_optional_field_take_its_default() -> None:
    batch = rows(3, has_cosigner=[True, True, True])
    del batch[1]["has_cosigner"]
    feed = validator().validate(v1_columns(batch)).feeds["has_cosigner"]
    assert feed[:, 0].tolist() == [1.0, 0.0, 1.0]


def test_an_absent_optional_nullable_column_without_default_is_nan() -> None:
    v = RequestValidator(signature(("x", "FP32", [-1, 1]), ("y", "FP32", [-1, 1])),
                         InputSchema(features={"x": FeatureSpec(type="float"),
                                               "y": FeatureSpec(type="float", required=False, nullable=True)}))
    feed = v.validate({"x": Column("x", [1.0, 2.0], (2, 1), "FP32")}).feeds["y"]
    assert feed.shape == (2, 1) and np.isnan(feed).all()


def test_unknown_fields_are_ignored_and_listed() -> None:
    batch = rows(2)
    for row in batch:
        row["customer_id"] = "C1"
        row["application_date"] = "2025-01-01"
    validated = validator().validate(v1_columns(batch))
    assert validated.ignored_fields == ["customer_id", "application_date"]
    assert "customer_id" not in validated.feeds


def test_unknown_fields_are_rejected_when_the_schema_says_reject() -> None:
    strict = SCHEMA.model_copy(update={"unknown_fields": "reject"})
    batch = rows(2)
    batch[0]["customer_id"] = "C1"
    (problem,) = violations(v1_columns(batch), validator(strict))
    assert (problem.field, problem.reason) == ("customer_id", "unknown_field")


def test_a_feature_can_feed_an_input_of_another_name() -> None:
    v = RequestValidator(signature(("model_x", "FP32", [-1])),
                         InputSchema(features={"x": FeatureSpec(type="float", input="model_x")}))
    batch = v.validate({"x": Column("x", [1.0, 2.0], (2,), "FP64")})
    assert list(batch.feeds) == ["model_x"] and batch.feeds["model_x"].tolist() == [1.0, 2.0]
    assert found({"model_x": Column("model_x", [1.0], (1,), "FP64")}, v) == {("x", None, "missing")}


def test_inputs_without_a_policy_feature_are_checked_against_the_signature() -> None:
    v = RequestValidator(signature(("n", "INT32", [-1]), ("s", "BYTES", [-1])), None)
    batch = v.validate({"n": Column("n", [1, 2], (2,), "INT64"), "s": Column("s", ["a", "b"], (2,), "BYTES")})
    assert batch.feeds["n"].dtype == np.int32 and batch.feeds["s"].tolist() == ["a", "b"]
    assert found({"n": Column("n", [1.5, 2], (2,), "FP64"), "s": Column("s", ["a", 3], (2,), None)}, v) == {
        ("n", 0, "type"), ("s", 1, "type")}


# --- structure: batch size, rows, datatype, shape ---------------------------------------------

def test_batches_over_max_batch_size_are_rejected() -> None:
    small = validator(SCHEMA.model_copy(update={"max_batch_size": 2}))
    assert small.validate(v2_columns(rows(2))).rows == 2
    (problem,) = violations(v2_columns(rows(3)), small)
    assert (problem.field, problem.reason) == ("*", "batch_size")
    assert problem.expected == "at most 2 rows" and problem.got == "3 rows"


def test_fields_with_a_different_number_of_rows_are_rejected() -> None:
    columns = v2_columns(rows(2))
    columns["age"] = Column("age", [41, 42, 43], (3, 1), "INT64")
    (problem,) = violations(columns)
    assert (problem.field, problem.reason) == ("age", "rows_mismatch")
    assert problem.expected == "2 rows like the other fields" and problem.got == "3 rows"


def test_declared_bytes_for_a_float_input_is_rejected() -> None:
    (problem,) = violations(v2_columns(rows(2), declared={"income": "BYTES"}))
    assert (problem.field, problem.reason, problem.got) == ("income", "datatype", "BYTES")
    assert problem.expected.startswith("FP32")


def test_declared_number_for_a_bytes_input_is_rejected() -> None:
    assert found(v2_columns(rows(1), declared={"purpose": "FP32"})) == {("purpose", None, "datatype")}


@pytest.mark.parametrize("declared", ["INT64", "INT32", "UINT8", "FP64", "FP16", "FP32"])
def test_declared_numeric_types_are_accepted_for_a_float_input(declared: str) -> None:
    batch = validator().validate(v2_columns(rows(1), declared={"loan_amount": declared}))
    assert batch.feeds["loan_amount"].dtype == np.float32


def test_shapes_n_and_n_by_1_are_both_accepted() -> None:
    flat = validator().validate(v2_columns(rows(2), shape="[N]"))
    column = validator().validate(v2_columns(rows(2), shape="[N,1]"))
    for name in flat.feeds:
        assert flat.feeds[name].shape == column.feeds[name].shape == (2, 1)
        assert flat.feeds[name].tolist() == column.feeds[name].tolist()


@pytest.mark.parametrize("shape", [(1, 2), (2, 2), (2, 1, 1), ()])
def test_other_shapes_are_rejected_for_a_per_row_input(shape: tuple[int, ...]) -> None:
    columns = v2_columns(rows(2))
    columns["income"] = Column("income", [1.0, 2.0, 3.0, 4.0][:math.prod(shape)], shape, "FP64")
    (problem,) = violations(columns)
    assert (problem.field, problem.row, problem.reason) == ("income", None, "shape")
    assert problem.expected == "[-1, 1]"


def test_multi_value_inputs_keep_their_shape() -> None:
    v = RequestValidator(signature(("m", "FP32", [-1, 3])), None)
    feed = v.validate({"m": Column("m", [1, 2, 3, 4, 5, 6], (2, 3), "INT64")}).feeds["m"]
    assert feed.shape == (2, 3) and feed.dtype == np.float32
    assert found({"m": Column("m", [1, 2, 3, 4, 5, 6, 7, 8], (2, 4), "INT64")}, v) == {("m", None, "shape")}
    (problem,) = violations({"m": Column("m", [1, 2, 3, 4, None, 6], (2, 3), "FP64")}, v)
    assert (problem.row, problem.reason) == (1, "null")


def test_row_values_for_a_multi_value_input_are_a_shape_violation() -> None:
    v = RequestValidator(signature(("m", "FP32", [-1, 3])), None)
    (problem,) = violations({"m": Column("m", [1, 2, 3, 4, 5, 6], None, None)}, v)
    assert (problem.field, problem.reason) == ("m", "shape")
    assert "[-1, 3]" in problem.expected


# --- every violation, and the listing cap -----------------------------------------------------

def test_every_violation_of_a_request_is_reported() -> None:
    batch = rows(4, age=["forty", 41, 17], income=[1.0, math.nan], employment=["salaried", "x", "y"],
                 loan_term_months=[36, 36, 36, 6.5], has_cosigner=[False, False, False, None])
    for row in batch:
        del row["purpose"]
    with pytest.raises(SchemaViolation) as caught:
        validator().validate(v2_columns(batch))
    listed = caught.value.violations.items
    assert {(v.field, v.row, v.reason) for v in listed} == {
        ("age", 0, "type"),
        ("age", 2, "range"),
        ("income", 1, "nan"),
        ("employment", 1, "category"),
        ("employment", 2, "category"),
        ("loan_term_months", 3, "type"),
        ("has_cosigner", 3, "null"),
        ("purpose", None, "missing"),
    }
    assert caught.value.violations.total == len(listed) == 8
    assert all(v.expected and v.got for v in listed)
    assert str(caught.value).startswith("request violates the model schema: 8 problems: ")


def test_the_listing_cap_keeps_the_total_count() -> None:
    n = 30
    batch = rows(n, age=[10] * n, income=["x"] * n)
    with pytest.raises(SchemaViolation) as caught:
        validator(max_listed=5).validate(v2_columns(batch))
    collected = caught.value.violations
    assert len(collected.items) == 5
    assert collected.total == 2 * n
    assert collected.by_reason == {"range": n, "type": n}
    assert str(caught.value).endswith(f"; and {2 * n - 5} more")


def test_the_listing_cap_counts_unlisted_missing_rows() -> None:
    batch = rows(12)
    for row in batch[:10]:
        del row["age"]
    with pytest.raises(SchemaViolation) as caught:
        validator(max_listed=4).validate(v1_columns(batch))
    collected = caught.value.violations
    assert [(v.field, v.row, v.reason) for v in collected.items] == [("age", i, "missing") for i in range(4)]
    assert collected.total == collected.by_reason["missing"] == 10


def test_empty_batch_is_rejected() -> None:
    (problem,) = violations({name: Column(name, [], (0, 1), None) for name in good_row()})
    assert (problem.field, problem.reason) == ("*", "empty")


def test_a_request_without_fields_reports_every_required_field() -> None:
    assert found({}) == {(name, None, "missing") for name in REQUIRED}


def test_a_schema_with_only_optional_fields_rejects_an_empty_request() -> None:
    v = one_input(FeatureSpec(type="float", required=False, default=1.0))
    (problem,) = violations({}, v)
    assert (problem.field, problem.reason) == ("*", "empty")


# --- regressions (found as bugs) -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("datatype", "spec", "value"), [
    ("INT32", FeatureSpec(type="int"), 2**31),
    ("FP32", FeatureSpec(type="float", max=10), 1e39),
])
def test_rejecting_out_of_range_values_does_not_warn(datatype: str, spec: FeatureSpec, value: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (problem,) = violations(x([value], "FP64"), one_input(spec, datatype=datatype))
    assert problem.reason == "range"


def test_int64_overflow_is_rejected() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (problem,) = violations(x([2**63], "UINT64"), one_input(FeatureSpec(type="int"), datatype="INT64"))
    assert problem.reason == "range"


def test_finite_values_too_large_for_fp32_are_rejected() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        problems = violations(x([1.0, 1e39], "FP64"), one_input(FeatureSpec(type="float"), datatype="FP32"))
    assert [(p.field, p.row) for p in problems] == [("x", 1)]


def test_a_type_error_does_not_hide_other_violations_in_the_same_column() -> None:
    assert found(v2_columns(rows(3, age=[17, "x", 200]))) == {
        ("age", 0, "range"), ("age", 1, "type"), ("age", 2, "range")}


def test_string_violations_in_multi_value_inputs_name_the_row() -> None:
    v = RequestValidator(signature(("tokens", "BYTES", [-1, 2])), None)
    columns = {"tokens": Column("tokens", ["a", "b", "c", None, 5, "f"], (3, 2), "BYTES")}
    assert found(columns, v) == {("tokens", 1, "null"), ("tokens", 2, "type")}


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_bool_features_reject_other_floats_in_short_columns(value: float) -> None:
    assert found(v2_columns(rows(1, has_cosigner=[value]))) == {("has_cosigner", 0, "type")}


def test_bool_features_reject_other_floats_in_long_columns() -> None:
    assert found(v2_columns(rows(40, has_cosigner=[0.5] * 40))) == {("has_cosigner", i, "type") for i in range(40)}


def test_an_integer_too_large_for_float64_is_a_violation() -> None:
    assert found(v2_columns(rows(2, income=[58000, 10**400]))) == {("income", 1, "range")}


# --- the quick path and the full path agree ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["salaried", "rent", "car", "other", "", "x" * 300, "SALARIED"]), st.binary(max_size=4),
    st.integers(0, 200), st.floats(0, 1e6),
)


def _outcome(result: ValidatedBatch | SchemaViolation) -> Any:
    if isinstance(result, SchemaViolation):
        return ("violation", [v.as_dict() for v in result.violations.items], result.violations.total)
    return ("ok", result.rows, result.ignored_fields,
            {k: (v.dtype.str, v.shape, repr(v.tolist())) for k, v in sorted(result.feeds.items())})  # NaN-safe


def _validate(checker: RequestValidator, columns: dict[str, Column]) -> ValidatedBatch | SchemaViolation:
    try:
        return checker.validate(columns)
    except SchemaViolation as exc:
        return exc


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 4), changes=st.dictionaries(st.sampled_from([*sorted(SCHEMA.features), "extra"]),
                                                      st.lists(_ODD_VALUES, min_size=1, max_size=4), max_size=3),
       shape=st.sampled_from(["[N,1]", "[N]"]), drop=st.sets(st.sampled_from(sorted(SCHEMA.features)), max_size=2))
def test_the_quick_path_accepts_and_builds_exactly_what_the_full_path_does(
        n: int, changes: dict[str, list[Any]], shape: str, drop: set[str]) -> None:
    batch = rows(n, **changes)
    for row in batch:
        for name in drop:
            row.pop(name, None)
    quick = validator()
    full = validator()
    full._quick = None  # the full path alone
    for columns in (v2_columns(batch, shape), v1_columns(batch)):
        assert _outcome(_validate(quick, columns)) == _outcome(_validate(full, columns))


def test_the_quick_path_serves_the_common_request() -> None:
    checker = validator()
    assert checker._quick is not None
    assert checker._validate_quick(v2_columns(rows(1))) is not None


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinity_for_a_float64_input_is_refused_unless_allowed(value: float) -> None:
    signature = Signature(inputs=[TensorSpec(name="x", datatype="FP64", shape=[-1, 1])], outputs=[])
    strict = InputSchema(features={"x": FeatureSpec(type="float")})
    with pytest.raises(SchemaViolation) as caught:
        RequestValidator(signature, strict).validate({"x": Column("x", [value], (1, 1), "FP64")})
    assert [v.reason for v in caught.value.violations.items] == ["inf"]
    lenient = InputSchema(features={"x": FeatureSpec(type="float", allow_inf=True)})
    batch = RequestValidator(signature, lenient).validate({"x": Column("x", [value], (1, 1), "FP64")})
    assert batch.feeds["x"].tolist() == [[value]]


# --- the one-row vector path (models with many numeric inputs) agrees with the column paths ----

_NUMERIC_SIGNATURE = Signature(inputs=[TensorSpec(name=f"f{i}", datatype="FP32", shape=[-1, 1]) for i in range(4)]
                               + [TensorSpec(name="flat", datatype="FP32", shape=[-1])], outputs=[])
_NUMERIC_SCHEMA = InputSchema(features={
    "f0": FeatureSpec(type="float", min=-1, max=1),
    "f1": FeatureSpec(type="int", min=0, max=10),
    "f2": FeatureSpec(type="float"),
    "f3": FeatureSpec(type="float", allow_nan=True, nullable=True),
    "flat": FeatureSpec(type="int"),
})
_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**60), 2**60),
                     st.integers(-3, 12), st.floats(-2, 2), st.none(), st.booleans(), st.just("1"),
                     st.just(1e39), st.just(2**53 + 1))


@settings(max_examples=600, deadline=None)
@given(values=st.fixed_dictionaries({name: st.lists(_NUMBERS, min_size=1, max_size=2)
                                     for name in ["f0", "f1", "f2", "f3", "flat"]}),
       declared=st.sampled_from([None, "FP32", "FP64", "INT64", "INT8", "BYTES"]),
       shape=st.sampled_from(["[N,1]", "[N]", "none"]))
def test_the_row_vector_path_agrees_with_the_column_paths(values: dict[str, list[Any]], declared: str | None,
                                                          shape: str) -> None:
    rows = len(values["f0"])
    columns = {}
    for name, column in values.items():
        data = (column * rows)[:rows]
        dims = None if shape == "none" else ((rows, 1) if shape == "[N,1]" else (rows,))
        columns[name] = Column(name, data, dims, declared if dims is not None else None)
    vector = RequestValidator(_NUMERIC_SIGNATURE, _NUMERIC_SCHEMA)
    assert vector._row is not None
    columns_only = RequestValidator(_NUMERIC_SIGNATURE, _NUMERIC_SCHEMA)
    columns_only._row = None
    full = RequestValidator(_NUMERIC_SIGNATURE, _NUMERIC_SCHEMA)
    full._row, full._quick = None, None
    assert _outcome(_validate(vector, columns)) == _outcome(_validate(columns_only, columns)) \
        == _outcome(_validate(full, columns))


def test_the_row_vector_path_serves_a_clean_numeric_row() -> None:
    checker = RequestValidator(_NUMERIC_SIGNATURE, _NUMERIC_SCHEMA)
    assert checker._row is not None
    row = {"f0": [0.5], "f1": [3], "f2": [1e6], "f3": [-2.0], "flat": [7]}
    assert checker._row.feeds({k: Column(k, v, (1, 1), "FP64") for k, v in row.items()}) is not None

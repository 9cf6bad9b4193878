"""Protocol bodies <-> request columns and answers (OIP v2 with binary data, KServe v1)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.codec import Answer, DecodedRequest, decode_v1, decode_v2, encode_v1, encode_v2
from gateway.errors import MalformedRequest, Violation
from gateway.tensors import decode_binary, encode_binary


def v2(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def tensor(name: str, shape: list[int], datatype: str, data: Any = None, **parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        out["data"] = data
    if parameters:
        out["parameters"] = parameters
    return out


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    """JSON header followed by binary tensor data, and the Inference-Header-Content-Length."""
    head = orjson.dumps(header)
    return head + b"".join(blobs), len(head)


def malformed(body: bytes, header_length: int | None = None) -> list[Violation]:
    with pytest.raises(MalformedRequest) as caught:
        decode_v2(body, header_length)
    return caught.value.violations.items


def malformed_v1(body: bytes) -> list[Violation]:
    with pytest.raises(MalformedRequest) as caught:
        decode_v1(body)
    return caught.value.violations.items


# --- decode_v2: JSON data ---------------------------------------------------------------------

def test_decode_v2_flat_data() -> None:
    decoded = decode_v2(v2(tensor("a", [2, 1], "FP32", [1.5, 2]), tensor("s", [2], "BYTES", ["x", "y"])), None)
    a, s = decoded.columns["a"], decoded.columns["s"]
    assert (a.name, a.values, a.shape, a.declared, a.absent_rows) == ("a", [1.5, 2], (2, 1), "FP32", None)
    assert (s.values, s.shape, s.declared) == (["x", "y"], (2,), "BYTES")
    assert list(decoded.columns) == ["a", "s"]


def test_decode_v2_nested_data_is_flattened_row_major() -> None:
    decoded = decode_v2(v2(tensor("m", [2, 3], "INT64", [[1, 2, 3], [4, 5, 6]])), None)
    assert decoded.columns["m"].values == [1, 2, 3, 4, 5, 6]
    assert decoded.columns["m"].shape == (2, 3)


def test_decode_v2_keeps_id_outputs_and_binary_output_flags() -> None:
    body = v2(tensor("a", [1], "FP32", [1]), id="req-7", parameters={"binary_data_output": True},
              outputs=[{"name": "p"}, {"name": "q", "parameters": {"binary_data": False}},
                       {"name": "r", "parameters": {"binary_data": True}}])
    decoded = decode_v2(body, None)
    assert decoded.id == "req-7"
    assert decoded.outputs == ["p", "q", "r"]
    assert decoded.binary_outputs == {"p", "r"}
    assert decoded.binary_by_default is True


def test_decode_v2_without_outputs_asks_for_all_as_json() -> None:
    decoded = decode_v2(v2(tensor("a", [1], "FP32", [1])), None)
    assert (decoded.id, decoded.outputs, decoded.binary_outputs) == (None, None, set())
    assert decoded.binary_by_default is False


def test_decode_v2_accepts_nan_and_infinity_literals_into_the_column() -> None:
    decoded = decode_v2(b'{"inputs":[{"name":"a","shape":[3],"datatype":"FP32","data":[NaN, Infinity, -Infinity]}]}',
                        None)
    values = decoded.columns["a"].values
    assert math.isnan(values[0]) and values[1] == math.inf and values[2] == -math.inf


@pytest.mark.parametrize(("shape", "data", "expected", "got"), [
    ([2, 2], [1, 2, 3], "4 values for shape [2, 2]", "3 values"),
    ([3], [True], "3 values for shape [3]", "1 values"),
    ([2, 1], [[1], [2], [3]], "2 values for shape [2, 1]", "3 values"),
    ([0], [1], "0 values for shape [0]", "1 values"),
])
def test_decode_v2_shape_and_data_count_must_agree(shape: list[int], data: list[Any], expected: str, got: str) -> None:
    (problem,) = malformed(v2(tensor("a", shape, "FP32", data)))
    assert (problem.field, problem.reason, problem.expected, problem.got) == ("inputs[0] (a)", "shape", expected, got)


def test_decode_v2_lists_every_malformed_tensor() -> None:
    body = v2(tensor("a", [2], "FP32", [1]), tensor("ok", [1], "FP32", [1]), tensor("b", [1], "FP128", [1]),
              tensor("c", [1], "INT8"), tensor("ok", [1], "FP32", [2]))
    assert {(p.field, p.reason) for p in malformed(body)} == {
        ("inputs[0] (a)", "shape"), ("inputs[2] (b)", "datatype"), ("inputs[3] (c)", "malformed"),
        ("inputs[4] (ok)", "malformed")}


def test_decode_v2_unknown_datatype() -> None:
    (problem,) = malformed(v2(tensor("a", [1], "FLOAT32", [1])))
    assert (problem.field, problem.reason, problem.got) == ("inputs[0] (a)", "datatype", "'FLOAT32'")
    assert "FP32" in problem.expected and "BYTES" in problem.expected


def test_decode_v2_duplicate_input_names() -> None:
    (problem,) = malformed(v2(tensor("a", [1], "FP32", [1]), tensor("a", [1], "FP32", [2])))
    assert (problem.field, problem.reason) == ("inputs[1] (a)", "malformed")
    assert problem.expected == "each input named once"


@pytest.mark.parametrize("body", [b'{"inputs": [', b"", b"not json", b'{"inputs": []}}'])
def test_decode_v2_invalid_json(body: bytes) -> None:
    (problem,) = malformed(body)
    assert (problem.field, problem.reason) == ("body", "malformed")
    assert problem.got.startswith("invalid JSON")


@pytest.mark.parametrize(("body", "got"), [(b"[1, 2]", "list"), (b'"inputs"', "str"), (b"3", "int"),
                                           (b"null", "NoneType")])
def test_decode_v2_body_must_be_an_object(body: bytes, got: str) -> None:
    (problem,) = malformed(body)
    assert (problem.field, problem.got) == ("body", got)
    assert "JSON object" in problem.expected


def test_decode_v2_missing_inputs() -> None:
    (problem,) = malformed(b'{"id": "1"}')
    assert (problem.field, problem.reason, problem.got) == ("inputs", "malformed", "nothing")


def test_decode_v2_bad_fields_are_named_by_path() -> None:
    listed = malformed(v2({"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}, {"shape": [1]}))
    fields = {p.field for p in listed}
    assert "inputs[0].shape[0]" in fields
    assert {"inputs[1].name", "inputs[1].datatype"} <= fields


# --- decode_v2: binary data -------------------------------------------------------------------

def test_decode_v2_binary_fp32_int64_and_bytes_inputs() -> None:
    f = encode_binary(np.array([1.5, -2.0], dtype=np.float32), "FP32")
    i = encode_binary(np.array([7, -9], dtype=np.int64), "INT64")
    s = encode_binary(np.array(["car", "home"], dtype=object), "BYTES")
    body, length = binary_body({"inputs": [
        tensor("f", [2, 1], "FP32", binary_data_size=len(f)),
        tensor("j", [2], "FP64", [0.5, 0.25]),
        tensor("i", [2, 1], "INT64", binary_data_size=len(i)),
        tensor("s", [2, 1], "BYTES", binary_data_size=len(s)),
    ]}, f, i, s)
    columns = decode_v2(body, length).columns
    floats, ints = columns["f"].values, columns["i"].values
    assert isinstance(floats, np.ndarray) and isinstance(ints, np.ndarray)
    assert floats.tolist() == [1.5, -2.0] and floats.dtype == np.float32
    assert ints.tolist() == [7, -9] and ints.dtype == np.int64
    assert list(columns["s"].values) == ["car", "home"]
    assert columns["j"].values == [0.5, 0.25]
    assert {n: (c.shape, c.declared) for n, c in columns.items()} == {
        "f": ((2, 1), "FP32"), "j": ((2,), "FP64"), "i": ((2, 1), "INT64"), "s": ((2, 1), "BYTES")}


def test_decode_v2_header_length_equal_to_the_body_means_no_binary_data() -> None:
    body = v2(tensor("a", [1], "FP32", [1]))
    assert decode_v2(body, len(body)).columns["a"].values == [1]


def test_decode_v2_truncated_binary_data() -> None:
    data = struct.pack("<3f", 1, 2, 3)
    body, length = binary_body({"inputs": [tensor("a", [4], "FP32", binary_data_size=16)]}, data)
    problem = malformed(body, length)[0]
    assert (problem.field, problem.reason) == ("inputs[0] (a)", "malformed")
    assert (problem.expected, problem.got) == ("16 bytes of binary data", "12 bytes left in the body")


def test_decode_v2_binary_size_that_does_not_fit_the_shape() -> None:
    data = struct.pack("<3f", 1, 2, 3)
    body, length = binary_body({"inputs": [tensor("a", [4], "FP32", binary_data_size=12)]}, data)
    problem = malformed(body, length)[0]
    assert problem.field == "inputs[0] (a)" and "12 bytes" in problem.got


def test_decode_v2_truncated_bytes_element() -> None:
    data = struct.pack("<I", 10) + b"abc"
    body, length = binary_body({"inputs": [tensor("s", [1], "BYTES", binary_data_size=len(data))]}, data)
    problem = malformed(body, length)[0]
    assert problem.field == "inputs[0] (s)" and "longer than the data left" in problem.got


def test_decode_v2_trailing_binary_data() -> None:
    body, length = binary_body({"inputs": [tensor("a", [1], "FP32", binary_data_size=4)]}, b"\x00" * 6)
    (problem,) = malformed(body, length)
    assert (problem.field, problem.expected, problem.got) == (
        "body", "4 bytes of binary data after the JSON header", "6 bytes")


def test_decode_v2_tensor_without_data_or_binary_size() -> None:
    body, length = binary_body({"inputs": [tensor("a", [1], "FP32")]}, b"\x00" * 4)
    listed = malformed(body, length)
    assert ("inputs[0] (a)", "malformed") in {(p.field, p.reason) for p in listed}


@pytest.mark.parametrize("size", [-4, "4", True, 1.5])
def test_decode_v2_binary_size_must_be_a_non_negative_int(size: Any) -> None:
    body, length = binary_body({"inputs": [tensor("a", [1], "FP32", binary_data_size=size)]}, b"\x00" * 4)
    assert ("inputs[0] (a)", "malformed") in {(p.field, p.reason) for p in malformed(body, length)}


@pytest.mark.parametrize(("header_length", "got"), [(0, "0"), (10_000, "10000")])
def test_decode_v2_bad_header_length(header_length: int, got: str) -> None:
    (problem,) = malformed(v2(tensor("a", [1], "FP32", [1])), header_length)
    assert (problem.field, problem.got) == ("Inference-Header-Content-Length", got)


@pytest.mark.parametrize(("second", "reason"), [
    (tensor("a", [1], "FP32", binary_data_size=4), "malformed"),  # duplicate name
    (tensor("c", [1], "FP128", binary_data_size=4), "datatype"),  # unknown datatype
    (tensor("c", [2], "FP32", binary_data_size=4), "malformed"),  # 4 bytes cannot hold shape [2]
], ids=["duplicate-name", "unknown-datatype", "wrong-size"])
def test_decode_v2_rejected_binary_tensor_does_not_shift_the_others(second: dict[str, Any], reason: str) -> None:
    body, length = binary_body({"inputs": [
        tensor("a", [1], "FP32", binary_data_size=4),
        second,
        tensor("b", [1], "INT64", binary_data_size=8),
    ]}, struct.pack("<f", 1.0), struct.pack("<f", 2.0), struct.pack("<q", 7))
    # the binary data adds up exactly: the second tensor is the only problem
    assert [(p.field, p.reason) for p in malformed(body, length)] == [(f"inputs[1] ({second['name']})", reason)]


# --- decode_v1 --------------------------------------------------------------------------------

def test_decode_v1_instances_become_columns() -> None:
    decoded = decode_v1(orjson.dumps({"instances": [{"a": 1, "b": "x"}, {"a": 2.5, "b": None}], "id": 12}))
    assert list(decoded.columns) == ["a", "b"]
    a, b = decoded.columns["a"], decoded.columns["b"]
    assert (a.values, a.shape, a.declared, a.absent_rows) == ([1, 2.5], None, None, None)
    assert (b.values, b.absent_rows) == (["x", None], None)
    assert decoded.id == "12"
    assert decoded.outputs is None and decoded.binary_outputs == set()


def test_decode_v1_lists_the_rows_that_lack_a_field() -> None:
    decoded = decode_v1(orjson.dumps({"instances": [{"a": 1}, {"b": 2}, {"a": 3, "b": 4}, {}]}))
    assert decoded.columns["a"].values == [1, None, 3, None]
    assert decoded.columns["a"].absent_rows == [1, 3]
    assert decoded.columns["b"].absent_rows == [0, 3]
    assert decoded.id is None


def test_decode_v1_without_instances_gives_no_columns() -> None:
    assert decode_v1(b'{"instances": []}').columns == {}


def test_decode_v1_every_non_object_instance_is_listed() -> None:
    listed = malformed_v1(b'{"instances": [1, {"a": 1}, "x", [2]]}')
    assert [(p.field, p.got) for p in listed] == [("instances[0]", "int"), ("instances[2]", "str"),
                                                  ("instances[3]", "list")]


@pytest.mark.parametrize(("body", "field", "got"), [
    (b'{"inputs": []}', "body", "keys ['inputs']"),
    (b"[]", "body", "list"),
    (b'{"instances": {"a": 1}}', "instances", "dict"),
])
def test_decode_v1_needs_an_instances_list(body: bytes, field: str, got: str) -> None:
    (problem,) = malformed_v1(body)
    assert (problem.field, problem.reason, problem.got) == (field, "malformed", got)


def test_decode_v1_invalid_json() -> None:
    (problem,) = malformed_v1(b'{"instances": [')
    assert problem.field == "body" and problem.got.startswith("invalid JSON")


def test_decode_v1_accepts_nan_literals() -> None:
    body = json.dumps({"instances": [{"a": float("nan"), "b": float("inf")}]}).encode()
    assert b"NaN" in body
    decoded = decode_v1(body)
    assert math.isnan(decoded.columns["a"].values[0]) and decoded.columns["b"].values == [math.inf]


# --- encode -----------------------------------------------------------------------------------

def answer(**outputs: tuple[np.ndarray, str]) -> Answer:
    return Answer(model="credit-risk", version="2", request_id="r-1", outputs={k: v[0] for k, v in outputs.items()},
                  datatypes={k: v[1] for k, v in outputs.items()}, rows=2, parameters={"route": "stable"})


LABEL = (np.array([0, 1], dtype=np.int64), "INT64")
PROBS = (np.array([[0.75, 0.25], [0.5, 0.5]], dtype=np.float32), "FP32")
TAGS = (np.array(["low", "high"], dtype=object), "BYTES")


def test_encode_v2_json() -> None:
    body, headers = encode_v2(answer(label=LABEL, probabilities=PROBS, tag=TAGS), DecodedRequest({}))
    assert headers == {}
    assert orjson.loads(body) == {
        "model_name": "credit-risk", "model_version": "2", "id": "r-1", "parameters": {"route": "stable"},
        "outputs": [
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [0, 1]},
            {"name": "probabilities", "shape": [2, 2], "datatype": "FP32", "data": [0.75, 0.25, 0.5, 0.5]},
            {"name": "tag", "shape": [2], "datatype": "BYTES", "data": ["low", "high"]},
        ]}


def test_encode_v2_writes_nan_as_null() -> None:
    probs = np.array([[np.nan, 1.0]], dtype=np.float32)
    body, _ = encode_v2(answer(probabilities=(probs, "FP32")), DecodedRequest({}))
    assert orjson.loads(body)["outputs"][0]["data"] == [None, 1.0]


def _split_binary(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(body[:length])
    arrays, offset = {}, length
    for out in header["outputs"]:
        if "data" in out:
            continue
        size = out["parameters"]["binary_data_size"]
        arrays[out["name"]] = decode_binary(body[offset:offset + size], out["datatype"],
                                            math.prod(out["shape"])).reshape(out["shape"])
        offset += size
    assert offset == len(body)
    return header, arrays


def test_encode_v2_binary_outputs_round_trip() -> None:
    body, headers = encode_v2(answer(label=LABEL, probabilities=PROBS, tag=TAGS),
                              DecodedRequest({}, binary_by_default=True))
    header, arrays = _split_binary(body, headers)
    assert header["id"] == "r-1" and header["model_version"] == "2"
    assert all("data" not in out for out in header["outputs"])
    np.testing.assert_array_equal(arrays["label"], LABEL[0])
    np.testing.assert_array_equal(arrays["probabilities"], PROBS[0])
    assert arrays["tag"].tolist() == ["low", "high"]


def test_encode_v2_binary_only_for_the_outputs_asked_for() -> None:
    request = DecodedRequest({}, outputs=["label", "probabilities"], binary_outputs={"probabilities"})
    body, headers = encode_v2(answer(label=LABEL, probabilities=PROBS), request)
    header, arrays = _split_binary(body, headers)
    assert header["outputs"][0]["data"] == [0, 1]
    assert list(arrays) == ["probabilities"]
    np.testing.assert_array_equal(arrays["probabilities"], PROBS[0])


def test_encode_v1_one_output_gives_one_prediction_per_row() -> None:
    assert orjson.loads(encode_v1(answer(probabilities=PROBS))) == {
        "predictions": [[0.75, 0.25], [0.5, 0.5]], "model_name": "credit-risk", "model_version": "2", "id": "r-1",
        "parameters": {"route": "stable"}}


def test_encode_v1_several_outputs_give_an_object_per_row() -> None:
    assert orjson.loads(encode_v1(answer(label=LABEL, probabilities=PROBS, tag=TAGS)))["predictions"] == [
        {"label": 0, "probabilities": [0.75, 0.25], "tag": "low"},
        {"label": 1, "probabilities": [0.5, 0.5], "tag": "high"},
    ]


# --- the one-pass path and the full path agree -------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gateway.codec as codec_module  # noqa: E402

_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-10, 10), st.text(max_size=3))
_TENSOR = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 2)),
     "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP99", 7]),
     "shape": st.one_of(st.lists(st.one_of(st.integers(-1, 3), st.just("2"), st.just(1.0)), max_size=3),
                        st.just("1")),
     "data": st.one_of(st.lists(st.one_of(_SCALAR, st.lists(_SCALAR, max_size=2)), max_size=6), st.none(),
                       st.just("x"))},
    optional={"parameters": st.one_of(st.none(), st.dictionaries(st.sampled_from(["k", "binary_data_size"]),
                                                                    st.one_of(_SCALAR, st.lists(_SCALAR)),
                                                                    max_size=2))})
_REQUEST = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_TENSOR, max_size=3), st.just({}))},
    optional={"id": st.one_of(st.none(), st.text(max_size=3), st.integers(-9, 9)),
              "parameters": st.one_of(st.none(), st.dictionaries(st.sampled_from(["timeout_ms", "x"]), _SCALAR)),
              "outputs": st.one_of(st.none(), st.lists(st.fixed_dictionaries({"name": st.sampled_from(["o", 3])}),
                                                       max_size=2))})


def _decoding(body: bytes) -> Any:
    try:
        decoded = decode_v2(body, None)
    except MalformedRequest as exc:
        return ("malformed", [v.as_dict() for v in exc.violations.items])
    return ("ok", decoded.id, decoded.outputs, decoded.binary_outputs, decoded.timeout_ms,
            {k: (c.name, repr(c.values), c.shape, c.declared) for k, c in decoded.columns.items()})


@settings(max_examples=500, deadline=None)
@given(request=_REQUEST)
def test_the_one_pass_decoder_agrees_with_the_full_path(request: dict[str, Any]) -> None:
    body = orjson.dumps(request)
    quick = _decoding(body)
    original = codec_module._quick_v2
    codec_module._quick_v2 = lambda body: None  # the full path alone
    try:
        full = _decoding(body)
    finally:
        codec_module._quick_v2 = original
    assert quick == full

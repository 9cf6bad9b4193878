"""The wire types of gateway/wire.py against the Open Inference Protocol REST spec.

The spec's `components/schemas` are read from the OpenAPI file, so the module cannot drift from it
unnoticed. Set OIP_SPEC to point at another copy of open_inference_rest.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from gateway import wire
from gateway.codec import decode_v2
from gateway.errors import MalformedRequest

SPEC_PATH = Path(os.environ.get("OIP_SPEC", "/work/shared/spec/open_inference_rest.yaml"))
if not SPEC_PATH.is_file():
    pytest.skip(f"Open Inference Protocol spec not found at {SPEC_PATH} (set OIP_SPEC)", allow_module_level=True)

SCHEMAS: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))["components"]["schemas"]

#: spec schema -> the pydantic model that implements it
MODELS: dict[str, type[BaseModel]] = {
    "inference_request": wire.InferenceRequest,
    "request_input": wire.RequestInput,
    "request_output": wire.RequestOutput,
    "response_output": wire.ResponseOutput,
    "inference_response": wire.InferenceResponse,
    "metadata_tensor": wire.MetadataTensor,
    "metadata_model_response": wire.ModelMetadata,
    "metadata_server_response": wire.ServerMetadata,
}

#: required by the spec but optional here, and why
DEVIATIONS: dict[str, dict[str, str]] = {
    "request_input": {"data": "binary tensor data extension: data follows the JSON (binary_data_size)"},
    "response_output": {"data": "binary tensor data extension: data follows the JSON (binary_data_size)"},
}

REQUEST_EXAMPLES: dict[str, dict[str, Any]] = SCHEMAS["inference_request"].get("x-examples") or {}


def _required(model: type[BaseModel]) -> set[str]:
    return set(model.model_json_schema(by_alias=True).get("required", []))


def _properties(model: type[BaseModel]) -> set[str]:
    return set(model.model_json_schema(by_alias=True)["properties"])


@pytest.mark.parametrize("schema", sorted(MODELS))
def test_required_fields_match_the_spec(schema: str) -> None:
    spec_required = set(SCHEMAS[schema].get("required", []))
    allowed = set(DEVIATIONS.get(schema, {}))
    assert allowed <= spec_required, f"stale deviation for {schema}: {allowed - spec_required}"
    assert _required(MODELS[schema]) == spec_required - allowed, (
        f"{MODELS[schema].__name__} required fields drifted from components/schemas/{schema}")


@pytest.mark.parametrize("schema", sorted(MODELS))
def test_model_fields_are_spec_properties(schema: str) -> None:
    assert _properties(MODELS[schema]) <= set(SCHEMAS[schema]["properties"])


def test_the_spec_has_request_examples() -> None:
    assert any("inputs" in example for example in REQUEST_EXAMPLES.values())


@pytest.mark.parametrize("name", sorted(REQUEST_EXAMPLES))
def test_spec_request_examples_parse(name: str) -> None:
    example = REQUEST_EXAMPLES[name]
    missing = set(SCHEMAS["inference_request"]["required"]) - set(example)
    if missing:
        # an example that does not fit the schema's own `required` list must be refused
        with pytest.raises(ValidationError):
            wire.InferenceRequest.model_validate(example)
        return
    request = wire.InferenceRequest.model_validate(example)
    assert request.id == example.get("id")
    assert [(t.name, t.shape, t.datatype, t.data) for t in request.inputs] == [
        (t["name"], t["shape"], t["datatype"], t["data"]) for t in example["inputs"]]
    assert [o.name for o in request.outputs or []] == [o["name"] for o in example.get("outputs", [])]
    assert wire.InferenceRequest.model_validate_json(orjson.dumps(example)) == request


def test_spec_example_1_is_decoded_and_its_short_bool_tensor_reported() -> None:
    # input1 declares shape [3] but carries one value: the decoder must say so
    with pytest.raises(MalformedRequest) as caught:
        decode_v2(orjson.dumps(REQUEST_EXAMPLES["Example 1"]), None)
    assert [(v.field, v.reason, v.got) for v in caught.value.violations.items] == [
        ("inputs[1] (input1)", "shape", "1 values")]


def test_spec_example_1_with_consistent_data_decodes() -> None:
    example = orjson.loads(orjson.dumps(REQUEST_EXAMPLES["Example 1"]))
    example["inputs"][1]["data"] = [True, False, True]
    decoded = decode_v2(orjson.dumps(example), None)
    assert decoded.id == "42" and decoded.outputs == ["output0"]
    assert decoded.columns["input0"].values == [1, 2, 3, 4] and decoded.columns["input0"].shape == (2, 2)


def test_shape_dimensions_are_unsigned() -> None:
    with pytest.raises(ValidationError):
        wire.RequestInput.model_validate({"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]})


def test_tensor_data_may_be_nested() -> None:
    tensor = wire.RequestInput.model_validate({"name": "a", "shape": [2, 2], "datatype": "BYTES",
                                               "data": [["a", "b"], ["c", "d"]]})
    assert tensor.data == [["a", "b"], ["c", "d"]]


def test_parameters_take_strings_numbers_and_booleans() -> None:
    params = {"s": "x", "i": 3, "f": 0.5, "b": True}
    request = wire.InferenceRequest.model_validate({"inputs": [], "parameters": params})
    assert request.parameters == params
    assert type(request.parameters["b"]) is bool and type(request.parameters["i"]) is int
    with pytest.raises(ValidationError):
        wire.InferenceRequest.model_validate({"inputs": [], "parameters": {"nested": {"a": 1}}})


def test_unknown_keys_are_ignored() -> None:
    request = wire.InferenceRequest.model_validate({"inputs": [], "model_name": "m", "extension": {"x": 1}})
    assert request.inputs == []

"""Protocol bodies <-> request columns and answers: Open Inference Protocol v2 and KServe v1.

Decoding checks only the protocol (well-formed JSON, tensors whose shape matches their data,
known datatypes); what the model needs is the validator's job. Every problem is collected.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from gateway.errors import MalformedRequest, Violation
from gateway.tensors import NUMPY_DTYPES, BinaryDataError, decode_binary, encode_binary, flatten, to_json_data
from gateway.validation import Column
from gateway.wire import InferenceRequest
from gateway.yamldoc import format_path

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass
class DecodedRequest:
    """A request reduced to what the pipeline needs, plus how the client wants the answer."""

    columns: dict[str, Column]
    id: str | None = None
    outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    binary_by_default: bool = False
    timeout_ms: float | None = None
    """The client's deadline from the body (`parameters.timeout_ms`, or Triton's `timeout` in µs)."""


@dataclass
class Answer:
    """What the pipeline produced for one request."""

    model: str
    version: str
    request_id: str
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    rows: int
    parameters: dict[str, Any] = field(default_factory=dict)


def _malformed(field_name: str, expected: str, got: str) -> Violation:
    return Violation(field_name, "malformed", expected, got)


def decode_v2(body: bytes, header_length: int | None) -> DecodedRequest:
    """Decode an OIP v2 inference body (JSON, or JSON followed by binary tensor data)."""
    binary = b""
    if header_length is not None:
        if header_length == 0:
            raise MalformedRequest([_malformed("Inference-Header-Content-Length", "the JSON header's length "
                                               "(raw binary requests without a header are not supported)", "0")])
        if header_length > len(body):
            raise MalformedRequest([_malformed("Inference-Header-Content-Length",
                                               f"at most the body length {len(body)}", str(header_length))])
        body, binary = body[:header_length], body[header_length:]
    if not binary:
        quick = _quick_v2(body)
        if quick is not None:
            return quick
    request = _well_formed_v2(body)
    if request is None:  # something is off: let the wire model say exactly what (or coerce it)
        try:
            request = InferenceRequest.model_validate_json(body).model_dump()
        except ValidationError as exc:
            raise MalformedRequest([_pydantic_violation(e) for e in exc.errors()]) from None

    problems: list[Violation] = []
    columns: dict[str, Column] = {}
    offset = 0
    for i, tensor in enumerate(request["inputs"]):
        name, datatype, shape, data = tensor["name"], tensor["datatype"], tensor["shape"], tensor.get("data")
        where = f"inputs[{i}] ({name})"
        raw: memoryview | None = None
        if data is None:
            # Take this tensor's bytes first, so a tensor rejected below cannot shift the next ones.
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                problems.append(_malformed(where, "`data`, or binary data with a binary_data_size parameter",
                                           "neither"))
                continue
            if offset + size > len(binary):
                problems.append(_malformed(where, f"{size} bytes of binary data",
                                           f"{max(len(binary) - offset, 0)} bytes left in the body"))
                offset = len(binary)
                continue
            raw = memoryview(binary)[offset:offset + size]
            offset += size
        if name in columns:
            problems.append(_malformed(where, "each input named once", "a second tensor of that name"))
            continue
        if datatype not in NUMPY_DTYPES:
            problems.append(Violation(where, "datatype", f"one of {', '.join(NUMPY_DTYPES)}", repr(datatype)))
            continue
        count = math.prod(shape)
        values: list[Any] | np.ndarray
        if raw is not None:
            try:
                values = decode_binary(raw, datatype, count)
            except BinaryDataError as exc:
                problems.append(_malformed(where, f"binary data for shape {shape}", str(exc)))
                continue
        else:
            values = flatten(data)
            if len(values) != count:
                problems.append(Violation(where, "shape", f"{count} values for shape {shape}",
                                          f"{len(values)} values"))
                continue
        columns[name] = Column(name, values, tuple(shape), datatype)
    if offset != len(binary):
        problems.append(_malformed("body", f"{offset} bytes of binary data after the JSON header",
                                   f"{len(binary)} bytes"))
    if problems:
        raise MalformedRequest(problems)

    return _decoded(request, columns)


def _quick_v2(body: bytes) -> DecodedRequest | None:
    """The common request (JSON tensors with flat data of the right length, nothing unusual) in one
    pass; None for anything else, which `_well_formed_v2`, the wire model and the full loop decide."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict or not _top_level_ok(request):
        return None
    inputs = request["inputs"]
    columns: dict[str, Column] = {}
    for tensor in inputs:
        if type(tensor) is not dict:
            return None
        name, datatype = tensor.get("name"), tensor.get("datatype")
        shape, data = tensor.get("shape"), tensor.get("data")
        if (type(name) is not str or type(datatype) is not str or type(shape) is not list or type(data) is not list
                or datatype not in NUMPY_DTYPES or name in columns):
            return None
        parameters = tensor.get("parameters")
        if parameters is not None and not _parameters_ok(parameters):
            return None
        count = 1
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
                return None
            count *= dim
        if len(data) != count or list in map(type, data):
            return None
        columns[name] = Column(name, data, tuple(shape), datatype)
    return _decoded(request, columns)


def _decoded(request: dict[str, Any], columns: dict[str, Column]) -> DecodedRequest:
    """The request's columns with its id, requested outputs and deadline."""
    parameters = request.get("parameters") or {}
    default_binary = parameters.get("binary_data_output") is True
    outputs = None
    binary_outputs: set[str] = set()
    if request.get("outputs"):
        outputs = [o["name"] for o in request["outputs"]]
        for o in request["outputs"]:
            flag = (o.get("parameters") or {}).get("binary_data")
            if flag is True or (flag is None and default_binary):
                binary_outputs.add(o["name"])
    return DecodedRequest(columns, request.get("id"), outputs, binary_outputs, default_binary,
                          _timeout_ms(parameters))


_SCALARS = (str, int, float, bool, type(None))
_MAX_DIM = 2**63 - 1


def _well_formed_v2(body: bytes) -> dict[str, Any] | None:
    """The body as plain JSON when it is exactly what the wire model accepts without coercion, else None.

    Most requests are well formed; checking them by hand costs a fraction of building the pydantic
    models. Anything unusual (a NaN literal, a "3" for a dimension, a wrong type) returns None so
    the wire model decides, with its precise messages; the two paths accept the same requests.
    """
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict or not _top_level_ok(request):
        return None
    for tensor in request["inputs"]:
        if (type(tensor) is not dict or type(tensor.get("name")) is not str or type(tensor.get("datatype")) is not str
                or type(tensor.get("shape")) is not list or type(tensor.get("data", [])) not in (list, type(None))
                or not _parameters_ok(tensor.get("parameters"))):
            return None
        for dim in tensor["shape"]:
            if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
                return None
    return request


def _top_level_ok(request: dict[str, Any]) -> bool:
    """`inputs` a list; `id`, `parameters` and `outputs` absent or of the wire model's exact types."""
    if type(request.get("inputs")) is not list:
        return False
    if type(request.get("id", "")) not in (str, type(None)) or not _parameters_ok(request.get("parameters")):
        return False
    outputs = request.get("outputs")
    if outputs is not None:
        if type(outputs) is not list:
            return False
        for output in outputs:
            if type(output) is not dict or type(output.get("name")) is not str or not _parameters_ok(
                    output.get("parameters")):
                return False
    return True


def _parameters_ok(parameters: Any) -> bool:
    return parameters is None or (type(parameters) is dict and all(type(v) in _SCALARS for v in parameters.values()))


def _timeout_ms(parameters: dict[str, Any]) -> float | None:
    if "timeout_ms" in parameters:
        return positive_ms(parameters["timeout_ms"], "parameters.timeout_ms")
    if "timeout" in parameters:  # tritonclient's infer(timeout=...) sends microseconds
        value = positive_ms(parameters["timeout"], "parameters.timeout")
        return value / 1000
    return None


def positive_ms(value: Any, where: str) -> float:
    """A positive finite number of milliseconds, or MalformedRequest."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a non-number is reported just below
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MalformedRequest([_malformed(where, "a positive number", repr(value)[:40])])
    return float(value)


def _pydantic_violation(error: Any) -> Violation:
    loc = format_path(error.get("loc", ())) or "body"
    if error.get("type") == "json_invalid":
        return _malformed("body", "a JSON object", f"invalid JSON ({error.get('msg')})")
    if error.get("type") == "model_type":
        return _malformed("body", "a JSON object with `inputs`", type(error.get("input")).__name__)
    got = "nothing" if error.get("type") == "missing" else repr(error.get("input"))[:60]
    return _malformed(loc, error.get("msg", "a valid value"), got)


def decode_v1(body: bytes) -> DecodedRequest:
    """Decode a KServe v1 `{"instances": [{feature: value, ...}, ...]}` body into columns."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        payload = _loads_with_nan(body, exc)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise MalformedRequest([_malformed("body", 'a JSON object {"instances": [...]}',
                                           type(payload).__name__ if not isinstance(payload, dict)
                                           else f"keys {sorted(payload)[:10]}")])
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise MalformedRequest([_malformed("instances", "a list of objects", type(instances).__name__)])
    problems = [_malformed(f"instances[{i}]", "an object of feature: value", type(row).__name__)
                for i, row in enumerate(instances) if not isinstance(row, dict)]
    if problems:
        raise MalformedRequest(problems)
    names: dict[str, None] = {}
    for row in instances:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in instances]
        absent = [i for i, row in enumerate(instances) if name not in row]
        columns[name] = Column(name, values, None, None, absent or None)
    request_id = payload.get("id")
    return DecodedRequest(columns, str(request_id) if request_id is not None else None)


def _loads_with_nan(body: bytes, error: Exception) -> Any:
    # orjson refuses the NaN/Infinity literals Python's json module writes; pydantic's parser takes
    # them, so a client's NaN reaches the validator (which rejects it unless the policy allows NaN).
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(Any).validate_json(body)
    except ValidationError:
        raise MalformedRequest([_malformed("body", "a JSON object", f"invalid JSON ({error})")]) from None


def encode_v2(answer: Answer, request: DecodedRequest) -> tuple[bytes, dict[str, str]]:
    """OIP v2 answer body and extra headers (binary outputs follow the JSON when asked for)."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in answer.outputs.items():
        datatype = answer.datatypes[name]
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if name in request.binary_outputs or (request.outputs is None and request.binary_by_default):
            blob = encode_binary(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = to_json_data(array)
        outputs.append(tensor)
    body = orjson.dumps({"model_name": answer.model, "model_version": answer.version, "id": answer.request_id,
                         "parameters": answer.parameters, "outputs": outputs}, option=JSON_OPTIONS)
    headers = {}
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(body))
        body += b"".join(blobs)
    return body, headers


def encode_v1(answer: Answer) -> bytes:
    """KServe v1 answer: one prediction per row (the value, or an object when there are several outputs)."""
    names = list(answer.outputs)
    if len(names) == 1:
        predictions: list[Any] = list(answer.outputs[names[0]])
    else:
        predictions = [{name: answer.outputs[name][i] for name in names} for i in range(answer.rows)]
    return orjson.dumps({"predictions": predictions, "model_name": answer.model, "model_version": answer.version,
                         "id": answer.request_id, "parameters": answer.parameters}, option=JSON_OPTIONS)

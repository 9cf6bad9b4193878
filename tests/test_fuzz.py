"""Property tests: no client input makes the gateway answer 5xx (or crash, or hang)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL, good_row, make_client, v2_body

CLIENT_STATUSES = {200, 400, 404, 413, 422}

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[TestClient]:
    with make_client() as client:
        yield client


def _dumps(payload: Any) -> bytes:
    # Python-style JSON (NaN / Infinity literals), as many real clients send.
    import json

    return json.dumps(payload, allow_nan=True).encode()


def _check(client: TestClient, path: str, body: bytes) -> None:
    answer = client.post(path, content=body)
    assert answer.status_code in CLIENT_STATUSES, (answer.status_code, answer.text[:500], body[:300])
    if answer.status_code != 200:
        assert isinstance(orjson.loads(answer.content)["error"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values)
def test_arbitrary_json_never_breaks_either_protocol(fuzz_client: TestClient, payload: Any) -> None:
    _check(fuzz_client, f"/v2/models/{MODEL}/infer", _dumps(payload))
    _check(fuzz_client, f"/v1/models/{MODEL}:predict", _dumps(payload))
    _check(fuzz_client, f"/v1/models/{MODEL}:predict", _dumps({"instances": payload}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(good_row())), value=json_values,
       part=st.sampled_from(["data", "shape", "datatype", "name", "value", "drop"]))
def test_mutated_valid_requests_are_answered_or_rejected_cleanly(
        fuzz_client: TestClient, field: str, value: Any, part: str) -> None:
    row = good_row()
    if part == "value":
        row[field] = value
    if part == "drop":
        del row[field]
    v1_answer = fuzz_client.post(f"/v1/models/{MODEL}:predict", content=_dumps({"instances": [row, good_row()]}))
    assert v1_answer.status_code in CLIENT_STATUSES
    body = v2_body([good_row(), good_row()])
    tensor = next((t for t in body["inputs"] if t["name"] == field), body["inputs"][0])
    if part in ("data", "shape", "datatype", "name"):
        tensor[part] = value
    elif part == "value":
        tensor["data"][0] = value
    _check(fuzz_client, f"/v2/models/{MODEL}/infer", _dumps(body))
    if v1_answer.status_code == 200:
        probabilities = [p["probabilities"] for p in v1_answer.json()["predictions"]]
        assert all(math.isfinite(x) for pair in probabilities for x in pair)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), header=st.integers(min_value=0, max_value=300))
def test_binary_garbage_with_and_without_a_json_header(fuzz_client: TestClient, raw: bytes, header: int) -> None:
    _check(fuzz_client, f"/v2/models/{MODEL}/infer", raw)
    answer = fuzz_client.post(f"/v2/models/{MODEL}/infer", content=raw,
                              headers={"Inference-Header-Content-Length": str(header)})
    assert answer.status_code in CLIENT_STATUSES

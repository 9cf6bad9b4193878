"""The real Triton HTTP client (`tritonclient.http`) against a real gateway process.

Inputs are built from the model metadata the server reports: FP32 [N, 1] for numbers and BYTES
[N, 1] (numpy object arrays) for strings, sent as JSON or as binary tensor data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import MODEL, RunningServer, golden_examples

pytestmark = pytest.mark.e2e

ATOL = 1e-5


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    """A Triton client pointed at the session's gateway (host:port, no scheme)."""
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def metadata(client: triton.InferenceServerClient) -> dict[str, Any]:
    """The model metadata as the client reads it."""
    meta: dict[str, Any] = client.get_model_metadata(MODEL)
    return meta


def example_of(version: str) -> dict[str, Any]:
    """The first golden example of a version that has no missing value (binary data carries no null)."""
    return next(e for e in golden_examples(version) if None not in e["inputs"].values())


def build_inputs(metadata: dict[str, Any], rows: list[dict[str, Any]], *,
                 binary_data: bool | None) -> list[triton.InferInput]:
    """One InferInput per model input, typed from the metadata; binary_data None uses the client default."""
    inputs = []
    for tensor in metadata["inputs"]:
        name, datatype = tensor["name"], tensor["datatype"]
        values = [row[name] for row in rows]
        if datatype == "BYTES":
            array = np.array(values, dtype=object).reshape(len(rows), 1)
        else:
            assert datatype == "FP32", f"{name} is {datatype}; this test only builds FP32 and BYTES"
            array = np.array(values, dtype=np.float32).reshape(len(rows), 1)
        infer_input = triton.InferInput(name, [len(rows), 1], datatype)
        if binary_data is None:
            infer_input.set_data_from_numpy(array)
        else:
            infer_input.set_data_from_numpy(array, binary_data=binary_data)
        inputs.append(infer_input)
    return inputs


def assert_golden(result: triton.InferResult, examples: list[dict[str, Any]]) -> None:
    """The result's numpy outputs match the golden outputs of `examples`."""
    labels = result.as_numpy("label")
    probabilities = result.as_numpy("probabilities")
    assert labels is not None
    assert probabilities is not None
    assert labels.dtype == np.int64
    assert probabilities.dtype == np.float32
    assert labels.tolist() == [e["outputs"]["label"] for e in examples]
    np.testing.assert_allclose(probabilities, np.array([e["outputs"]["probabilities"] for e in examples]),
                               rtol=0, atol=ATOL)


# ---------------------------------------------------------------- health and metadata


def test_server_live_and_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_model_and_version_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(MODEL) is True
    assert client.is_model_ready(MODEL, model_version="1") is True
    assert client.is_model_ready(MODEL, model_version="2") is True
    assert client.is_model_ready("no-such-model") is False
    assert client.is_model_ready(MODEL, model_version="99") is False


def test_server_metadata(client: triton.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert isinstance(meta["name"], str)
    assert meta["name"]
    assert isinstance(meta["version"], str)
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(client: triton.InferenceServerClient, metadata: dict[str, Any]) -> None:
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1", "2"]
    assert len(metadata["inputs"]) == 12
    assert {t["datatype"] for t in metadata["inputs"]} == {"FP32", "BYTES"}
    assert all(t["shape"] == [-1, 1] for t in metadata["inputs"])
    assert {t["name"] for t in metadata["inputs"]} == set(example_of("1")["inputs"])
    assert {t["name"] for t in metadata["outputs"]} == {"label", "probabilities"}
    pinned = client.get_model_metadata(MODEL, model_version="2")
    assert pinned["versions"] == ["2"]
    assert pinned["inputs"] == metadata["inputs"]


def test_metadata_of_unknown_model_raises(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert "no-such-model" in str(raised.value.message())
    assert raised.value.status() == "404"


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("binary_in", [False, None], ids=["json-inputs", "binary-inputs-default"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-outputs", "binary-outputs"])
def test_infer_reproduces_golden_row(client: triton.InferenceServerClient, metadata: dict[str, Any],
                                     binary_in: bool | None, binary_out: bool) -> None:
    example = example_of("1")
    outputs = [triton.InferRequestedOutput("label", binary_data=binary_out),
               triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    result = client.infer(MODEL, build_inputs(metadata, [example["inputs"]], binary_data=binary_in),
                          outputs=outputs, request_id="triton-golden")
    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["model_version"] == "1"
    assert response["id"] == "triton-golden"
    for output in response["outputs"]:
        # binary outputs carry their size instead of `data`; JSON outputs carry `data`
        assert ("data" in output) is (not binary_out), output
        assert ("binary_data_size" in (output.get("parameters") or {})) is binary_out, output
    assert_golden(result, [example])


def test_infer_without_requested_outputs_returns_all(client: triton.InferenceServerClient,
                                                     metadata: dict[str, Any]) -> None:
    examples = [e for e in golden_examples("1") if None not in e["inputs"].values()][:4]
    result = client.infer(MODEL, build_inputs(metadata, [e["inputs"] for e in examples], binary_data=None))
    assert {o["name"] for o in result.get_response()["outputs"]} == {"label", "probabilities"}
    assert_golden(result, examples)


def test_infer_selected_output_only(client: triton.InferenceServerClient, metadata: dict[str, Any]) -> None:
    example = example_of("1")
    result = client.infer(MODEL, build_inputs(metadata, [example["inputs"]], binary_data=None),
                          outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("label") is None
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    np.testing.assert_allclose(probabilities[0], example["outputs"]["probabilities"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("binary_in", [False, None], ids=["json-inputs", "binary-inputs-default"])
def test_infer_pinned_version_2(client: triton.InferenceServerClient, metadata: dict[str, Any],
                                binary_in: bool | None) -> None:
    example = example_of("2")
    result = client.infer(MODEL, build_inputs(metadata, [example["inputs"]], binary_data=binary_in),
                          model_version="2",
                          outputs=[triton.InferRequestedOutput("label", binary_data=False),
                                   triton.InferRequestedOutput("probabilities", binary_data=True)])
    assert result.get_response()["model_version"] == "2"
    assert_golden(result, [example])


def test_unknown_model_raises_with_server_error_text(client: triton.InferenceServerClient,
                                                     metadata: dict[str, Any]) -> None:
    inputs = build_inputs(metadata, [example_of("1")["inputs"]], binary_data=None)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", inputs)
    assert "unknown model 'no-such-model'" in str(raised.value.message())
    assert raised.value.status() == "404"


def test_bad_category_raises_with_server_error_text(client: triton.InferenceServerClient,
                                                    metadata: dict[str, Any]) -> None:
    row = {**example_of("1")["inputs"], "purpose": "yacht"}
    for binary_in in (False, None):
        with pytest.raises(InferenceServerException) as raised:
            client.infer(MODEL, build_inputs(metadata, [row], binary_data=binary_in))
        message = str(raised.value.message())
        assert "purpose" in message
        assert "yacht" in message
        assert raised.value.status() == "422"
    # the client and the server are still fine afterwards
    assert client.is_server_ready() is True


def test_unknown_version_raises(client: triton.InferenceServerClient, metadata: dict[str, Any]) -> None:
    inputs = build_inputs(metadata, [example_of("1")["inputs"]], binary_data=None)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, inputs, model_version="99")
    assert "'99'" in str(raised.value.message())
    assert raised.value.status() == "404"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client: triton.InferenceServerClient, metadata: dict[str, Any], algorithm: str) -> None:
    examples = [e for e in golden_examples("2") if None not in e["inputs"].values()][:4]
    result = client.infer(MODEL, build_inputs(metadata, [e["inputs"] for e in examples], binary_data=None),
                          model_version="2", request_compression_algorithm=algorithm)
    assert_golden(result, examples)


def test_missing_value_as_nan_in_binary_data(client: triton.InferenceServerClient, metadata: dict[str, Any]) -> None:
    """Binary tensors cannot carry null; the policy accepts NaN as "unknown" for credit_history_years."""
    example = next(e for e in golden_examples("1") if e["inputs"]["credit_history_years"] is None)
    row = {**example["inputs"], "credit_history_years": float("nan")}
    result = client.infer(MODEL, build_inputs(metadata, [row], binary_data=True))
    assert_golden(result, [example])

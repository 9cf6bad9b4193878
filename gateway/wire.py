"""Open Inference Protocol (KServe v2) REST types, written from the published OpenAPI spec.

One module holds every wire type; `tests/test_wire.py` checks them against the spec's examples and
its `components/schemas`. Unknown keys are ignored, as the protocol leaves room for extensions.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Parameter = str | int | float | bool | None
Parameters = dict[str, Parameter]
Dim = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RequestInput(_Wire):
    """One input tensor of an inference request (`data` is absent when sent as binary)."""

    name: str
    shape: list[Dim]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(_Wire):
    """One requested output tensor."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Wire):
    """`$inference_request`."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    """`$response_output`."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(_Wire):
    """`$inference_response`."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(_Wire):
    """`$metadata_tensor`: name, datatype and shape (-1 for a variable dimension)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Wire):
    """`$metadata_model_response`."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor] = []
    outputs: list[MetadataTensor] = []


class ServerMetadata(_Wire):
    """`$metadata_server_response`."""

    name: str
    version: str
    extensions: list[str]


class ErrorResponse(_Wire):
    """`$inference_error_response`, plus the structured list of violations where there are any."""

    error: str
    violations: list[dict[str, Any]] | None = None


class ModelReady(_Wire):
    """`$ready_model_response`."""

    name: str
    ready: bool

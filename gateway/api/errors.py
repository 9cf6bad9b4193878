"""The one table from gateway errors to HTTP statuses, and the protocol's error body."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from gateway.api.auth import Forbidden, Unauthenticated
from gateway.control import Conflict, GateClosed, StoreFailed
from gateway.errors import (
    ClientError,
    GatewayError,
    InferenceFailed,
    InferenceTimeout,
    MalformedRequest,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
    SchemaViolation,
    Unavailable,
    UnsupportedEncoding,
    VersionNotFound,
    ViolationError,
)
from gateway.readiness.jobs import RunRefused
from gateway.readiness.store import ReportRejected

#: error class -> (HTTP status, outcome label for metrics)
STATUS: dict[type[GatewayError], tuple[int, str]] = {
    MalformedRequest: (400, "malformed"),
    RequestTooLarge: (413, "too_large"),
    UnsupportedEncoding: (415, "malformed"),
    SchemaViolation: (422, "invalid"),
    ModelNotFound: (404, "not_found"),
    VersionNotFound: (404, "not_found"),
    NotFound: (404, "not_found"),
    RunRefused: (409, "conflict"),
    Unavailable: (503, "unavailable"),
    InferenceTimeout: (504, "timeout"),
    Unauthenticated: (401, "unauthenticated"),
    Forbidden: (403, "forbidden"),
    Conflict: (409, "conflict"),
    GateClosed: (409, "conflict"),
    ReportRejected: (400, "malformed"),
    StoreFailed: (503, "unavailable"),
    ClientError: (400, "malformed"),
    InferenceFailed: (500, "error"),
}


def status_of(error: GatewayError) -> tuple[int, str]:
    """HTTP status and outcome label of an error (500/"error" for anything unlisted)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "error"


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, headers=headers,
                    media_type="application/json")


def error_payload(error: GatewayError) -> tuple[int, bytes]:
    """The status the table gives and the JSON body: `{"error": "..."}` with the listed violations."""
    status, _ = status_of(error)
    body: dict[str, object] = {"error": error.message}
    if isinstance(error, ViolationError):
        body["violations"] = [v.as_dict() for v in error.violations.items]
        body["violation_count"] = error.violations.total
    return status, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """`error_payload` as a Starlette response."""
    status, body = error_payload(error)
    return Response(body, status_code=status, headers=headers, media_type="application/json")

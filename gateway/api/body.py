"""Reading a request body with a size limit enforced before the body is parsed (or even read)."""

from __future__ import annotations

from starlette.requests import Request

from gateway.errors import MalformedRequest, RequestTooLarge, Violation


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or RequestTooLarge as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedRequest([Violation("Content-Length", "malformed", "a byte count", repr(declared))])
        if int(declared) > limit:
            raise RequestTooLarge(f"request body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def header_length(request: Request) -> int | None:
    """The binary data extension's Inference-Header-Content-Length, if given."""
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise MalformedRequest([Violation("Inference-Header-Content-Length", "malformed", "a byte count",
                                          repr(value))])
    return int(value)

"""Reading a request body with a size limit enforced before the body is parsed (or even read)."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from starlette.requests import Request

from gateway.errors import MalformedRequest, RequestTooLarge, UnsupportedEncoding, Violation

#: Content-Encoding -> zlib window bits (gzip header, or zlib-wrapped deflate)
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a Starlette request (see `receive_body`)."""
    return await receive_body(request.receive, request.headers, limit)


async def receive_body(receive: Callable[[], Awaitable[MutableMapping[str, Any]]], headers: Mapping[str, str],
                       limit: int) -> bytes:
    """The whole (inflated) body from ASGI `receive`, or RequestTooLarge as soon as it is known to
    exceed `limit` bytes; ClientGone if the client disconnects first. `headers` have lower-case names."""
    declared = headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise MalformedRequest([Violation("Content-Length", "malformed", "a byte count", repr(declared))])
        if int(declared) > limit:
            raise RequestTooLarge(f"request body is {int(declared)} bytes; the limit is {limit} bytes")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in DECODERS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    return _decompress(body, encoding, limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a compressed body; the limit applies to the inflated size too (no zip bombs)."""
    inflater = zlib.decompressobj(DECODERS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedRequest([Violation("body", "malformed", f"{encoding}-compressed data", str(exc))]) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestTooLarge(f"request body inflates to more than the limit of {limit} bytes")
    if not inflater.eof:
        raise MalformedRequest([Violation("body", "malformed", f"complete {encoding} data", "a truncated stream")])
    return out


def header_length(headers: Mapping[str, str]) -> int | None:
    """The binary data extension's Inference-Header-Content-Length, if given (lower-case names)."""
    value = headers.get("inference-header-content-length")
    if value is None:
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise MalformedRequest([Violation("Inference-Header-Content-Length", "malformed", "a byte count",
                                          repr(value))])
    return int(value)

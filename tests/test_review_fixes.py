"""Regression tests for findings of the hot-path review: each failed before its fix."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.api.body import header_length, receive_body
from gateway.audit import AuditWriter, verify
from gateway.card import Signature, TensorSpec
from gateway.errors import MalformedRequest
from gateway.policy import Batching, Policy
from gateway.policy_fit import policy_misfits
from tests.conftest import MODEL, good_row, make_client, v2_body


def test_an_integer_beyond_64_bits_does_not_stop_the_audit_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = AuditWriter(tmp_path, 100, "batch", 1.0, 10**9, 10**6)
        await writer.start()
        assert await writer.submit({"kind": "request", "inputs": {"customer_id": [10**30]}}, "block")
        assert await writer.submit({"kind": "request", "inputs": {"age": [41]}}, "block")
        await writer.close()

    asyncio.run(scenario())
    lines = [json.loads(line) for f in sorted(tmp_path.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [line["inputs"] for line in lines if line.get("kind") == "request"] == [
        {"customer_id": [str(10**30)]}, {"age": [41]}]
    assert verify(tmp_path).ok


def test_a_non_ascii_digit_in_a_length_header_is_a_client_error() -> None:
    """`"²".isdigit()` is true and `int("²")` raises: that was a 500 on client input."""
    with pytest.raises(MalformedRequest):
        header_length({"inference-header-content-length": "\u00b2"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    with pytest.raises(MalformedRequest):
        asyncio.run(receive_body(receive, {"content-length": "\u00b2"}, 1000))


def test_a_client_shortened_deadline_never_trips_the_breaker() -> None:
    with make_client() as client:
        for _ in range(8):  # more than the policy's fail_max of 5
            client.post(f"/v2/models/{MODEL}/versions/2/infer", json=v2_body([good_row()]),
                        headers={"X-Timeout-Ms": "0.001"})
        status: dict[str, Any] = client.get("/status").json()
        (model,) = [m for m in status["models"] if m["name"] == MODEL]
        (version,) = [v for v in model["versions"] if v["version"] == "2"]
        assert version["breaker"]["state"] == "closed", version["breaker"]
        normal = client.post(f"/v2/models/{MODEL}/versions/2/infer", json=v2_body([good_row()]))
        assert normal.status_code == 200 and normal.headers["x-route"] == "pinned"


def test_batching_refuses_inputs_whose_width_varies() -> None:
    signature = Signature(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, -1])],
                          outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, -1])])
    policy = Policy.model_validate({"model": "m", "schema": {"features": {}}, "batching": Batching().model_dump()})
    messages = [m.message for m in policy_misfits(policy, signature) if m.error]
    assert any("fixed dimensions after the first" in m for m in messages), messages

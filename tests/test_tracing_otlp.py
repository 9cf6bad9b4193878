"""OTLP export: a real gateway with GATEWAY_TRACE_EXPORTER=otlp sends its spans as OTLP/HTTP protobuf
to a receiver on loopback (what the compose stack's OpenTelemetry collector listens for)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import MODEL, MODELS, POLICIES, RunningServer, good_row


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Receiver.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_a_gateway_exports_its_request_spans_over_otlp(receiver: str) -> None:
    gateway = RunningServer(MODELS, POLICIES, env={"GATEWAY_TRACE_EXPORTER": "otlp",
                                                   "OTEL_EXPORTER_OTLP_ENDPOINT": receiver,
                                                   "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        gateway.wait_live()
        answer = httpx.post(f"{gateway.url}/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
        assert answer.status_code == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _Receiver.received:
            time.sleep(0.1)
    finally:
        gateway.stop()
    assert _Receiver.received, "no OTLP export arrived"
    path, content_type, body = _Receiver.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for r in request.resource_spans for scope in r.scope_spans for s in scope.spans]
    names = {s.name for s in spans}
    service = {a.value.string_value for r in request.resource_spans for a in r.resource.attributes
               if a.key == "service.name"}
    assert service == {"gateway"} and spans, names

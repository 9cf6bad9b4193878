"""End to end against a real `gateway serve` process: health, metadata, inference, errors, metrics.

Everything goes through HTTP (httpx) to the session-scoped `server` fixture; no gateway module is
imported. Golden examples come from models/credit-risk/data/golden.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, RunningServer, golden_examples, good_row, v2_body

pytestmark = pytest.mark.e2e

VERSIONS = ("1", "2")
FEATURES = ("age", "income", "loan_amount", "loan_term_months", "credit_history_years", "num_open_accounts",
            "debt_to_income", "delinquencies_2y", "has_cosigner", "employment", "home_ownership", "purpose")
ATOL = 1e-5
MAX_BODY = 1024 * 1024
INFER = f"/v2/models/{MODEL}/infer"
PREDICT = f"/v1/models/{MODEL}:predict"


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    """One keep-alive client for the module, as a real caller would hold."""
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


# ---------------------------------------------------------------- helpers


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `outputs` of a v2 response keyed by tensor name."""
    return {o["name"]: o for o in body["outputs"]}


def assert_matches_golden(labels: list[int], probabilities: np.ndarray, examples: list[dict[str, Any]]) -> None:
    """Labels equal and probabilities within ATOL of the golden outputs, row by row."""
    expected_labels = [e["outputs"]["label"] for e in examples]
    expected_probs = np.array([e["outputs"]["probabilities"] for e in examples], dtype=np.float64)
    assert labels == expected_labels
    assert probabilities.shape == expected_probs.shape
    np.testing.assert_allclose(probabilities, expected_probs, rtol=0, atol=ATOL)


def assert_v2_golden(body: dict[str, Any], examples: list[dict[str, Any]]) -> None:
    """A v2 answer to `examples` (as one batch) reproduces their golden outputs."""
    out = outputs_by_name(body)
    assert out["label"]["datatype"] == "INT64"
    assert out["label"]["shape"] == [len(examples)]
    assert out["probabilities"]["datatype"] == "FP32"
    assert out["probabilities"]["shape"] == [len(examples), 2]
    probs = np.array(out["probabilities"]["data"], dtype=np.float64).reshape(len(examples), 2)
    assert_matches_golden(list(out["label"]["data"]), probs, examples)


def assert_error_body(response: httpx.Response, status: int, *, violations: bool) -> dict[str, Any]:
    """The protocol's error body: JSON with an `error` string (and the violation list where due)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    if violations:
        assert isinstance(body.get("violations"), list)
        assert body["violations"]
        for v in body["violations"]:
            assert {"field", "reason", "expected", "got"} <= v.keys()
    return body


def first_golden() -> dict[str, Any]:
    """The first golden example of the stable version (1), which has no missing values."""
    example = golden_examples("1")[0]
    assert None not in example["inputs"].values()
    return example


def assert_good_request_still_served(http: httpx.Client, server: RunningServer) -> None:
    """A valid request right after a bad one is answered correctly, by a still running process."""
    example = first_golden()
    response = http.post(INFER, json=v2_body([example["inputs"]]))
    assert response.status_code == 200, response.text
    assert_v2_golden(response.json(), [example])
    assert server.process.poll() is None, "the gateway process died"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client) -> Samples:
    """Every sample of /metrics, parsed with the Prometheus parser, keyed by name and labels."""
    response = http.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` that carry `labels` (0 when none exists yet)."""
    wanted = set(labels.items())
    return sum(value for (found, series), value in samples.items() if found == name and wanted <= set(series))


# ---------------------------------------------------------------- health and metadata


def test_health_live_and_ready(http: httpx.Client) -> None:
    live = http.get("/v2/health/live")
    assert live.status_code == 200
    assert live.json()["live"] is True
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True


def test_server_metadata(http: httpx.Client) -> None:
    response = http.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["name"], str)
    assert body["name"]
    assert isinstance(body["version"], str)
    assert "binary_tensor_data" in body["extensions"]


def _assert_credit_risk_signature(body: dict[str, Any]) -> None:
    assert body["name"] == MODEL
    assert body["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: t for t in body["inputs"]}
    assert set(inputs) == set(FEATURES)
    for name, tensor in inputs.items():
        expected = "BYTES" if name in ("employment", "home_ownership", "purpose") else "FP32"
        assert tensor["datatype"] == expected, name
        assert tensor["shape"] == [-1, 1], name
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in body["outputs"]}
    assert outputs == {"label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 2])}


def test_model_metadata(http: httpx.Client) -> None:
    response = http.get(f"/v2/models/{MODEL}")
    assert response.status_code == 200
    body = response.json()
    _assert_credit_risk_signature(body)
    assert body["versions"] == ["1", "2"]


def test_version_metadata(http: httpx.Client) -> None:
    response = http.get(f"/v2/models/{MODEL}/versions/2")
    assert response.status_code == 200
    body = response.json()
    _assert_credit_risk_signature(body)
    assert body["versions"] == ["2"]


def test_model_and_version_ready(http: httpx.Client) -> None:
    model = http.get(f"/v2/models/{MODEL}/ready")
    assert model.status_code == 200
    assert model.json() == {"name": MODEL, "ready": True}
    for version in VERSIONS:
        response = http.get(f"/v2/models/{MODEL}/versions/{version}/ready")
        assert response.status_code == 200, version
        assert response.json()["ready"] is True


def test_metadata_and_readiness_of_unknown_model_and_version_are_404(http: httpx.Client) -> None:
    for path in ("/v2/models/no-such-model", "/v2/models/no-such-model/ready",
                 f"/v2/models/{MODEL}/versions/99", f"/v2/models/{MODEL}/versions/99/ready"):
        body = assert_error_body(http.get(path), 404, violations=False)
        assert "no-such-model" in body["error"] or "'99'" in body["error"], path


# ---------------------------------------------------------------- golden examples


@pytest.mark.parametrize("version", VERSIONS)
def test_v2_pinned_version_reproduces_its_golden_examples(http: httpx.Client, version: str) -> None:
    examples = golden_examples(version)
    assert len(examples) >= 10
    response = http.post(f"/v2/models/{MODEL}/versions/{version}/infer",
                         json=v2_body([e["inputs"] for e in examples], id=f"golden-v{version}"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    assert body["model_version"] == version
    assert body["id"] == f"golden-v{version}"
    assert response.headers["x-model-version"] == version
    assert_v2_golden(body, examples)


@pytest.mark.parametrize("version", VERSIONS)
def test_v1_pinned_version_reproduces_its_golden_examples(http: httpx.Client, version: str) -> None:
    examples = golden_examples(version)
    response = http.post(f"/v1/models/{MODEL}/versions/{version}:predict",
                         json={"instances": [e["inputs"] for e in examples], "id": f"v1-golden-{version}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    assert body["model_version"] == version
    assert body["id"] == f"v1-golden-{version}"
    assert response.headers["x-model-version"] == version
    predictions = body["predictions"]
    assert len(predictions) == len(examples)
    probs = np.array([p["probabilities"] for p in predictions], dtype=np.float64)
    assert_matches_golden([p["label"] for p in predictions], probs, examples)


def test_the_two_versions_really_differ() -> None:
    """Guards the golden tests above: a server answering every version with one model would fail them."""
    by_id = {e["id"]: e["outputs"]["probabilities"] for e in golden_examples("1")}
    other = {e["id"]: e["outputs"]["probabilities"] for e in golden_examples("2")}
    assert by_id.keys() == other.keys()
    assert any(abs(by_id[k][1] - other[k][1]) > 1e-3 for k in by_id)


def test_unversioned_requests_go_to_the_policy_stable_version(http: httpx.Client) -> None:
    example = first_golden()
    v2 = http.post(INFER, json=v2_body([example["inputs"]], id="route-check"))
    assert v2.status_code == 200, v2.text
    assert v2.headers["x-model-version"] == "1"
    assert v2.json()["model_version"] == "1"
    assert v2.json()["id"] == "route-check"
    assert_v2_golden(v2.json(), [example])
    v1 = http.post(PREDICT, json={"instances": [example["inputs"]]})
    assert v1.status_code == 200, v1.text
    assert v1.headers["x-model-version"] == "1"
    assert v1.json()["model_version"] == "1"


def test_request_id_header_is_used_when_the_body_has_no_id(http: httpx.Client) -> None:
    response = http.post(INFER, json=v2_body([good_row()]), headers={"X-Request-Id": "trace-123"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "trace-123"
    assert response.headers["x-request-id"] == "trace-123"


@pytest.mark.parametrize("request_id", ["заявка-7", "line\r\nbreak"], ids=["non-latin-1", "crlf"])
def test_any_json_string_id_is_echoed(http: httpx.Client, server: RunningServer, request_id: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30.0) as own:  # a failure here must not spoil `http`
        response = own.post(INFER, json=v2_body([good_row()], id=request_id))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == request_id
    assert_good_request_still_served(http, server)


def test_empty_string_id_is_echoed(http: httpx.Client) -> None:
    response = http.post(INFER, json=v2_body([good_row()], id=""))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == ""


# ---------------------------------------------------------------- output selection


def test_requested_output_is_the_only_one_returned(http: httpx.Client) -> None:
    example = first_golden()
    response = http.post(INFER, json=v2_body([example["inputs"]], outputs=[{"name": "probabilities"}]))
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == ["probabilities"]
    np.testing.assert_allclose(outputs[0]["data"], example["outputs"]["probabilities"], rtol=0, atol=ATOL)

    response = http.post(INFER, json=v2_body([example["inputs"]], outputs=[{"name": "label"}]))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == [{"name": "label", "shape": [1], "datatype": "INT64",
                                           "data": [example["outputs"]["label"]]}]


def test_unknown_output_name_is_422(http: httpx.Client, server: RunningServer) -> None:
    response = http.post(INFER, json=v2_body([good_row()], outputs=[{"name": "label"}, {"name": "score"}]))
    body = assert_error_body(response, 422, violations=True)
    assert "score" in body["error"]
    assert [v["reason"] for v in body["violations"]] == ["unknown_output"]
    assert_good_request_still_served(http, server)


# ---------------------------------------------------------------- bad requests, each followed by a good one


def _with_input(name: str, **changes: Any) -> dict[str, Any]:
    body = v2_body([good_row()])
    for tensor in body["inputs"]:
        if tensor["name"] == name:
            tensor.update(changes)
    return body


def _without_input(name: str) -> dict[str, Any]:
    body = v2_body([good_row()])
    body["inputs"] = [t for t in body["inputs"] if t["name"] != name]
    return body


def _raw(body: dict[str, Any], old: str, new: str) -> bytes:
    """Serialise `body` and replace one literal (to write what JSON encoders refuse, like NaN)."""
    text = json.dumps(body)
    assert text.count(old) == 1, f"{old!r} must occur once in the body"
    return text.replace(old, new).encode()


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b" " * n
        sent += n


@dataclass(frozen=True)
class BadCase:
    """A bad request, the status it must get, and what its error body must name."""

    id: str
    request: Callable[[], dict[str, Any]]
    status: int
    path: str = INFER
    reasons: set[str] = field(default_factory=set)
    """Violation reasons that must all be listed (a list is required when non-empty)."""
    fields: set[str] = field(default_factory=set)
    """Violation fields that must all be listed."""
    error_mentions: tuple[str, ...] = ()


FIVE_MB = 5 * 1024 * 1024

BAD_CASES = [
    BadCase("bytes-for-numeric-input", lambda: {"json": _with_input("age", datatype="BYTES", data=["41"])},
            422, reasons={"datatype"}, fields={"age"}),
    BadCase("string-data-for-fp32-input", lambda: {"json": _with_input("income", datatype="FP32", data=["lots"])},
            422, reasons={"type"}, fields={"income"}),
    BadCase("shape-data-mismatch", lambda: {"json": _with_input("age", shape=[2, 1])},
            400, reasons={"shape"}, error_mentions=("age",)),
    BadCase("missing-required-input", lambda: {"json": _without_input("income")},
            422, reasons={"missing"}, fields={"income"}, error_mentions=("income",)),
    BadCase("unknown-model", lambda: {"json": v2_body([good_row()])}, 404,
            path="/v2/models/no-such-model/infer", error_mentions=("no-such-model",)),
    BadCase("unknown-version", lambda: {"json": v2_body([good_row()])}, 404,
            path=f"/v2/models/{MODEL}/versions/99/infer", error_mentions=("99",)),
    BadCase("unknown-version-v1", lambda: {"json": {"instances": [good_row()]}}, 404,
            path=f"/v1/models/{MODEL}/versions/99:predict", error_mentions=("99",)),
    BadCase("body-5mb", lambda: {"content": b" " * FIVE_MB, "headers": {"content-type": "application/json"}},
            413, error_mentions=(str(MAX_BODY),)),
    BadCase("body-5mb-chunked", lambda: {"content": _chunks(FIVE_MB)}, 413, error_mentions=(str(MAX_BODY),)),
    BadCase("body-5mb-v1", lambda: {"content": b" " * FIVE_MB}, 413, path=PREDICT),
    BadCase("malformed-json", lambda: {"content": b'{"inputs": [{"name": "age", "shape": [1, 1],'},
            400, reasons={"malformed"}),
    BadCase("malformed-json-v1", lambda: {"content": b'{"instances": [{"age": 41,}]}'}, 400,
            path=PREDICT, reasons={"malformed"}),
    BadCase("json-array-not-object", lambda: {"content": b"[1, 2, 3]"}, 400, reasons={"malformed"}),
    BadCase("json-string-not-object", lambda: {"content": b'"inputs"'}, 400, reasons={"malformed"}),
    BadCase("json-array-not-object-v1", lambda: {"content": b"[]"}, 400, path=PREDICT, reasons={"malformed"}),
    BadCase("nan-literal", lambda: {"content": _raw(v2_body([good_row()]), "[0.28]", "[NaN]")},
            422, reasons={"nan"}, fields={"debt_to_income"}, error_mentions=("debt_to_income",)),
    BadCase("nan-literal-v1", lambda: {"content": _raw({"instances": [good_row()]}, "0.28", "NaN")},
            422, path=PREDICT, reasons={"nan"}, fields={"debt_to_income"}, error_mentions=("debt_to_income",)),
    BadCase("infinity-literal", lambda: {"content": _raw(v2_body([good_row()]), "[58000.0]", "[Infinity]")},
            422, reasons={"inf"}, fields={"income"}),
    BadCase("out-of-range", lambda: {"json": v2_body([{**good_row(), "age": 200}])},
            422, reasons={"range"}, fields={"age"}),
    BadCase("negative-out-of-range-v1", lambda: {"json": {"instances": [{**good_row(), "loan_amount": -5.0}]}},
            422, path=PREDICT, reasons={"range"}, fields={"loan_amount"}),
    BadCase("unknown-category", lambda: {"json": v2_body([{**good_row(), "purpose": "yacht"}])},
            422, reasons={"category"}, fields={"purpose"}, error_mentions=("yacht",)),
    BadCase("empty-inputs-list", lambda: {"json": {"inputs": []}}, 422, reasons={"missing"},
            fields={"age", "income", "purpose"}),
    BadCase("batch-over-max", lambda: {"json": v2_body([good_row()] * 1025)}, 422, reasons={"batch_size"},
            error_mentions=("1024",)),
    BadCase("batch-over-max-v1", lambda: {"json": {"instances": [good_row()] * 1025}}, 422, path=PREDICT,
            reasons={"batch_size"}),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_request_is_refused_and_the_next_good_one_served(
        http: httpx.Client, server: RunningServer, case: BadCase) -> None:
    response = http.post(case.path, **case.request())
    body = assert_error_body(response, case.status, violations=bool(case.reasons))
    listed = body.get("violations", [])
    assert case.reasons <= {v["reason"] for v in listed}, listed
    assert case.fields <= {v["field"] for v in listed}, listed
    for text in case.error_mentions:
        assert text in body["error"], body["error"]
    assert_good_request_still_served(http, server)


def test_chunked_body_case_really_has_no_content_length(http: httpx.Client) -> None:
    """The chunked 413 case above must exercise the streaming limit, not the Content-Length check."""
    response = http.post(INFER, content=_chunks(FIVE_MB))
    assert response.status_code == 413
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"


def test_batch_at_max_size_is_accepted(http: httpx.Client) -> None:
    """The 1025-row refusal is about the limit, not about size: 1024 rows are answered."""
    response = http.post(INFER, json=v2_body([good_row()] * 1024))
    assert response.status_code == 200, response.text[:500]
    assert outputs_by_name(response.json())["label"]["shape"] == [1024]


def test_every_violation_is_listed_not_just_the_first(http: httpx.Client) -> None:
    rows = [{**good_row(), "age": 200, "purpose": "yacht"}, {**good_row(), "income": -1.0}]
    body = assert_error_body(http.post(INFER, json=v2_body(rows)), 422, violations=True)
    found = {(v["field"], v["row"], v["reason"]) for v in body["violations"]}
    assert found == {("age", 0, "range"), ("purpose", 0, "category"), ("income", 1, "range")}
    assert body["violation_count"] == 3


def test_violations_are_listed_up_to_a_limit_and_all_counted(http: httpx.Client, server: RunningServer) -> None:
    response = http.post(INFER, json=v2_body([{**good_row(), "age": 500}] * 1024))
    body = assert_error_body(response, 422, violations=True)
    assert len(body["violations"]) == 100
    assert body["violation_count"] == 1024
    assert body["error"].endswith("and 924 more")
    assert len(response.content) < 64 * 1024
    assert_good_request_still_served(http, server)


def test_v1_model_status(http: httpx.Client) -> None:
    response = http.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200
    assert response.json() == {"name": MODEL, "ready": True}
    assert_error_body(http.get("/v1/models/no-such-model"), 404, violations=False)


def test_unknown_route_and_method_answer_json_errors(http: httpx.Client) -> None:
    assert_error_body(http.get("/v2/no-such-route"), 404, violations=False)
    assert_error_body(http.get(INFER), 405, violations=False)


# ---------------------------------------------------------------- metrics


def test_metrics_count_outcomes_latency_violations_and_ignored_fields(http: httpx.Client) -> None:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    before = scrape(http)
    example = first_golden()

    assert http.post(INFER, json=v2_body([example["inputs"]])).status_code == 200
    assert http.post(INFER, json=v2_body([{**example["inputs"], "customer_id": 1234}])).status_code == 200
    assert http.post(INFER, json=v2_body([{**good_row(), "age": 200}])).status_code == 422
    assert http.post(INFER, content=b"{not json").status_code == 400
    assert http.post(INFER, content=b" " * (MAX_BODY + 1)).status_code == 413
    assert http.post("/v2/models/no-such-model/infer", json=v2_body([good_row()])).status_code == 404
    assert http.post(PREDICT, json={"instances": [good_row()]}).status_code == 200

    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "gateway_requests_total"
    assert delta(requests, model=MODEL, version="1", protocol="v2", outcome="ok") == 2
    assert delta(requests, model=MODEL, version="1", protocol="v1", outcome="ok") == 1
    assert delta(requests, model=MODEL, version="", protocol="v2", outcome="invalid") == 1
    assert delta(requests, model=MODEL, version="", protocol="v2", outcome="malformed") == 1
    assert delta(requests, model=MODEL, version="", protocol="v2", outcome="too_large") == 1
    assert delta(requests, model="_unknown", version="", protocol="v2", outcome="not_found") == 1
    outcomes = {dict(labels)["outcome"] for (name, labels) in after if name == requests}
    assert {"ok", "invalid", "malformed", "too_large", "not_found"} <= outcomes

    assert delta("gateway_request_duration_seconds_bucket", model=MODEL, version="1", le="+Inf") == 3
    assert delta("gateway_request_duration_seconds_count", model=MODEL, version="1") == 3
    assert delta("gateway_request_duration_seconds_sum", model=MODEL, version="1") > 0
    assert delta("gateway_validation_failures_total", model=MODEL, reason="range") == 1
    assert delta("gateway_ignored_fields_total", model=MODEL) == 1
    assert delta("gateway_inference_rows_total", model=MODEL, version="1") == 3
    assert sample(after, "gateway_model_ready", model=MODEL) == 1
    assert sample(after, "gateway_model_version_ready", model=MODEL, version="2") == 1


def test_metrics_name_every_validation_failure_reason(http: httpx.Client) -> None:
    before = scrape(http)
    rows = [{**good_row(), "age": 200, "purpose": "yacht"}, {**good_row(), "age": 300}]
    assert http.post(INFER, json=v2_body(rows)).status_code == 422
    assert http.post(INFER, json=_without_input("income")).status_code == 422
    after = scrape(http)
    failures = "gateway_validation_failures_total"
    assert sample(after, failures, model=MODEL, reason="range") - sample(before, failures, model=MODEL,
                                                                          reason="range") == 2
    assert sample(after, failures, model=MODEL, reason="category") - sample(before, failures, model=MODEL,
                                                                             reason="category") == 1
    assert sample(after, failures, model=MODEL, reason="missing") - sample(before, failures, model=MODEL,
                                                                            reason="missing") == 1


def test_unknown_versions_do_not_create_metric_series(http: httpx.Client) -> None:
    junk = [f"junk-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    for version in junk:
        assert http.post(f"/v2/models/{MODEL}/versions/{version}/infer",
                         json=v2_body([good_row()])).status_code == 404
        assert http.post(f"/v2/models/no-such-model/versions/{version}/infer",
                         json=v2_body([good_row()])).status_code == 404
    versions = {dict(labels).get("version") for (_, labels) in scrape(http)}
    assert versions.isdisjoint(junk)


# ---------------------------------------------------------------- concurrency


def test_twenty_concurrent_requests_all_answer_correctly(server: RunningServer) -> None:
    examples = [(v, e) for v in VERSIONS for e in golden_examples(v)][:20]
    assert len(examples) == 20

    async def one(client: httpx.AsyncClient, version: str, example: dict[str, Any]) -> httpx.Response:
        return await client.post(f"/v2/models/{MODEL}/versions/{version}/infer",
                                 json=v2_body([example["inputs"]], id=f"{version}-{example['id']}"))

    async def run_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits) as client:
            return await asyncio.gather(*(one(client, v, e) for v, e in examples))

    responses = asyncio.run(run_all())
    for (version, example), response in zip(examples, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == f"{version}-{example['id']}"
        assert body["model_version"] == version
        assert_v2_golden(body, [example])

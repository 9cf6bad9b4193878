"""End to end over broken model repositories and policies: refuse what is wrong, keep serving the rest.

Each test builds a writable repository (`repo_copy`), breaks it on disk, starts a real gateway on it
(`start_server`) and checks what HTTP clients see. Several problems share one server to keep the
number of process starts small.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import MODEL, RunningServer, golden_examples, v2_body

pytestmark = pytest.mark.e2e

StartServer = Callable[..., RunningServer]

ATOL = 1e-5


# ---------------------------------------------------------------- repository surgery


def card_path(models: Path, model: str, version: str) -> Path:
    return models / model / version / "model.yaml"


def edit_card(models: Path, model: str, version: str, **changes: Any) -> dict[str, Any]:
    """Rewrite a card with top-level keys changed; returns the new card."""
    path = card_path(models, model, version)
    card: dict[str, Any] = yaml.safe_load(path.read_text())
    card.update(changes)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return card


def clone_model(models: Path, new_name: str, version: str = "1") -> Path:
    """Copy credit-risk/<version> to <new_name>/<version> with a card that names the new model."""
    target = models / new_name / version
    shutil.copytree(models / MODEL / version, target)
    edit_card(models, new_name, version, name=new_name)
    return target


def flip_bytes(path: Path) -> str:
    """Invert a run of bytes in the middle of a file; returns the file's new sha256."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def write_policy(policies: Path, file_name: str, **changes: Any) -> Path:
    """A policy file derived from the bundled credit-risk policy with top-level keys changed."""
    policy: dict[str, Any] = yaml.safe_load((policies / f"{MODEL}.yaml").read_text())
    policy.update(changes)
    policy = {k: v for k, v in policy.items() if v is not None}  # None deletes a section
    path = policies / file_name
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


# ---------------------------------------------------------------- HTTP helpers


def status_of(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/status")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def version_status(status: dict[str, Any], model: str, version: str) -> dict[str, Any]:
    found = next(m for m in status["models"] if m["name"] == model)
    entry: dict[str, Any] = next(v for v in found["versions"] if v["version"] == version)
    return entry


def model_status(status: dict[str, Any], model: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(m for m in status["models"] if m["name"] == model)
    return entry


def assert_unavailable(response: httpx.Response, *mentions: str) -> str:
    """503 with a JSON body whose `error` names every one of `mentions`; returns the error."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert isinstance(body["error"], str)
    for text in mentions:
        assert text in body["error"], body["error"]
    return str(body["error"])


def assert_serves_golden(http: httpx.Client, path: str, version: str) -> None:
    """POSTing golden examples of `version` to `path` answers 200 from that version, reproducing them."""
    examples = [e for e in golden_examples(version) if None not in e["inputs"].values()][:3]
    response = http.post(path, json=v2_body([e["inputs"] for e in examples]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == version
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == [e["outputs"]["label"] for e in examples]
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (len(examples), 2)),
                               [e["outputs"]["probabilities"] for e in examples], rtol=0, atol=ATOL)


# ---------------------------------------------------------------- tests


def test_refused_versions_are_reported_while_the_rest_serves(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    # 1. credit-risk version 2: bytes flipped, so the file no longer matches the card's sha256
    flipped_sha = flip_bytes(models / MODEL / "2" / "model.onnx")
    # 2. `garbage`: the card's sha256 is right, but the bytes are no ONNX model
    clone_model(models, "garbage")
    junk = b"\x00\x01 this is not an ONNX protobuf \xfe\xff" * 64
    (models / "garbage" / "1" / "model.onnx").write_bytes(junk)
    edit_card(models, "garbage", "1", sha256=hashlib.sha256(junk).hexdigest())
    # 3. `mislabeled`: the card declares `age` as FP64; the file takes FP32
    card = yaml.safe_load(card_path(models, MODEL, "1").read_text())
    inputs = [{**t, "datatype": "FP64"} if t["name"] == "age" else t for t in card["signature"]["inputs"]]
    clone_model(models, "mislabeled")
    edit_card(models, "mislabeled", "1", signature={**card["signature"], "inputs": inputs})

    # no fallback: this test is about refusals, which a fallback would answer for
    write_policy(policies, f"{MODEL}.yaml", fallback=None)
    running = start_server(models, policies)
    with httpx.Client(base_url=running.url, timeout=30.0) as http:
        status = status_of(http)

        # the corrupted version is refused by hash, its neighbour keeps serving
        v2 = version_status(status, MODEL, "2")
        assert v2["state"] == "failed"
        assert "sha256" in v2["reason"]
        assert flipped_sha in v2["reason"]
        assert version_status(status, MODEL, "1")["state"] == "ready"
        assert model_status(status, MODEL)["ready"] is True
        assert_unavailable(http.get(f"/v2/models/{MODEL}/versions/2/ready"), "sha256")
        assert_unavailable(http.post(f"/v2/models/{MODEL}/versions/2/infer",
                                     json=v2_body([golden_examples("2")[0]["inputs"]])), "sha256")
        assert http.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
        assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
        assert http.get(f"/v2/models/{MODEL}").json()["versions"] == ["1"]
        assert_serves_golden(http, f"/v2/models/{MODEL}/versions/1/infer", "1")
        assert_serves_golden(http, f"/v2/models/{MODEL}/infer", "1")

        # consistent hash, garbage bytes: onnxruntime refuses to load them
        garbage = version_status(status, "garbage", "1")
        assert garbage["state"] == "failed"
        assert "onnxruntime" in garbage["reason"]
        assert model_status(status, "garbage")["ready"] is False
        assert_unavailable(http.get("/v2/models/garbage/ready"), "onnxruntime")

        # the card's signature disagrees with the file
        mislabeled = version_status(status, "mislabeled", "1")
        assert mislabeled["state"] == "failed"
        assert "signature" in mislabeled["reason"]
        assert "age" in mislabeled["reason"]
        assert_unavailable(http.get("/v2/models/mislabeled/versions/1/ready"), "signature")

        # models with no loadable version make the server not ready, and the body says why
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False
        assert "garbage" in body["error"]
        assert "mislabeled" in body["error"]
        assert "onnxruntime" in body["error"]
        assert sorted(r.split(":", 1)[0] for r in body["reasons"]) == ["garbage", "mislabeled"]
        assert status["server"]["ready"] is False

        # liveness is not readiness: the process is up and says so
        assert http.get("/v2/health/live").status_code == 200
        assert running.process.poll() is None


def test_policy_problems_make_their_model_fail_closed(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    # credit-risk: the policy routes unversioned requests to version 2, whose file is corrupted
    flip_bytes(models / MODEL / "2" / "model.onnx")
    write_policy(policies, f"{MODEL}.yaml", routing={"stable": "2"}, fallback=None)
    # `strict`: a good model whose policy file is invalid (max_batch_size must be >= 1)
    clone_model(models, "strict")
    policy = yaml.safe_load((policies / f"{MODEL}.yaml").read_text())
    write_policy(policies, "strict.yaml", model="strict", schema={**policy["schema"], "max_batch_size": 0})

    running = start_server(models, policies)
    with httpx.Client(base_url=running.url, timeout=30.0) as http:
        status = status_of(http)

        # stable points at the broken version: not ready, unversioned requests refused, pinned 1 answers
        assert_unavailable(http.get(f"/v2/models/{MODEL}/ready"), "'2'", "sha256")
        assert model_status(status, MODEL)["ready"] is False
        assert_unavailable(http.post(f"/v2/models/{MODEL}/infer",
                                     json=v2_body([golden_examples("1")[0]["inputs"]])), "not ready")
        assert http.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
        assert_serves_golden(http, f"/v2/models/{MODEL}/versions/1/infer", "1")

        # the invalid policy is listed, and its model serves nothing, not even pinned versions
        problems = status["policy_problems"]
        assert any("strict.yaml" in p and "max_batch_size" in p for p in problems), problems
        assert model_status(status, "strict")["ready"] is False
        assert version_status(status, "strict", "1")["state"] == "failed"
        assert_unavailable(http.get("/v2/models/strict/ready"), "polic")
        assert_unavailable(http.get("/v2/models/strict/versions/1/ready"), "polic")
        assert_unavailable(http.post("/v2/models/strict/versions/1/infer",
                                     json=v2_body([golden_examples("1")[0]["inputs"]])))

        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503
        assert sorted(r.split(":", 1)[0] for r in ready.json()["reasons"]) == [MODEL, "strict"]

        metrics = http.get("/metrics").text
        assert "gateway_policy_problems 1.0" in metrics
        assert f'gateway_model_ready{{model="{MODEL}"}} 0.0' in metrics


def test_unparseable_policy_file_makes_its_model_fail_closed(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    path = policies / f"{MODEL}.yaml"
    path.write_text(path.read_text() + "\n  routing: [unclosed\n")

    running = start_server(models, policies)
    with httpx.Client(base_url=running.url, timeout=30.0) as http:
        problems = status_of(http)["policy_problems"]
        assert any(f"{MODEL}.yaml" in p for p in problems), problems
        # without its policy the model must not answer: no schema checks, no routing to version 1
        assert_unavailable(http.get(f"/v2/models/{MODEL}/ready"))
        assert http.get("/v2/health/ready").status_code == 503
        too_old = {**golden_examples("1")[0]["inputs"], "age": 200}
        response = http.post(f"/v2/models/{MODEL}/infer", json=v2_body([too_old]))
        assert response.status_code in (422, 503), response.text

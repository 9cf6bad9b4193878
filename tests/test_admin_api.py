"""Admin API in process: tokens and roles, switch, rollback, canary, shadow, events, load/unload, restarts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import MODEL, good_row, make_client, v2_body

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"
ADMIN = "admin-token-0123456789ab"
TOKENS: list[dict[str, str]] = [
    {"name": "vera", "role": "viewer", "token": VIEWER},
    {"name": "otto", "role": "operator", "token": OPERATOR},
    {"name": "ada", "role": "admin", "token": ADMIN},
]
VIEW = f"/admin/models/{MODEL}"
REPO = f"/v2/repository/models/{MODEL}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Gateway:
    """An in-process gateway over a writable repository copy, with its own state directory."""

    def __init__(self, models: Path, policies: Path, state: Path) -> None:
        self.models, self.policies, self.state = models, policies, state
        self.client: TestClient | None = None

    def start(self) -> TestClient:
        self.client = make_client(self.models, self.policies, admin_tokens=TOKENS, state_dir=self.state)
        self.client.__enter__()
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None

    def restart(self) -> TestClient:
        self.stop()
        return self.start()

    @property
    def http(self) -> TestClient:
        assert self.client is not None
        return self.client

    def call(self, method: str, path: str, body: Any = None, token: str = OPERATOR,
             status: int = 200) -> dict[str, Any]:
        """An admin call that must answer `status`; returns the JSON body."""
        answer = self.http.request(method, path, json=body, headers=bearer(token))
        assert answer.status_code == status, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def view(self) -> dict[str, Any]:
        return self.call("GET", VIEW, token=VIEWER)

    def aliases(self) -> dict[str, Any]:
        result: dict[str, Any] = self.view()["aliases"]
        return result

    def stored(self) -> dict[str, Any]:
        """The state file as written to disk."""
        data: dict[str, Any] = json.loads((self.state / f"{MODEL}.state.json").read_text())
        return data

    def index(self) -> dict[str, dict[str, Any]]:
        answer = self.http.post("/v2/repository/index", headers=bearer(VIEWER))
        assert answer.status_code == 200, answer.text
        return {row["version"]: row for row in answer.json() if row["name"] == MODEL}

    def infer(self, version: str | None = None) -> httpx.Response:
        path = f"/v2/models/{MODEL}/versions/{version}/infer" if version else f"/v2/models/{MODEL}/infer"
        return self.http.post(path, json=v2_body([good_row()]))

    def events(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/admin/events", token=VIEWER)["events"]
        return result


@pytest.fixture
def gw(ungated_repo: tuple[Path, Path], tmp_path: Path) -> Iterator[Gateway]:
    """The readiness gate is off: these tests are about release mechanics (test_readiness_gate.py: approval)."""
    gateway = Gateway(*ungated_repo, tmp_path / "state")
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def answered_by(answer: httpx.Response) -> tuple[str, str]:
    """(model_version from the body, X-Route) of a successful answer."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == answer.json()["model_version"]
    return answer.json()["model_version"], answer.headers["x-route"]


def edit_policy(policies: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = policies / f"{MODEL}.yaml"
    policy: dict[str, Any] = yaml.safe_load(path.read_text())
    change(policy)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


# ---------------------------------------------------------------- authentication and roles

PROTECTED = [
    ("GET", VIEW), ("GET", "/admin/events"), ("GET", f"{VIEW}/rollout"), ("POST", f"{VIEW}/switch"),
    ("POST", f"{VIEW}/rollback"), ("PUT", f"{VIEW}/canary"), ("DELETE", f"{VIEW}/canary"),
    ("PUT", f"{VIEW}/shadow"), ("DELETE", f"{VIEW}/shadow"), ("POST", "/v2/repository/index"),
    ("POST", f"{REPO}/load"), ("POST", f"{REPO}/unload?version=2"),
]
BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "basic scheme": {"Authorization": f"Basic {ADMIN}"},
    "token scheme": {"Authorization": f"Token {ADMIN}"},
    "no scheme": {"Authorization": ADMIN},
    "empty bearer": {"Authorization": "Bearer "},
    "unknown token": {"Authorization": "Bearer not-a-configured-token-0000"},
    "token prefix": {"Authorization": f"Bearer {ADMIN[:-1]}"},
    "other header": {"X-Api-Key": ADMIN},
}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS.values()), ids=list(BAD_CREDENTIALS))
def test_missing_or_invalid_credentials_are_401(gw: Gateway, credentials: dict[str, str]) -> None:
    for method, path in PROTECTED:
        answer = gw.http.request(method, path, json={"version": "2", "percent": 10}, headers=credentials)
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.json()["error"]
    assert gw.aliases()["stable"] == "1" and gw.index()["2"]["state"] == "READY"  # nothing happened


def test_the_bearer_scheme_is_case_insensitive(gw: Gateway) -> None:
    assert gw.http.get(VIEW, headers={"Authorization": f"bearer {VIEWER}"}).status_code == 200
    assert gw.http.get(VIEW, headers={"Authorization": f"BEARER {VIEWER}"}).status_code == 200


def test_no_configured_tokens_means_401_for_everyone(repo_copy: tuple[Path, Path], tmp_path: Path) -> None:
    with make_client(*repo_copy, state_dir=tmp_path / "state") as client:
        for method, path in PROTECTED:
            for headers in ({}, bearer(ADMIN)):
                answer = client.request(method, path, json={"version": "2"}, headers=headers)
                assert answer.status_code == 401, (method, path)
        assert "GATEWAY_ADMIN_TOKENS" in client.get(VIEW, headers=bearer(ADMIN)).json()["error"]
        # inference and status stay open
        assert client.get("/status").status_code == 200
        assert client.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()])).status_code == 200


def test_tokens_shorter_than_16_characters_are_refused_as_settings() -> None:
    with pytest.raises(ValueError, match="16"):
        make_client(admin_tokens=[{"name": "x", "role": "admin", "token": "short-token"}])


def test_viewers_read_but_cannot_operate(gw: Gateway) -> None:
    for method, path in [("GET", VIEW), ("GET", "/admin/events"), ("GET", f"{VIEW}/rollout")]:
        assert gw.http.request(method, path, headers=bearer(VIEWER)).status_code == 200
    assert gw.http.post("/v2/repository/index", headers=bearer(VIEWER)).status_code == 200
    operator_calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", f"{VIEW}/switch", {"version": "2"}), ("POST", f"{VIEW}/rollback", None),
        ("PUT", f"{VIEW}/canary", {"version": "2", "percent": 10}), ("DELETE", f"{VIEW}/canary", None),
        ("PUT", f"{VIEW}/shadow", {"version": "2"}), ("DELETE", f"{VIEW}/shadow", None),
        ("POST", f"{VIEW}/rollout", {"version": "2"}), ("POST", f"{VIEW}/rollout/pause", None),
    ]
    for method, path, body in operator_calls:
        answer = gw.http.request(method, path, json=body, headers=bearer(VIEWER))
        assert answer.status_code == 403, (method, path, answer.text)
        assert "vera" in answer.json()["error"] and "operator" in answer.json()["error"]
    assert gw.aliases() == gw.view()["policy_aliases"] and gw.events() == []


def test_operators_operate_but_cannot_load_or_unload(gw: Gateway) -> None:
    for path in (f"{REPO}/unload?version=2", f"{REPO}/load?version=2", f"{REPO}/load"):
        for token in (VIEWER, OPERATOR):
            answer = gw.http.post(path, headers=bearer(token))
            assert answer.status_code == 403, (path, token, answer.text)
            assert "admin" in answer.json()["error"]
    assert gw.index()["2"]["state"] == "READY"
    gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 10})
    gw.call("DELETE", f"{VIEW}/canary")
    gw.call("PUT", f"{VIEW}/shadow", {"version": "2"})
    gw.call("DELETE", f"{VIEW}/shadow")
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    gw.call("POST", f"{VIEW}/rollback")
    assert [e["actor"] for e in gw.events()] == ["otto"] * 6


def test_admins_can_do_everything(gw: Gateway) -> None:
    gw.call("GET", VIEW, token=ADMIN)
    gw.call("POST", f"{VIEW}/switch", {"version": "2"}, token=ADMIN)
    gw.call("POST", f"{REPO}/unload?version=3", token=ADMIN, status=404)  # no such version: past the role check
    assert gw.call("POST", f"{REPO}/load?version=2", token=ADMIN)["after"]["loaded"] == ["2"]
    assert gw.events()[0]["actor"] == "ada"


# ---------------------------------------------------------------- switch


def test_switch_sends_unversioned_requests_to_the_new_version(gw: Gateway) -> None:
    assert answered_by(gw.infer()) == ("1", "stable")
    change = gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    assert change["model"] == MODEL and change["action"] == "switch"
    assert change["before"]["stable"] == "1" and change["after"]["stable"] == "2"
    assert change["after"]["previous_stable"] == "1"
    for _ in range(5):
        assert answered_by(gw.infer()) == ("2", "stable")
    v1 = gw.http.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
    assert v1.headers["x-model-version"] == "2" and v1.headers["x-route"] == "stable"
    assert answered_by(gw.infer("1")) == ("1", "pinned")  # the old stable stays warm
    assert gw.stored()["aliases"] == gw.aliases() == change["after"]


def test_switch_accepts_a_numeric_version(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": 2})
    assert gw.aliases()["stable"] == "2"


def test_switch_refusals_change_nothing(gw: Gateway) -> None:
    before = gw.stored()
    assert "no version '9'" in gw.call("POST", f"{VIEW}/switch", {"version": "9"}, status=404)["error"]
    assert "already stable" in gw.call("POST", f"{VIEW}/switch", {"version": "1"}, status=409)["error"]
    gw.call("POST", "/admin/models/nope/switch", {"version": "2"}, status=404)
    for body in ({}, {"version": None}, {"version": ""}, {"version": True}, {"version": 2.5}, {"version": ["2"]}):
        gw.call("POST", f"{VIEW}/switch", body, status=400)
    for raw in (b"not json", b"[\"2\"]", b"\"2\""):
        answer = gw.http.post(f"{VIEW}/switch", content=raw, headers=bearer(OPERATOR))
        assert answer.status_code == 400, answer.text
    assert gw.stored() == before and gw.aliases()["stable"] == "1" and gw.events() == []


def test_switch_to_an_unloaded_version_is_refused(gw: Gateway) -> None:
    gw.call("POST", f"{REPO}/unload?version=2", token=ADMIN)
    error = gw.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)["error"]
    assert "not serving" in error and "unloaded" in error
    assert gw.aliases()["stable"] == "1"


def test_switch_to_a_failed_version_is_refused(repo_copy: tuple[Path, Path], tmp_path: Path) -> None:
    models, policies = repo_copy
    onnx = models / MODEL / "2" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-64])  # the card's sha256 no longer matches
    gateway = Gateway(models, policies, tmp_path / "state")
    gateway.start()
    try:
        assert gateway.index()["2"]["state"] == "UNAVAILABLE" and "sha256" in gateway.index()["2"]["reason"]
        error = gateway.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)["error"]
        assert "not serving" in error
        gateway.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 5}, status=409)
        gateway.call("PUT", f"{VIEW}/shadow", {"version": "2"}, status=409)
        assert gateway.aliases() == gateway.view()["policy_aliases"]
    finally:
        gateway.stop()


def test_switching_to_the_canary_clears_the_canary(gw: Gateway) -> None:
    gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 30})
    after = gw.call("POST", f"{VIEW}/switch", {"version": "2"})["after"]
    assert after["stable"] == "2" and after["canary"] is None and after["canary_percent"] == 0


# ---------------------------------------------------------------- rollback


def test_rollback_returns_to_the_previous_stable(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    assert answered_by(gw.infer()) == ("2", "stable")
    change = gw.call("POST", f"{VIEW}/rollback", {"reason": "p99 doubled"})
    assert change["action"] == "rollback"
    assert change["after"]["stable"] == "1" and change["after"]["previous_stable"] == "2"
    assert answered_by(gw.infer()) == ("1", "stable")
    assert gw.stored()["aliases"] == gw.aliases() == change["after"]
    assert gw.events()[-1]["reason"] == "p99 doubled"
    # rolling back again goes forward to 2: previous_stable is always the one before
    assert gw.call("POST", f"{VIEW}/rollback")["after"]["stable"] == "2"


def test_rollback_without_a_previous_stable_is_409(gw: Gateway) -> None:
    before = gw.stored()
    error = gw.call("POST", f"{VIEW}/rollback", status=409)["error"]
    assert "no previous stable" in error
    assert gw.stored() == before and gw.aliases()["stable"] == "1"
    gw.call("POST", "/admin/models/nope/rollback", status=404)


def test_rollback_drops_the_canary(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    gw.call("PUT", f"{VIEW}/canary", {"version": "1", "percent": 20})
    after = gw.call("POST", f"{VIEW}/rollback")["after"]
    assert after["stable"] == "1" and after["canary"] is None and after["canary_percent"] == 0


# ---------------------------------------------------------------- canary


def test_canary_put_and_delete(gw: Gateway) -> None:
    change = gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 10})
    assert change["action"] == "canary"
    assert gw.aliases()["canary"] == "2" and gw.aliases()["canary_percent"] == 10
    assert gw.stored()["aliases"]["canary"] == "2" and gw.stored()["aliases"]["canary_percent"] == 10
    gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 100})
    for _ in range(5):
        assert answered_by(gw.infer()) == ("2", "canary")
    assert answered_by(gw.infer("1")) == ("1", "pinned")
    gw.call("DELETE", f"{VIEW}/canary")
    assert gw.aliases()["canary"] is None and gw.aliases()["canary_percent"] == 0
    assert gw.stored()["aliases"]["canary"] is None
    assert answered_by(gw.infer()) == ("1", "stable")


def test_canary_at_zero_percent_takes_no_traffic(gw: Gateway) -> None:
    gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 0})
    assert all(answered_by(gw.infer()) == ("1", "stable") for _ in range(5))


@pytest.mark.parametrize("body", [
    {"version": "2", "percent": 101}, {"version": "2", "percent": -1}, {"version": "2", "percent": 100.5},
    {"version": "2", "percent": "10"}, {"version": "2", "percent": True}, {"version": "2", "percent": None},
    {"version": "2"}, {"percent": 10}, {"version": "", "percent": 10}, {"version": None, "percent": 10},
], ids=["101", "negative", "100.5", "string", "bool", "null", "no percent", "no version", "empty version",
        "null version"])
def test_canary_validation_errors_are_400(gw: Gateway, body: dict[str, Any]) -> None:
    answer = gw.call("PUT", f"{VIEW}/canary", body, status=400)
    assert answer["error"]
    assert gw.aliases()["canary"] is None and gw.events() == []


def test_canary_refusals(gw: Gateway) -> None:
    assert "stable" in gw.call("PUT", f"{VIEW}/canary", {"version": "1", "percent": 10}, status=409)["error"]
    gw.call("PUT", f"{VIEW}/canary", {"version": "9", "percent": 10}, status=404)
    gw.call("PUT", "/admin/models/nope/canary", {"version": "2", "percent": 10}, status=404)
    gw.call("POST", f"{REPO}/unload?version=2", token=ADMIN)
    gw.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 10}, status=409)
    assert gw.aliases()["canary"] is None


# ---------------------------------------------------------------- shadow


def test_shadow_put_and_delete(gw: Gateway) -> None:
    assert gw.view()["shadow"] is None
    change = gw.call("PUT", f"{VIEW}/shadow", {"version": "2"})
    assert change["action"] == "shadow"
    assert change["after"]["shadow"] == "2" and change["after"]["shadow_percent"] == 100  # the default
    view = gw.view()
    assert view["aliases"]["shadow"] == "2" and view["shadow"]["version"] == "2"
    assert gw.stored()["aliases"]["shadow"] == "2"
    assert answered_by(gw.infer()) == ("1", "stable")  # the shadow never answers
    gw.call("PUT", f"{VIEW}/shadow", {"version": "2", "percent": 25})
    assert gw.aliases()["shadow_percent"] == 25
    gw.call("DELETE", f"{VIEW}/shadow")
    assert gw.aliases()["shadow"] is None and gw.aliases()["shadow_percent"] == 0
    assert gw.view()["shadow"] is None and gw.stored()["aliases"]["shadow"] is None


def test_shadow_validation_and_refusals(gw: Gateway) -> None:
    for body in ({"version": "2", "percent": 150}, {"version": "2", "percent": -5}, {"percent": 50}, {}):
        gw.call("PUT", f"{VIEW}/shadow", body, status=400)
    gw.call("PUT", f"{VIEW}/shadow", {"version": "9"}, status=404)
    assert gw.aliases()["shadow"] is None and gw.events() == []


# ---------------------------------------------------------------- the model view and the event log


def test_model_view_shows_effective_and_policy_aliases(gw: Gateway) -> None:
    view = gw.view()
    assert view["name"] == MODEL and view["alias_source"] == "policy"
    assert view["aliases"]["stable"] == view["policy_aliases"]["stable"] == "1"
    assert sorted(view["serving"]) == ["1", "2"] and view["rollout"] is None
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    view = gw.view()
    assert view["alias_source"] == "state"
    assert view["aliases"]["stable"] == "2" and view["aliases"]["previous_stable"] == "1"
    assert view["policy_aliases"]["stable"] == "1" and view["policy_aliases"]["previous_stable"] is None
    gw.call("GET", "/admin/models/nope", token=VIEWER, status=404)


def test_events_list_actions_with_actor_before_and_after(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": "2"}, token=OPERATOR)
    gw.call("PUT", f"{VIEW}/canary", {"version": "1", "percent": 5}, token=ADMIN)
    gw.call("POST", f"{VIEW}/rollback", {"reason": "bad"}, token=OPERATOR)
    gw.call("POST", f"{VIEW}/switch", {"version": "9"}, status=404)  # refused: not an event
    events = gw.events()
    assert [(e["action"], e["actor"], e["model"]) for e in events] == [
        ("switch", "otto", MODEL), ("canary", "ada", MODEL), ("rollback", "otto", MODEL)]
    assert events[0]["before"]["stable"] == "1" and events[0]["after"]["stable"] == "2"
    assert events[1]["before"]["canary"] is None and events[1]["after"]["canary"] == "1"
    assert events[2]["after"]["stable"] == "1" and events[2]["reason"] == "bad"
    assert all(isinstance(e["time"], float) for e in events)
    assert events == sorted(events, key=lambda e: e["time"])
    # and they are appended to the events file in the state directory
    lines = [json.loads(line) for line in (gw.state / "events.jsonl").read_text().splitlines()]
    assert [(e["action"], e["actor"]) for e in lines] == [("switch", "otto"), ("canary", "ada"), ("rollback", "otto")]


# ---------------------------------------------------------------- unload and load


@pytest.mark.parametrize(("setup", "version", "alias"), [
    ([], "1", "stable"),
    ([("POST", "switch", {"version": "2"})], "1", "previous_stable"),
    ([("PUT", "canary", {"version": "2", "percent": 5})], "2", "canary"),
    ([("PUT", "shadow", {"version": "2", "percent": 5})], "2", "shadow"),
])
def test_unloading_an_aliased_version_is_409_naming_the_alias(
        gw: Gateway, setup: list[tuple[str, str, dict[str, Any]]], version: str, alias: str) -> None:
    for method, action, body in setup:
        gw.call(method, f"{VIEW}/{action}", body)
    error = gw.call("POST", f"{REPO}/unload?version={version}", token=ADMIN, status=409)["error"]
    assert alias in error
    assert gw.index()[version]["state"] == "READY"
    assert answered_by(gw.infer(version)) == (version, "pinned")


def test_unloading_the_whole_model_is_refused_while_aliases_point_into_it(gw: Gateway) -> None:
    error = gw.call("POST", f"{REPO}/unload", token=ADMIN, status=409)["error"]
    assert "stable" in error and "?version=" in error
    assert all(row["state"] == "READY" for row in gw.index().values())


def test_unload_and_load_a_version(gw: Gateway) -> None:
    change = gw.call("POST", f"{REPO}/unload?version=2", token=ADMIN)
    assert change["action"] == "unload" and change["before"]["serving"] == ["1", "2"]
    assert change["after"]["serving"] == ["1"]
    index = gw.index()
    assert index["2"]["state"] == "UNAVAILABLE" and index["2"]["reason"] == "unloaded"
    assert index["1"]["state"] == "READY"
    # the bundled policy has a fallback: a pinned request to the unloaded version gets it
    answer = gw.infer("2")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-fallback"] == "unavailable" and answer.headers["x-route"] == "fallback"
    assert answer.json()["parameters"]["attempted_version"] == "2"
    assert answered_by(gw.infer()) == ("1", "stable")  # the rest keeps serving
    assert gw.http.get(f"/v2/models/{MODEL}/versions/2/ready").status_code == 503
    assert gw.view()["serving"] == ["1"]
    ready = gw.http.post("/v2/repository/index", json={"ready": True}, headers=bearer(VIEWER)).json()
    assert [(row["version"], row["state"]) for row in ready] == [("1", "READY")]

    change = gw.call("POST", f"{REPO}/load?version=2", token=ADMIN)
    assert change["action"] == "load" and change["after"]["loaded"] == ["2"]
    assert gw.index()["2"] == {"name": MODEL, "version": "2", "state": "READY"}
    answer = gw.infer("2")
    assert answered_by(answer) == ("2", "pinned") and "x-fallback" not in answer.headers
    assert [e["action"] for e in gw.events()] == ["unload", "load"]
    assert all(e["actor"] == "ada" for e in gw.events())


def test_an_unload_is_kept_across_a_restart_until_the_version_is_loaded_again(gw: Gateway) -> None:
    gw.call("POST", f"{REPO}/unload?version=2", token=ADMIN)
    gw.restart()  # the unload is control state, like the aliases: the version stays out
    assert gw.index()["2"] == {"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}
    gw.call("POST", f"{REPO}/load?version=2", token=ADMIN)
    gw.restart()
    assert gw.index()["2"] == {"name": MODEL, "version": "2", "state": "READY"}


def test_unloaded_version_without_a_fallback_is_503(repo_copy: tuple[Path, Path], tmp_path: Path) -> None:
    models, policies = repo_copy
    edit_policy(policies, lambda p: p.pop("fallback"))
    gateway = Gateway(models, policies, tmp_path / "state")
    gateway.start()
    try:
        gateway.call("POST", f"{REPO}/unload?version=2", token=ADMIN)
        answer = gateway.infer("2")
        assert answer.status_code == 503 and "unloaded" in answer.json()["error"]
        assert answered_by(gateway.infer()) == ("1", "stable")
    finally:
        gateway.stop()


def test_load_refusals(gw: Gateway) -> None:
    gw.call("POST", f"{REPO}/load?version=9", token=ADMIN, status=400)
    gw.call("POST", "/v2/repository/models/nope/load", token=ADMIN, status=404)
    gw.call("POST", "/v2/repository/models/nope/unload?version=1", token=ADMIN, status=404)
    gw.call("POST", f"{REPO}/unload?version=9", token=ADMIN, status=404)
    # nothing new on disk: loading "everything not serving" loads nothing
    assert gw.call("POST", f"{REPO}/load", token=ADMIN)["after"]["loaded"] == []


def test_a_version_copied_in_at_runtime_can_be_loaded_pinned_and_switched_to(gw: Gateway) -> None:
    target = gw.models / MODEL / "3"
    shutil.copytree(gw.models / MODEL / "2", target)
    card = target / "model.yaml"
    text = card.read_text()
    assert "version: '2'" in text
    card.write_text(text.replace("version: '2'", "version: '3'"))

    assert gw.index()["3"]["state"] == "UNAVAILABLE"
    assert gw.infer("3").status_code == 404  # not known until loaded
    gw.call("POST", f"{VIEW}/switch", {"version": "3"}, status=404)

    change = gw.call("POST", f"{REPO}/load", token=ADMIN)  # every version not serving yet
    assert change["after"]["loaded"] == ["3"] and change["after"]["serving"] == ["1", "2", "3"]
    assert gw.index()["3"]["state"] == "READY"
    assert answered_by(gw.infer("3")) == ("3", "pinned")

    gw.call("POST", f"{VIEW}/switch", {"version": "3"})
    assert answered_by(gw.infer()) == ("3", "stable")
    assert gw.stored()["aliases"]["stable"] == "3"
    assert gw.call("POST", f"{VIEW}/rollback")["after"]["stable"] == "1"


def test_a_version_copied_in_with_a_wrong_card_is_refused(gw: Gateway) -> None:
    target = gw.models / MODEL / "3"
    shutil.copytree(gw.models / MODEL / "2", target)  # the card still says version 2
    error = gw.call("POST", f"{REPO}/load?version=3", token=ADMIN, status=409)["error"]
    assert "3" in error
    index = gw.index()["3"]
    assert index["state"] == "UNAVAILABLE" and "card names" in index["reason"]
    gw.call("POST", f"{VIEW}/switch", {"version": "3"}, status=409)


# ---------------------------------------------------------------- durability and restarts


def test_the_state_file_follows_every_change(gw: Gateway) -> None:
    steps: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "switch", {"version": "2"}), ("PUT", "canary", {"version": "1", "percent": 7.5}),
        ("PUT", "shadow", {"version": "1", "percent": 50}), ("DELETE", "canary", None),
        ("DELETE", "shadow", None), ("POST", "rollback", None),
    ]
    hashes = {gw.stored()["routing_hash"]}
    for method, action, body in steps:
        after = gw.call(method, f"{VIEW}/{action}", body)["after"]
        stored = gw.stored()
        assert stored["aliases"] == after == gw.aliases(), action
        hashes.add(stored["routing_hash"])
    assert len(hashes) == 1  # the policy did not change
    assert sorted(p.name for p in gw.state.iterdir()) == ["credit-risk.state.json", "events.jsonl"]


def test_a_change_that_cannot_be_stored_is_refused(gw: Gateway) -> None:
    shutil.rmtree(gw.state)
    gw.state.write_text("not a directory")  # every write into the state directory now fails
    answer = gw.call("POST", f"{VIEW}/switch", {"version": "2"}, status=503)
    assert "nothing was changed" in answer["error"]
    assert gw.aliases()["stable"] == "1" and answered_by(gw.infer()) == ("1", "stable")


def test_a_restart_keeps_the_state_until_the_policy_routing_changes(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    first_hash = gw.stored()["routing_hash"]

    gw.restart()  # same state directory, same policy: the state wins
    view = gw.view()
    assert view["alias_source"] == "state"
    assert view["aliases"]["stable"] == "2" and view["aliases"]["previous_stable"] == "1"
    assert view["policy_aliases"]["stable"] == "1"
    assert answered_by(gw.infer()) == ("2", "stable")
    assert gw.events() == []
    gw.call("POST", f"{VIEW}/rollback")  # state now: stable 1, previous 2
    assert gw.stored()["aliases"]["stable"] == "1"

    edit_policy(gw.policies, lambda p: p["routing"].update(stable="2"))
    gw.restart()  # the owner edited routing: the policy wins
    view = gw.view()
    assert view["alias_source"] == "policy"
    assert view["aliases"]["stable"] == "2" and view["aliases"]["previous_stable"] is None
    assert answered_by(gw.infer()) == ("2", "stable")
    (event,) = gw.events()
    assert event["action"] == "policy_routing_changed" and event["actor"] == "system"
    assert event["before"]["stable"] == "1" and event["before"]["previous_stable"] == "2"
    assert event["after"]["stable"] == "2" and event["after"]["previous_stable"] is None
    stored = gw.stored()
    assert stored["aliases"]["stable"] == "2" and stored["routing_hash"] != first_hash
    actions = [json.loads(line)["action"] for line in (gw.state / "events.jsonl").read_text().splitlines()]
    assert actions == ["switch", "rollback", "policy_routing_changed"]

    gw.restart()  # and from now on the new state is kept again
    assert gw.view()["alias_source"] == "state" and gw.aliases()["stable"] == "2" and gw.events() == []


def test_edits_outside_the_routing_section_keep_the_state(gw: Gateway) -> None:
    gw.call("POST", f"{VIEW}/switch", {"version": "2"})
    routing_hash = gw.stored()["routing_hash"]

    def edit(policy: dict[str, Any]) -> None:
        policy["guard"]["timeout_ms"] = 300  # not routing
        policy["routing"]["stable"] = 1  # the same version, written as a number

    edit_policy(gw.policies, edit)
    gw.restart()
    view = gw.view()
    assert view["alias_source"] == "state" and view["aliases"]["stable"] == "2"
    assert gw.stored()["routing_hash"] == routing_hash and gw.events() == []

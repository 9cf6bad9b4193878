"""The control state store: round trip, atomic writes, unreadable files, and the routing fingerprint."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.state import Aliases, ModelState, RolloutState, StateStore, routing_hash
from tests.conftest import MODEL, good_row, make_client

ROLLOUT = RolloutState(
    version="3", steps=(1.0, 10.0, 50.0, 100.0), step=2, status="paused", reason="held for review",
    started_at=1_700_000_000.5, step_started_at=1_700_000_060.25, actor="release-bot",
    history=({"step": 0, "percent": 1.0, "decision": "advance", "canary": {"requests": 120, "errors": 0}},
             {"step": 1, "percent": 10.0, "decision": "advance"}),
)
FULL = ModelState(
    aliases=Aliases(stable="2", previous_stable="1", canary="3", canary_percent=12.5, shadow="1", shadow_percent=40.0),
    routing_hash="0123456789abcdef", rollout=ROLLOUT, updated_at=1_700_000_100.75, unloaded=("4",),
)
OLD = ModelState(Aliases(stable="1"), "fedcba9876543210", None, 1.0)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_aliases_and_rollout_with_history(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")  # created on first save
    assert store.load(MODEL) is None
    store.save(MODEL, FULL)
    loaded = store.load(MODEL)
    assert loaded == FULL
    assert loaded is not None and loaded.rollout is not None
    assert loaded.rollout.history[0]["canary"] == {"requests": 120, "errors": 0}
    assert isinstance(loaded.rollout.steps, tuple) and isinstance(loaded.rollout.history, tuple)
    assert store.path(MODEL) == tmp_path / "state" / f"{MODEL}.state.json"


def test_a_state_written_before_unloads_were_kept_reads_as_not_knowing_them() -> None:
    from gateway.state import decode_state, encode_state

    payload = json.loads(encode_state(FULL))
    del payload["unloaded"]
    assert decode_state(json.dumps(payload)) == replace(FULL, unloaded=None)  # not "nothing unloaded"


def test_round_trip_without_rollout_and_overwrite(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(MODEL, FULL)
    store.save(MODEL, OLD)
    assert store.load(MODEL) == OLD
    assert json.loads(store.path(MODEL).read_text())["rollout"] is None


def test_models_have_separate_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("a", FULL)
    store.save("b", OLD)
    assert (store.load("a"), store.load("b")) == (FULL, OLD)
    assert files_in(tmp_path) == ["a.state.json", "b.state.json"]


# ---------------------------------------------------------------- atomic writes


def test_a_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for _ in range(3):
        store.save(MODEL, FULL)
    assert files_in(tmp_path) == [f"{MODEL}.state.json"]


def test_an_unserialisable_value_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(MODEL, OLD)
    before = store.path(MODEL).read_bytes()
    bad_history = RolloutState(version="2", steps=(100.0,), history=({"when": object()},))
    with pytest.raises(TypeError):
        store.save(MODEL, ModelState(Aliases(stable="2"), "x", bad_history, 2.0))
    assert store.path(MODEL).read_bytes() == before
    assert store.load(MODEL) == OLD
    assert files_in(tmp_path) == [f"{MODEL}.state.json"]


def test_a_failed_rename_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save(MODEL, OLD)
    before = store.path(MODEL).read_bytes()

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        store.save(MODEL, FULL)
    monkeypatch.undo()
    assert store.path(MODEL).read_bytes() == before
    assert store.load(MODEL) == OLD
    assert files_in(tmp_path) == [f"{MODEL}.state.json"]


def test_a_failed_fsync_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save(MODEL, OLD)
    before = store.path(MODEL).read_bytes()

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        store.save(MODEL, FULL)
    monkeypatch.undo()
    assert store.path(MODEL).read_bytes() == before
    assert files_in(tmp_path) == [f"{MODEL}.state.json"]


def test_the_first_save_that_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        store.save(MODEL, FULL)
    monkeypatch.undo()
    assert files_in(tmp_path) == []
    assert store.load(MODEL) is None


# ---------------------------------------------------------------- unreadable files


def _valid_payload() -> dict[str, Any]:
    return {"aliases": {"stable": "1", "previous_stable": None, "canary": None, "canary_percent": 0.0,
                        "shadow": None, "shadow_percent": 0.0}, "routing_hash": "abc", "rollout": None,
            "updated_at": 1.0}


CORRUPT: dict[str, bytes] = {
    "empty": b"",
    "truncated": json.dumps(_valid_payload()).encode()[:40],
    "not json": b"stable: 1\n",
    "invalid utf-8": b"\xff\xfe\x00garbage",
    "no aliases": json.dumps({"routing_hash": "abc"}).encode(),
    "no routing hash": json.dumps({"aliases": {"stable": "1"}}).encode(),
    "unknown alias": json.dumps({**_valid_payload(), "aliases": {"stable": "1", "tertiary": "2"}}).encode(),
    "aliases not an object": json.dumps({**_valid_payload(), "aliases": ["1"]}).encode(),
    "aliases null": json.dumps({**_valid_payload(), "aliases": None}).encode(),
    "rollout without steps": json.dumps({**_valid_payload(), "rollout": {"version": "2"}}).encode(),
    "rollout not an object": json.dumps({**_valid_payload(), "rollout": "running"}).encode(),
    "bad updated_at": json.dumps({**_valid_payload(), "updated_at": "yesterday"}).encode(),
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_an_unreadable_state_file_loads_as_none(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path(MODEL).write_bytes(content)
    assert store.load(MODEL) is None


def test_a_directory_in_place_of_the_state_file_loads_as_none(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path(MODEL).mkdir()
    assert store.load(MODEL) is None


def test_a_valid_payload_loads(tmp_path: Path) -> None:
    """The corrupt cases above differ from this one only in what they break."""
    store = StateStore(tmp_path)
    store.path(MODEL).write_text(json.dumps(_valid_payload()))
    # (a payload without `unloaded`, as gateways before shared unloads wrote: the list is unknown)
    assert store.load(MODEL) == ModelState(Aliases(stable="1"), "abc", None, 1.0, unloaded=None)


@pytest.mark.parametrize("content", ["null", "[]", "42", '"state"'])
def test_a_state_file_that_is_json_but_not_an_object_loads_as_none(tmp_path: Path, content: str) -> None:
    store = StateStore(tmp_path)
    store.path(MODEL).write_text(content)
    assert store.load(MODEL) is None


def _status_model(client: Any) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/status").json()
    (model,) = body["models"]
    return model


def _state_dir_with(tmp_path: Path, content: bytes) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    (state / f"{MODEL}.state.json").write_bytes(content)
    return state


def test_the_app_falls_back_to_the_policy_routing_when_the_state_file_is_corrupt(tmp_path: Path) -> None:
    corrupt = json.dumps({**_valid_payload(), "aliases": {"stable": "2", "previous_stable": "1"}})[:-20]
    state = _state_dir_with(tmp_path, corrupt.encode())
    with make_client(state_dir=state) as client:
        model = _status_model(client)
        assert model["aliases"]["stable"] == "1" and model["alias_source"] == "policy"
        answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
        assert answer.headers["x-model-version"] == "1"
    # the corrupt file was replaced by the policy's routing
    stored = StateStore(state).load(MODEL)
    assert stored is not None and stored.aliases == Aliases(stable="1")


def test_the_app_uses_a_valid_state_file_over_the_policy(tmp_path: Path) -> None:
    """Control for the test above: the same layout with a readable file is obeyed."""
    with make_client(state_dir=tmp_path / "first") as client:
        assert _status_model(client)["alias_source"] == "policy"
    hash_of_policy = json.loads((tmp_path / "first" / f"{MODEL}.state.json").read_text())["routing_hash"]
    valid = {**_valid_payload(), "aliases": {"stable": "2", "previous_stable": "1"}, "routing_hash": hash_of_policy}
    state = _state_dir_with(tmp_path, json.dumps(valid).encode())
    with make_client(state_dir=state) as client:
        model = _status_model(client)
        assert model["aliases"]["stable"] == "2" and model["alias_source"] == "state"


def test_the_app_starts_when_the_state_file_holds_json_null(tmp_path: Path) -> None:
    state = _state_dir_with(tmp_path, b"null")
    with make_client(state_dir=state) as client:
        model = _status_model(client)
        assert model["aliases"]["stable"] == "1" and model["alias_source"] == "policy"


# ---------------------------------------------------------------- routing_hash


def test_routing_hash_is_stable_and_ignores_key_order() -> None:
    routing = {"stable": "1", "canary": {"version": "2", "percent": 10}, "shadow_queue": 100}
    reordered = {"shadow_queue": 100, "canary": {"percent": 10, "version": "2"}, "stable": "1"}
    assert routing_hash(routing) == routing_hash(reordered) == routing_hash(json.loads(json.dumps(routing)))
    assert len(routing_hash(routing)) == 16
    int(routing_hash(routing), 16)  # hex


@pytest.mark.parametrize("changed", [
    {"stable": "2", "canary": {"version": "2", "percent": 10}, "shadow_queue": 100},
    {"stable": "1", "canary": {"version": "2", "percent": 20}, "shadow_queue": 100},
    {"stable": "1", "canary": None, "shadow_queue": 100},
    {"stable": "1", "canary": {"version": "2", "percent": 10}, "shadow_queue": 100,
     "sticky_key": {"header": "X-Customer-Id"}},
    {"stable": "1", "canary": {"version": "2", "percent": 10}, "shadow_queue": 100,
     "shadow": {"version": "2", "percent": 5}},
])
def test_routing_hash_changes_when_the_routing_section_changes(changed: dict[str, Any]) -> None:
    routing = {"stable": "1", "canary": {"version": "2", "percent": 10}, "shadow_queue": 100}
    assert routing_hash(changed) != routing_hash(routing)

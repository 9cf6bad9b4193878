"""Routing: the sticky canary split, the sticky key of a request, and shadow sampling."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from starlette.datastructures import Headers

from gateway.policy import StickyKey
from gateway.registry import ServedModel
from gateway.routing import choose_version, shadow_version, sticky_fraction, sticky_value
from gateway.state import Aliases
from gateway.validation import Column
from tests.conftest import MODEL, good_row, make_client

KEYS = [f"customer-{i:05d}" for i in range(10_000)]


def never_drawn() -> float:
    raise AssertionError("the random draw must not be used when there is a sticky key")


@pytest.fixture(scope="module")
def served() -> Iterator[ServedModel]:
    """credit-risk as the in-process app serves it (versions 1 and 2 ready)."""
    with make_client() as client:
        model = client.app.state.gateway.snapshot.model(MODEL)  # type: ignore[attr-defined]
        assert set(model.served) == {"1", "2"}
        yield model


def canary_model(served: ServedModel, percent: float, canary: str = "2") -> ServedModel:
    return served.with_aliases(Aliases(stable="1", canary=canary, canary_percent=percent), "state")


# ---------------------------------------------------------------- sticky_fraction


def test_sticky_fraction_is_deterministic_and_in_unit_interval() -> None:
    keys = [*KEYS[:2000], "", "é", "a" * 10_000, "customer-00001 ", "\x00"]
    first = [sticky_fraction(k) for k in keys]
    assert first == [sticky_fraction(k) for k in keys]
    assert all(isinstance(f, float) and 0.0 <= f < 1.0 for f in first)
    assert len(set(first)) == len(set(keys))  # distinct keys, distinct fractions (no degenerate hash)


def test_sticky_fraction_is_spread_over_the_unit_interval() -> None:
    fractions = np.array([sticky_fraction(k) for k in KEYS])
    counts, _ = np.histogram(fractions, bins=10, range=(0.0, 1.0))
    assert counts.min() > 850 and counts.max() < 1150  # ~1000 per decile


# ---------------------------------------------------------------- choose_version


@pytest.mark.parametrize("percent", [10.0, 50.0])
def test_canary_share_over_many_keys_matches_its_weight(served: ServedModel, percent: float) -> None:
    model = canary_model(served, percent)
    routes = [choose_version(model, key, never_drawn) for key in KEYS]
    share = sum(1 for version, _ in routes if version == "2") / len(KEYS) * 100
    assert abs(share - percent) <= 2.0, share
    assert set(routes) == {("2", "canary"), ("1", "stable")}


def test_the_same_key_always_gets_the_same_version(served: ServedModel) -> None:
    model = canary_model(served, 50)
    for key in KEYS[:500]:
        first = choose_version(model, key, never_drawn)
        assert all(choose_version(model, key, never_drawn) == first for _ in range(3))
    # the decision is the documented one: the key's fraction against the percentage
    for key in KEYS[:500]:
        expected = "2" if sticky_fraction(key) * 100 < 50 else "1"
        assert choose_version(model, key, never_drawn)[0] == expected


def test_raising_the_percentage_never_moves_a_key_back_to_stable(served: ServedModel) -> None:
    steps = [0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 99.0, 100.0]
    keys = KEYS[:3000]
    previous = {key: False for key in keys}
    for percent in steps:
        model = canary_model(served, percent)
        now = {key: choose_version(model, key, never_drawn)[0] == "2" for key in keys}
        assert not [k for k in keys if previous[k] and not now[k]], f"keys left the canary at {percent}%"
        previous = now
    assert all(previous.values())  # 100 % sends everyone to the canary
    assert not any(choose_version(canary_model(served, 0.0), k, never_drawn)[0] == "2" for k in keys)


def test_without_a_key_the_split_uses_the_injected_draw(served: ServedModel) -> None:
    model = canary_model(served, 10)
    assert choose_version(model, None, lambda: 0.0) == ("2", "canary")
    assert choose_version(model, None, lambda: 0.0999) == ("2", "canary")
    assert choose_version(model, None, lambda: 0.1) == ("1", "stable")
    assert choose_version(model, None, lambda: 0.9999) == ("1", "stable")
    draws = random.Random(7)
    share = sum(choose_version(model, None, draws.random)[0] == "2" for _ in range(10_000)) / 100
    assert abs(share - 10) <= 2


def test_a_key_overrides_the_draw(served: ServedModel) -> None:
    low = next(k for k in KEYS if sticky_fraction(k) < 0.05)
    high = next(k for k in KEYS if sticky_fraction(k) > 0.95)
    model = canary_model(served, 10)
    assert choose_version(model, low, lambda: 0.99) == ("2", "canary")
    assert choose_version(model, high, lambda: 0.0) == ("1", "stable")


def test_no_canary_or_a_canary_that_does_not_serve_routes_to_stable(served: ServedModel) -> None:
    plain = served.with_aliases(Aliases(stable="1"), "state")
    assert choose_version(plain, None, lambda: 0.0) == ("1", "stable")
    zero = canary_model(served, 0.0)
    assert choose_version(zero, None, lambda: 0.0) == ("1", "stable")
    unknown = canary_model(served, 100.0, canary="9")
    assert choose_version(unknown, "k", never_drawn) == ("1", "stable")
    not_serving = replace(canary_model(served, 100.0), served={"1": served.served["1"]})
    assert choose_version(not_serving, None, lambda: 0.0) == ("1", "stable")


def test_no_version_when_stable_cannot_serve(served: ServedModel) -> None:
    broken = replace(served.with_aliases(Aliases(stable="2"), "state"), served={"1": served.served["1"]})
    assert choose_version(broken, None, lambda: 0.5) == (None, "stable")


# ---------------------------------------------------------------- sticky_value


def test_sticky_value_reads_a_header_case_insensitively() -> None:
    spec = StickyKey(header="X-Customer-Id")
    assert sticky_value(spec, {"x-customer-id": "C17"}, {}) == "C17"
    assert sticky_value(spec, Headers({"X-CUSTOMER-ID": "C18"}), {}) == "C18"
    assert sticky_value(StickyKey(header="x-customer-id"), Headers({"X-Customer-Id": "C19"}), {}) == "C19"
    assert sticky_value(spec, {"x-other": "C17"}, {}) is None
    assert sticky_value(None, {"x-customer-id": "C17"}, {}) is None


def test_sticky_value_reads_the_first_row_of_a_field() -> None:
    spec = StickyKey(field="customer_id")
    assert sticky_value(spec, {}, {"customer_id": Column("customer_id", ["C1", "C2"])}) == "C1"
    assert sticky_value(spec, {}, {"customer_id": Column("customer_id", np.array([42, 43]))}) == "42"
    assert sticky_value(spec, {}, {"customer_id": Column("customer_id", [None, "C2"])}) is None
    assert sticky_value(spec, {}, {"customer_id": Column("customer_id", [])}) is None
    assert sticky_value(spec, {}, {"age": Column("age", [41])}) is None
    # a header of the same name is not the field
    assert sticky_value(spec, {"customer_id": "H"}, {}) is None


def _sticky_policy(policies: Path, sticky: dict[str, str]) -> None:
    path = policies / f"{MODEL}.yaml"
    policy: dict[str, Any] = yaml.safe_load(path.read_text())
    policy["routing"] = {"stable": "1", "canary": {"version": "2", "percent": 50}, "sticky_key": sticky}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


def _split_keys() -> tuple[str, str]:
    """A key the 50 % canary takes and one it leaves on stable."""
    return (next(k for k in KEYS if sticky_fraction(k) < 0.4), next(k for k in KEYS if sticky_fraction(k) > 0.6))


def test_a_sticky_header_keeps_callers_on_their_version_over_http(repo_copy: tuple[Path, Path]) -> None:
    models, policies = repo_copy
    _sticky_policy(policies, {"header": "X-Customer-Id"})
    canary_key, stable_key = _split_keys()
    with make_client(models, policies) as client:
        for key, version, route in ((canary_key, "2", "canary"), (stable_key, "1", "stable")):
            for _ in range(10):
                answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]},
                                     headers={"x-customer-id": key})
                assert answer.status_code == 200, answer.text
                assert (answer.headers["x-model-version"], answer.headers["x-route"]) == (version, route)


def test_a_sticky_field_keeps_callers_on_their_version_over_http(repo_copy: tuple[Path, Path]) -> None:
    models, policies = repo_copy
    _sticky_policy(policies, {"field": "customer_id"})
    canary_key, stable_key = _split_keys()
    with make_client(models, policies) as client:
        for key, version in ((canary_key, "2"), (stable_key, "1")):
            for _ in range(10):
                row = {**good_row(), "customer_id": key}
                answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [row]})
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-model-version"] == version


# ---------------------------------------------------------------- shadow_version


def shadow_model(served: ServedModel, shadow: str | None, percent: float) -> ServedModel:
    return served.with_aliases(Aliases(stable="1", shadow=shadow, shadow_percent=percent), "state")


def test_shadow_version_respects_its_percentage(served: ServedModel) -> None:
    model = shadow_model(served, "2", 30)
    assert shadow_version(model, lambda: 0.0) == "2"
    assert shadow_version(model, lambda: 0.2999) == "2"
    assert shadow_version(model, lambda: 0.3) is None
    draws = random.Random(11)
    share = sum(shadow_version(model, draws.random) == "2" for _ in range(10_000)) / 100
    assert abs(share - 30) <= 2
    always = shadow_model(served, "2", 100)
    for x in (0.0, 0.5, 0.999999):
        assert shadow_version(always, lambda x=x: x) == "2"


def test_shadow_version_is_none_without_shadow_or_at_zero_percent(served: ServedModel) -> None:
    assert shadow_version(shadow_model(served, None, 100), lambda: 0.0) is None
    assert shadow_version(shadow_model(served, "2", 0), lambda: 0.0) is None


def test_shadow_version_never_returns_a_version_that_is_not_serving(served: ServedModel) -> None:
    assert shadow_version(shadow_model(served, "9", 100), lambda: 0.0) is None
    unloaded = replace(shadow_model(served, "2", 100), served={"1": served.served["1"]})
    assert shadow_version(unloaded, lambda: 0.0) is None

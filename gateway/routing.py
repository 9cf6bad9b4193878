"""Which version answers an unversioned request: stable, or canary by a sticky hash; and the shadow."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from gateway.policy import StickyKey
from gateway.registry import ServedModel
from gateway.validation import Column


def sticky_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key (same key, same number, on every replica and restart)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sticky_value(spec: StickyKey | None, headers: Mapping[str, str], columns: Mapping[str, Column]) -> str | None:
    """The request's sticky key: the named header, or the first row's value of the named field."""
    if spec is None:
        return None
    if spec.header is not None:
        return headers.get(spec.header.lower())
    column = columns.get(spec.field or "")
    if column is None or len(column.values) == 0:
        return None
    first = column.values[0]
    return None if first is None else str(first)


def choose_version(model: ServedModel, key: str | None, draw: Callable[[], float]) -> tuple[str | None, str]:
    """(version, route) for an unversioned request.

    The canary takes the keys whose fraction is below its percentage, so raising the percentage
    only ever moves callers from stable to canary, never back, within a rollout.
    """
    aliases = model.aliases
    if aliases.canary is not None and aliases.canary_percent > 0 and aliases.canary in model.served:
        fraction = sticky_fraction(key) if key is not None else draw()
        if fraction * 100 < aliases.canary_percent:
            return aliases.canary, "canary"
    return model.default_version, "stable"


def shadow_version(model: ServedModel, draw: Callable[[], float]) -> str | None:
    """The shadow version when this request is sampled for mirroring, else None."""
    aliases = model.aliases
    if aliases.shadow is None or aliases.shadow not in model.served or aliases.shadow_percent <= 0:
        return None
    return aliases.shadow if draw() * 100 < aliases.shadow_percent else None

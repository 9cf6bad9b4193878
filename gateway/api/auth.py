"""Bearer tokens with roles for the admin API, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import Request

from gateway.errors import ClientError
from gateway.settings import AdminToken

ROLES = {"viewer": 0, "operator": 1, "admin": 2}


class Unauthenticated(ClientError):
    """No valid bearer token (401)."""


class Forbidden(ClientError):
    """A valid token whose role is not enough (403)."""


@dataclass(frozen=True)
class Actor:
    """Who is acting, as named by their token."""

    name: str
    role: str


class TokenBook:
    """The configured tokens, kept as sha256 digests; lookups do not stop at the first match."""

    def __init__(self, tokens: list[AdminToken]) -> None:
        self._entries = [(hashlib.sha256(t.token.encode()).digest(), Actor(t.name, t.role)) for t in tokens]

    def identify(self, presented: str) -> Actor | None:
        """The actor a token belongs to (constant time in the number of configured tokens)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for expected, actor in self._entries:
            if hmac.compare_digest(digest, expected):
                found = actor
        return found

    def require(self, request: Request, role: str) -> Actor:
        """The request's actor if its role is at least `role`; else Unauthenticated or Forbidden."""
        if not self._entries:
            raise Unauthenticated("the admin API is disabled: no GATEWAY_ADMIN_TOKENS are configured")
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        actor = self.identify(presented.strip())
        if actor is None:
            raise Unauthenticated("invalid token")
        if ROLES[actor.role] < ROLES[role]:
            raise Forbidden(f"{actor.name} is a {actor.role}; this needs {role}")
        return actor

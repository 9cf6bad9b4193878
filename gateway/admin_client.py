"""The CLI's HTTP client for the admin API (standard library only, so the CLI needs no extra packages)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class AdminCallFailed(Exception):
    """The server could not be reached (exit code 2), as opposed to refusing the call."""


@dataclass(frozen=True)
class AdminReply:
    """HTTP status and decoded JSON body."""

    status: int
    body: Any


@dataclass(frozen=True)
class AdminClient:
    """Calls `url` with a bearer token."""

    url: str
    token: str | None
    timeout_s: float = 30.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> AdminReply:
        """One request; 4xx/5xx come back as replies, connection problems raise AdminCallFailed."""
        data = json.dumps(body).encode() if body is not None else None
        try:
            request = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method)
            request.add_header("Content-Type", "application/json")
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return AdminReply(response.status, _decode(response.read()))
        except urllib.error.HTTPError as exc:
            return AdminReply(exc.code, _decode(exc.read()))
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            raise AdminCallFailed(f"cannot reach {self.url}: {exc}") from None

    def upload_report(self, report: dict[str, Any]) -> AdminReply:
        """Store a readiness report (its JSON form) for the promotion gate: 201 with its summary, 400 with
        the reasons it was refused (e.g. changed after it was made), 404 for a model not served there."""
        return self.call("PUT", "/admin/readiness", report)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")

"""The gateway's errors, independent of HTTP.

    GatewayError                      base; `counts_against_breaker` says whether a version is at fault
    ├── ClientError                   the request is at fault (never counts against a breaker)
    │   ├── ViolationError            carries the list of every violation found
    │   │   ├── MalformedRequest      not a well-formed protocol message (bad JSON, bad tensor)
    │   │   └── SchemaViolation       well-formed, but breaks the model's schema or policy
    │   ├── RequestTooLarge           body over the configured limit (compressed or inflated)
    │   ├── UnsupportedEncoding       a Content-Encoding other than gzip, deflate or identity
    │   ├── ModelNotFound             no such model
    │   └── VersionNotFound           no such version of a known model
    ├── Unavailable                   the model or version exists but cannot answer now
    │   ├── CircuitOpen               the version's breaker is open (or half-open with a trial in flight)
    │   └── Overloaded                too many model calls are already waiting
    ├── InferenceTimeout              the deadline passed before the model answered   [counts]
    └── InferenceFailed               the runtime raised while running a valid request [counts]

The API layer maps each leaf to an HTTP status in one table (`gateway.api.errors`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    counts_against_breaker = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(GatewayError):
    """The request is at fault."""


@dataclass(frozen=True)
class Violation:
    """One problem with one field (and row, where it applies) of a request."""

    field: str
    reason: str
    expected: str
    got: str
    row: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form, as listed in an error body."""
        return {"field": self.field, "row": self.row, "reason": self.reason,
                "expected": self.expected, "got": self.got}

    def describe(self) -> str:
        """One line for humans and logs."""
        where = self.field if self.row is None else f"{self.field}[row {self.row}]"
        return f"{where}: {self.reason} (expected {self.expected}, got {self.got})"


@dataclass
class ViolationList:
    """Collects violations up to a limit and counts the ones it did not keep."""

    limit: int
    items: list[Violation] = field(default_factory=list)
    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)

    def add(self, violation: Violation) -> None:
        """Record one violation (kept if under the limit, counted always)."""
        self.total += 1
        self.by_reason[violation.reason] += 1
        if len(self.items) < self.limit:
            self.items.append(violation)

    def count_unlisted(self, reason: str, n: int) -> None:
        """Count `n` more violations of one reason that are not listed (the list is full)."""
        if n > 0:
            self.total += n
            self.by_reason[reason] += n

    def __bool__(self) -> bool:
        return self.total > 0


class ViolationError(ClientError):
    """A client error that carries the list of violations (and their total count)."""

    summary = "invalid request"

    def __init__(self, violations: ViolationList | list[Violation]) -> None:
        if isinstance(violations, list):
            collected = ViolationList(limit=len(violations) or 1)
            for v in violations:
                collected.add(v)
            violations = collected
        self.violations = violations
        shown = "; ".join(v.describe() for v in violations.items)
        hidden = violations.total - len(violations.items)
        more = f"; and {hidden} more" if hidden > 0 else ""
        count = violations.total
        super().__init__(f"{self.summary}: {count} problem{'s' if count != 1 else ''}: {shown}{more}")


class MalformedRequest(ViolationError):
    """The body is not a well-formed protocol message."""

    summary = "malformed request"


class SchemaViolation(ViolationError):
    """A well-formed request that breaks the model's schema or its policy."""

    summary = "request violates the model schema"


class RequestTooLarge(ClientError):
    """The body is larger than the configured limit."""


class UnsupportedEncoding(ClientError):
    """The body uses a Content-Encoding the gateway does not decode."""


class ModelNotFound(ClientError):
    """No model of that name is served."""


class VersionNotFound(ClientError):
    """The model exists but has no such version."""


class NotFound(ClientError):
    """Something else the client named does not exist (e.g. a stored readiness report)."""


class Unavailable(GatewayError):
    """The model or version exists but is not ready to answer."""


class CircuitOpen(Unavailable):
    """The version's circuit breaker does not let this call through."""


class Overloaded(Unavailable):
    """More model calls are queued than the process allows; answering now beats queueing."""


class InferenceTimeout(GatewayError):
    """The request's deadline passed before the model answered (the run is cancelled)."""

    counts_against_breaker = True


class QueuedTooLong(InferenceTimeout):
    """The deadline passed before the model ran: queueing, not the version, so the breaker ignores it."""

    counts_against_breaker = False


class InferenceFailed(GatewayError):
    """The runtime raised an error while running a validated request."""

    counts_against_breaker = True

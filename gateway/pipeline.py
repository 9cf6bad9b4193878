"""The request path as one recipe: snapshot, resolve the version, validate, run, answer.

Knows nothing of HTTP. Later safety nets (route, guard, fallback, side paths) slot in here, in
the order the design's hot path shows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from gateway.codec import Answer
from gateway.errors import SchemaViolation, Violation
from gateway.registry import ServedVersion, Snapshot
from gateway.validation import Column, ValidatedBatch


class InferencePipeline:
    """Turns decoded request columns into an Answer from one model version."""

    def __init__(self, snapshot: Callable[[], Snapshot], executor: ThreadPoolExecutor) -> None:
        self._snapshot = snapshot
        self._executor = executor

    async def infer(self, model: str, version: str | None, columns: dict[str, Column],
                    outputs: list[str] | None, request_id: str | None) -> tuple[Answer, ValidatedBatch]:
        """Answer one request; raises a GatewayError subclass on any failure."""
        served = self._snapshot().model(model).resolve(version)
        batch = served.validator.validate(columns)
        wanted = _requested_outputs(served, outputs)
        assert served.entry.model is not None  # a served version always has a session
        results = await served.entry.model.predict(batch.feeds, wanted, self._executor)
        datatypes = {t.name: t.datatype for t in served.entry.model.signature.outputs}
        answer = Answer(
            model=model,
            version=served.entry.version,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            outputs=results,
            datatypes=datatypes,
            rows=batch.rows,
        )
        return answer, batch


def _requested_outputs(served: ServedVersion, outputs: list[str] | None) -> list[str] | None:
    if outputs is None:
        return None
    assert served.entry.model is not None
    known = served.entry.model.output_names
    unknown = [name for name in outputs if name not in known]
    if unknown:
        raise SchemaViolation([Violation(f"outputs ({name})", "unknown_output", f"one of {known}", repr(name))
                               for name in unknown])
    return list(dict.fromkeys(outputs))

"""What the readiness checks share: the target, its policy, card, versions, data and staging gateway.

Everything is loaded once and lazily: a check that needs the held-out table reads it the first
time, and a check that needs the staging gateway starts it the first time. A problem that makes
the whole run meaningless (no such model or version, an invalid policy, a staging gateway that
will not start) raises `CannotRun`; a problem with what is being judged (a model file that does
not match its card, data that fails the schema) is a failed item instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from numpy.typing import NDArray

from gateway.card import ModelCard
from gateway.policy import LoadedPolicy, Policy, PolicyError, Readiness, load_policy, policy_files
from gateway.readiness.data import DataError, GoldenLine, Table, file_sha256, read_golden, read_table
from gateway.readiness.evaluate import Evaluator, Scored
from gateway.readiness.report import ItemResult, Status
from gateway.readiness.staging import StagingError, StagingGateway
from gateway.repository import ModelRepository, ModelVersion
from gateway.runtime import RuntimeOptions


class CannotRun(Exception):
    """The checklist cannot run at all (exit code 2); the message says why."""


@dataclass(frozen=True)
class Target:
    """What to judge and where it lives."""

    model: str
    version: str
    models_dir: Path
    policies_dir: Path
    production_url: str | None = None
    """A production gateway whose environment must match (overrides the policy's)."""
    scale: float = 1.0
    """Multiplies the load, soak and rehearsal durations (a quick run for tests: 0.1)."""


def item(status: Status, detail: str, evidence: dict[str, Any] | None = None,
         measured: dict[str, Any] | None = None) -> ItemResult:
    """A check's result (the runner fills in phase, key and title)."""
    return ItemResult("", "", "", status, detail, evidence or {}, measured or {})


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A figure for a report: rounded, and None for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


class Context:
    """The shared state of one readiness run."""

    def __init__(self, target: Target, say: Callable[[str], None] = lambda _: None) -> None:
        self.target = target
        self.say = say
        self.figures: list[dict[str, Any]] = []
        self.loaded = self._policy()
        self.policy: Policy = self.loaded.policy
        self.readiness: Readiness = self.policy.readiness or Readiness()
        version_dir = target.models_dir / target.model / target.version
        if not (version_dir / "model.onnx").is_file():
            raise CannotRun(f"no model file {version_dir / 'model.onnx'}")
        self.version_dir = version_dir
        self.repository = ModelRepository(target.models_dir, RuntimeOptions())
        say(f"loading {target.model} v{target.version}")
        self.candidate: ModelVersion = self.repository.load_version(target.model, target.version)
        self.model_sha256 = self.candidate.sha256 or file_sha256(version_dir / "model.onnx")
        self.data_dir = target.models_dir / target.model / self.readiness.data.dir
        self._staging: StagingGateway | None = None
        self._stable: ModelVersion | None = None
        self.production_status: dict[str, Any] | None = None

    # --- the model ----------------------------------------------------------------------------

    def _policy(self) -> LoadedPolicy:
        directory = self.target.policies_dir
        if not directory.is_dir():
            raise CannotRun(f"policy directory {directory} does not exist")
        for path in policy_files(directory):
            try:
                loaded = load_policy(path)
            except PolicyError as exc:
                if exc.model == self.target.model:
                    raise CannotRun("the policy is invalid:\n  " + "\n  ".join(p.describe() for p in exc.problems)
                                    ) from None
                continue
            if loaded.policy.model == self.target.model:
                return loaded
        raise CannotRun(f"no policy for model {self.target.model!r} in {directory}")

    @cached_property
    def policy_sections(self) -> set[str]:
        """The top-level sections the policy file writes out (the rest take their defaults)."""
        try:
            data = yaml.safe_load(Path(self.loaded.source).read_text())
        except (OSError, yaml.YAMLError):
            return set()
        return set(data) if isinstance(data, dict) else set()

    @property
    def card(self) -> ModelCard | None:
        """The candidate's card (None when it has none or it is invalid)."""
        return self.candidate.card

    def require_card(self) -> ModelCard:
        """The candidate's card; DataError when there is none."""
        if self.card is None:
            raise DataError(f"{self.target.model} v{self.target.version} has no valid model card: "
                            f"{self.candidate.reason}")
        return self.card

    def require_model(self) -> ModelVersion:
        """The candidate, loaded; DataError with the repository's reason when it was refused."""
        if not self.candidate.ready:
            raise DataError(f"the candidate did not load: {self.candidate.reason}")
        return self.candidate

    @cached_property
    def stable_version(self) -> str | None:
        """The version serving as stable now (production's when a URL is given, else the policy's),
        None when there is none or it is the candidate itself."""
        stable: str | None = self.policy.routing.stable
        status = self.production()
        if status is not None:
            for model in status.get("models", []):
                if isinstance(model, dict) and model.get("name") == self.target.model:
                    stable = (model.get("aliases") or {}).get("stable") or stable
        return None if stable in (None, self.target.version) else str(stable)

    def stable(self) -> ModelVersion | None:
        """The current stable version, loaded (None when there is none, or it failed to load)."""
        if self.stable_version is None:
            return None
        if self._stable is None:
            self._stable = self.repository.load_version(self.target.model, self.stable_version)
        return self._stable if self._stable.ready else None

    # --- data ---------------------------------------------------------------------------------

    @cached_property
    def heldout(self) -> Table:
        """The held-out (time-split) table."""
        return read_table(self.data_dir / self.readiness.data.heldout)

    @cached_property
    def all_rows(self) -> Table | None:
        """Every row, for the random split (None when the policy names no such file)."""
        name = self.readiness.data.rows
        return read_table(self.data_dir / name) if name else None

    @cached_property
    def golden(self) -> list[GoldenLine]:
        """golden.jsonl's lines (empty when the file does not exist)."""
        path = self.data_dir / self.readiness.data.golden
        return read_golden(path) if path.exists() else []

    @cached_property
    def label_column(self) -> str:
        """The outcome column: the policy's, else the card's training label."""
        card = self.require_card()
        column = self.readiness.data.label or card.training_data.label
        if not column:
            raise DataError("no label column: set readiness.data.label or the card's training_data.label")
        return column

    @cached_property
    def evaluator(self) -> Evaluator:
        """Offline scoring with the candidate's signature and score."""
        return Evaluator.for_card(self.policy, self.require_card(), self.readiness.fairness.decision_threshold)

    @cached_property
    def candidate_heldout(self) -> Scored:
        """The candidate's answers on the held-out table."""
        model = self.require_model().model
        assert model is not None
        return self.evaluator.run(model, self.heldout)

    def data_files(self) -> dict[str, Any]:
        """The data files the run used and their fingerprints (for the report's context)."""
        files: dict[str, Any] = {}
        for name in (self.readiness.data.heldout, self.readiness.data.rows, self.readiness.data.golden):
            if name and (self.data_dir / name).is_file():
                files[name] = file_sha256(self.data_dir / name)
        return files

    # --- the staging gateway and production -----------------------------------------------------

    def staging(self) -> StagingGateway:
        """The staging gateway, started on first use (CannotRun when it will not start)."""
        if self._staging is None:
            self.say("starting the staging gateway")
            gateway = StagingGateway(self.target.models_dir, self.target.policies_dir)
            try:
                gateway.start()
            except StagingError as exc:
                raise CannotRun(str(exc)) from None
            self._staging = gateway
        return self._staging

    def close(self) -> None:
        """Stop the staging gateway."""
        if self._staging is not None:
            self._staging.stop()
            self._staging = None

    @property
    def production_url(self) -> str | None:
        """The production gateway's base URL, if any."""
        return self.target.production_url or self.readiness.production_url

    def production(self) -> dict[str, Any] | None:
        """Production's /status (None without a URL; CannotRun when it cannot be read)."""
        url = self.production_url
        if url is None:
            return None
        if self.production_status is None:
            try:
                answer = httpx.get(url.rstrip("/") + "/status", timeout=10)
                answer.raise_for_status()
                status = answer.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise CannotRun(f"cannot read the production gateway's status at {url}: {exc}") from None
            if not isinstance(status, dict) or not isinstance(status.get("models", []), list):
                raise CannotRun(f"the production gateway's status at {url} is not a gateway's status (a JSON "
                                f"object with `models`)")
            self.production_status = status
        return self.production_status

    def infer_path(self, pinned: bool = True) -> str:
        """The v2 inference path of the candidate (or of the model's routing when not pinned)."""
        if pinned:
            return f"/v2/models/{self.target.model}/versions/{self.target.version}/infer"
        return f"/v2/models/{self.target.model}/infer"

    def v2_body(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows (feature -> value) as a v2 request: one [N, 1] tensor per feature."""
        inputs = []
        for name in rows[0]:
            values = [row.get(name) for row in rows]
            inputs.append({"name": name, "shape": [len(rows), 1], "datatype": datatype_of(values), "data": values})
        return {"inputs": inputs}

    def table_rows(self, table: Table, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Rows of a table as typed feature dicts, as a client would send them."""
        from gateway.readiness.data import request_columns

        columns = request_columns(table.take(np.arange(start, min(stop or table.rows, table.rows))),
                                  self.policy.input_schema.features)
        count = len(next(iter(columns.values())).values) if columns else 0
        return [{name: column.values[i] for name, column in columns.items()} for i in range(count)]


def datatype_of(values: list[Any]) -> str:
    """The v2 datatype a client would declare for these JSON values."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "BOOL"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "FP64"
    return "BYTES"


def outputs_of(answer: dict[str, Any]) -> dict[str, NDArray[Any]]:
    """A v2 answer's outputs as arrays of their declared shapes."""
    outputs = {}
    for output in answer.get("outputs", []):
        array = np.asarray(output.get("data", []), dtype=object if output.get("datatype") == "BYTES" else None)
        with contextlib.suppress(ValueError):
            array = array.reshape(output.get("shape", [-1]))
        outputs[output["name"]] = array
    return outputs


"""Process settings: from `GATEWAY_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AdminToken(BaseModel):
    """One admin API credential: who presents it, and what it may do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    role: Literal["viewer", "operator", "admin"]
    token: str = Field(min_length=16, repr=False)


class Settings(BaseSettings):
    """Everything the process needs to start; policies hold everything per model."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True, use_attribute_docstrings=True,
                                      extra="forbid")

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""
    models_dir: Path = Path("models")
    """Root of the model repository (`<model>/<version>/model.onnx` + card)."""
    policies_dir: Path = Path("policies")
    """Directory of policy files (`*.yaml`), one per model."""
    workers: int = Field(default=1, ge=1, le=64)
    """uvicorn worker processes sharing the port. More than one needs `state_store: redis` (the workers
    share control state through it as replicas do); each worker writes its own audit chain
    (`<audit_dir>/worker-<n>/`) and metrics are merged across workers (Prometheus multiprocess mode)."""
    metrics_dir: Path | None = None
    """With several workers: where they keep their metric files (emptied at start); default
    `<state_dir>/metrics`."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest accepted request body; larger ones get 413 before they are parsed."""
    max_listed_violations: int = Field(default=100, ge=1, le=10_000)
    """Most violations listed in one error body (all of them are always counted)."""
    inference_threads: int = Field(default=2, ge=1, le=64)
    """Worker threads that run onnxruntime (the event loop never runs a model)."""
    ort_intra_op_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime intra-op threads per session."""
    ort_inter_op_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime inter-op threads per session."""
    max_queued_inferences: int = Field(default=256, ge=1, le=100_000)
    """Model calls allowed in flight or waiting for a worker; beyond it requests are answered at once
    (fallback reason `overloaded`, or 503) instead of queueing past their deadlines."""
    drain_timeout_s: int = Field(default=10, ge=0, le=600)
    """On SIGTERM: stop accepting, and give in-flight requests this long to finish."""
    allow_fault_injection: bool = False
    """Apply policies' `faults` sections (rehearsals in staging and tests); refused when false."""
    state_dir: Path = Path("state")
    """Control state (effective aliases, rollouts) and the control event log; atomic writes."""
    state_store: Literal["file", "redis"] = "file"
    """Where the alias table and rollout progress live: `file` (this replica's own, in state_dir) or
    `redis` (shared by every replica with the same redis_url and redis_prefix; changes apply on the
    others within a second)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis server of `state_store: redis`."""
    redis_prefix: str = Field(default="gateway", pattern=r"^[A-Za-z0-9_.:-]+$")
    """Key prefix in Redis, so several deployments can share one server."""
    readiness_dir: Path | None = None
    """Readiness reports uploaded for the promotion gate (`<dir>/<model>/<sha256>.json`); default
    `<state_dir>/readiness`."""
    admin_tokens: list[AdminToken] = []
    """Admin API credentials, e.g. `[{"name": "ci", "role": "operator", "token": "..."}]` (JSON in the
    environment). Roles: viewer (read), operator (switch, rollback, canary, shadow, rollout), admin
    (also load/unload). With none, the admin API answers 401 to everyone."""
    audit_dir: Path = Path("audit")
    """Directory of the hash-chained audit log (JSON Lines files)."""
    audit_queue: int = Field(default=10_000, ge=1, le=10_000_000)
    """Records waiting for the writer; when full, each model's `audit.on_full` decides."""
    audit_fsync: Literal["batch", "interval"] = "batch"
    """fsync after every written batch, or at most every `audit_fsync_interval_s`."""
    audit_fsync_interval_s: float = Field(default=1.0, gt=0, le=60)
    """With `audit_fsync: interval`: the longest a written record waits for its fsync."""
    audit_max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Rotate to a new file beyond this size."""
    audit_max_file_age_s: float = Field(default=3600.0, gt=0)
    """Rotate to a new file after this long."""
    readiness_hmac_key: str | None = Field(default=None, min_length=16, repr=False)
    """Shared secret that signs readiness reports: when set, the gate trusts only reports signed with
    it (`gateway readiness` signs when the same variable is in its environment), so holding an
    operator token is not enough to open the gate with a report made by hand."""
    audit_hmac_key: str | None = Field(default=None, min_length=16, repr=False)
    """Secret for `hash` redaction; without it, fields to hash are dropped instead (never written)."""
    trace_exporter: Literal["none", "console", "otlp"] = "none"
    """Where OpenTelemetry spans go: `none` (spans still carry ids, returned in X-Trace-Id), `console`, or
    `otlp` (needs opentelemetry-exporter-otlp-proto-http; endpoint from OTEL_EXPORTER_OTLP_* variables)."""
    trace_sample_ratio: float | None = Field(default=None, ge=0, le=1)
    """Share of requests whose spans are recorded (default: 0 with exporter `none`, 1 otherwise)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the gateway and uvicorn."""

    @model_validator(mode="after")
    def _workers_share_state(self) -> Settings:
        if self.workers > 1 and self.state_store != "redis":
            raise ValueError("workers > 1 needs state_store: redis (the workers share control state through it; "
                             "with the file store each would keep its own alias table)")
        return self

"""The composition root: `create_app(settings)` builds every component in the lifespan and wires it."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.api import admin, health, inference
from gateway.api import monitoring as monitoring_api
from gateway.api import repository as repository_api
from gateway.api.auth import TokenBook
from gateway.api.body import ClientGone
from gateway.api.errors import json_response
from gateway.audit import AuditWriter, Redactor
from gateway.control import ReleaseControl
from gateway.faults import FaultInjector
from gateway.feedback_shared import SharedPredictions
from gateway.monitoring import Monitoring
from gateway.pipeline import InferencePipeline
from gateway.policy import Rollout
from gateway.readiness.jobs import ReadinessRunner
from gateway.readiness.store import ReportStore
from gateway.registry import BreakerBoard, ServedModel, ServedVersion, Snapshot, build_snapshot, serve_version
from gateway.repository import ModelRepository, ModelVersion
from gateway.rollout import RolloutController
from gateway.runtime import INLINE, RuntimeOptions
from gateway.settings import Settings
from gateway.shadow import ShadowMirror
from gateway.state import ControlStateStore, StateStore
from gateway.state_redis import RedisStateStore, StateWatcher
from gateway.stats import TrafficStats
from gateway.telemetry import BREAKER_CODES, SAMPLE_INTERVAL_S, Metrics, multiprocess_dir
from gateway.tracing import make_tracer, never_sampled
from gateway.workers import WorkerSlot, claim_slot, hold_single_writer

log = logging.getLogger("gateway")


class Gateway:
    """Everything one running gateway owns; reachable from routes as `request.app.state.gateway`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.slot: WorkerSlot | None = claim_slot(settings.audit_dir) if settings.workers > 1 else None
        """This worker's slot when several share the port: it names its audit chain and event log."""
        self._writer_lock = hold_single_writer(settings.audit_dir) if self.slot is None else None
        # a gateway dropped without stop() (never started, a test) lets go of its lock when collected
        weakref.finalize(self, _release, self.slot, self._writer_lock)
        worker = self.slot.name if self.slot is not None else ""

        def own(path: Path) -> Path:
            return path / worker if worker else path

        self.metrics = Metrics(multiprocess_dir() if settings.workers > 1 else None)
        self.state_store = _state_store(settings)
        self.metrics.sample(self.metrics.state_store_up, lambda: 1.0 if self.state_store.status()["ok"] else 0.0)
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_threads,
                                           thread_name_prefix="inference")
        self.repository = ModelRepository(
            settings.models_dir,
            RuntimeOptions(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        )
        self.snapshot = Snapshot(models={}, policy_problems=["models are still loading"])
        self.breakers = BreakerBoard(on_change=self.metrics.breaker_changed)
        self.stats = TrafficStats()
        self.shadow = ShadowMirror(lambda: self.snapshot, self.executor, self.stats, self.metrics,
                                   audit=lambda record: self.audit.submit(record, "block"))
        self.monitor = Monitoring(lambda: self.snapshot, self.metrics, judge_volume=settings.state_store == "file")
        if settings.state_store == "redis":  # labels reaching another replica find their predictions
            self.monitor.shared = SharedPredictions(
                settings.redis_url, settings.redis_prefix,
                on_dropped=lambda model, n: self.metrics.feedback_unshared.labels(model).inc(n))
        self.tracer, self.tracer_provider = make_tracer(settings.trace_exporter, settings.trace_sample_ratio)
        self.trace_roots = not never_sampled(settings.trace_exporter, settings.trace_sample_ratio)
        """Whether requests without a caller's trace context may be recorded (else they skip the SDK)."""
        self.pipeline = InferencePipeline(lambda: self.snapshot, self.executor, settings.max_queued_inferences,
                                          self.stats, self.shadow, monitor=self.monitor, tracer=self.tracer)
        self.metrics.sample(self.metrics.in_flight, lambda: self.pipeline.in_flight)
        self.reports = ReportStore(settings.readiness_dir or settings.state_dir / "readiness",
                                   key=settings.readiness_hmac_key)
        """Uploaded readiness reports, which open the promotion gate."""
        self.readiness_runs = ReadinessRunner(
            settings.models_dir.resolve(), settings.policies_dir.resolve(), self.reports.directory.resolve(),
            on_report=lambda actor, summary: self.control.record(actor, str(summary["model"]), "readiness_report",
                                                                 None, summary), lock_dir=settings.state_dir)
        """Checklist runs started through the admin API (one at a time, in a child process)."""
        self.state_watcher: StateWatcher | None = None
        self.control = ReleaseControl(lambda: self.snapshot, self.publish, self.state_store,
                                      self.repository, self._serve_version, own(settings.state_dir) / "events.jsonl",
                                      on_change=lambda model, action: self.metrics.alias_changes.labels(
                                          model, action).inc(), reports=self.reports)
        self.rollouts = RolloutController(self.control, self.stats, self.metrics, self._rollout_plan,
                                          drift_state=self.monitor.drift_state)
        self.control.on_adopted = self.rollouts.adopted
        self.tokens = TokenBook(settings.admin_tokens)
        self.audit: AuditWriter = AuditWriter(own(settings.audit_dir), settings.audit_queue, settings.audit_fsync,
                                 settings.audit_fsync_interval_s, settings.audit_max_file_bytes,
                                 settings.audit_max_file_age_s)
        self.audit.on_written = lambda n: self.metrics.audit_records.labels("written").inc(n)
        self.metrics.sample(self.metrics.audit_backlog, lambda: self.audit.backlog)
        self.control.on_record = self.audit.offer
        self._redactors: dict[tuple[str, str], Redactor] = {}
        self._sampler: asyncio.Task[None] | None = None

    def redactor(self, model: str) -> Redactor:
        """The redaction of a model's audit records (compiled once per policy)."""
        served = self.snapshot.models.get(model)
        policy = served.policy if served is not None else None
        key = (model, policy.sha256 if policy else "")
        found = self._redactors.get(key)
        if found is None:
            rules = policy.policy.audit.redact if policy else {}
            found = self._redactors[key] = Redactor(dict(rules), self.settings.audit_hmac_key)
        return found

    async def load(self) -> None:
        """Load every model version and policy off the event loop, then publish the snapshot."""
        await self.audit.start()
        snapshot = await asyncio.to_thread(
            build_snapshot, self.repository, self.settings.policies_dir, self.settings.max_listed_violations,
            self.breakers, self.settings.allow_fault_injection)
        self.publish(self.control.reconcile(snapshot))  # on the loop: it may hand decisions to the audit log
        self.rollouts.resume_all()
        if isinstance(self.state_store, RedisStateStore):  # other replicas' changes, applied here
            store = self.state_store
            self.state_watcher = StateWatcher(store, lambda: list(self.snapshot.models), self.control.apply_shared,
                                              trip=self.breakers.trip)
            self.state_watcher.start()
            loop = asyncio.get_running_loop()

            def announce(name: str) -> None:
                # a trip happens on the request path: announce it from a worker thread, never waiting for Redis
                loop.run_in_executor(None, store.announce_trip, name)

            self.breakers.on_trip = announce
        self.monitor.start()
        if self.monitor.shared is not None:
            self.monitor.shared.start()
        if self.metrics.multiprocess_dir is not None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_metrics())
        # Everything loaded so far (modules, sessions, policies) lives as long as the process: move
        # it out of the collector's sight, so a full collection under load scans only what requests
        # made (a full pass over the start-up heap stalled the loop for 50-90 ms).
        gc.collect()
        gc.freeze()

    async def _sample_metrics(self) -> None:
        while True:
            await asyncio.to_thread(self.metrics.refresh)  # it scans the metrics directory: off the loop
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def _serve_version(self, model: ServedModel, entry: ModelVersion) -> tuple[ServedVersion | None, str]:
        faults = None
        policy = model.policy.policy if model.policy else None
        if policy is not None and self.settings.allow_fault_injection:
            fault = next((f for f in policy.faults if f.version == entry.version), None)
            faults = FaultInjector(fault) if fault else None
        return serve_version(model.name, entry, model.policy, "", self.breakers, faults,
                             self.settings.max_listed_violations)

    def _rollout_plan(self, model: str) -> Rollout:
        served = self.snapshot.model(model)
        return served.policy.policy.rollout if served.policy else Rollout()

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` the one new requests see (a single assignment), and update gauges."""
        self.snapshot = snapshot
        m = self.metrics
        for model in snapshot.models.values():
            m.model_ready.labels(model.name).set(1 if model.ready else 0)
            for version in model.versions:
                m.version_ready.labels(model.name, version).set(1 if version in model.served else 0)
                if version not in model.served:
                    m.forget_version(model.name, version)
            for version, served in model.served.items():
                m.serving(model.name, version)
                m.breaker_state.labels(model.name, version).set(BREAKER_CODES[served.breaker.state])
            m.canary_ratio.labels(model.name).set(model.aliases.canary_percent / 100 if model.aliases.canary else 0)
        m.policy_problems.set(len(snapshot.policy_problems))

    def report(self) -> None:
        """Log what is wrong with the current snapshot (once, after loading)."""
        for problem in self.snapshot.policy_problems:
            log.error("policy problem: %s", problem)
        for model in self.snapshot.models.values():
            for problem in model.problems:
                log.warning("model %s: %s", model.name, problem)
        for reason in ([] if self.snapshot.ready else self.snapshot.not_ready_reasons()):
            log.warning("not ready: %s", reason)

    async def stop(self) -> None:
        """Stop rollouts and shadows, then the worker threads (after in-flight runs finish)."""
        if self.state_watcher is not None:  # first: nothing adopted may relaunch a rollout task below
            await self.state_watcher.close()
        await self.rollouts.close()
        if isinstance(self.state_store, RedisStateStore):
            self.state_store.close()
        await self.readiness_runs.close()
        await self.shadow.close()
        await self.monitor.close()
        if self.monitor.shared is not None:
            await self.monitor.shared.close()
        await self.audit.close()
        if self._sampler is not None:
            self._sampler.cancel()
        self.tracer_provider.shutdown()
        self.close()
        if self.slot is not None:
            self.slot.release()
        if self._writer_lock is not None:
            self._writer_lock.close()

    def close(self) -> None:
        """Stop the worker threads (after in-flight runs finish) and close the audit file."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        INLINE.close()  # the watchdog thread; a later inline run (another app in this process) restarts it
        self.audit.close_now()


def _release(slot: WorkerSlot | None, lock: IO[bytes] | None) -> None:
    if slot is not None:
        slot.release()
    if lock is not None:
        lock.close()


def _state_store(settings: Settings) -> ControlStateStore:
    """The control-state store the settings choose."""
    if settings.state_store == "redis":
        return RedisStateStore(settings.redis_url, settings.redis_prefix)
    return StateStore(settings.state_dir)


class GatewayApp(FastAPI):
    """FastAPI, with the inference paths answered before any framework layer runs."""

    inference: inference.InferenceEndpoints | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if self.inference is not None and await self.inference.handle(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving the model repository and policies named by `settings`."""
    settings = settings or Settings()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.load()
        gateway.report()
        yield
        await gateway.stop()

    app = GatewayApp(title="Safety-net inference gateway", version=__version__, lifespan=lifespan,
                     docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
    app.inference = inference.InferenceEndpoints(gateway)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(repository_api.router)
    app.include_router(monitoring_api.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
        return json_response({"error": message}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": "invalid request", "violations": exc.errors()}, 400)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=400)  # nobody is left to read it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return json_response({"error": f"internal error ({type(exc).__name__}); see the gateway log"}, 500)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (settings from GATEWAY_* only)."""
    return create_app(Settings())

"""Readiness runs started through the admin API: `gateway readiness` in a child process.

The checklist starts its own staging gateway and drives load at it, so it never runs inside the
serving process: the admin call spawns the CLI, answers 202 at once, and the job is watched on the
loop. One run at a time (a second is refused with 409); the last `KEPT_JOBS` are listed; each
keeps at most `LOG_TAIL_BYTES` of its output. When a run ends with a report, the report (already
in the store the gate reads) is handed to `on_report`, which records it in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import ClientError
from gateway.locks import DirectoryBusy, hold

KEPT_JOBS = 20
LOG_TAIL_BYTES = 64 * 1024
#: a run longer than this is stopped (the checklist's own phases are bounded far below it)
RUN_TIMEOUT_S = 3600.0


class RunRefused(ClientError):
    """A readiness run is already going (only one at a time)."""


@dataclass
class ReadinessJob:
    """One run: what, who, when, and how it ended."""

    id: int
    model: str
    version: str
    actor: str
    scale: float
    started: float
    status: str = "running"  # running | ready | not_ready | could_not_run | stopped
    finished: float | None = None
    exit_code: int | None = None
    report: dict[str, Any] | None = None
    output: str = ""
    _process: Any = field(default=None, repr=False)
    _lock: Any = field(default=None, repr=False)

    def view(self) -> dict[str, Any]:
        """JSON-ready form for the admin API."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def release(self) -> None:
        """Let the next run start (on any worker)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class ReadinessRunner:
    """Starts and watches readiness runs for the admin API."""

    def __init__(self, models_dir: Path, policies_dir: Path, store_dir: Path,
                 on_report: Callable[[str, dict[str, Any]], None], lock_dir: Path | None = None) -> None:
        self.lock_dir = lock_dir
        """Where a run holds a lock, so workers of one gateway sharing this machine run one at a time."""
        self.models_dir = models_dir
        self.policies_dir = policies_dir
        self.store_dir = store_dir
        self.on_report = on_report
        self.jobs: deque[ReadinessJob] = deque(maxlen=KEPT_JOBS)
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> ReadinessJob | None:
        """The run in progress, if any."""
        return next((j for j in self.jobs if j.status == "running"), None)

    async def start(self, model: str, version: str, actor: str, scale: float = 1.0) -> ReadinessJob:
        """Spawn `gateway readiness MODEL VERSION`; RunRefused while another run is going."""
        busy = self.running
        if busy is not None:
            raise RunRefused(f"readiness run {busy.id} ({busy.model} v{busy.version}) is still running")
        lock = None
        if self.lock_dir is not None:  # another worker of this gateway may be running one on this machine
            try:
                lock = hold(self.lock_dir, ".readiness-run.lock", "holds a readiness run")
            except DirectoryBusy:
                raise RunRefused("a readiness run started through another worker of this gateway is still "
                                 "running (one at a time: its load test would skew this one's)") from None
        job = ReadinessJob(next(self._ids), model, version, actor, scale, time.time(), _lock=lock)
        self.jobs.append(job)  # before any await: a second request arriving meanwhile sees it running
        out_dir = Path(tempfile.mkdtemp(prefix="gateway-readiness-run-"))
        command = [sys.executable, "-m", "gateway", "readiness", model, version, "--models", str(self.models_dir),
                   "--policies", str(self.policies_dir), "--store", str(self.store_dir), "--out", str(out_dir),
                   "--scale", str(scale)]
        try:
            job._process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except BaseException as exc:
            job.status, job.finished, job.output = "could_not_run", time.time(), f"cannot start: {exc}"
            shutil.rmtree(out_dir, ignore_errors=True)
            job.release()
            raise
        task = asyncio.get_running_loop().create_task(self._watch(job, out_dir))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _watch(self, job: ReadinessJob, out_dir: Path) -> None:
        process = job._process
        tail = bytearray()
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                while chunk := await process.stdout.read(4096):
                    tail += chunk
                    del tail[:-LOG_TAIL_BYTES]
                    job.output = tail.decode("utf-8", "replace")
                job.exit_code = await process.wait()
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()  # the CLI stops its staging gateways on SIGTERM
            try:
                async with asyncio.timeout(60):
                    job.exit_code = await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                job.exit_code = await process.wait()
            job.status = "stopped"
        job.finished = time.time()
        job.output = tail.decode("utf-8", "replace")
        reports = sorted(out_dir.glob("*-readiness.json"))
        if job.status == "running":
            job.status = {0: "ready", 1: "not_ready"}.get(job.exit_code, "could_not_run") if reports \
                else "could_not_run"
        try:
            if reports and job.exit_code in (0, 1):
                document = orjson.loads(reports[0].read_bytes())
                job.report = {k: document.get(k) for k in ("sha256", "model", "version", "ready", "score", "band",
                                                           "model_sha256", "policy_sha256", "maturity")}
                job.report["failed"] = [f"{i['phase']}.{i['key']}: {i['detail']}"
                                        for i in document.get("items", []) if i.get("status") == "fail"]
                self.on_report(job.actor, job.report)
        except Exception as exc:  # an unreadable report is the run's outcome, not the watcher's crash
            job.status, job.output = "could_not_run", f"{job.output}\nthe report could not be read: {exc}"
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
            job.release()

    async def close(self) -> None:
        """Stop any run in progress (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

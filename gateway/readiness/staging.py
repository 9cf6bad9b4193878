"""A staging gateway for the readiness checklist: the real server, on a free loopback port.

It serves the same model repository and policy directory as production would, with its own
throw-away state and audit directories, an admin token only the checklist knows, and its logs
captured to a file that the report can point at. The process is stopped (SIGTERM, then SIGKILL)
when the checklist is done, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from loadtests.common import free_port

#: how long the staging gateway may take to load and warm up every model
START_TIMEOUT_S = 120.0
#: environment variables a staging gateway does not inherit
PRIVATE_SETTINGS = ("OTEL_", "GATEWAY_TRACE_", "GATEWAY_READINESS_", "GATEWAY_AUDIT_HMAC_KEY", "GATEWAY_TOKEN",
                    "GATEWAY_REDIS_", "GATEWAY_STATE_STORE", "GATEWAY_WORKERS", "GATEWAY_METRICS_DIR",
                    "PROMETHEUS_MULTIPROC_DIR")
"""Settings staging must not inherit: production's secrets, span sink and report store, and its shared
state (a rehearsal on staging switches and rolls back: never on production's Redis) and workers."""


class StagingError(Exception):
    """The staging gateway could not be started (the checklist cannot run: exit code 2)."""


class StagingGateway:
    """`gateway serve` in a child process; use as a context manager."""

    def __init__(self, models_dir: Path, policies_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.models_dir = models_dir.resolve()
        self.policies_dir = policies_dir.resolve()
        self.extra_env = extra_env or {}
        self.token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-readiness-"))
        self.state_dir = self.workdir / "state"
        self.audit_dir = self.workdir / "audit"
        self.log_path = self.workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StagingGateway:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the server and wait until it answers ready; StagingError with its log otherwise."""
        # Performance settings (threads, queue limits, body size) are kept so the load test measures
        # what production would run; where spans go, secrets and the report store are production's own
        # and must not see staging traffic.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_SETTINGS)}
        env = {**inherited, "GATEWAY_STATE_DIR": str(self.state_dir), "GATEWAY_AUDIT_DIR": str(self.audit_dir),
               "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_ALLOW_FAULT_INJECTION": "false",
               "GATEWAY_STATE_STORE": "file", "GATEWAY_WORKERS": "1",
               "GATEWAY_ADMIN_TOKENS": json.dumps([{"name": "readiness", "role": "admin", "token": self.token}]),
               **self.extra_env}
        command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--models", str(self.models_dir), "--policies", str(self.policies_dir)]
        try:
            self._spawn(command, env)
        except BaseException:
            self.stop()  # nothing of a failed start stays behind: no process, no directory
            raise

    def _spawn(self, command: list[str], env: dict[str, str]) -> None:
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StagingError(f"the staging gateway exited with code {self.process.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise StagingError(f"the staging gateway did not start within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s) and remove its throw-away directories."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def client(self, timeout: float = 10.0) -> httpx.Client:
        """A client for the server (the admin token is sent with every call)."""
        return httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {self.token}"})

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One admin call; the caller judges the answer."""
        with self.client() as client:
            return client.request(method, path, **kwargs)

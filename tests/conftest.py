"""Shared fixtures: the bundled repository, an in-process app, and real uvicorn servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
POLICIES = ROOT / "policies"
MODEL = "credit-risk"


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    """A `gateway serve` subprocess on a free loopback port."""

    def __init__(self, models: Path, policies: Path, env: dict[str, str] | None = None,
                 state: Path | None = None) -> None:
        self.port = free_port()
        self.state = state or Path(tempfile.mkdtemp(prefix="gateway-state-"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-test-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(self.port),
             "--models", str(models), "--policies", str(policies), "--log-level", "info"],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "GATEWAY_STATE_DIR": str(self.state),
                 "GATEWAY_AUDIT_DIR": str(self.state.parent / f"{self.state.name}-audit"), **(env or {})},
        )

    def wait_live(self, timeout: float = 60.0) -> None:
        """Block until /v2/health/live answers (models are loaded before the port opens)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything the server logged so far."""
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The gateway serving the bundled models and policies, shared by the whole session."""
    running = RunningServer(MODELS, POLICIES)
    try:
        running.wait_live()
        yield running
    finally:
        running.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Start extra servers on custom repositories; all are stopped after the test."""
    started: list[RunningServer] = []

    def start(models: Path, policies: Path, env: dict[str, str] | None = None,
              state: Path | None = None) -> RunningServer:
        running = RunningServer(models, policies, env, state)
        started.append(running)
        running.wait_live()
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def repo_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the bundled model repository and policies (without the data files)."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("data", "*.py", "__pycache__"))
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    return models, policies


@pytest.fixture
def readiness_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the bundled models (data and sign-offs included) and policies, for the
    readiness checklist; the policy's alert rules point at the repository's own."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    patch_policy(policies, MODEL, readiness={"alert_rules": str(ROOT / "docker" / "prometheus" / "alerts.yml")})
    return models, policies


def patch_policy(policies: Path, model: str, **sections: Any) -> None:
    """Merge top-level `sections` into a copied policy file (e.g. guard={...}); comments are lost."""
    import yaml

    path = policies / f"{model}.yaml"
    document = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        else:
            document[key] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def ungate(policies: Path, model: str = MODEL) -> Path:
    """Turn the readiness gate off in a copied policy, for tests that switch or roll out to test something
    other than release approval (the gate itself is tested in test_readiness_gate.py); returns `policies`."""
    patch_policy(policies, model, readiness={"gate": "off"})
    return policies


@pytest.fixture
def ungated_repo(repo_copy: tuple[Path, Path]) -> tuple[Path, Path]:
    """`repo_copy` with the readiness gate off (see `ungate`)."""
    models, policies = repo_copy
    return models, ungate(policies)


@pytest.fixture(scope="session")
def ungated_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled policies with the readiness gate off (see `ungate`), shared by the session."""
    policies = tmp_path_factory.mktemp("ungated") / "policies"
    shutil.copytree(POLICIES, policies)
    return ungate(policies)


def make_client(models: Path = MODELS, policies: Path = POLICIES, **settings: Any) -> TestClient:
    """An in-process client (lifespan runs on enter) for an app over the given repository."""
    settings.setdefault("state_dir", Path(tempfile.mkdtemp(prefix="gateway-state-")))
    settings.setdefault("audit_dir", Path(tempfile.mkdtemp(prefix="gateway-audit-")))
    return TestClient(create_app(Settings(models_dir=models, policies_dir=policies, **settings)))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """In-process client over the bundled repository, shared by a test module."""
    with make_client() as c:
        yield c


def golden_examples(version: str | None = None) -> list[dict[str, Any]]:
    """Golden examples from models/credit-risk/data/golden.jsonl (optionally of one version)."""
    lines = (MODELS / MODEL / "data" / "golden.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if version is None or r["version"] == version]


def good_row() -> dict[str, Any]:
    """One valid credit-risk application (KServe v1 instance form)."""
    return {
        "age": 41, "income": 58000.0, "loan_amount": 15000.0, "loan_term_months": 36,
        "credit_history_years": 12.5, "num_open_accounts": 4, "debt_to_income": 0.28,
        "delinquencies_2y": 0, "has_cosigner": False, "employment": "salaried",
        "home_ownership": "mortgage", "purpose": "car",
    }


DATATYPES = {"employment": "BYTES", "home_ownership": "BYTES", "purpose": "BYTES", "has_cosigner": "BOOL"}


def v2_body(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """An OIP v2 body with one [N, 1] tensor per feature of `rows`."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    inputs = []
    for name in names:
        values = [r.get(name) for r in rows]
        datatype = DATATYPES.get(name, "INT64" if all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in values) else "FP64")
        inputs.append({"name": name, "shape": [len(rows), 1], "datatype": datatype, "data": values})
    return {"inputs": inputs, **extra}

"""The bundled load scripts run and judge correctly (short, low-rate runs: behaviour, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_switch_under_load_reports_zero_errors_and_switch_times() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtests.switch_under_load", "--seconds", "3", "--rate", "40",
                           "--every", "0.4", "--max-switch-ms", "1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["load"]["requests"] == 120 and report["load"]["non_2xx"] == 0
    assert report["switches"] >= 5 and set(report["load"]["versions"]) == {"1", "2"}
    assert report["switch_ms"]["max"] >= report["switch_ms"]["median"] > 0


def test_load_scripts_refuse_targets_off_this_machine() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtests.switch_under_load", "--url", "http://example.com:8080"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "loopback" in done.stderr


def test_audit_bench_writer_reports_a_verified_rate() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtests.audit_bench", "--writer-only", "--records", "2000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(done.stdout)
    assert report["writer"]["records"] == 2000 and report["writer"]["verified"] is True
    assert report["writer"]["records_per_s"] > 0 and report["writer"]["batches"] >= 2
    assert done.returncode in (0, 1)  # the verdict depends on this machine's disk, not on correctness

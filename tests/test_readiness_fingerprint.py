"""The environment fingerprint: what it records, which differences matter, and /status."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.readiness import fingerprint
from gateway.readiness.fingerprint import RUNTIME_PACKAGES, compare, environment
from tests.conftest import make_client


def test_the_fingerprint_is_json_ready_and_names_the_runtime() -> None:
    env = environment()
    assert orjson.loads(orjson.dumps(env)) == env
    assert env["python"]["major_minor"].count(".") == 1
    assert env["python"]["version"].startswith(env["python"]["major_minor"])
    assert env["machine"]
    import numpy
    import onnxruntime

    assert env["onnxruntime"]["version"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in env["onnxruntime"]["providers"]
    assert set(env["packages"]) == set(RUNTIME_PACKAGES)
    assert env["packages"]["numpy"] == numpy.__version__
    assert env["packages"]["gateway"] is not None
    flags = env["cpu"]["flags"]
    assert flags is None or all(isinstance(f, str) for f in flags)


def test_each_call_returns_a_copy_the_caller_may_change() -> None:
    env = environment()
    env["packages"]["numpy"] = "0.0"
    assert environment()["packages"]["numpy"] != "0.0"


def test_identical_fingerprints_have_no_differences() -> None:
    env = environment()
    assert compare(env, copy.deepcopy(env)) == []


def _with(env: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(env)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


def test_an_onnxruntime_version_difference_must_match() -> None:
    env = environment()
    remote = _with(env, "onnxruntime.version", "0.0.1")
    (diff,) = compare(env, remote)
    assert diff == {"key": "onnxruntime.version", "local": env["onnxruntime"]["version"], "remote": "0.0.1",
                    "severity": "must_match"}


def test_a_cpu_model_name_difference_is_info() -> None:
    env = environment()
    (diff,) = compare(env, _with(env, "cpu.model", "Some Other CPU"))
    assert diff["key"] == "cpu.model" and diff["severity"] == "info" and diff["remote"] == "Some Other CPU"


def test_cpu_flags_compare_as_a_set_and_a_missing_flag_must_match() -> None:
    local = _with(environment(), "cpu.flags", ["avx", "avx2", "fma"])
    assert compare(local, _with(local, "cpu.flags", ["fma", "avx2", "avx"])) == []
    (diff,) = compare(local, _with(local, "cpu.flags", ["avx", "fma"]))
    assert diff["key"] == "cpu.flags" and diff["severity"] == "must_match"


def test_severities_of_the_other_keys() -> None:
    env = environment()
    remote = _with(env, "python.version", env["python"]["version"] + "9")
    remote = _with(remote, "packages.orjson", "0.0")
    remote = _with(remote, "machine", "riscv64")
    remote = _with(remote, "os.release", "0.0")
    remote = _with(remote, "python.major_minor", "2.7")
    severities = {d["key"]: d["severity"] for d in compare(env, remote)}
    assert severities == {"packages.orjson": "must_match", "machine": "must_match",
                          "python.major_minor": "must_match", "python.version": "info", "os.release": "info"}
    # must_match differences come first
    assert [d["severity"] for d in compare(env, remote)][:3] == ["must_match"] * 3


def test_a_remote_without_a_fingerprint_differs_everywhere_that_is_known() -> None:
    env = environment()
    diffs = compare(env, {})
    assert {d["key"] for d in diffs} >= {"onnxruntime.version", "packages.numpy", "python.major_minor"}
    assert all(d["remote"] is None for d in diffs)


def test_status_reports_the_environment() -> None:
    with make_client() as client:
        server = client.get("/status").json()["server"]
    assert server["environment"] == orjson.loads(orjson.dumps(environment()))
    assert server["environment"]["onnxruntime"]["version"]


@pytest.fixture
def fresh_fingerprint() -> Iterator[None]:
    """Recompute the (per-process cached) fingerprint in this test, and again after it."""
    fingerprint._fingerprint.cache_clear()
    yield
    fingerprint._fingerprint.cache_clear()


def test_what_cannot_be_found_is_null(fresh_fingerprint: None, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    def no_metadata(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(fingerprint, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(fingerprint.metadata, "version", no_metadata)
    monkeypatch.setattr(fingerprint.platform, "processor", lambda: "")
    env = environment()
    assert env["cpu"] == {"model": None, "flags": None}
    assert set(env["packages"].values()) == {None}


def test_arm_features_are_read_too(fresh_fingerprint: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n"
                       "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm\n"
                       "CPU implementer\t: 0x41\n\nprocessor\t: 1\nFeatures\t: fp\n")
    monkeypatch.setattr(fingerprint, "CPUINFO", cpuinfo)
    monkeypatch.setattr(fingerprint.platform, "processor", lambda: "")
    assert environment()["cpu"] == {"model": None, "flags": ["asimd", "asimdhp", "asimddp", "fphp", "sve", "i8mm"]}

"""The runtime's environment fingerprint, and which differences between two of them matter.

A model validated on one machine can answer differently on another: onnxruntime picks kernels by
the CPU's instruction sets (AVX2 vs AVX-512 vs VNNI change float summation order), and numpy,
onnxruntime or Python upgrades change numerics and behaviour. The readiness checklist compares the
staging fingerprint with the production gateway's (`/status` -> `server.environment`).

`environment()` is computed once per process and never raises: what cannot be found is `null`.
`compare()` lists differences as `must_match` (they can change answers: Python major.minor,
machine architecture, CPU instruction-set flags, onnxruntime and any runtime package version) or
`info` (worth knowing, rarely answer-changing: Python patch version and implementation, CPU model
name, OS, onnxruntime providers).
"""

from __future__ import annotations

import copy
import functools
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

Severity = Literal["must_match", "info"]

#: distributions whose versions are fingerprinted (the gateway's runtime dependencies, and itself)
RUNTIME_PACKAGES = (
    "fastapi", "uvicorn", "pydantic", "pydantic-settings", "numpy", "onnxruntime", "pybreaker",
    "opentelemetry-sdk", "prometheus-client", "PyYAML", "orjson", "httptools", "gateway",
)

#: CPU instruction-set flags that select onnxruntime kernels (x86 from `flags`, Arm from `Features`)
ISA_FLAGS = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16",
)

CPUINFO = Path("/proc/cpuinfo")
#: /proc/cpuinfo names that differ from the usual ones (x86 Linux calls SSE3 `pni`)
_FLAG_ALIASES = {"pni": "sse3"}

#: dotted keys whose difference can change answers (every `packages.*` key is must_match as well)
MUST_MATCH = frozenset({"python.major_minor", "machine", "cpu.flags", "onnxruntime.version"})
#: dotted keys compared as sets (their order means nothing)
_SET_VALUED = frozenset({"cpu.flags"})

T = TypeVar("T")


def _safe(probe: Callable[[], T]) -> T | None:
    """The probe's value, or None when it fails in any way (a fingerprint never raises)."""
    try:
        return probe()
    except Exception:
        return None


def _cpuinfo() -> tuple[str | None, list[str] | None]:
    """CPU model name and the ISA flags present, from the first processor of /proc/cpuinfo."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None, None
    model: str | None = None
    flags: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model", "processor") and value.strip() \
                and not value.strip().isdigit():  # x86 "processor: 0" is an index, not a name
            model = value.strip()
        elif flags is None and key in ("flags", "features"):
            flags = {_FLAG_ALIASES.get(f, f) for f in value.split()}
        if model is not None and flags is not None:
            break
    present = None if flags is None else [f for f in ISA_FLAGS if f in flags]
    return model, present


def _onnxruntime() -> dict[str, Any]:
    version = providers = None
    try:
        import onnxruntime

        version = str(onnxruntime.__version__)
        providers = [str(p) for p in onnxruntime.get_available_providers()]
    except Exception:
        pass
    return {"version": version, "providers": providers}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except Exception:
        return None


@functools.cache
def _fingerprint() -> dict[str, Any]:
    model, flags = _safe(_cpuinfo) or (None, None)
    return {
        "python": {
            "version": _safe(platform.python_version),
            "major_minor": f"{sys.version_info.major}.{sys.version_info.minor}",
            "implementation": _safe(platform.python_implementation),
        },
        "os": {"system": _safe(platform.system) or None, "release": _safe(platform.release) or None,
               "platform": _safe(platform.platform) or None},
        "machine": _safe(platform.machine) or None,
        "cpu": {"model": model or _safe(platform.processor) or None, "flags": flags},
        "onnxruntime": _onnxruntime(),
        "packages": {name: _package_version(name) for name in RUNTIME_PACKAGES},
    }


def environment() -> dict[str, Any]:
    """This process's environment fingerprint (JSON-ready; unknown values are None).

    Keys: `python` {version, major_minor, implementation}, `os` {system, release, platform},
    `machine`, `cpu` {model, flags}, `onnxruntime` {version, providers}, `packages` {name: version}.
    Computed once per process; each call returns a fresh copy the caller may change.
    """
    try:
        return copy.deepcopy(_fingerprint())
    except Exception:  # pragma: no cover - every probe is guarded already
        return {}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def severity(key: str) -> Severity:
    """Whether a difference at this dotted key can change answers (`must_match`) or not (`info`)."""
    return "must_match" if key in MUST_MATCH or key.startswith("packages.") else "info"


def _same(key: str, a: Any, b: Any) -> bool:
    if key in _SET_VALUED and isinstance(a, list) and isinstance(b, list):
        return set(map(str, a)) == set(map(str, b))
    return bool(a == b)


def compare(local: dict[str, Any], remote: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences between two fingerprints: `{key, local, remote, severity}`, must_match ones first.

    Keys are dotted paths (`packages.numpy`, `cpu.flags`); a key missing on one side counts as None.
    """
    mine, theirs = _flatten(local), _flatten(remote if isinstance(remote, dict) else {})
    keys = list(mine) + [k for k in theirs if k not in mine]
    diffs = [{"key": k, "local": mine.get(k), "remote": theirs.get(k), "severity": severity(k)}
             for k in keys if not _same(k, mine.get(k), theirs.get(k))]
    return sorted(diffs, key=lambda d: (d["severity"] != "must_match", d["key"]))

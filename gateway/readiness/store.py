"""Readiness reports kept for the promotion gate: `<dir>/<model>/<sha256>.json`.

A report is stored under its content address, so uploading the same report twice keeps one file
and two different reports never collide. An upload is checked before it is stored (shape, content
address, a verdict that follows from its items), and a report read back is checked against its
address again before a gate decision rests on it: a file changed on disk is ignored and logged,
never trusted, and junk in the directory is skipped. Files are written atomically; each model
keeps its `keep_per_model` most recently stored reports.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import ClientError
from gateway.readiness.items import CHECKLIST
from gateway.readiness.report import ItemResult, ReadinessReport, address_of
from gateway.state import write_atomically

log = logging.getLogger("gateway.readiness.store")

#: the largest report accepted or read back (reports carry plot data, hence the room)
MAX_REPORT_BYTES = 16 * 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[0-9a-f]{64}\.json$")
_STATUSES = ("pass", "fail", "not_applicable", "skipped")
_BANDS = ("delay", "launch_with_extra_monitoring", "ready")


class ReportRejected(ClientError):
    """A readiness report that is malformed, inconsistent, or was changed after it was made (400)."""


def problems_of(report: Any) -> list[str]:
    """Every reason to refuse a report's JSON form (empty: well-formed, unchanged and consistent)."""
    if not isinstance(report, dict):
        return [f"a report is a JSON object, not {type(report).__name__}"]
    found = _shape_problems(report)
    if found:
        return found
    try:
        address = address_of(report)
    except (TypeError, ValueError) as exc:
        return [f"the report's content cannot be addressed: {exc}"]
    if address != report["sha256"]:
        return [f"content address mismatch: the report was changed after it was made (it says "
                f"{report['sha256'][:12]}, its content gives {address[:12]})"]
    return _verdict_problems(report)


def _shape_problems(report: dict[str, Any]) -> list[str]:
    found = []
    for key in ("model", "version"):
        if not isinstance(report.get(key), str) or not _NAME.match(report[key]):
            found.append(f"{key}: a name of letters, digits, '_', '.', '-' is required, got {report.get(key)!r}")
    for key in ("sha256", "model_sha256", "policy_sha256"):
        if not isinstance(report.get(key), str) or not _SHA256.match(report[key]):
            found.append(f"{key}: 64 lower-case hex digits are required, got {report.get(key)!r}")
    value = report.get("score")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        found.append(f"score: a number in [0, 1] is required, got {value!r}")
    if report.get("band") not in _BANDS:
        found.append(f"band: one of {', '.join(_BANDS)} is required, got {report.get('band')!r}")
    if not isinstance(report.get("ready"), bool):
        found.append(f"ready: true or false is required, got {report.get('ready')!r}")
    for key in ("context", "maturity"):
        if not isinstance(report.get(key), dict):
            found.append(f"{key}: an object is required, got {type(report.get(key)).__name__}")
    if "timings" in report and not isinstance(report["timings"], dict):
        found.append(f"timings: an object is required, got {type(report['timings']).__name__}")
    items = report.get("items")
    if not isinstance(items, list) or not items:
        return [*found, "items: a non-empty list of checklist items is required"]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            found.append(f"items[{i}]: an object is required, got {type(item).__name__}")
            continue
        missing = [k for k in ("phase", "key", "title") if not isinstance(item.get(k), str)]
        if missing:
            found.append(f"items[{i}]: {', '.join(missing)} must be strings")
        if item.get("status") not in _STATUSES:
            found.append(f"items[{i}].status: one of {', '.join(_STATUSES)} is required, got {item.get('status')!r}")
    return found


def _verdict_problems(report: dict[str, Any]) -> list[str]:
    """A report whose address matches can still have been assembled by hand: its items must be the
    checklist's, and its score, band and `ready` what those items give, by the checklist's own rules."""
    listed = [(i["phase"], i["key"]) for i in report["items"]]
    expected = [(phase, key) for phase, key, _ in CHECKLIST]
    if listed != expected:
        unknown = sorted(f"{p}.{k}" for p, k in set(listed) - set(expected))
        missing = sorted(f"{p}.{k}" for p, k in set(expected) - set(listed))
        return [f"not a run of this gateway's checklist: its items are not the {len(expected)} checklist items in "
                f"order (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'})"]
    items = [ItemResult(i["phase"], i["key"], i["title"], i["status"]) for i in report["items"]]
    derived = ReadinessReport(report["model"], report["version"], report["model_sha256"], report["policy_sha256"],
                              items)
    found = []
    if not math.isclose(report["score"], derived.score, abs_tol=1e-6):
        found.append(f"inconsistent verdict: score {report['score']} but the items give {derived.score:.6f}")
    if report["band"] != derived.band:
        found.append(f"inconsistent verdict: band {report['band']} but the items give {derived.band}")
    if report["ready"] != derived.ready:
        found.append(f"inconsistent verdict: ready is {str(report['ready']).lower()} but the items give "
                     f"{str(derived.ready).lower()}")
    return found


def summary_of(report: dict[str, Any], mtime: float) -> dict[str, Any]:
    """What the gate and the admin API show of a stored report."""
    return {"sha256": report["sha256"], "model": report["model"], "version": report["version"],
            "ready": report["ready"], "score": report["score"], "band": report["band"],
            "model_sha256": report["model_sha256"], "policy_sha256": report["policy_sha256"],
            "created": _created(report.get("timings"), mtime)}


def _created(timings: Any, mtime: float) -> float:
    """When the report was made: `timings.finished` (epoch seconds or ISO 8601), else when it was stored."""
    finished = timings.get("finished") if isinstance(timings, dict) else None
    if isinstance(finished, (int, float)) and not isinstance(finished, bool) and math.isfinite(finished):
        return float(finished)
    if isinstance(finished, str):
        try:
            moment = datetime.fromisoformat(finished)
        except ValueError:
            return mtime
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return mtime


@dataclass(frozen=True)
class _Stored:
    """One file's summary, with what identifies the version of the file it was read from."""

    path: Path
    stamp: tuple[int, int]
    """(mtime in ns, size): a changed file is read again."""
    summary: dict[str, Any] | None
    """None: junk (unreadable, not a report, or not matching its address)."""


def signature_of(sha256: str, key: str) -> str:
    """HMAC-SHA256 of a report's address with the shared readiness key (hex)."""
    return hmac.new(key.encode(), sha256.encode(), hashlib.sha256).hexdigest()


def signature_problems(report: dict[str, Any], key: str | None) -> list[str]:
    """With a key: the report must carry the signature of its address made with that key."""
    if key is None:
        return []
    given = report.get("signature")
    if not isinstance(given, str) or not hmac.compare_digest(given, signature_of(str(report.get("sha256")), key)):
        return ["not signed with this gateway's GATEWAY_READINESS_HMAC_KEY (run `gateway readiness` with the same "
                "key in its environment)"]
    return []


class ReportStore:
    """Readiness reports by model, verified on the way in and on the way out (thread-safe).

    With `key`, only reports signed with it are accepted and trusted (the CLI signs when it has the
    key): a report assembled by hand, or planted in the directory, opens nothing.
    """

    def __init__(self, directory: Path, keep_per_model: int = 50, key: str | None = None) -> None:
        self.directory = directory
        self.keep_per_model = keep_per_model
        self._key = key
        self._lock = threading.Lock()
        self._seen: dict[Path, _Stored] = {}

    def put(self, report: Any) -> dict[str, Any]:
        """Verify and store a report (its JSON form); its summary, or ReportRejected with every reason."""
        problems = problems_of(report)
        if not problems:
            problems = signature_problems(report, self._key)
        if problems:
            raise ReportRejected("readiness report rejected: " + "; ".join(problems))
        try:
            data = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        except TypeError as exc:  # outside the address (figures, measurements): e.g. an integer over 64 bits
            raise ReportRejected(f"readiness report rejected: it cannot be written as JSON: {exc}") from None
        path = self.directory / report["model"] / f"{report['sha256']}.json"
        with self._lock:
            write_atomically(path, data)
            self._prune(path)
            return summary_of(report, path.stat().st_mtime)

    def summaries(self, model: str) -> list[dict[str, Any]]:
        """Summaries of the model's stored reports that verify, newest first."""
        with self._lock:
            return [s.summary for s in self._scan(model) if s.summary is not None]

    def passing(self, model: str, version: str, model_sha256: str, policy_sha256: str) -> dict[str, Any] | None:
        """The newest stored ready report for exactly that model file and policy, read and verified afresh."""
        with self._lock:
            for stored in self._scan(model):
                s = stored.summary
                if s is None or not s["ready"] or (s["version"], s["model_sha256"], s["policy_sha256"]) != (
                        version, model_sha256, policy_sha256):
                    continue
                # the gate rests on this file: check what is on disk now, not what was read before
                fresh = self._read(stored.path, self._key)
                if fresh is not None and fresh["sha256"] == s["sha256"] and fresh["ready"]:
                    return fresh
                log.error("readiness report %s changed on disk since it was stored; ignored", stored.path)
        return None

    def report(self, model: str, sha256: str) -> dict[str, Any] | None:
        """A stored report in full, if it exists and still matches its address."""
        if not _NAME.match(model) or not _SHA256.match(sha256):
            return None
        path = self.directory / model / f"{sha256}.json"
        try:
            report = orjson.loads(path.read_bytes()) if path.stat().st_size <= MAX_REPORT_BYTES else None
        except (OSError, ValueError):
            return None
        if report is None or problems_of(report) or signature_problems(report, self._key) or \
                report.get("sha256") != sha256:
            return None
        return report  # type: ignore[no-any-return]

    # --- files ---------------------------------------------------------------------------------

    def _scan(self, model: str) -> list[_Stored]:
        """Every report file of a model (junk included, as None), newest first; unchanged files are not re-read."""
        folder = self.directory / model
        if not _NAME.match(model) or not folder.is_dir():
            return []
        found = []
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.error("cannot list readiness reports in %s: %s", folder, exc)
            return []
        for entry in entries:
            if not _FILE.match(entry.name):
                continue
            try:
                info = entry.stat()
            except OSError:
                continue
            path = Path(entry.path)
            stamp = (info.st_mtime_ns, info.st_size)
            known = self._seen.get(path)
            if known is None or known.stamp != stamp:
                known = self._seen[path] = _Stored(path, stamp, self._read(path, self._key))
            found.append(known)
        for path in [p for p in self._seen if p.parent == folder and not p.exists()]:
            del self._seen[path]
        return sorted(found, key=lambda s: (s.summary["created"] if s.summary else 0.0, s.stamp[0]), reverse=True)

    @staticmethod
    def _read(path: Path, key: str | None = None) -> dict[str, Any] | None:
        """The summary of a report file that verifies; None (logged) for anything else."""
        try:
            info = path.stat()
            if info.st_size > MAX_REPORT_BYTES:
                raise ValueError(f"{info.st_size} bytes is over the limit of {MAX_REPORT_BYTES}")
            report = orjson.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("skipping readiness report file %s: %s", path, exc)
            return None
        problems = problems_of(report)
        if not problems:
            problems = signature_problems(report, key)
        if not problems and report["sha256"] != path.stem:
            problems = [f"stored under another address ({path.stem[:12]})"]
        if problems:
            log.error("ignoring readiness report file %s: %s", path, "; ".join(problems))
            return None
        return summary_of(report, info.st_mtime)

    def _prune(self, written: Path) -> None:
        """Delete the model's report files stored longest ago beyond `keep_per_model`, never the one just
        `written` (file times are coarse: it may tie with older ones); other names are left alone."""
        folder = written.parent
        stored = []
        for entry in os.scandir(folder):
            if _FILE.match(entry.name) and entry.name != written.name:
                try:
                    stored.append((entry.stat().st_mtime_ns, entry.name))
                except OSError:
                    continue
        for _, name in sorted(stored, reverse=True)[max(self.keep_per_model - 1, 0):]:
            try:
                (folder / name).unlink()
            except OSError as exc:
                log.error("cannot prune readiness report %s: %s", folder / name, exc)
            self._seen.pop(folder / name, None)

"""`gateway readiness MODEL VERSION`: run the checklist, write the reports, keep the evidence.

Exit codes: 0 ready, 1 not ready (the report says why), 2 the checklist could not run (bad
arguments, no such model or version, an invalid policy, a staging gateway that would not start,
a report that could not be written or submitted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from gateway.readiness.report import ItemResult

EXIT_READY, EXIT_NOT_READY, EXIT_CANNOT_RUN = 0, 1, 2

_MARKS = {"pass": "pass", "fail": "FAIL", "not_applicable": "n/a", "skipped": "skipped"}


def add_parser(commands: Any) -> None:
    """Register the `readiness` subcommand."""
    parser = commands.add_parser(
        "readiness", help="run the release readiness checklist for a version (exit 0 ready, 1 not, 2 could not run)",
        description="Run the release readiness checklist against the model repository, the policy, the "
                    "model's data and a staging gateway started on a free loopback port; write the report "
                    "(JSON, Markdown, HTML) and keep it for the promotion gate.")
    parser.add_argument("model", help="model name")
    parser.add_argument("version", help="candidate version")
    parser.add_argument("--models", type=Path, default=None, help="model repository (default: GATEWAY_MODELS_DIR "
                                                                   "or ./models)")
    parser.add_argument("--policies", type=Path, default=None, help="policy directory (default: "
                                                                    "GATEWAY_POLICIES_DIR or ./policies)")
    parser.add_argument("--out", type=Path, default=Path("readiness-reports"),
                        help="where the report files go (default ./readiness-reports)")
    parser.add_argument("--store", type=Path, default=None,
                        help="report store the gateway's promotion gate reads (default: GATEWAY_READINESS_DIR, "
                             "else <GATEWAY_STATE_DIR>/readiness); --no-store to skip")
    parser.add_argument("--no-store", action="store_true", help="do not keep the report in the store")
    parser.add_argument("--submit", metavar="URL", help="also upload the report to this gateway's admin API "
                                                        "(recorded in its audit log)")
    parser.add_argument("--token", help="operator token for --submit (default: env GATEWAY_TOKEN)")
    parser.add_argument("--production-url", help="production gateway whose environment must match")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the load, soak and rehearsal durations (e.g. 0.1 for a smoke run)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run_command(args: argparse.Namespace, err: TextIO = sys.stderr, out: TextIO = sys.stdout) -> int:
    """Run the checklist for the parsed arguments; returns the exit code."""
    from gateway.readiness.checklist import CannotRun, Target, run
    from gateway.readiness.render import write_reports
    from gateway.settings import Settings

    if not 0 < args.scale <= 10:
        print("gateway readiness: --scale must be in (0, 10]", file=err)
        return EXIT_CANNOT_RUN
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError: a bad GATEWAY_* variable
        print(f"gateway readiness: invalid settings: {exc}", file=err)
        return EXIT_CANNOT_RUN
    target = Target(args.model, args.version, args.models or settings.models_dir,
                    args.policies or settings.policies_dir, args.production_url, args.scale)
    progress = _Progress(err, quiet=args.quiet)
    try:
        with _stopped_by_sigterm():
            report = run(target, say=progress.say, on_item=progress.item)
    except CannotRun as exc:
        print(f"gateway readiness: cannot run: {exc}", file=err)
        return EXIT_CANNOT_RUN
    except _Terminated:
        print("gateway readiness: stopped (SIGTERM); the staging gateways were stopped", file=err)
        return EXIT_CANNOT_RUN
    document = report.as_json()
    if settings.readiness_hmac_key:
        from gateway.readiness.store import signature_of

        document["signature"] = signature_of(document["sha256"], settings.readiness_hmac_key)
    try:
        paths = write_reports(document, args.out)
    except OSError as exc:
        print(f"gateway readiness: cannot write the report to {args.out}: {exc}", file=err)
        return EXIT_CANNOT_RUN
    stored = None
    if not args.no_store:
        from gateway.readiness.store import ReportRejected, ReportStore

        directory = args.store or settings.readiness_dir or settings.state_dir / "readiness"
        try:
            stored = ReportStore(directory, key=settings.readiness_hmac_key).put(document)
        except (OSError, ValueError, ReportRejected) as exc:
            print(f"gateway readiness: cannot keep the report in {directory}: {exc}", file=err)
            return EXIT_CANNOT_RUN
    _summary(document, paths, out)
    if stored is not None:
        print(f"kept for the promotion gate in {directory}", file=out)
    if args.submit:
        code = _submit(args, document, err, out)
        if code is not None:
            return code
    return EXIT_READY if report.ready else EXIT_NOT_READY


def _submit(args: argparse.Namespace, document: dict[str, Any], err: TextIO, out: TextIO) -> int | None:
    from gateway.admin_client import AdminCallFailed, AdminClient

    client = AdminClient(args.submit, args.token or os.environ.get("GATEWAY_TOKEN"))
    try:
        reply = client.upload_report(document)
    except AdminCallFailed as exc:
        print(f"gateway readiness: cannot submit the report: {exc}", file=err)
        return EXIT_CANNOT_RUN
    if reply.status != 201:
        print(f"gateway readiness: {args.submit} refused the report ({reply.status}): {reply.body}", file=err)
        return EXIT_CANNOT_RUN
    print(f"submitted to {args.submit} (recorded in its audit log)", file=out)
    return None


def _summary(document: dict[str, Any], paths: dict[str, Path], out: TextIO) -> None:
    verdict = "READY" if document["ready"] else "NOT READY"
    maturity = document.get("maturity") or {}
    print(f"{document['model']} v{document['version']}: {verdict}: score {document['score']:.0%} "
          f"({document['band'].replace('_', ' ')}), maturity level {maturity.get('level')} "
          f"({maturity.get('name')})", file=out)
    for entry in document["items"]:
        if entry["status"] == "fail":
            print(f"  FAIL {entry['phase']}.{entry['key']}: {entry['detail']}", file=out)
    print(f"report {document['sha256']}", file=out)
    for kind, path in paths.items():
        print(f"  {kind}: {path}", file=out)


class _Terminated(Exception):
    """SIGTERM arrived: unwind (stopping the staging gateways on the way out)."""


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread, so every `finally` runs before exit."""
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Progress:
    """One line per finished item on stderr, plus what is being started."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.count = 0
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"  .. {message}", file=self.stream, flush=True)

    def item(self, result: ItemResult) -> None:
        self.count += 1
        if self.quiet:
            return
        elapsed = time.monotonic() - self.started
        print(f"[{self.count:2d}] {elapsed:6.1f}s {_MARKS[result.status]:>7}  {result.phase}.{result.key}: "
              f"{result.detail}", file=self.stream, flush=True)

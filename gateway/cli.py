"""The `gateway` command: serve, check or describe policies, release control, audit, readiness.

Exit codes: 0 success, 1 invalid input (a policy or card with problems), 2 usage error
(`gateway readiness`: 0 ready, 1 not ready, 2 could not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.readiness import command as readiness_command

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Model-serving gateway with safety nets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the model repository over HTTP",
                                description="Serve the model repository (settings also from GATEWAY_* env).")
    serve.add_argument("--host", help="listen address (default 127.0.0.1, env GATEWAY_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default 8080, env GATEWAY_PORT)")
    serve.add_argument("--models", type=Path, dest="models_dir", help="model repository (default ./models)")
    serve.add_argument("--policies", type=Path, dest="policies_dir", help="policy directory (default ./policies)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default 1, env "
                                                   "GATEWAY_WORKERS; more than one needs the redis state store)")

    policy = commands.add_parser("policy", help="check policy files or print their schema")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    check = policy_commands.add_parser("check", help="validate policy files against the schema and the models")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--models", type=Path, default=Path("models"), help="model repository (default ./models)")
    schema = policy_commands.add_parser("schema", help="print (or write) the policy JSON Schema")
    schema.add_argument("--output", type=Path, help="write to this file instead of standard output")
    _admin_commands(commands)

    audit = commands.add_parser("audit", help="verify or read the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_commands.add_parser("verify", help="check the whole hash chain; exit 1 naming the first "
                                                      "bad record")
    verify.add_argument("directory", type=Path)
    show = audit_commands.add_parser("show", help="print records (JSON Lines), filtered")
    show.add_argument("directory", type=Path)
    show.add_argument("--request-id")
    show.add_argument("--model")
    show.add_argument("--version")
    show.add_argument("--kind", choices=["request", "shadow", "control", "recovery"])
    show.add_argument("--since", help="ISO time or epoch seconds (inclusive)")
    show.add_argument("--until", help="ISO time or epoch seconds (exclusive)")

    docs = policy_commands.add_parser("docs", help="print the policy and settings reference (Markdown)")
    docs.add_argument("--write", type=Path, metavar="FILE",
                      help="refresh the generated sections of FILE (e.g. README.md) in place")
    readiness_command.add_parser(commands)
    return parser


def _admin_commands(commands: Any) -> None:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                            help="gateway address (env GATEWAY_URL, default http://127.0.0.1:8080)")
        parser.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"),
                            help="admin bearer token (env GATEWAY_TOKEN)")
        return parser

    add("status", "show models, versions, aliases, breakers and problems")
    switch = add("switch", "make a version stable at once (the old stable stays warm for rollback)")
    switch.add_argument("model")
    switch.add_argument("version")
    switch.add_argument("--force", action="store_true",
                        help="past the readiness gate without a passing report (admin token; audited)")
    rollback = add("rollback", "go back to the previous stable version")
    rollback.add_argument("model")
    rollback.add_argument("--reason", default="")
    canary = add("canary", "send a share of traffic to a canary version (0 or --clear stops it)")
    canary.add_argument("model")
    canary.add_argument("version", nargs="?")
    canary.add_argument("percent", nargs="?", type=float)
    canary.add_argument("--clear", action="store_true")
    shadow = add("shadow", "mirror a share of requests to a shadow version (--clear stops it)")
    shadow.add_argument("model")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--percent", type=float, default=100.0)
    shadow.add_argument("--clear", action="store_true")
    rollout = add("rollout", "progressive rollout: start MODEL VERSION | pause | resume | abort | status MODEL")
    rollout.add_argument("action", choices=["start", "pause", "resume", "abort", "status"])
    rollout.add_argument("model")
    rollout.add_argument("version", nargs="?")
    rollout.add_argument("--force", action="store_true",
                         help="start: past the readiness gate without a passing report (admin token; audited)")
    load = add("load", "load (verify, warm up) versions of a model at runtime")
    load.add_argument("model")
    load.add_argument("--version", help="one version (default: every version not yet serving)")
    unload = add("unload", "stop serving a version (refused while an alias points at it)")
    unload.add_argument("model")
    unload.add_argument("--version", required=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command in ADMIN_COMMANDS:
        return _admin(parser, args)
    if args.command == "audit":
        return _audit(parser, args)
    if args.command == "readiness":
        return readiness_command.run_command(args)
    if args.policy_command == "check":
        return _policy_check(args.files, args.models)
    if args.policy_command == "docs":
        return _policy_docs(args.write)
    return _policy_schema(args.output)


ADMIN_COMMANDS = {"status", "switch", "rollback", "canary", "shadow", "rollout", "load", "unload"}


def _admin(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Turn an admin command into one API call; print the JSON answer; 0 ok, 1 refused, 2 unreachable."""
    from gateway.admin_client import AdminCallFailed, AdminClient

    model = getattr(args, "model", "")
    call: tuple[str, str, dict[str, Any] | None]
    if args.command == "status":
        call = ("GET", "/status", None)
    elif args.command == "switch":
        call = ("POST", f"/admin/models/{model}/switch", {"version": args.version, **_forced(args)})
    elif args.command == "rollback":
        call = ("POST", f"/admin/models/{model}/rollback", {"reason": args.reason})
    elif args.command == "canary":
        if args.clear or args.percent == 0:
            call = ("DELETE", f"/admin/models/{model}/canary", None)
        elif args.version is None or args.percent is None:
            parser.error("canary needs MODEL VERSION PERCENT (or --clear)")
        else:
            call = ("PUT", f"/admin/models/{model}/canary", {"version": args.version, "percent": args.percent})
    elif args.command == "shadow":
        if args.clear:
            call = ("DELETE", f"/admin/models/{model}/shadow", None)
        elif args.version is None:
            parser.error("shadow needs MODEL VERSION (or --clear)")
        else:
            call = ("PUT", f"/admin/models/{model}/shadow", {"version": args.version, "percent": args.percent})
    elif args.command == "rollout":
        if args.force and args.action != "start":
            parser.error("--force goes with rollout start")
        if args.action == "start":
            if args.version is None:
                parser.error("rollout start needs MODEL VERSION")
            call = ("POST", f"/admin/models/{model}/rollout", {"version": args.version, **_forced(args)})
        elif args.action == "status":
            call = ("GET", f"/admin/models/{model}/rollout", None)
        else:
            call = ("POST", f"/admin/models/{model}/rollout/{args.action}", None)
    elif args.command == "load":
        suffix = f"?version={args.version}" if args.version else ""
        call = ("POST", f"/v2/repository/models/{model}/load{suffix}", None)
    else:
        call = ("POST", f"/v2/repository/models/{model}/unload?version={args.version}", None)
    try:
        reply = AdminClient(args.url, args.token).call(*call)
    except AdminCallFailed as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(reply.body, indent=2))
    return EXIT_OK if reply.status < 400 else EXIT_INVALID


def _forced(args: argparse.Namespace) -> dict[str, bool]:
    """`force` in the body only when asked for (the server refuses it from non-admins)."""
    return {"force": True} if args.force else {}


def _audit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import heapq

    from gateway.audit import chains, records, verify

    if not args.directory.is_dir():
        print(f"gateway: {args.directory} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    found = chains(args.directory)
    if args.audit_command == "verify":
        if not found:
            print(f"{args.directory}: no audit files (nor worker-<n>/ chains) here")
            return EXIT_OK
        broken = 0
        for chain in found:
            verdict = verify(chain)
            for finding in verdict.findings:
                where = "" if chain == args.directory else f"{chain.name}/"
                print(("" if finding.fatal else "note: ") + where + finding.describe())
            status = "ok" if verdict.ok else "BROKEN"
            print(f"{chain}: {status}: {verdict.records} records in {verdict.files} files verified")
            broken += not verdict.ok
        return EXIT_OK if not broken else EXIT_INVALID
    since, until = _when(parser, args.since), _when(parser, args.until)
    # each chain is in time order; several (one per worker) are merged by time, each record naming its chain
    streams = [records(chain) if chain == args.directory else _named(records(chain), chain.name) for chain in found]
    for record in heapq.merge(*streams, key=lambda r: float(r.get("time") or 0)):
        if args.request_id is not None and record.get("request_id") != args.request_id:
            continue
        if args.model is not None and record.get("model") != args.model:
            continue
        if args.version is not None and record.get("version") != args.version:
            continue
        if args.kind is not None and record.get("kind") != args.kind:
            continue
        moment = float(record.get("time") or 0)
        if (since is not None and moment < since) or (until is not None and moment >= until):
            continue
        print(json.dumps(record, sort_keys=True))
    return EXIT_OK


def _named(stream: Iterator[dict[str, Any]], chain: str) -> Iterator[dict[str, Any]]:
    for record in stream:
        yield {**record, "chain": chain}


def _when(parser: argparse.ArgumentParser, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        parser.error(f"not a time: {text!r} (ISO 8601 or epoch seconds)")
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.locks import DirectoryBusy
    from gateway.settings import Settings

    overrides: dict[str, Any] = {k: v for k in ("host", "port", "models_dir", "policies_dir", "log_level",
                                                 "workers") if (v := getattr(args, k)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"gateway: setting {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.models_dir.is_dir():
        print(f"gateway: model repository {settings.models_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # loop="asyncio": under uvloop, at 128 busy connections a few connections waited seconds for
    # their turn (p99 1-2 s at p50 60 ms) while asyncio's loop served them fairly (p99 ~150 ms) at
    # the same throughput; see loadtests/RESULTS.md.
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
                               "timeout_graceful_shutdown": settings.drain_timeout_s, "loop": "asyncio",
                               "http": "httptools"}
    if settings.workers == 1:
        try:
            app = create_app(settings)
        except DirectoryBusy as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return EXIT_USAGE
        uvicorn.run(app, **options)
        return EXIT_OK
    # Several workers: each is a fresh process that builds its app from the environment, so the
    # command-line overrides travel there, with the metric directory all of them write to.
    from gateway.workers import prepare_metrics_dir

    for name, value in overrides.items():
        os.environ[f"GATEWAY_{name.upper()}"] = str(value)
    try:
        metrics_lock = prepare_metrics_dir(settings.metrics_dir or settings.state_dir / "metrics")
    except OSError as exc:
        print(f"gateway: cannot use the metrics directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options["http"] = "gateway.workers:NoDelayHttpToolsProtocol"  # see gateway.workers: Nagle's 40 ms
    try:
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.workers, **options)
    finally:
        metrics_lock.close()
    return EXIT_OK


def _policy_check(files: list[Path], models_dir: Path) -> int:
    from gateway.policy_check import check_policy_file

    missing = [f for f in files if not f.is_file()]
    if missing:
        for f in missing:
            print(f"gateway: no such file: {f}", file=sys.stderr)
        return EXIT_USAGE
    if not models_dir.is_dir():
        print(f"gateway: model repository {models_dir} is not a directory (use --models)", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    for path in files:
        report = check_policy_file(path, models_dir)
        for problem in report.errors:
            print(f"{problem.describe()}")
        for problem in report.warnings:
            print(f"{problem.describe()} [warning]")
        if report.ok:
            print(f"{path}: ok" + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
        else:
            failed += 1
            print(f"{path}: {len(report.errors)} error{'s' if len(report.errors) != 1 else ''}")
    return EXIT_INVALID if failed else EXIT_OK


def _policy_schema(output: Path | None) -> int:
    from gateway.policy import json_schema

    text = json_schema()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
    return EXIT_OK


def _policy_docs(target: Path | None) -> int:
    from gateway.reference import policy_reference, refresh, settings_reference

    if target is None:
        sys.stdout.write(policy_reference() + "\n" + settings_reference())
        return EXIT_OK
    if not target.is_file():
        print(f"gateway: no such file: {target}", file=sys.stderr)
        return EXIT_USAGE
    target.write_text(refresh(target.read_text()))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

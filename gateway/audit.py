"""The tamper-evident audit log: hash-chained JSON Lines, written off the hot path, verified offline.

Each line is one record: its canonical JSON (sorted keys, compact) with a last field `hash`,
where hash = sha256(previous record's hash + the canonical bytes before `,"hash"`). The very
first record follows 64 zeros. `seq` counts records across files; a file is named after its
first record's `seq` (`audit-000000000001.jsonl`) and the chain runs on from the previous file's
last hash, so edited, deleted, inserted or reordered records and missing files all break the
chain at a nameable place.

The writer takes records from a bounded asyncio queue, serialises, hashes and appends them in a
worker thread, one batch at a time, and fsyncs per batch (or per interval). At start it checks
the newest file: a torn last line (a crash mid-write) is left as evidence and the chain goes on
in a new file whose first record is an explicit `recovery` record naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("gateway.audit")

GENESIS = "0" * 64
LINE = re.compile(rb'^(\{.*),"hash":"([0-9a-f]{64})"\}$')
NAME = re.compile(r"^audit-(\d{12})\.jsonl$")
WORKER = re.compile(r"^worker-\d+$")
BATCH = 1000
GATHER_S = 0.02  # how long the writer lets records gather before a batch (bounds fsync latency too)


def canonical(record: dict[str, Any]) -> bytes:
    """The record's canonical JSON (sorted keys, no spaces; numpy values become plain numbers)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=_plain)


def _serialisable(record: dict[str, Any]) -> bytes:
    """`canonical(record)`; a value JSON cannot carry as a number (an integer beyond 64 bits, which
    a client can send) is written as its decimal string instead, so one request can never stop the log."""
    try:
        return canonical(record)
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:
        return canonical(_big_ints_as_text(record))
    except (TypeError, orjson.JSONEncodeError) as exc:  # anything else: keep the facts, name the problem
        log.error("audit record %s could not be serialised: %s", record.get("request_id"), exc)
        kept: dict[str, Any] = {k: record[k] for k in ("kind", "time", "request_id", "trace_id", "model", "version",
                                                       "seq", "prev") if k in record}
        return canonical({**kept, "unserialisable": str(exc)})


def _big_ints_as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_big_ints_as_text(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "O":
        return [_big_ints_as_text(v) for v in value.tolist()]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def _plain(value: Any) -> Any:
    """What orjson cannot write itself: object arrays (strings from binary tensors) and numpy scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def chain_hash(previous: str, body: bytes) -> str:
    """sha256 over the previous hash (hex) and this record's canonical bytes."""
    return hashlib.sha256(previous.encode() + body).hexdigest()


def file_name(first_seq: int) -> str:
    """The file that starts at record `first_seq`."""
    return f"audit-{first_seq:012d}.jsonl"


class Redactor:
    """Applies a policy's per-field redaction to request inputs."""

    def __init__(self, rules: dict[str, str], key: str | None) -> None:
        self.rules = rules
        self._key = key.encode() if key else None

    def apply(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs with redacted fields dropped, masked, or replaced by keyed hashes."""
        if not self.rules:
            return inputs
        out = {}
        for name, values in inputs.items():
            action = self.rules.get(name)
            if action is None:
                out[name] = values
            elif action == "mask":
                out[name] = ["***" for _ in values]
            elif action == "hash" and self._key is not None:
                key = self._key
                out[name] = [None if v is None else "hmac:" + hmac.new(key, _normal(v).encode(), "sha256")
                             .hexdigest()[:32] for v in values]
            # drop, or hash without a key: the field is left out entirely
        return out


def _normal(value: Any) -> str:
    """One text per value whatever JSON spelling carried it (58000 and 58000.0 hash alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(float(value))
    return str(value)


@dataclass
class _Tail:
    """Where the chain stands: next seq, last hash, and a torn line found at start (if any)."""

    seq: int = 1
    last_hash: str = GENESIS
    torn: dict[str, Any] | None = None


def _last_record(data: bytes) -> tuple[dict[str, Any] | None, str | None, dict[str, int] | None]:
    """(last complete record, its hash, torn tail {offset, bytes}) of one file's bytes."""
    last: dict[str, Any] | None = None
    digest: str | None = None
    offset = 0
    for line in data.split(b"\n"):
        end = offset + len(line)
        match = LINE.match(line) if end < len(data) else None  # complete when a newline follows
        parsed = _parse(match.group(1)) if match is not None else None
        if parsed is not None and match is not None:
            last, digest = parsed, match.group(2).decode()
        elif line:
            return last, digest, {"offset": offset, "bytes": len(data) - offset}
        offset = end + 1
    return last, digest, None


def _scan_tail(directory: Path) -> _Tail:
    """Where the chain ends on disk: the last complete record of the newest file that has one.

    A torn tail of the newest file (a crash mid-write) is reported; when that file holds nothing
    else, it is renamed aside (kept as evidence) so the new file can take its place in the chain.
    """
    files = sorted(p for p in directory.glob("audit-*.jsonl") if NAME.match(p.name))
    tail = _Tail()
    for index, path in enumerate(reversed(files)):
        record, digest, torn = _last_record(path.read_bytes())
        if index == 0 and torn is not None:
            tail.torn = {"file": path.name, **torn}
            if record is None:  # nothing but the torn line: move it out of the chain's way
                aside = path.with_name(path.name + ".torn")
                path.rename(aside)
                tail.torn["file"] = aside.name
        if record is not None and digest is not None:
            tail.seq, tail.last_hash = int(record["seq"]) + 1, digest
            return tail
    return tail


def _parse(body: bytes) -> dict[str, Any] | None:
    """The record in a line's JSON part, or None when it is not a JSON object."""
    try:
        value = orjson.loads(body + b"}")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class WriterStats:
    """Counts for metrics and status."""

    written: int = 0
    dropped: int = 0
    rejected: int = 0
    batches: int = 0
    last_fsync: float = field(default_factory=time.monotonic)


class AuditFull(Exception):
    """The queue is full and the model's policy says `reject`."""


class AuditWriter:
    """Appends records to the chain from a bounded queue; `submit` is the only call on the hot path."""

    def __init__(self, directory: Path, capacity: int, fsync: str = "batch", fsync_interval_s: float = 1.0,
                 max_file_bytes: int = 64 * 1024 * 1024, max_file_age_s: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.capacity = capacity
        self._fsync_mode = fsync
        self._fsync_interval = fsync_interval_s
        self._max_bytes = max_file_bytes
        self._max_age = max_file_age_s
        self._clock = clock
        self.stats = WriterStats()
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._handle: Any = None
        self._file_started = 0.0
        self._file_bytes = 0
        self._tail = _Tail()
        self.on_written: Callable[[int], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the chain's end on disk, open a new file (with a recovery record after a crash)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tail = await asyncio.to_thread(_scan_tail, self.directory)
        self._queue = asyncio.Queue(maxsize=self.capacity)
        await asyncio.to_thread(self._open, self._tail.seq)
        if self._tail.torn is not None:
            log.error("audit log: torn last line in %s at byte %d (%d bytes); continuing with a recovery record",
                      self._tail.torn["file"], self._tail.torn["offset"], self._tail.torn["bytes"])
            await asyncio.to_thread(self._write, [{"kind": "recovery", "time": self._clock(), **self._tail.torn,
                                                   "note": "torn line left by an unclean stop; chain continues"}])
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Write everything queued, fsync, close (called on shutdown: nothing answered goes unrecorded)."""
        if self._queue is not None:
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._handle is not None:
            await asyncio.to_thread(self._sync_and_close)

    def close_now(self) -> None:
        """Flush and close the file without draining the queue (only for tearing down a stopped loop)."""
        self._sync_and_close()

    # --- hot path ----------------------------------------------------------------------------------

    def offer(self, record: dict[str, Any]) -> None:
        """Queue a record from synchronous code (control decisions): never lost, may wait in a task."""
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            asyncio.get_running_loop().create_task(self._queue.put(record))

    @property
    def backlog(self) -> int:
        """Records waiting to be written."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, record: dict[str, Any], on_full: str) -> bool:
        """Queue a record. `block` waits for room; `reject` raises AuditFull; `drop` counts and returns False."""
        if self._queue is None:
            raise RuntimeError("the audit writer is not started")
        if on_full == "block":
            try:
                self._queue.put_nowait(record)  # the common case, without making a coroutine
            except asyncio.QueueFull:
                await self._queue.put(record)
            return True
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            if on_full == "reject":
                self.stats.rejected += 1
                raise AuditFull(f"the audit log is {self.capacity} records behind") from None
            self.stats.dropped += 1
            return False
        return True

    # --- the writer ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(GATHER_S)  # let a batch gather: one thread hop and one fsync for many records
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            delay = 0.1
            while True:  # a record is never dropped here: on a failing disk, retry (the queue fills, and
                try:     # each model's on_full decides what its clients see)
                    await asyncio.to_thread(self._write, batch)
                    break
                except Exception:  # a disk error, or a bug: never drop, never die; the queue fills meanwhile
                    log.exception("audit log write failed; retrying %d records", len(batch))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            for _ in batch:
                self._queue.task_done()

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Serialise, chain and append a batch (worker thread; the only writer)."""
        now = time.monotonic()
        if self._file_bytes >= self._max_bytes or self._clock() - self._file_started >= self._max_age:
            self._sync_and_close()
            self._open(self._tail.seq)
        lines = []
        seq, last = self._tail.seq, self._tail.last_hash
        for record in records:
            record["seq"], record["prev"] = seq, last  # the record is the writer's now: no copy
            body = _serialisable(record)
            digest = chain_hash(last, body)
            lines.append(body[:-1] + b',"hash":"' + digest.encode() + b'"}\n')
            seq, last = seq + 1, digest
        data = b"".join(lines)
        self._handle.write(data)
        self._handle.flush()
        self._tail.seq, self._tail.last_hash = seq, last  # the chain moves on only once written
        self._file_bytes += len(data)
        if self._fsync_mode == "batch" or now - self.stats.last_fsync >= self._fsync_interval:
            os.fsync(self._handle.fileno())
            self.stats.last_fsync = now
        self.stats.written += len(records)
        self.stats.batches += 1
        if self.on_written is not None:
            self.on_written(len(records))

    def _open(self, first_seq: int) -> None:
        path = self.directory / file_name(first_seq)
        self._handle = path.open("ab")
        self._file_started = self._clock()
        self._file_bytes = path.stat().st_size
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _sync_and_close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


# --- verification ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """A break in the chain (or a tolerated, recovered torn line)."""

    file: str
    line: int
    seq: int | None
    problem: str
    fatal: bool = True

    def describe(self) -> str:
        """`file:line: (seq N) problem`."""
        where = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.file}:{self.line}:{where} {self.problem}"


@dataclass
class Verdict:
    """What `verify` found: records checked and every finding, the first fatal one decisive."""

    records: int = 0
    files: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No fatal finding."""
        return not any(f.fatal for f in self.findings)


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    data = path.read_bytes()
    parts = data.split(b"\n")
    for number, part in enumerate(parts, start=1):
        last = number == len(parts)
        if last and part == b"":
            return
        yield number, part, not last  # complete when a newline follows


def verify(directory: Path) -> Verdict:
    """Check the whole chain: every record's hash, its link to the previous one, seq continuity, files."""
    verdict = Verdict()
    files = sorted(p for p in directory.glob("audit-*.jsonl") if NAME.match(p.name))
    expected_seq, previous = 1, GENESIS
    pending_torn: dict[str, Any] | None = None
    for path in files:
        verdict.files += 1
        name_seq = int(NAME.match(path.name).group(1))  # type: ignore[union-attr]
        if pending_torn is not None and name_seq != expected_seq:  # a torn line ended the previous file
            verdict.findings.append(Finding(pending_torn["file"], pending_torn["line"], None,
                                            "torn line (truncated record) inside the chain"))
            return verdict
        if name_seq != expected_seq:
            gap = "a file is missing" if name_seq > expected_seq else "files overlap"
            verdict.findings.append(Finding(path.name, 1, name_seq, f"starts at seq {name_seq}, the chain is at "
                                                                    f"{expected_seq}: {gap}"))
            return verdict
        first = True
        for number, line, complete in _lines(path):
            match = LINE.match(line) if complete else None
            if match is None:
                if not complete:
                    pending_torn = {"file": path.name, "line": number}
                    continue
                verdict.findings.append(Finding(path.name, number, None, "not an audit record (malformed line)"))
                return verdict
            body, stored = match.group(1) + b"}", match.group(2).decode()
            record = _parse(match.group(1))
            if record is None:
                verdict.findings.append(Finding(path.name, number, None, "not an audit record (malformed JSON)"))
                return verdict
            seq = record.get("seq")
            acknowledged = first and pending_torn is not None
            if acknowledged and pending_torn is not None:
                if record.get("kind") != "recovery" or record.get("file") != pending_torn["file"]:
                    verdict.findings.append(Finding(pending_torn["file"], pending_torn["line"], None,
                                                    "torn last line (an unclean stop) with no recovery record"))
                    return verdict
                verdict.findings.append(Finding(pending_torn["file"], pending_torn["line"], None,
                                                "torn last line, acknowledged by the recovery record "
                                                f"in {path.name}", fatal=False))
                pending_torn = None
            if first and not acknowledged and record.get("kind") == "recovery":
                verdict.findings.append(Finding(path.name, number, seq if isinstance(seq, int) else None,
                                                f"recovery after an unclean stop (torn line kept in "
                                                f"{record.get('file')})", fatal=False))
            first = False
            if record.get("prev") != previous or seq != expected_seq:
                if isinstance(seq, int) and seq > expected_seq:
                    problem = (f"records {expected_seq}..{seq - 1} are missing or out of order here "
                               "(deleted or reordered)")
                else:
                    problem = f"out of order or inserted (expected seq {expected_seq} after hash {previous[:12]})"
                verdict.findings.append(Finding(path.name, number, seq if isinstance(seq, int) else None, problem))
                return verdict
            if chain_hash(previous, body) != stored:
                verdict.findings.append(Finding(path.name, number, seq, "content does not match its hash (edited)"))
                return verdict
            previous, expected_seq = stored, expected_seq + 1
            verdict.records += 1
    if pending_torn is not None:
        verdict.findings.append(Finding(pending_torn["file"], pending_torn["line"], None,
                                        "torn last line (truncated: an unclean stop, not yet recovered)"))
    return verdict


def chains(directory: Path) -> list[Path]:
    """The audit chains under `directory`: itself when it holds audit files, and each `worker-<n>`
    sub-directory (one chain per worker when several share a port), in worker order."""
    found = [directory] if any(NAME.match(p.name) for p in directory.glob("audit-*.jsonl")) else []
    workers = [p for p in directory.glob("worker-*") if p.is_dir() and WORKER.match(p.name)]
    return found + sorted(workers, key=lambda p: int(p.name.split("-")[1]))


def records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every complete record, in order (for `gateway audit show`)."""
    for path in sorted(p for p in directory.glob("audit-*.jsonl") if NAME.match(p.name)):
        for _, line, complete in _lines(path):
            match = LINE.match(line) if complete else None
            record = _parse(match.group(1)) if match is not None else None
            if record is not None and match is not None:
                yield {**record, "hash": match.group(2).decode()}

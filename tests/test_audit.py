"""The tamper-evident audit log in-process: the writer, the chain, tampering, recovery, redaction, the CLI.

Every test drives `AuditWriter` in `asyncio.run` over a temporary directory and checks the result
through `verify`, `records` and the `gateway audit` command; faults (a slow disk, a torn write) are
injected on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import cli
from gateway.audit import (
    GENESIS,
    AuditFull,
    AuditWriter,
    Finding,
    Redactor,
    Verdict,
    canonical,
    chain_hash,
    file_name,
    records,
    verify,
)

T = TypeVar("T")
PAD = "x" * 300  # makes every record ~500 bytes, so a 600-byte limit gives two records per file
KEY = "a-secret-hmac-key-for-tests"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro
    return asyncio.run(main())


def record(i: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "request", "model": "m", "version": "1", "request_id": f"r{i}", "time": 1000.0 + i, **extra}


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll on the loop (the writer's thread makes progress meanwhile) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def write_one_per_batch(writer: AuditWriter, recs: list[dict[str, Any]]) -> None:
    """Submit records one at a time, each written (as its own batch) before the next."""
    for rec in recs:
        target = writer.stats.written + 1
        await writer.submit(rec, "block")
        await until(lambda target=target: writer.stats.written >= target)


def write_log(directory: Path, count: int, per_batch: bool = False, **options: Any) -> None:
    """One writer session: start, write `count` records, close."""
    async def session() -> None:
        writer = AuditWriter(directory, 100, **options)
        await writer.start()
        recs = [record(i, pad=PAD) if per_batch else record(i) for i in range(count)]
        if per_batch:
            await write_one_per_batch(writer, recs)
        else:
            for rec in recs:
                await writer.submit(rec, "block")
        await writer.close()
    run(session())


def audit_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def lines_of(path: Path) -> list[bytes]:
    """The complete lines of a file (without their newlines)."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def parsed(line: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def first_fatal(verdict: Verdict) -> Finding:
    assert not verdict.ok
    return next(f for f in verdict.findings if f.fatal)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """Six records in one file."""
    directory = tmp_path / "audit"
    write_log(directory, 6)
    return directory


@pytest.fixture
def rotated(tmp_path: Path) -> Path:
    """Six records in three files of two (size rotation)."""
    directory = tmp_path / "audit"
    write_log(directory, 6, per_batch=True, max_file_bytes=600)
    return directory


# ------------------------------------------------------------------------------------- a clean chain


def test_a_clean_chain_verifies(chain: Path) -> None:
    verdict = verify(chain)
    assert verdict.ok
    assert (verdict.records, verdict.files, verdict.findings) == (6, 1, [])
    assert [p.name for p in audit_files(chain)] == ["audit-000000000001.jsonl"]


def test_records_are_canonical_lines_ending_in_their_chained_hash(chain: Path) -> None:
    previous = GENESIS
    for seq, line in enumerate(lines_of(audit_files(chain)[0]), start=1):
        rec = parsed(line)
        assert list(rec)[-1] == "hash"
        assert (rec["seq"], rec["prev"], rec["request_id"]) == (seq, previous, f"r{seq - 1}")
        body = canonical({k: v for k, v in rec.items() if k != "hash"})
        assert line == body[:-1] + b',"hash":"' + rec["hash"].encode() + b'"}'
        assert rec["hash"] == chain_hash(previous, body)
        previous = rec["hash"]


def test_records_reads_back_every_record_in_order(rotated: Path) -> None:
    assert [r["request_id"] for r in records(rotated)] == [f"r{i}" for i in range(6)]
    assert [r["seq"] for r in records(rotated)] == list(range(1, 7))


def test_an_empty_directory_verifies_with_nothing_in_it(tmp_path: Path) -> None:
    verdict = verify(tmp_path)
    assert verdict.ok
    assert (verdict.records, verdict.files) == (0, 0)


# ------------------------------------------------------------------------------------------ rotation


def test_size_rotation_keeps_the_chain_across_files(rotated: Path) -> None:
    files = audit_files(rotated)
    assert [p.name for p in files] == [file_name(1), file_name(3), file_name(5)]
    contents = [[parsed(line) for line in lines_of(p)] for p in files]
    assert [[r["seq"] for r in recs] for recs in contents] == [[1, 2], [3, 4], [5, 6]]
    for earlier, later in itertools.pairwise(contents):
        assert later[0]["prev"] == earlier[-1]["hash"]
    verdict = verify(rotated)
    assert verdict.ok
    assert (verdict.records, verdict.files) == (6, 3)


def test_age_rotation_starts_a_new_file(tmp_path: Path) -> None:
    now = [5000.0]

    async def session() -> None:
        writer = AuditWriter(tmp_path, 10, max_file_age_s=60.0, clock=lambda: now[0])
        await writer.start()
        await write_one_per_batch(writer, [record(0), record(1)])
        now[0] += 61.0
        await write_one_per_batch(writer, [record(2)])
        await writer.close()

    run(session())
    assert [p.name for p in audit_files(tmp_path)] == [file_name(1), file_name(3)]
    assert verify(tmp_path).ok


def test_a_restart_continues_the_chain_in_a_new_file(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    write_log(tmp_path, 2)
    assert [p.name for p in audit_files(tmp_path)] == [file_name(1), file_name(4)]
    first = parsed(lines_of(audit_files(tmp_path)[1])[0])
    assert first["seq"] == 4
    assert first["prev"] == parsed(lines_of(audit_files(tmp_path)[0])[-1])["hash"]
    verdict = verify(tmp_path)
    assert verdict.ok
    assert verdict.records == 5


def test_a_restart_without_records_in_between_keeps_the_chain(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    write_log(tmp_path, 0)  # a start and stop with no traffic leaves an empty audit-000000000004.jsonl
    write_log(tmp_path, 2)
    verdict = verify(tmp_path)
    assert verdict.findings == []
    assert verdict.records == 5


# ------------------------------------------------------------------------------------------ tampering


def test_an_edited_field_is_named(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    assert b'"request_id":"r2"' in lines[2]
    lines[2] = lines[2].replace(b'"request_id":"r2"', b'"request_id":"rX"')
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 3, 3)
    assert "edited" in bad.problem


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    rec = parsed(lines[2])
    rec["model"] = "forged"
    body = canonical({k: v for k, v in rec.items() if k != "hash"})
    lines[2] = body[:-1] + b',"hash":"' + chain_hash(rec["prev"], body).encode() + b'"}'
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 4, 4)


def test_a_deleted_record_is_named(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    del lines[2]
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 3, 4)
    assert "3..3 are missing" in bad.problem
    assert "deleted" in bad.problem


def test_a_duplicated_record_is_named_as_inserted(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    lines.insert(3, lines[2])
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 4, 3)
    assert "inserted" in bad.problem


def test_a_forged_record_with_a_valid_own_hash_but_wrong_prev_is_named(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    forged_prev = "f" * 64
    body = canonical({**record(99), "seq": 4, "prev": forged_prev})
    forged = body[:-1] + b',"hash":"' + chain_hash(forged_prev, body).encode() + b'"}'
    lines.insert(3, forged)
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 4, 4)
    assert "inserted" in bad.problem


def _swap_third_and_fourth(chain: Path) -> Path:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(path, lines)
    return path


def test_a_reordered_pair_is_named(chain: Path) -> None:
    path = _swap_third_and_fourth(chain)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line, bad.seq) == (path.name, 3, 4)


def test_a_reordered_pair_is_reported_as_out_of_order(chain: Path) -> None:
    _swap_third_and_fourth(chain)
    bad = first_fatal(verify(chain))
    assert "out of order" in bad.problem


def test_a_truncated_last_line_is_named_as_torn(chain: Path) -> None:
    path = audit_files(chain)[0]
    data = path.read_bytes()
    last_start = data[:-1].rindex(b"\n") + 1
    path.write_bytes(data[:last_start + 40])
    verdict = verify(chain)
    bad = first_fatal(verdict)
    assert (bad.file, bad.line, bad.seq) == (path.name, 6, None)
    assert "torn" in bad.problem
    assert verdict.records == 5


def test_a_lost_final_newline_counts_as_torn(chain: Path) -> None:
    path = audit_files(chain)[0]
    path.write_bytes(path.read_bytes()[:-1])
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line) == (path.name, 6)
    assert "torn" in bad.problem


def _tear_the_first_file(rotated: Path) -> Path:
    first = audit_files(rotated)[0]
    first.write_bytes(first.read_bytes()[:-30])
    return first


def test_a_torn_line_inside_the_chain_fails_verification(rotated: Path) -> None:
    _tear_the_first_file(rotated)
    verdict = verify(rotated)
    assert not verdict.ok
    assert verdict.records == 1


def test_a_torn_line_inside_the_chain_is_named_as_torn(rotated: Path) -> None:
    first = _tear_the_first_file(rotated)
    bad = first_fatal(verify(rotated))
    assert (bad.file, bad.line) == (first.name, 2)
    assert "torn" in bad.problem


def test_a_missing_middle_file_is_named(rotated: Path) -> None:
    files = audit_files(rotated)
    files[1].unlink()
    bad = first_fatal(verify(rotated))
    assert (bad.file, bad.line, bad.seq) == (file_name(5), 1, 5)
    assert "missing" in bad.problem


def test_a_missing_first_file_is_named(rotated: Path) -> None:
    audit_files(rotated)[0].unlink()
    bad = first_fatal(verify(rotated))
    assert (bad.file, bad.line, bad.seq) == (file_name(3), 1, 3)
    assert "missing" in bad.problem


def test_a_line_that_is_not_a_record_is_named(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    lines[1] = b"hello"
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line) == (path.name, 2)
    assert "malformed" in bad.problem


def test_a_record_shaped_line_with_broken_json_is_named(chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    lines[1] = b'{"kind":"req{"seq":2,"hash":"' + b"0" * 64 + b'"}'
    write_lines(path, lines)
    bad = first_fatal(verify(chain))
    assert (bad.file, bad.line) == (path.name, 2)


# ---------------------------------------------------------------------------------------- recovery


def test_a_restart_after_a_torn_line_writes_a_recovery_record(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    path = audit_files(tmp_path)[0]
    data = path.read_bytes()
    torn_at = data[:-1].rindex(b"\n") + 1
    path.write_bytes(data[:torn_at + 25])  # the third record cut mid-line by a crash
    assert not verify(tmp_path).ok

    write_log(tmp_path, 1)
    assert path.read_bytes() == data[:torn_at + 25]  # the evidence is left as it was
    files = audit_files(tmp_path)
    assert [p.name for p in files] == [file_name(1), file_name(3)]
    recovery, after = (parsed(line) for line in lines_of(files[1]))
    assert recovery["kind"] == "recovery"
    assert (recovery["file"], recovery["offset"], recovery["bytes"]) == (path.name, torn_at, 25)
    assert (recovery["seq"], recovery["prev"]) == (3, parsed(data.split(b"\n")[1])["hash"])
    assert (after["seq"], after["prev"], after["request_id"]) == (4, recovery["hash"], "r0")

    verdict = verify(tmp_path)
    assert verdict.ok
    assert verdict.records == 4
    notes = [f for f in verdict.findings if not f.fatal]
    assert len(notes) == 1
    assert (notes[0].file, notes[0].line) == (path.name, 3)
    assert "recovery" in notes[0].problem


def test_a_second_restart_after_recovery_keeps_verifying(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    path = audit_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-10])
    write_log(tmp_path, 1)
    write_log(tmp_path, 1)
    verdict = verify(tmp_path)
    assert verdict.ok
    assert verdict.records == 2 + 1 + 1 + 1
    assert [r["kind"] for r in records(tmp_path)].count("recovery") == 1


def test_a_torn_first_write_of_a_fresh_file_is_recovered(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    torn = b'{"kind":"request","model":"m"'
    (tmp_path / file_name(4)).write_bytes(torn)  # the crash hit the first write after a rotation
    write_log(tmp_path, 1)
    assert any(p.read_bytes() == torn for p in tmp_path.iterdir())  # left as evidence (if maybe renamed)
    verdict = verify(tmp_path)
    assert verdict.ok
    assert verdict.records == 3 + 2


# ----------------------------------------------------------------------------- a full queue: on_full


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """A fault injected on purpose: `_write` signals `entered`, then waits for `gate` before writing."""
    entered, gate = threading.Event(), threading.Event()
    original = AuditWriter._write

    def slow_write(self: AuditWriter, recs: list[dict[str, Any]]) -> None:
        entered.set()
        gate.wait(timeout=10)
        original(self, recs)

    monkeypatch.setattr(AuditWriter, "_write", slow_write)
    try:
        yield entered, gate
    finally:
        gate.set()


async def full_writer(directory: Path, entered: threading.Event) -> AuditWriter:
    """A capacity-1 writer stuck writing record 0, with record 1 filling its queue."""
    writer = AuditWriter(directory, 1)
    await writer.start()
    assert await writer.submit(record(0), "block")
    await until(entered.is_set)
    assert writer.backlog == 0
    assert await writer.submit(record(1), "block")
    assert writer.backlog == 1
    return writer


def test_block_waits_for_room(tmp_path: Path, slow_disk: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = slow_disk

    async def scenario() -> None:
        writer = await full_writer(tmp_path, entered)
        waiting = asyncio.create_task(writer.submit(record(2), "block"))
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert not waiting.done()
        gate.set()
        assert await asyncio.wait_for(waiting, 5) is True
        await writer.close()
        assert (writer.stats.dropped, writer.stats.rejected) == (0, 0)

    run(scenario())
    assert [r["request_id"] for r in records(tmp_path)] == ["r0", "r1", "r2"]
    assert verify(tmp_path).ok


def test_reject_raises_and_counts(tmp_path: Path, slow_disk: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = slow_disk

    async def scenario() -> None:
        writer = await full_writer(tmp_path, entered)
        for i in (2, 3):
            with pytest.raises(AuditFull, match="1 records behind"):
                await writer.submit(record(i), "reject")
        assert (writer.stats.rejected, writer.stats.dropped) == (2, 0)
        gate.set()
        await writer.close()

    run(scenario())
    assert [r["request_id"] for r in records(tmp_path)] == ["r0", "r1"]
    assert verify(tmp_path).ok


def test_drop_returns_false_and_counts(tmp_path: Path, slow_disk: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = slow_disk

    async def scenario() -> None:
        writer = await full_writer(tmp_path, entered)
        assert await writer.submit(record(2), "drop") is False
        assert await writer.submit(record(3), "drop") is False
        assert (writer.stats.dropped, writer.stats.rejected) == (2, 0)
        gate.set()
        await until(lambda: writer.backlog == 0)
        assert await writer.submit(record(4), "drop") is True  # room again
        await writer.close()

    run(scenario())
    assert [r["request_id"] for r in records(tmp_path)] == ["r0", "r1", "r4"]
    assert verify(tmp_path).ok


def test_close_writes_everything_queued(tmp_path: Path, slow_disk: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = slow_disk

    async def scenario() -> None:
        writer = AuditWriter(tmp_path, 100)
        await writer.start()
        for i in range(50):
            await writer.submit(record(i), "block")
        await until(entered.is_set)
        closing = asyncio.create_task(writer.close())
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert not closing.done()  # it waits for the writer
        gate.set()
        await asyncio.wait_for(closing, 5)
        assert writer.stats.written == 50

    run(scenario())
    verdict = verify(tmp_path)
    assert verdict.ok
    assert verdict.records == 50


def test_submit_before_start_is_refused(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path, 1)
    with pytest.raises(RuntimeError, match="not started"):
        run(writer.submit(record(0), "block"))


# --------------------------------------------------------------------------------------------- fsync


@pytest.mark.parametrize(("mode", "per_batch"), [("batch", 1), ("interval", 0)])
def test_fsync_per_batch_or_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                         per_batch: int) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)

    async def scenario() -> tuple[int, int]:
        writer = AuditWriter(tmp_path, 10, fsync=mode, fsync_interval_s=60.0)
        await writer.start()
        started = len(calls)
        await write_one_per_batch(writer, [record(i) for i in range(3)])
        during = len(calls) - started
        await writer.close()
        return during, len(calls) - started - during

    during, at_close = run(scenario())
    assert during == 3 * per_batch
    assert at_close == 1
    assert verify(tmp_path).records == 3


# ------------------------------------------------------------------------------------------ redaction


def test_redactor_drop_removes_the_field() -> None:
    out = Redactor({"age": "drop"}, KEY).apply({"age": [41, 52], "income": [1.5, 2.5]})
    assert out == {"income": [1.5, 2.5]}


def test_redactor_mask_replaces_every_value() -> None:
    out = Redactor({"employment": "mask"}, KEY).apply({"employment": ["salaried", "retired"], "age": [41, 52]})
    assert out == {"employment": ["***", "***"], "age": [41, 52]}


def test_redactor_hash_is_a_keyed_hmac_equal_for_equal_values() -> None:
    out = Redactor({"income": "hash"}, KEY).apply({"income": [58000.0, 58000.0, 61000.0, None]})
    first, same, other, missing = out["income"]
    assert first == same
    assert first != other
    assert first.startswith("hmac:")
    assert len(first) == len("hmac:") + 32
    assert missing is None
    assert "58000" not in first
    another_key = Redactor({"income": "hash"}, KEY + "-rotated").apply({"income": [58000.0]})
    assert another_key["income"][0] != first


def test_redactor_hash_without_a_key_drops_the_field() -> None:
    assert Redactor({"income": "hash"}, None).apply({"income": [58000.0], "age": [41]}) == {"age": [41]}


def test_redactor_leaves_unnamed_fields_alone() -> None:
    inputs = {"age": [41], "purpose": ["car"]}
    assert Redactor({}, KEY).apply(inputs) == inputs


@pytest.mark.parametrize("key", [KEY, None])
def test_redacted_raw_values_never_reach_the_file(tmp_path: Path, key: str | None) -> None:
    redactor = Redactor({"income": "hash", "employment": "mask", "age": "drop"}, key)
    raw = {"income": [73519.25, 88123.5], "employment": ["self_employed", "retired"], "age": [93, 94],
           "purpose": ["car", "medical"]}

    async def session() -> None:
        writer = AuditWriter(tmp_path, 10)
        await writer.start()
        await writer.submit({**record(0), "inputs": redactor.apply(raw)}, "block")
        await writer.close()

    run(session())
    data = b"".join(p.read_bytes() for p in audit_files(tmp_path))
    for secret in (b"73519.25", b"88123.5", b"self_employed", b"retired", b'"age"'):
        assert secret not in data
    assert b'"purpose":["car","medical"]' in data  # unredacted fields are kept
    assert verify(tmp_path).ok


# ------------------------------------------------------------------------------------------- the CLI


def gateway_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_exit_0_on_a_clean_chain(capsys: pytest.CaptureFixture[str], rotated: Path) -> None:
    code, out, _ = gateway_cli(capsys, "audit", "verify", rotated)
    assert code == 0
    assert "ok: 6 records in 3 files verified" in out


def test_cli_verify_exit_1_naming_the_bad_record(capsys: pytest.CaptureFixture[str], chain: Path) -> None:
    path = audit_files(chain)[0]
    lines = lines_of(path)
    lines[4] = lines[4].replace(b'"model":"m"', b'"model":"n"')
    write_lines(path, lines)
    code, out, _ = gateway_cli(capsys, "audit", "verify", chain)
    assert code == 1
    assert f"{path.name}:5: (seq 5) content does not match its hash (edited)" in out
    assert "BROKEN: 4 records in 1 files verified" in out


def test_cli_verify_prints_the_recovery_note(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_log(tmp_path, 2)
    path = audit_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-5])
    write_log(tmp_path, 1)
    code, out, _ = gateway_cli(capsys, "audit", "verify", tmp_path)
    assert code == 0
    assert f"note: {path.name}:2: torn last line, acknowledged" in out


def test_cli_verify_exit_2_for_a_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = gateway_cli(capsys, "audit", "verify", tmp_path / "nowhere")
    assert code == 2
    assert "is not a directory" in err
    assert out == ""


def test_cli_show_exit_2_for_a_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert gateway_cli(capsys, "audit", "show", tmp_path / "nowhere")[0] == 2


EPOCH_2024 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Records of two models, two versions and three kinds, an hour apart from 2024-01-01T00:00Z."""
    recs = [
        {"kind": "request", "model": "a", "version": "1", "request_id": "q0", "time": EPOCH_2024},
        {"kind": "request", "model": "a", "version": "2", "request_id": "q1", "time": EPOCH_2024 + 3600},
        {"kind": "request", "model": "b", "version": "1", "request_id": "q2", "time": EPOCH_2024 + 7200},
        {"kind": "shadow", "model": "a", "version": "2", "request_id": "q0", "time": EPOCH_2024 + 7200.5},
        {"kind": "control", "model": "a", "actor": "ops", "action": "switch", "time": EPOCH_2024 + 10800},
    ]

    async def session() -> None:
        writer = AuditWriter(tmp_path, 10)
        await writer.start()
        for rec in recs:
            await writer.submit(rec, "block")
        await writer.close()

    run(session())
    return tmp_path


def show(capsys: pytest.CaptureFixture[str], directory: Path, *filters: str) -> list[tuple[str, Any]]:
    code, out, _ = gateway_cli(capsys, "audit", "show", directory, *filters)
    assert code == 0
    shown = [json.loads(line) for line in out.splitlines()]
    for rec in shown:
        assert len(rec["hash"]) == 64
    return [(r["kind"], r.get("request_id")) for r in shown]


def test_cli_show_everything_in_order(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    assert show(capsys, mixed) == [("request", "q0"), ("request", "q1"), ("request", "q2"), ("shadow", "q0"),
                                   ("control", None)]


def test_cli_show_filters(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    assert show(capsys, mixed, "--request-id", "q0") == [("request", "q0"), ("shadow", "q0")]
    assert show(capsys, mixed, "--model", "b") == [("request", "q2")]
    assert show(capsys, mixed, "--model", "a", "--version", "2") == [("request", "q1"), ("shadow", "q0")]
    assert show(capsys, mixed, "--kind", "control") == [("control", None)]
    assert show(capsys, mixed, "--kind", "request", "--model", "a") == [("request", "q0"), ("request", "q1")]
    assert show(capsys, mixed, "--request-id", "nobody") == []


def test_cli_show_time_range_in_iso_and_epoch(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    middle = [("request", "q1"), ("request", "q2"), ("shadow", "q0")]
    assert show(capsys, mixed, "--since", "2024-01-01T01:00:00+00:00", "--until", "2024-01-01T03:00:00Z") == middle
    assert show(capsys, mixed, "--since", str(EPOCH_2024 + 3600), "--until", str(int(EPOCH_2024 + 10800))) == middle
    assert show(capsys, mixed, "--since", "2024-01-01T01:00:00") == [*middle, ("control", None)]  # naive: UTC
    assert show(capsys, mixed, "--until", "2024-01-01T01:00:00+00:00") == [("request", "q0")]  # exclusive
    assert show(capsys, mixed, "--since", "2024-01-01T02:00:00+01:00", "--until", "2024-01-01T02:00:00.5Z") == [
        ("request", "q1"), ("request", "q2")]


def test_cli_show_refuses_a_bad_time(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["audit", "show", str(mixed), "--since", "yesterday"])
    assert stopped.value.code == 2
    assert "not a time" in capsys.readouterr().err


def test_records_carry_numpy_values_as_plain_json() -> None:
    """The request path hands the writer raw arrays (strings from binary tensors, batch views)."""
    import numpy as np
    import orjson as json

    from gateway.audit import canonical

    wide = np.arange(6, dtype=np.float32).reshape(3, 2)
    record = {"inputs": {"purpose": np.array(["car", "home"], dtype=object), "age": [41, 52]},
              "outputs": {"probabilities": wide[:, 1], "label": np.array([0, 1], dtype=np.int64)[1:]},
              "score": np.float32(0.5)}
    assert json.loads(canonical(record)) == {
        "inputs": {"age": [41, 52], "purpose": ["car", "home"]},
        "outputs": {"label": [1], "probabilities": [1.0, 3.0, 5.0]}, "score": 0.5}

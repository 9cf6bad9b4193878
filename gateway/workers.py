"""Several uvicorn workers in one container: each claims a numbered slot that names its own files.

With several workers uvicorn's supervisor binds the listening socket itself, without naming the
protocol, and asyncio then leaves Nagle's algorithm on for accepted connections: on Linux every
keep-alive answer waited ~40 ms for the client's delayed ACK (p50 44 ms instead of 2 ms).
`NoDelayHttpToolsProtocol` turns it off per connection, as a single worker already has it.

A worker takes the first free slot by holding an exclusive `flock` on `<audit_dir>/.worker-<n>.lock`
(beside the chain it names) for its lifetime; the kernel releases the lock when the process ends,
however it ends, so a worker that uvicorn starts in place of a dead one takes the dead one's slot
and continues its audit chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import IO

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.locks import DirectoryBusy, hold

#: slots tried before giving up (a worker restarted while the old one still exits takes the next one)
MAX_SLOTS = 256


class WorkerSlot:
    """A claimed slot: its number, held until `release()` or the end of the process."""

    def __init__(self, number: int, handle: IO[bytes]) -> None:
        self.number = number
        self._handle = handle

    @property
    def name(self) -> str:
        """`worker-<n>`: the sub-directory of this worker's audit chain and event log."""
        return f"worker-{self.number}"

    def release(self) -> None:
        """Give the slot back (the next worker to start may take it)."""
        self._handle.close()


def claim_slot(directory: Path) -> WorkerSlot:
    """Take the lowest-numbered free worker slot of the audit directory `directory` (its chain is
    `directory/worker-<n>/`); OSError if none of MAX_SLOTS is free."""
    for number in range(MAX_SLOTS):
        try:
            return WorkerSlot(number, hold(directory, f".worker-{number}.lock", "slot taken"))
        except DirectoryBusy:
            continue
    raise OSError(f"no free worker slot in {directory} (all {MAX_SLOTS} are held)")


def hold_single_writer(directory: Path) -> IO[bytes]:
    """One gateway process writes the audit chain in `directory`: two would interleave and break it."""
    return hold(directory, ".writer.lock", "is written by another gateway process: give each its own "
                "GATEWAY_AUDIT_DIR, or run several workers with `gateway serve --workers N`")


def prepare_metrics_dir(directory: Path) -> IO[bytes]:
    """Lock the directory of Prometheus' multiprocess mode for this supervisor (DirectoryBusy while
    another one runs: its workers' files must not be removed under them), remove a previous run's
    metric files (only those: `*.db`), and name it in the environment the workers inherit; the client
    library reads the variable when it is first imported in each worker. Keep the handle open."""
    handle = hold(directory, ".supervisor.lock", "is the metrics directory of a running gateway: give "
                  "each its own GATEWAY_METRICS_DIR (or GATEWAY_STATE_DIR)")
    for entry in directory.glob("*.db"):
        if entry.is_file():
            entry.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory.resolve())
    return handle


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with TCP_NODELAY set on every accepted TCP connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Disable Nagle's algorithm, then hand the connection to uvicorn."""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # a connection already reset: uvicorn handles it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

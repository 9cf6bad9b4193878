"""Exclusive directory locks between gateway processes on one machine (`flock`: the kernel drops a
lock when its process ends, however it ends, so a crash never leaves a directory locked)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


class DirectoryBusy(OSError):
    """Another live gateway process holds a directory this one would write."""


def hold(directory: Path, name: str, busy: str) -> IO[bytes]:
    """An exclusive lock on `directory/name`, held until the returned handle is closed (or the process
    ends); DirectoryBusy with `busy` in its message when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / name, "ab")  # noqa: SIM115 - held for as long as the lock is
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DirectoryBusy(f"{directory} {busy}") from None
    return handle

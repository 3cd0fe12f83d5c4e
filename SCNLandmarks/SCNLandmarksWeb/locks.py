"""Exclusive locks on files shared by the station's session processes, never waited for: a session's
event loop must not stop while another process holds a lock."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def tryLock(handle: IO) -> bool:
    """Take an exclusive lock on an open file if no other open file holds it (in any process; it is
    released when `handle` closes, or by `unlock`). Returns whether it was taken."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)  # (the lock covers the file's first byte, where `unlock` releases it)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def unlock(handle: IO) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def lockIfFree(path: Path) -> Iterator[bool]:
    """Try to lock the file `path` (created empty if missing) for the block; yields whether it was
    taken (False: another session holds it now)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # (appending nothing: the file stays as it was)
        taken = tryLock(handle)
        try:
            yield taken
        finally:
            if taken:
                unlock(handle)


def isLocked(path: Path) -> bool:
    """Whether another open file holds the lock of `path` now (a missing file is not locked)."""
    if not path.is_file():
        return False
    with lockIfFree(path) as taken:
        return not taken

"""Writing files safely: atomic replacement (a reader sees the old file or the new one, never half of
one), and file names made from free text."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` if the block succeeds, else remove it.

    Args:
        suffix: the temporary file's suffix (writers that pick the format from it need the real one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates owner-only files; give the result the permissions any new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def safe_filename(text: str, fallback: str) -> str:
    """`text` as a portable file name stem: runs of other characters than letters, digits, '.', '_'
    and '-' become '_'; `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or fallback


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text (newlines as given) to `path` atomically."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)

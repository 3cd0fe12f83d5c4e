"""Corrections not exported yet, kept on the server so that closing a tab does not lose them.

A session writes them after every correction to its autosave folder (``<reviewer>/<session id>``,
outside its temporary folder, which goes when the session ends): the corrected points as a
``.mrk.json``, the image they belong to (an upload is linked there, since uploads go with the
session), the model that detected them, and the points the reviewer moved. The reviewer's next
session finds the folders of their other sessions and offers them back: download the points, or
restore the review (the image opened and detected again with the same model, the moved points put
back). Exporting the points (or discarding them) empties the folder. A session holds a lock on its
mark file (``.<session id>.live`` beside its folder) while it runs, so that the reviewer's other
sessions (a second tab) never offer, nor delete, the corrections of a session still open.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from SCNLandmarksLib.io.atomic import atomic_output
from SCNLandmarksLib.io.paths import format_suffix

from .locks import isLocked, tryLock

logger = logging.getLogger(__name__)

MANIFEST = "autosave.json"
LANDMARKS = "landmarks.mrk.json"
IMAGE = "image"


@dataclass(frozen=True)
class Recoverable:
    """The corrections another session of this reviewer left.

    Attributes:
        folder: its autosave folder.
        imageName: the image as the reviewer knows it (an upload's own file name).
        imagePath: the image file (kept in `folder` for uploads).
        modelPath: the model file that detected the points.
        movedRas: landmark index -> the RAS position the reviewer moved it to.
        savedAt: when the last correction was written (seconds since the epoch).
    """

    folder: Path
    imageName: str
    imagePath: Path
    modelPath: str
    movedRas: dict[int, tuple[float, float, float]]
    savedAt: float

    @property
    def landmarks(self) -> Path:
        """The corrected points, as the page's export writes them."""
        return self.folder / LANDMARKS

    @property
    def summary(self) -> str:
        points = f"{len(self.movedRas)} point{'s' if len(self.movedRas) != 1 else ''} moved"
        return f"{self.imageName}: {points}, last at {time.strftime('%H:%M', time.localtime(self.savedAt))}"


class Autosave:
    """One session's autosave folder, and the reviewer's others (its siblings).

    Args:
        folder: this session's folder (created on first write); None keeps nothing (no station).
        temporary: the session's temporary folder: images in it go with the session, so they are
            linked (or copied) into the autosave folder.
    """

    def __init__(self, folder: Path | None, temporary: Path):
        self.folder = folder
        self.temporary = temporary.resolve()
        self.liveMark: IO[str] | None = None
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            self.liveMark = open(_liveMark(folder), "a")  # locked until `close` (or the process ends)
            tryLock(self.liveMark)  # (free: the session's id is new)

    def close(self) -> None:
        """The session ends: its corrections may be offered to the reviewer's next sessions."""
        if self.liveMark is not None:
            self.liveMark.close()
            self.liveMark = None
            if self.folder is not None:
                _liveMark(self.folder).unlink(missing_ok=True)

    def write(
        self,
        imagePath: Path,
        imageName: str,
        modelPath: str,
        movedRas: dict[int, tuple[float, float, float]],
        writeLandmarks: Callable[[Path], None],
    ) -> None:
        """Keep the current corrections (replacing what was kept before).

        Raises:
            OSError: the folder cannot be written (the caller logs it; the session goes on).
        """
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        imagePath = Path(imagePath).resolve()
        if imagePath.is_relative_to(self.temporary):
            kept = self.folder / (IMAGE + format_suffix(imagePath))
            try:
                if not kept.exists():
                    os.link(imagePath, kept)  # both under the station's folder: no copy, nothing to wait for
                imagePath = kept
            except OSError as error:  # no hard links here: the points can still be downloaded
                logger.warning("%s: the upload is not kept for a restore (%s)", imagePath, error)
        with atomic_output(self.folder / LANDMARKS, ".mrk.json") as temporary:
            writeLandmarks(temporary)
        manifest = {
            "image_name": imageName,
            "image": str(imagePath),
            "model": modelPath,
            "moved_ras": {str(index): list(position) for index, position in movedRas.items()},
            "saved_at": time.time(),
        }
        with atomic_output(self.folder / MANIFEST, ".json") as temporary:
            temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    def clear(self) -> None:
        """Nothing left to keep (exported, discarded, or replaced by a new detection)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def others(self) -> list[Recoverable]:
        """What the reviewer's other sessions kept, the latest first (unreadable folders are skipped)."""
        if self.folder is None or not self.folder.parent.is_dir():
            return []
        found = []
        for folder in self.folder.parent.iterdir():
            if folder == self.folder or not (folder / MANIFEST).is_file() or isLocked(_liveMark(folder)):
                continue
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
                found.append(
                    Recoverable(
                        folder,
                        str(manifest["image_name"]),
                        Path(manifest["image"]),
                        str(manifest["model"]),
                        {int(i): tuple(map(float, p)) for i, p in manifest["moved_ras"].items()},
                        float(manifest["saved_at"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning("%s: not a readable autosave (%s)", folder, error)
        return sorted(found, key=lambda kept: -kept.savedAt)

    @staticmethod
    def forget(kept: Recoverable) -> None:
        """Remove what an ended session kept (restored, or discarded by the reviewer)."""
        shutil.rmtree(kept.folder, ignore_errors=True)
        _liveMark(kept.folder).unlink(missing_ok=True)


def _liveMark(folder: Path) -> Path:
    """The file a running session keeps locked (see the module docstring)."""
    return folder.parent / f".{folder.name}.live"

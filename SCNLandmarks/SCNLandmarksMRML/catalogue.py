"""The model catalogue (`Resources/Models/models.json`) and model downloads.

The catalogue is a JSON list of models (or ``{"models": [...]}``); each entry names a model file
relative to the catalogue, or a download URL with its SHA-256::

    [{"name": "Hand X-ray (37 landmarks)", "file": "hand_xray.safetensors",
      "url": "https://.../hand_xray.safetensors", "sha256": "...",
      "dimension": 2, "description": "..."}]

It is looked for in the module's Resources (installed extension) and in the source tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from SCNLandmarksLib.errors import Cancelled, ModelFileError

logger = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]
CATALOGUE_LOCATIONS = (
    MODULE_DIR / "Resources" / "Models" / "models.json",       # installed extension
    MODULE_DIR.parent / "Resources" / "Models" / "models.json",  # source tree
)


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue model.

    Attributes:
        name: shown in the model selector.
        path: local model file (may not exist yet when a URL is given).
        url: download address, or "".
        sha256: expected checksum of the download, or "".
        dimension: 2 or 3 when the catalogue says, else None.
        description: free text.
        sample: an image to try the model on (self-test), or None.
        sampleLandmarks: its true landmarks (.mrk.json, .fcsv, .csv), or None.
        toleranceMm: the largest median error the self-test accepts on the sample, or None.
    """

    name: str
    path: Path | None
    url: str = ""
    sha256: str = ""
    dimension: int | None = None
    description: str = ""
    sample: Path | None = None
    sampleLandmarks: Path | None = None
    toleranceMm: float | None = None

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_file()


def readCatalogue(path: Path) -> list[ModelEntry]:
    """The entries of one catalogue file; unreadable entries are skipped with a warning."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("%s: cannot read the model catalogue (%s)", path, error)
        return []
    items = data.get("models", []) if isinstance(data, dict) else data
    entries = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        fileName = item.get("file") or item.get("path")
        url = str(item.get("url", ""))
        if not fileName and url:
            fileName = url.rstrip("/").rsplit("/", 1)[-1]
        name = str(item.get("name") or item.get("title") or fileName or "")
        if not name or not fileName:
            logger.warning("%s: skipping a catalogue entry without name/file: %s", path, item)
            continue
        filePath = Path(fileName)
        if not filePath.is_absolute():
            filePath = Path(path).parent / filePath
        dimension = item.get("dimension")

        def local(key: str) -> Path | None:
            value = item.get(key)
            return None if not value else (Path(value) if Path(value).is_absolute() else Path(path).parent / value)

        tolerance = item.get("tolerance_mm")
        entries.append(ModelEntry(name, filePath, url, str(item.get("sha256", "")),
                                  int(dimension) if dimension in (2, 3) else None,
                                  str(item.get("description", "")), local("sample"), local("sample_landmarks"),
                                  float(tolerance) if isinstance(tolerance, (int, float)) else None))
    return entries


def availableModels(locations=CATALOGUE_LOCATIONS) -> list[ModelEntry]:
    """Catalogue models, from the first catalogue file found (installed first, then source tree)."""
    for location in locations:
        if Path(location).is_file():
            return readCatalogue(Path(location))
    return []


def _safeName(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def downloadModel(entry: ModelEntry, folder: Path | None = None,
                  progress: Callable[[float, str], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> Path:
    """Download a catalogue model (call only after the user agreed), checking its SHA-256.

    Args:
        entry: catalogue entry with a URL.
        folder: where to save; default the entry's own path (falls back to the user's cache
            folder when that is not writable).
        progress: called with (fraction, message).
        cancel: polled between chunks; True stops and removes the partial file.

    Returns:
        The downloaded model file.

    Raises:
        ModelFileError: no URL, download failure or checksum mismatch; Cancelled when cancelled.
    """
    if not entry.url:
        raise ModelFileError(f"'{entry.name}': no download address in the catalogue")
    target = (Path(folder) / _safeName(entry.path.name if entry.path else entry.name)) if folder else entry.path
    if target is None or not os.access(target.parent if target.parent.exists() else target.parent.parent, os.W_OK):
        target = Path.home() / ".cache" / "SCNLandmarks" / _safeName(entry.path.name if entry.path else entry.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as output, urllib.request.urlopen(entry.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while True:
                if cancel is not None and cancel():
                    raise Cancelled(f"download of '{entry.name}' cancelled")
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                output.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done / total if total else 0.0, f"downloading {entry.name}: {done >> 20} MB")
        if entry.sha256 and digest.hexdigest().lower() != entry.sha256.lower():
            raise ModelFileError(f"'{entry.name}': the download from {entry.url} is corrupt "
                                 f"(SHA-256 {digest.hexdigest()}, expected {entry.sha256})")
        os.replace(temporary, target)
    except OSError as error:
        raise ModelFileError(f"'{entry.name}': download from {entry.url} failed ({error})") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target

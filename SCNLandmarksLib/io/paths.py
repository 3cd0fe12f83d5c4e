"""File names derived from inputs: an image's stem, distinct output names, and never replacing a file.

Every writer that names an output after an input image goes through `image_stem` (or
`output_stems` for many inputs), so two inputs never silently share an output file.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from SCNLandmarksLib.errors import DataError

# Suffixes made of two parts that name one format: stripping only the last part would leave a
# stem such as "brain.nii".
COMPOUND_SUFFIXES = (".nii.gz", ".mrk.json", ".seg.nrrd", ".seg.nii.gz", ".tar.gz")


def format_suffix(path: str | os.PathLike) -> str:
    """The lower-case suffix that names the file's format: '.nii.gz', '.mrk.json', '.png', '' for none.

    Only the last dot (or a known two-part suffix) counts: 'scan.v1.png' has the suffix '.png'.
    Folders (e.g. a DICOM series) have no format suffix.
    """
    path = Path(path)
    if path.is_dir():
        return ""
    name = path.name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return path.suffix.lower()


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its format suffix; other dots are kept.

    'scan.v1.png' -> 'scan.v1', 'brain.nii.gz' -> 'brain', 'case.mrk.json' -> 'case'; a folder
    (a DICOM series) keeps its whole name.
    """
    path = Path(path)
    suffix = format_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One distinct output stem per input, in input order.

    Each input gets its `image_stem`. Inputs whose stems coincide (compared without case, as on
    case-insensitive file systems) get their whole file name instead ('scan.png', 'scan.nii.gz'),
    and where that still coincides, the folders above it joined by '_' ('a_scan.png', 'b_scan.png').

    Raises:
        DataError: the same file is given twice, so no name can tell its results apart.
    """
    inputs = [Path(p) for p in paths]
    candidates = [_stem_candidates(path) for path in inputs]
    level = [0] * len(inputs)
    while True:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, names in enumerate(candidates):
            groups[names[level[i]].casefold()].append(i)
        clashes = [members for members in groups.values() if len(members) > 1]
        if not clashes:
            return [names[level[i]] for i, names in enumerate(candidates)]
        for members in clashes:
            for i in members:
                if level[i] + 1 == len(candidates[i]):
                    others = [str(inputs[j]) for j in members if j != i]
                    raise DataError(
                        f"{inputs[i]}: given more than once (also as {', '.join(others)}); "
                        "its results would overwrite each other"
                    )
                level[i] += 1


def _stem_candidates(path: Path) -> list[str]:
    """Ever more specific output stems for `path`: its stem, its name, then with parent folders."""
    parts = path.resolve().parts
    candidates = [image_stem(path), path.name]
    candidates += ["_".join(p for p in parts[-k:] if p != os.sep) for k in range(2, len(parts) + 1)]
    return candidates


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool = False, option: str = "--overwrite") -> None:
    """Check, before anything is written, that no output would replace an existing file.

    Args:
        paths: the files about to be written.
        overwrite: True when the user asked for existing files to be replaced.
        option: how the user asks for that, named in the message.

    Raises:
        DataError: listing every existing file, unless `overwrite`.
    """
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise DataError(f"would replace existing file(s) {shown}; nothing was written (give {option} to replace them)")

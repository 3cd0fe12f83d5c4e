"""Build a dataset spec from a folder of images and their landmark files (``scn-landmarks dataset init``),
or from several specs (``scn-landmarks dataset merge``).

Images pair with per-image landmark files, or with the rows of one landmark table, by file stem
(`image_stem`: "001.png" pairs with "001.mrk.json", "001.json", "001.txt" or a table row "001"/"001.png").
The spec is checked by loading every paired image's landmarks through the loader training uses before
it is written; an existing spec is replaced only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..geometry import ImageGeometry
from ..io.atomic import atomic_output
from ..io.images import carries_spacing, checked_spacing, image_inputs, read_image
from ..io.landmark_formats import (
    LANDMARK_INPUT_FORMATS,
    PER_IMAGE_FORMATS,
    PER_IMAGE_SUFFIXES,
    PIXEL_FORMATS,
    TABLE_FORMATS,
    detect_format,
    read_landmark_file,
    read_landmark_table,
)
from ..io.landmarks import write_landmarks_csv
from ..io.paths import image_stem, refuse_existing
from ..landmark_set import LandmarkSet
from .spec import DatasetSpec, ImageEntry, load_dataset_spec

# How many unpaired names the summary lists before "...".
_LISTED = 10


@dataclass
class DatasetInitSummary:
    """What `init_dataset` found and wrote."""

    spec: Path
    images: list[Path]
    landmarks_format: str
    landmark_names: list[str]
    paired: dict[str, tuple[Path, str]] = field(default_factory=dict)  # id -> (image, landmarks source)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_landmarks: list[str] = field(default_factory=list)  # files, or table rows
    csv_coordinates: str | None = None
    points_present: int = 0
    points_missing: int = 0
    spacing: tuple[float, ...] | None = None  # stated for the pictures, mm per pixel

    def lines(self) -> list[str]:
        """The summary as printed by ``dataset init``."""

        def listed(items: list) -> str:
            shown = ", ".join(str(item) for item in items[:_LISTED])
            return f": {shown}{', ...' if len(items) > _LISTED else ''}" if items else ""

        table = self.csv_coordinates is not None
        lines = [
            f"images found: {len(self.images)}",
            f"paired: {len(self.paired)} (landmark format {self.landmarks_format}"
            + (f", {self.csv_coordinates} coordinates" if table else "")
            + ")",
            f"unpaired images: {len(self.unpaired_images)}{listed([p.name for p in self.unpaired_images])}",
            f"unpaired {'table rows' if table else 'landmark files'}: {len(self.unpaired_landmarks)}"
            f"{listed(self.unpaired_landmarks)}",
            f"landmark names ({len(self.landmark_names)}): {', '.join(self.landmark_names)}",
            f"landmark points: {self.points_present} present, {self.points_missing} missing",
            *([f"pictures in mm: {' x '.join(map(str, self.spacing))} mm per pixel"] if self.spacing else []),
            f"wrote {self.spec} (no splits yet: give each image a split, or add a [splits] table)",
        ]
        return lines


def read_names_file(path: str | os.PathLike) -> list[str]:
    """Landmark names, one a line (blank lines ignored); duplicates are a DataError naming the file."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the landmark names ({error})") from None
    if not names:
        raise DataError(f"{path}: no landmark names (one name a line)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: landmark name(s) {duplicates} occur more than once")
    return names


def _by_stem(folder: Path, paths: list[Path], what: str) -> dict[str, Path]:
    """{stem: path}; two paths with one stem could not be paired, which is a DataError naming both."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        stem = image_stem(path)
        if stem in by_stem:
            raise DataError(
                f"{folder}: {what} {by_stem[stem].name} and {path.name} have the same stem '{stem}'; "
                "pairing by stem could not tell them apart"
            )
        by_stem[stem] = path
    return by_stem


def _images_by_stem(images_dir: Path) -> dict[str, Path]:
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: not a folder of images")
    return _by_stem(images_dir, image_inputs([images_dir]), "images")


def _landmark_files_by_stem(folder: Path, landmarks_format: str, image_paths: set[Path]) -> dict[str, Path]:
    """{stem: file} of the files in `folder` with a suffix of a per-image landmark format."""
    if landmarks_format not in ("auto", *PER_IMAGE_FORMATS):
        raise DataError(
            f"{folder}: a folder holds one landmark file per image; '{landmarks_format}' is a "
            f"table format (give the table file instead)"
        )
    kinds = PER_IMAGE_FORMATS if landmarks_format == "auto" else (landmarks_format,)
    suffixes = tuple(suffix for kind in kinds for suffix in PER_IMAGE_SUFFIXES[kind])
    files = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file() and path not in image_paths and path.name.lower().endswith(suffixes)
    ]
    return _by_stem(folder, files, "landmark files")


def init_dataset(
    images: str | os.PathLike,
    landmarks: str | os.PathLike,
    out: str | os.PathLike,
    landmarks_format: str = "auto",
    names: list[str] | None = None,
    csv_coordinates: str | None = None,
    overwrite: bool = False,
    spacing: Sequence[float] | None = None,
) -> DatasetInitSummary:
    """Write a dataset spec pairing the images of a folder with their landmarks by file stem.

    Args:
        images: folder of images (files with image suffixes; other files are ignored).
        landmarks: a folder of per-image landmark files (may be the images folder), or one table file
            (``csv`` image,landmark,x,y or ``wide-csv`` id,x_0,y_0,...).
        out: the spec (.toml) to write.
        landmarks_format: "auto" or one of `LANDMARK_INPUT_FORMATS`.
        names: landmark names in model order; None takes them from the files (in order of first
            appearance; positional formats name points "0", "1", ...).
        csv_coordinates: a table's coordinates, "index" or "physical"; None: "index" for ``wide-csv``
            (its published convention), "physical" for ``csv`` (what `write_landmarks_csv` writes).
        overwrite: replace an existing `out`.
        spacing: mm per pixel (x, y[, z]) of the pictures (PNG, JPEG, BMP, TIFF), written as the spec's
            `spacing`; their positions, and landmarks in pixel coordinates, are then in mm.

    Returns:
        The summary: images found, pairs, what did not pair, landmark names.

    Raises:
        DataError: `out` exists (without `overwrite`), nothing pairs, two files share a stem, or a
            landmark file cannot be read (names the file), or `spacing` is not the images'
            dimension or no image is a picture; nothing is written then.
    """
    images_dir, source, out = Path(images), Path(landmarks), Path(out)
    if landmarks_format not in ("auto", *LANDMARK_INPUT_FORMATS):
        raise DataError(f"unknown landmark format '{landmarks_format}' (auto, {', '.join(LANDMARK_INPUT_FORMATS)})")
    refuse_existing([out], overwrite)
    if not source.exists():
        raise DataError(f"{source}: landmark file or folder not found")
    by_stem = _images_by_stem(images_dir)
    dimension = read_image(next(iter(by_stem.values()))).GetDimension()
    stated = None if spacing is None else checked_spacing(spacing, str(images_dir), dimension)
    if stated is not None and all(carries_spacing(image) for image in by_stem.values()):
        raise DataError(f"{images_dir}: a spacing is for pictures without one, and every image carries its own")
    geometries: dict[str, ImageGeometry] = {}

    def geometry(image_id: str, image: Path) -> ImageGeometry:
        if image_id not in geometries:
            own = None if carries_spacing(image) else stated
            geometries[image_id] = ImageGeometry.of(read_image(image, dimension, own))
        return geometries[image_id]

    table = source if source.is_file() else None
    found_sets: list[LandmarkSet] = []
    entries: list[tuple[str, Path, Path | None]] = []
    summary = DatasetInitSummary(out, list(by_stem.values()), landmarks_format, [], spacing=stated)
    if table is not None:
        kind = detect_format(table, table=True) if landmarks_format == "auto" else landmarks_format
        if kind not in TABLE_FORMATS:
            raise DataError(
                f"{table}: a single landmark file must be a table ({', '.join(TABLE_FORMATS)}), not '{kind}'"
            )
        summary.landmarks_format = kind
        summary.csv_coordinates = csv_coordinates or ("index" if kind == "wide-csv" else "physical")
        # Keys and names only: physical reading needs no geometry.
        rows = read_landmark_table(table, kind, "physical", None, names, dimension)
        for key, landmark_set in rows.items():
            # A row names its image by stem ("scan.v1") or by file name ("scan.v1.png").
            image = by_stem.get(key) or by_stem.get(image_stem(key))
            if image is None:
                summary.unpaired_landmarks.append(key)
                continue
            entries.append((key, image, None))
            found_sets.append(landmark_set)
    else:
        if csv_coordinates is not None:
            raise DataError(f"{source}: csv_coordinates applies to a landmark table, not to a folder")
        files = _landmark_files_by_stem(source, landmarks_format, set(by_stem.values()))
        summary.unpaired_landmarks = [path.name for stem, path in files.items() if stem not in by_stem]
        kinds = set()
        for stem, image in by_stem.items():
            if stem in files:
                path = files[stem]
                kind = detect_format(path) if landmarks_format == "auto" else landmarks_format
                kinds.add(kind)
                pixel_geometry = geometry(stem, image) if kind in PIXEL_FORMATS else None
                found_sets.append(read_landmark_file(path, kind, names, dimension, pixel_geometry))
                entries.append((stem, image, path))
        summary.landmarks_format = kinds.pop() if len(kinds) == 1 else "auto"
    paired_images = {image for _, image, _ in entries}
    summary.unpaired_images = [image for image in by_stem.values() if image not in paired_images]
    if not entries:
        raise DataError(
            f"{source}: no landmarks pair with the {len(by_stem)} images in {images_dir} by file "
            f"stem (images: {', '.join(list(by_stem)[:3])}; landmarks: "
            f"{', '.join(summary.unpaired_landmarks[:3]) or 'none found'})"
        )
    if names is None:
        names = list(dict.fromkeys(name for landmark_set in found_sets for name in landmark_set.names))
    summary.landmark_names = names

    # Checked with the loader training uses before it replaces anything.
    with atomic_output(out, ".toml") as temporary:
        DatasetSpec(
            temporary,
            dimension,
            tuple(names),
            tuple(ImageEntry(image_id, image, landmarks, None) for image_id, image, landmarks in entries),
            table,
            summary.csv_coordinates or "physical",
            summary.landmarks_format,
            stated,
        ).write("Written by scn-landmarks dataset init.")
        spec = load_dataset_spec(temporary)
        loaded = spec.load_landmarks(list(spec.entries), geometries)
    summary.paired = {image_id: (image, str(landmarks or table)) for image_id, image, landmarks in entries}
    summary.points_present = sum(int(s.present.sum()) for s in loaded.values())
    summary.points_missing = sum(int((~s.present).sum()) for s in loaded.values())
    return summary


def merge_datasets(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
) -> DatasetSpec:
    """Write one dataset spec holding the images of several (e.g. one per X-ray device).

    Each image keeps its file, its stated spacing and its split; its id becomes "LABEL-ID" (ids of
    different sources may repeat); the landmarks of all go into one table beside the spec
    (``OUT_STEM_landmarks.csv``, physical coordinates, as each source's loader read them).

    Args:
        labels: one per source (default: the name of each source spec's folder).

    Raises:
        DataError: fewer than two sources, labels that repeat or do not match the sources, sources
            of different dimension, landmark names or unit (pixels and mm cannot share one model),
            or `out` or its table exist (without `overwrite`); nothing is written then.
    """
    if len(sources) < 2:
        raise DataError("merging needs at least two dataset specs")
    specs = [load_dataset_spec(Path(source)) for source in sources]
    labels = list(labels) if labels is not None else [spec.path.parent.name for spec in specs]
    if len(labels) != len(specs) or len(set(labels)) != len(labels) or not all(labels):
        raise DataError(f"the sources need distinct, non-empty labels, one each: got {labels} (give --labels)")
    first = specs[0]
    for spec in specs[1:]:
        if spec.dimension != first.dimension or set(spec.landmark_names) != set(first.landmark_names):
            raise DataError(
                f"{spec.path}: its images are {spec.dimension}D with landmarks {list(spec.landmark_names)}; "
                f"{first.path} has {first.dimension}D with {list(first.landmark_names)}: they cannot train one model"
            )
    units = {spec.path: sorted({entry.unit for entry in spec.entries}) for spec in specs}
    if len({unit for spec_units in units.values() for unit in spec_units}) > 1:
        described = ", ".join(f"{path}: {' and '.join(spec_units)}" for path, spec_units in units.items())
        raise DataError(
            f"the sources' positions are in different units ({described}); state the "
            "pictures' spacing in every source, or in none (then training finds their size from the anatomy)"
        )
    out = Path(out).resolve()
    table = out.parent / f"{out.stem}_landmarks.csv"
    refuse_existing([out, table], overwrite)
    entries, landmark_sets = [], {}
    for label, spec in zip(labels, specs):
        landmarks = spec.load_landmarks(list(spec.entries))
        for entry in spec.entries:
            merged_id = f"{label}-{entry.id}"
            entries.append(ImageEntry(merged_id, entry.image, None, entry.split, entry.spacing))
            landmark_sets[merged_id] = landmarks[entry.id].reordered(list(first.landmark_names))
    merged = DatasetSpec(out, first.dimension, first.landmark_names, tuple(entries), table, "physical")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_landmarks_csv(table, landmark_sets)
    merged.write(f"The images of {', '.join(str(spec.path) for spec in specs)} (ids prefixed by {', '.join(labels)}).")
    return merged

"""Landmark formats that datasets are published in, and the choice of reader for any landmark file.

Formats (the names `LANDMARK_INPUT_FORMATS` lists, used by dataset specs and ``dataset init``):

* ``mrk.json``, ``fcsv``, ``csv``: the library's own formats (see `SCNLandmarksLib.io.landmarks`);
  ``csv`` is a one-image table ``landmark,x,y`` or a many-image table ``image,landmark,x,y``.
* ``labelme``: LabelMe JSON, one file per image, ``point`` shapes named by their label (`read_labelme`).
* ``isbi``: ISBI 2015 cephalometric challenge text files, one per image, one ``x,y`` line per
  landmark in pixels (`read_isbi`).
* ``wide-csv``: one row per image, ``id,x_0,y_0,x_1,y_1,...``, with or without a header row
  (`read_wide_csv`); the hand X-ray set is published this way.

Files without names for their points (``isbi``, ``wide-csv``) are positional: point i is the i-th
landmark name given, or is named "i" (0-based, as in the ``x_0`` columns) when no names are given.

"auto" detects a file's format: ``.mrk.json``, ``.fcsv``, ``.txt`` (isbi) by suffix; ``.json`` by content
(a ``markups`` list: Slicer, a ``shapes`` list: LabelMe); a ``.csv`` table by its first row (a
``landmark``/``landmark_name`` column: ``csv``, otherwise ``wide-csv``).

Every reader returns physical LPS points; an infinite coordinate is a DataError naming file, line and
landmark, while an empty or ``nan`` coordinate means a missing landmark.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.io.landmarks import (
    _make_set,
    _parse_float,
    _read_text,
    json_key_line,
    read_landmarks,
    read_landmarks_csv,
    table_index_to_physical,
)
from SCNLandmarksLib.landmark_set import LandmarkSet

logger = logging.getLogger(__name__)

LANDMARK_INPUT_FORMATS = ("mrk.json", "fcsv", "csv", "labelme", "isbi", "wide-csv")
# Formats of one file per image, and formats of one table for many images ("csv" is both).
PER_IMAGE_FORMATS = ("mrk.json", "fcsv", "csv", "labelme", "isbi")
TABLE_FORMATS = ("csv", "wide-csv")
# Per-image formats in pixels: reading them needs the image's geometry.
PIXEL_FORMATS = ("labelme", "isbi")
# File name endings of each per-image format, for finding landmark files in a folder.
PER_IMAGE_SUFFIXES = {
    "mrk.json": (".mrk.json", ".json"),
    "fcsv": (".fcsv",),
    "csv": (".csv",),
    "labelme": (".json",),
    "isbi": (".txt",),
}

# LabelMe puts (0, 0) at the top-left corner of the top-left pixel, whose center (ITK index 0) is
# therefore at (0.5, 0.5).
LABELME_PIXEL_CENTRE = 0.5


def _positional_names(count: int, names: list[str] | None, path: Path, what: str) -> list[str]:
    """The names of `count` positional points: `names` (which must have `count` entries) or "0".."count-1"."""
    if names is None:
        return [str(i) for i in range(count)]
    if count != len(names):
        raise DataError(f"{path}: {what} holds {count} points but {len(names)} landmark names are expected")
    return list(names)


def _check_pixel_geometry(path: Path, geometry: ImageGeometry | None, what: str) -> ImageGeometry:
    if geometry is None:
        raise ValueError(f"{path}: a {what} file holds pixel positions; its image's geometry is needed")
    if geometry.dimension != 2:
        raise DataError(f"{path}: a {what} file holds 2D points but its image is {geometry.dimension}D")
    return geometry


# ----------------------------------------------------------------------------------------------------
# format detection


def _json_document(path: Path) -> tuple[str, object]:
    text = _read_text(path)
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None


def _first_csv_row(path: Path) -> list[str]:
    for row in csv.reader(io.StringIO(_read_text(path))):
        if any(cell.strip() for cell in row):
            return [cell.strip().lower() for cell in row]
    raise DataError(f"{path}: empty CSV file")


def detect_format(path: str | os.PathLike, table: bool = False) -> str:
    """The format of a landmark file, one of `LANDMARK_INPUT_FORMATS`, from its suffix and content.

    Args:
        path: the landmark file.
        table: True for a file holding many images' landmarks (``csv`` or ``wide-csv``), False for a
            file of one image.

    Raises:
        DataError: unreadable file, or a suffix/content no reader knows (names the file).
    """
    path = Path(path)
    name = path.name.lower()
    if table:
        if not name.endswith(".csv"):
            raise DataError(f"{path}: a landmark table must be a .csv file ({', '.join(TABLE_FORMATS)})")
        header = _first_csv_row(path)
        return "csv" if "landmark" in header or "landmark_name" in header else "wide-csv"
    if name.endswith(".mrk.json"):
        return "mrk.json"
    if name.endswith(".json"):
        document = _json_document(path)[1]
        if isinstance(document, dict) and "markups" in document:
            return "mrk.json"
        if isinstance(document, dict) and "shapes" in document:
            return "labelme"
        raise DataError(f"{path}: a JSON file that is neither Slicer markups (no 'markups') nor LabelMe (no 'shapes')")
    for kind in ("fcsv", "csv", "isbi"):
        if any(name.endswith(suffix) for suffix in PER_IMAGE_SUFFIXES[kind]):
            return kind
    raise DataError(f"{path}: unsupported landmark file type (expected .mrk.json, .json, .fcsv, .csv or .txt)")


# ----------------------------------------------------------------------------------------------------
# LabelMe JSON


def read_labelme(
    path: str | os.PathLike, geometry: ImageGeometry | None, names: list[str] | None = None
) -> LandmarkSet:
    """Read the ``point`` shapes of a LabelMe JSON file as one image's landmarks.

    Coordinate convention: LabelMe stores (x = column, y = row) in pixels with (0, 0) at the top-left
    *corner* of the image, so a pixel center sits at +0.5; the ITK continuous index is (x - 0.5, y - 0.5),
    which the image geometry maps to physical LPS. Other shapes (polygons, boxes) are ignored (logged).

    Args:
        path: the LabelMe .json file.
        geometry: geometry of the (2D) image the points were placed on.
        names: landmark names (result order; absent ones missing); None keeps the file's order.

    Returns:
        LandmarkSet with (N, 2) physical LPS points.

    Raises:
        DataError: malformed file, an infinite coordinate, duplicate or empty labels, a label not in
            `names`, an image size other than the geometry's, or a 3D image; the message names the file.
    """
    path = Path(path)
    geometry = _check_pixel_geometry(path, geometry, "LabelMe")
    text, document = _json_document(path)
    shapes = document.get("shapes") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(shapes, list):
        raise DataError(f"{path}: not a LabelMe file (no 'shapes' list)")
    size = (document.get("imageWidth"), document.get("imageHeight"))
    if None not in size and tuple(size) != geometry.size:
        raise DataError(
            f"{path}: the annotations are for an image of {size[0]} x {size[1]} pixels, but the "
            f"image is {geometry.size[0]} x {geometry.size[1]}"
        )
    labels: list[str] = []
    indices: list[list[float]] = []
    others = 0
    for number, shape in enumerate(shapes):
        if not isinstance(shape, dict) or shape.get("shape_type", "point") != "point":
            others += 1
            continue
        label = str(shape.get("label", ""))
        try:
            point = [float(v) for v in np.asarray(shape.get("points"), dtype=np.float64).reshape(2)]
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: point '{label}' has points {shape.get('points')!r}; expected one [x, y] pair"
            ) from None
        if any(math.isinf(v) for v in point):
            line = json_key_line(text, "points", number)
            raise DataError(
                f"{path}{'' if line is None else f', line {line}'}: point '{label}' has the infinite position {point}"
            )
        labels.append(label)
        indices.append(point)
    if others:
        logger.info("%s: ignoring %d shapes that are not points", path, others)
    index = np.asarray(indices, dtype=np.float64).reshape(-1, 2) - LABELME_PIXEL_CENTRE
    return _make_set(path, labels, geometry.index_to_physical(index), names, None)


# ----------------------------------------------------------------------------------------------------
# ISBI 2015 cephalometric text files


def read_isbi(path: str | os.PathLike, geometry: ImageGeometry | None, names: list[str] | None = None) -> LandmarkSet:
    """Read an ISBI 2015 cephalometric challenge annotation file: one ``x,y`` line per landmark.

    Coordinate convention: (x = column, y = row) pixel positions with the center of the top-left pixel
    at (0, 0), i.e. the ITK continuous index, which the image geometry maps to physical LPS. The
    points are the leading ``x,y`` lines; what follows them (the challenge files end with the image's
    classification labels, one number a line) is ignored. An empty or ``nan`` value marks a missing
    landmark.

    Args:
        path: the .txt file.
        geometry: geometry of the (2D) image.
        names: the landmark names in file order (the file has none); None names them "0", "1", ...

    Returns:
        LandmarkSet with (N, 2) physical LPS points in the order of `names`.

    Raises:
        DataError: a malformed number, an infinite coordinate, no points, or a point count other than
            the number of names; the message names the file (and line and landmark).
    """
    path = Path(path)
    geometry = _check_pixel_geometry(path, geometry, "ISBI")
    rows: list[tuple[int, list[str]]] = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.replace(" ", "").split(",") if line.strip() else []
        if len(fields) != 2:
            if rows:
                break
            if fields:
                raise DataError(f"{path}, line {line_number}: expected 'x,y', got '{line.strip()}'")
            continue
        rows.append((line_number, fields))
    if not rows:
        raise DataError(f"{path}: no 'x,y' lines")
    labels = _positional_names(len(rows), names, path, "the file")
    index = np.array(
        [
            [_parse_float(value, path, line, axis, label) for value, axis in zip(fields, "xy")]
            for (line, fields), label in zip(rows, labels)
        ]
    )
    return LandmarkSet(labels, geometry.index_to_physical(index))


# ----------------------------------------------------------------------------------------------------
# wide CSV tables


def _is_number_or_blank(cell: str) -> bool:
    try:
        float(cell or "nan")
        return True
    except ValueError:
        return False


def _wide_header(path: Path, header: list[str], dimension: int | None) -> tuple[int, list[str]]:
    """Dimension and point names of a header ``id,x_<name>,y_<name>[,z_<name>],...``."""
    axes = "xyz"[: 3 if any(column.lower().startswith("z_") for column in header[1:]) else 2]
    if dimension is not None and dimension != len(axes):
        raise DataError(f"{path}: the header has {len(axes)}D columns but the landmarks must be {dimension}D")
    columns = header[1:]
    names = [column[2:] for column in columns[:: len(axes)]]
    expected = [f"{axis}_{name}" for name in names for axis in axes]
    if [c.lower() for c in columns] != [c.lower() for c in expected]:
        raise DataError(
            f"{path}: the header {header} is not 'id' followed by {', '.join(a + '_<n>' for a in axes)}"
            " columns for each landmark"
        )
    return len(axes), names


def read_wide_csv(
    path: str | os.PathLike,
    coordinates: str = "index",
    geometries: dict[str, ImageGeometry] | None = None,
    names: list[str] | None = None,
    dimension: int | None = None,
    images: Iterable[str] | None = None,
) -> dict[str, LandmarkSet]:
    """Read a table with one row per image: ``id,x_0,y_0,x_1,y_1,...`` (or ``x,y,z`` triples).

    A header row is optional: it is recognised by a non-numeric coordinate cell and names the points by
    the ``x_<name>`` suffixes; without one the table is 2D unless `dimension` is 3. Empty or ``nan``
    cells mean a missing landmark.

    Coordinate convention: "index" (the published convention, e.g. the hand X-ray set): continuous pixel
    indices, x = column, y = row[, z = slice], the center of the first pixel at 0, mapped to physical LPS
    by each image's geometry; "physical": LPS mm (px for pixel-unit images) as they are.

    Args:
        path: the .csv file.
        coordinates: "index" or "physical".
        geometries: image geometry per row id; required for "index".
        names: landmark names in column order (the points are positional); None takes the header's
            names, or "0", "1", ... without a header.
        dimension: 2 or 3; None takes the header's, or 2 without a header.
        images: only these row ids (None = all); others need no geometry.

    Returns:
        {row id: LandmarkSet} in file order, points in physical LPS.

    Raises:
        DataError: a malformed row or number (names file and line), an infinite coordinate (names file,
            line and landmark), a duplicate id, or a missing/mismatched geometry for "index".
    """
    path = Path(path)
    if coordinates not in ("physical", "index"):
        raise ValueError(f"coordinates must be 'physical' or 'index', got '{coordinates}'")
    reader = csv.reader(io.StringIO(_read_text(path)))
    rows = [
        (reader.line_num, [cell.strip() for cell in cells]) for cells in reader if any(cell.strip() for cell in cells)
    ]
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    header_names = None
    if not all(_is_number_or_blank(cell) for cell in rows[0][1][1:]):
        dimension, header_names = _wide_header(path, rows[0][1], dimension)
        rows = rows[1:]
    dimension = dimension or 2
    wanted = None if images is None else set(images)
    result: dict[str, LandmarkSet] = {}
    for line, cells in rows:
        values = cells[1:]
        if len(values) % dimension:
            raise DataError(f"{path}, line {line}: {len(values)} coordinates are not {dimension}D points")
        labels = _positional_names(len(values) // dimension, names or header_names, path, f"line {line}")
        image = cells[0]
        if not image:
            raise DataError(f"{path}, line {line}: empty image id")
        if image in result:
            raise DataError(f"{path}, line {line}: image '{image}' occurs more than once")
        points = np.array(
            [
                [
                    _parse_float(values[i * dimension + a], path, line, f"{'xyz'[a]}_{i}", label)
                    for a in range(dimension)
                ]
                for i, label in enumerate(labels)
            ]
        ).reshape(-1, dimension)
        if wanted is not None and image not in wanted:
            continue
        points[~np.all(np.isfinite(points), axis=1)] = np.nan
        if coordinates == "index":
            points = table_index_to_physical(path, image, points, geometries)
        result[image] = LandmarkSet(labels, points)
    return result


# ----------------------------------------------------------------------------------------------------
# one entry point per kind of file


def read_landmark_file(
    path: str | os.PathLike,
    landmarks_format: str = "auto",
    names: list[str] | None = None,
    dimension: int | None = None,
    geometry: ImageGeometry | None = None,
) -> LandmarkSet:
    """Read one image's landmark file of any per-image format (`PER_IMAGE_FORMATS`, or "auto").

    Args:
        path: the landmark file.
        landmarks_format: one of `PER_IMAGE_FORMATS`, or "auto" (`detect_format`).
        names: landmark names (result order); positional formats take them in file order.
        dimension: 2 or 3 (see `read_landmarks`); None keeps the file's.
        geometry: the image's geometry; required for pixel formats (`PIXEL_FORMATS`).

    Raises:
        DataError: as the format's reader (the message names the file).
    """
    path = Path(path)
    kind = detect_format(path) if landmarks_format == "auto" else landmarks_format
    if kind not in PER_IMAGE_FORMATS:
        raise DataError(f"{path}: '{kind}' is not a format of one image's landmarks ({', '.join(PER_IMAGE_FORMATS)})")
    if kind == "labelme":
        return read_labelme(path, geometry, names)
    if kind == "isbi":
        return read_isbi(path, geometry, names)
    return read_landmarks(path, names, dimension)


def read_landmark_table(
    path: str | os.PathLike,
    landmarks_format: str = "auto",
    coordinates: str = "physical",
    geometries: dict[str, ImageGeometry] | None = None,
    names: list[str] | None = None,
    dimension: int | None = None,
    images: Iterable[str] | None = None,
) -> dict[str, LandmarkSet]:
    """Read a table of many images' landmarks: ``csv`` (`read_landmarks_csv`) or ``wide-csv``
    (`read_wide_csv`), or "auto" (`detect_format`); the arguments are theirs.

    Returns:
        {image key as written in the table: LandmarkSet}, points in physical LPS.
    """
    path = Path(path)
    kind = detect_format(path, table=True) if landmarks_format == "auto" else landmarks_format
    if kind == "csv":
        return read_landmarks_csv(path, coordinates, geometries, names, dimension, images)
    if kind == "wide-csv":
        return read_wide_csv(path, coordinates, geometries, names, dimension, images)
    raise DataError(f"{path}: '{kind}' is not a format of a landmark table ({', '.join(TABLE_FORMATS)})")

"""Landmark files: 3D Slicer markups (.mrk.json, .fcsv) and plain CSV tables.

Every reader returns physical LPS coordinates (ITK convention, mm or px); every writer stores LPS and
says so in the file. Formats, chosen by the file suffix:

* ``.mrk.json`` / ``.json``: Slicer markups JSON (schemas markups-schema-v1.0.0 to v1.0.4; written as
  v1.0.3); one control point per landmark, ``label`` = landmark name, ``positionStatus``
  "missing"/"undefined" = missing landmark.
* ``.fcsv``: Slicer markups fiducial CSV (version 4.x); missing landmarks are simply absent.

In .mrk.json and .fcsv files, when the labels are not the expected landmark names but the descriptions
are (AFIDs files label points 1..32 and name them in the description), the descriptions name the points.
* ``.csv``: a table with a header row. One image:
  ``landmark,x,y[,z][,confidence][,expected_error][,coverage_radius_90]``;
  many images: ``image,landmark,x,y[,z][,confidence]`` (see `read_landmarks_csv`). Empty or ``nan`` coordinates,
  or no row at all, mean a missing landmark; other columns (e.g. ``status``) are ignored.

A calibrated model's coverage radius (the distance from the point within which the true point lies
with a stated probability) is a .mrk.json measurement ``coverage radius 90%`` (its description says so
in words) and a CSV column ``coverage_radius_90``, for a probability of 90 % (`coverage_radius_column`).

An infinite coordinate is never a missing landmark but a broken file: a DataError names the file, the
line and the landmark.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import ImageGeometry, ras_to_lps
from SCNLandmarksLib.io.atomic import write_text_atomically
from SCNLandmarksLib.landmark_set import LandmarkSet

logger = logging.getLogger(__name__)

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
# Slicer's control point states; "missing" (skipped on purpose) and "undefined" (not placed yet) have no
# position.
POSITION_STATUSES = ("defined", "preview", "missing", "undefined")
NO_POSITION_STATUSES = ("missing", "undefined")
CONFIDENCE_MEASUREMENT = "confidence"
EXPECTED_ERROR_MEASUREMENT = "expected error"  # also the CSV column, with "_" for the space
EXPECTED_ERROR_COLUMN = "expected_error"
COVERAGE_RADIUS_COLUMN = "coverage_radius"  # + "_90" for 90 %; the measurement: "coverage radius 90%"
_COVERAGE_RADIUS_NAME = re.compile(r"coverage[ _]radius[ _]([0-9]+(?:\.[0-9]+)?)%?")

FCSV_VERSION = "4.11"
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
# Slicer 5 appends unnamed fields after `associatedNodeID`, the first being the numeric position status
# (its enum: 0 undefined, 1 preview, 2 defined, 3 missing); it keeps stale coordinates for missing points.
_FCSV_NO_POSITION_CODES = ("0", "3")

# z coordinates larger than this (mm) make dropping z for a 2D model suspicious.
_PLANAR_Z_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------
# helpers


def _format(path: Path) -> str:
    """'json', 'fcsv' or 'csv' from the file name (case-insensitive)."""
    name = path.name.lower()
    for suffix, kind in ((".mrk.json", "json"), (".json", "json"), (".fcsv", "fcsv"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: unsupported landmark file type (expected .mrk.json, .json, .fcsv or .csv)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: landmark file not found")
    try:
        # utf-8-sig: spreadsheet programs often prepend a byte order mark to CSV files.
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read landmark file ({error})") from error


def _write_text_atomically(path: Path, text: str) -> None:
    try:
        write_text_atomically(path, text)
    except OSError as error:
        raise DataError(f"{path}: cannot write landmark file ({error})") from error


def _parse_float(text: str, path: Path, line: int, column: str, landmark: str | None = None) -> float:
    """A number from a table cell; empty or 'nan' means missing (NaN), an infinite value is an error."""
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return math.nan
    of_landmark = f" for landmark '{landmark}'" if landmark is not None else ""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}: column '{column}' holds '{text}'{of_landmark}, not a number") from None
    if math.isinf(value):
        raise DataError(
            f"{path}, line {line}: column '{column}' holds the infinite value '{text}'{of_landmark} "
            "(leave the cell empty or write nan for a missing landmark)"
        )
    return value


def json_key_line(text: str, key: str, occurrence: int) -> int | None:
    """1-based line of the `occurrence`-th (0-based) ``"key":`` in a JSON text, None if there is none.

    JSON parsers give no positions; this finds the line to name in an error about a parsed value.
    """
    for number, match in enumerate(re.finditer(rf'"{re.escape(key)}"\s*:', text)):
        if number == occurrence:
            return text.count("\n", 0, match.start()) + 1
    return None


def labels_or_descriptions(
    path: Path, labels: list[str], descriptions: list[str], names: list[str] | None
) -> list[str]:
    """The point names to use: the labels, or the descriptions when only those are the expected names.

    AFIDs .fcsv files and others label points 1..N and put the landmark name in the description.
    """
    if names is None or all(label in names for label in labels):
        return labels
    stripped = [d.strip() for d in descriptions]
    if stripped and all(d in names for d in stripped) and len(set(stripped)) == len(stripped):
        logger.info(
            "%s: the labels (%s, ...) are not landmark names but the descriptions are; "
            "naming the points by their descriptions",
            path,
            labels[0],
        )
        return stripped
    return labels


def _check_labels(path: Path, labels: list[str]) -> None:
    empty = [i + 1 for i, label in enumerate(labels) if not label.strip()]
    if empty:
        raise DataError(f"{path}: landmark(s) number {empty} have no label; every landmark needs a name")
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise DataError(f"{path}: landmark name(s) {duplicates} occur more than once")


def _apply_dimension(path: Path, points: np.ndarray, dimension: int | None) -> np.ndarray:
    """Drop z for 2D models (2D points are stored with z = 0); refuse 2D points for 3D models."""
    if dimension is None or dimension == points.shape[1]:
        return points
    if dimension == 2:
        z = points[:, 2]
        if np.any(np.abs(z[np.isfinite(z)]) > _PLANAR_Z_TOLERANCE):
            logger.warning(
                "%s: dropping non-zero z coordinates (up to %.3g) for a 2D model", path, np.nanmax(np.abs(z))
            )
        return points[:, :2]
    if dimension == 3:
        raise DataError(f"{path}: the landmarks are 2D but the model expects 3D landmarks")
    raise ValueError(f"dimension must be 2, 3 or None, got {dimension}")


def _make_set(
    path: Path,
    labels: list[str],
    points: np.ndarray,
    names: list[str] | None,
    dimension: int | None,
    **per_point,
) -> LandmarkSet:
    """Validate labels, apply `dimension` and the name order of `names`; `per_point`: the LandmarkSet's
    other fields (confidences, expected errors, coverage radii and their coverage)."""
    _check_labels(path, labels)
    landmarks = LandmarkSet(labels, _apply_dimension(path, points, dimension), **per_point)
    return landmarks if names is None else landmarks.reordered(_check_names(path, labels, names))


def _check_names(path: Path, found: list[str], names: list[str] | None) -> list[str]:
    """The name order to use: `names`, after checking that the file holds no other landmark."""
    if names is None:
        return found
    unknown = [n for n in found if n not in names]
    if unknown:
        raise DataError(f"{path}: unknown landmark(s) {unknown}; the model's landmarks are {list(names)}")
    return list(names)


def _number_text(value: float) -> str:
    """Shortest text that reads back to exactly the same float."""
    return repr(float(value))


def _status_texts(landmarks: LandmarkSet, status: Sequence[str] | None) -> list[str]:
    """One (possibly empty) detection status text per landmark."""
    if status is None:
        return [""] * len(landmarks.names)
    status = [str(s) for s in status]
    if len(status) != len(landmarks.names):
        raise ValueError(f"status has {len(status)} entries for {len(landmarks.names)} landmarks")
    return status


def _value_text(values: np.ndarray | None, i: int) -> str:
    if values is None or not np.isfinite(values[i]):
        return ""
    return _number_text(values[i])


def coverage_radius_column(coverage: float) -> str:
    """The CSV column of coverage radii with probability `coverage`: "coverage_radius_90" for 0.9."""
    return f"{COVERAGE_RADIUS_COLUMN}_{100.0 * coverage:g}"


def _coverage_radius_measurement(coverage: float) -> str:
    """The .mrk.json measurement of coverage radii with probability `coverage`: "coverage radius 90%"."""
    return coverage_radius_column(coverage).replace("_", " ") + "%"


def _coverage_of(name: object) -> float | None:
    """The probability a coverage radius column or measurement name states (0.9), or None for another name."""
    match = _COVERAGE_RADIUS_NAME.fullmatch(str(name).strip().lower())
    coverage = None if match is None else float(match.group(1)) / 100.0
    return coverage if coverage is not None and 0.0 < coverage < 1.0 else None


# ----------------------------------------------------------------------------------------------------
# Slicer markups JSON


def _read_markups_json(path: Path) -> tuple[list[str], list[str], np.ndarray, dict]:
    """Labels, descriptions, (N, 3) LPS points (NaN rows = missing) and the LandmarkSet's optional
    per-point fields (confidences, expected errors, coverage radii and their coverage).

    Schema v1.0.0 has no coordinateUnits and no measurements (defaults: mm, no confidences); v1.0.4 may
    give the units as a code triplet ["mm", "UCUM", "millimeter"].
    """
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list) or not markups or not isinstance(markups[0], dict):
        raise DataError(f"{path}: not a Slicer markups file (no 'markups' list)")
    if len(markups) > 1:
        logger.warning("%s holds %d markups; reading only the first", path, len(markups))
    markup = markups[0]

    system = str(markup.get("coordinateSystem", "LPS")).upper()  # the schema's default is LPS
    if system not in ("LPS", "RAS"):
        raise DataError(f"{path}: unknown coordinateSystem '{system}' (expected LPS or RAS)")
    units = markup.get("coordinateUnits", "mm")
    if isinstance(units, list) and units:
        units = units[0]
    if units not in ("mm", "px"):
        # Slicer itself does not rescale either: the whole scene is then in these units. "px" is what
        # this library writes for images without spacing (their pixel grid is the physical one).
        logger.warning("%s: coordinateUnits is '%s'; coordinates are used without rescaling", path, units)

    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise DataError(f"{path}: 'controlPoints' is not a list")
    labels: list[str] = []
    descriptions: list[str] = []
    points = np.full((len(control_points), 3), np.nan)
    positions_seen = 0
    for i, point in enumerate(control_points):
        if not isinstance(point, dict):
            raise DataError(f"{path}: control point {i + 1} is not an object")
        labels.append(str(point.get("label", "")))
        descriptions.append(str(point.get("description", "")))
        positions_seen += "position" in point
        point_status = point.get("positionStatus", "defined")
        if point_status not in POSITION_STATUSES:
            raise DataError(f"{path}: control point '{labels[-1]}' has unknown positionStatus '{point_status}'")
        if point_status in NO_POSITION_STATUSES:
            continue  # Slicer writes "" or stale coordinates here
        position = point.get("position")
        try:
            points[i] = np.asarray(position, dtype=np.float64).reshape(3)
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: control point '{labels[-1]}' has position {position!r}; expected three numbers"
            ) from None
        if np.isinf(points[i]).any():
            line = json_key_line(text, "position", positions_seen - 1)
            raise DataError(
                f"{path}{'' if line is None else f', line {line}'}: control point {i + 1} "
                f"(landmark '{labels[-1]}') has the "
                f"infinite position {position} (a missing landmark has positionStatus "
                '"missing")'
            )
    if system == "RAS":
        points = ras_to_lps(points)
    radius_names = [
        m["name"] for m in markup.get("measurements", []) if isinstance(m, dict) and _coverage_of(m.get("name"))
    ]
    radii = _read_point_measurement(path, markup, len(labels), radius_names[0]) if radius_names else None
    return (
        labels,
        descriptions,
        points,
        {
            "confidences": _read_point_measurement(path, markup, len(labels), CONFIDENCE_MEASUREMENT),
            "expected_errors": _read_point_measurement(path, markup, len(labels), EXPECTED_ERROR_MEASUREMENT),
            "coverage_radii": radii,
            "coverage": _coverage_of(radius_names[0]) if radii is not None else None,
        },
    )


def _read_point_measurement(path: Path, markup: dict, count: int, name: str) -> np.ndarray | None:
    """(count,) values of the measurement `name` (NaN = unknown), or None without one."""
    for measurement in markup.get("measurements", []):
        if isinstance(measurement, dict) and measurement.get("name") == name:
            values = measurement.get("controlPointValues")
            if not isinstance(values, list) or len(values) != count:
                # A confidence is only meaningful per control point; a node-level value is not one.
                logger.warning("%s: ignoring the %s measurement (no value per control point)", path, name)
                return None
            try:
                return np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(f"{path}: the {name} measurement holds non-numeric values") from None
    return None


def _markups_json_text(landmarks: LandmarkSet, status: list[str], unit: str) -> str:
    points = landmarks.points_lps
    if landmarks.dimension == 2:
        points = np.concatenate([points, np.zeros((len(points), 1))], axis=1)
    control_points = []
    for i, (name, present) in enumerate(zip(landmarks.names, landmarks.present)):
        control_points.append(
            {
                "id": str(i + 1),
                "label": name,
                "description": status[i],
                "position": [float(v) for v in points[i]] if present else [0.0, 0.0, 0.0],
                "positionStatus": "defined" if present else "missing",
            }
        )
    markup: dict = {
        "type": "Fiducial",
        "coordinateSystem": "LPS",
        "coordinateUnits": unit,
        "controlPoints": control_points,
    }
    # Unknown values are written as NaN: not strict JSON, but exactly what Slicer itself writes and
    # reads for measurement values (it rejects null there).
    measurements = []
    if landmarks.confidences is not None:
        measurements.append(
            {
                "name": CONFIDENCE_MEASUREMENT,
                "enabled": True,
                "controlPointValues": [float(c) for c in landmarks.confidences],
            }
        )
    if landmarks.expected_errors is not None:
        measurements.append(
            {
                "name": EXPECTED_ERROR_MEASUREMENT,
                "enabled": True,
                "units": unit,
                "controlPointValues": [float(e) for e in landmarks.expected_errors],
            }
        )
    if landmarks.coverage_radii is not None and landmarks.coverage is not None:
        measurements.append(
            {
                "name": _coverage_radius_measurement(landmarks.coverage),
                "enabled": True,
                "units": unit,
                "description": f"the true point lies within this distance of the point with probability "
                f"{100.0 * landmarks.coverage:g} % (split conformal, per landmark)",
                "controlPointValues": [float(r) for r in landmarks.coverage_radii],
            }
        )
    if measurements:
        markup["measurements"] = measurements
    return json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [markup]}, indent=2) + "\n"


# ----------------------------------------------------------------------------------------------------
# Slicer fcsv


def _read_fcsv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Labels, descriptions and (N, 3) LPS points of a Slicer 4.x/5.x fiducial CSV."""
    columns = list(FCSV_COLUMNS)
    system = None
    labels: list[str] = []
    descriptions: list[str] = []
    rows: list[list[float]] = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip(), value.strip()
            if key == "CoordinateSystem":
                system = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}.get(value.upper())
                if system is None:
                    raise DataError(
                        f"{path}, line {line_number}: unknown CoordinateSystem '{value}' (expected 0/RAS or 1/LPS)"
                    )
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
                missing_columns = [c for c in ("x", "y", "z", "label") if c not in columns]
                if missing_columns:
                    raise DataError(f"{path}, line {line_number}: the columns header lacks {missing_columns}")
            continue
        if not line.strip():
            continue
        # Slicer quotes labels that contain commas, as the csv module does.
        fields = next(csv.reader([line]))
        if len(fields) < len(columns):
            fields += [""] * (len(columns) - len(fields))
        record = dict(zip(columns, fields))
        labels.append(record["label"])
        descriptions.append(record.get("desc", ""))
        point = [_parse_float(record[axis], path, line_number, axis, record["label"]) for axis in ("x", "y", "z")]
        status_code = fields[len(columns)].strip() if len(fields) > len(columns) else ""
        if status_code in _FCSV_NO_POSITION_CODES or not all(math.isfinite(v) for v in point):
            point = [math.nan] * 3
        rows.append(point)
    points = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    if system is None:
        # Slicer >= 5 reads a file without the header line as LPS; do the same so both agree.
        logger.warning("%s: no CoordinateSystem header line; assuming LPS as Slicer does", path)
        system = "LPS"
    return labels, descriptions, ras_to_lps(points) if system == "RAS" else points


def _fcsv_text(landmarks: LandmarkSet, status: list[str]) -> str:
    stream = io.StringIO()
    stream.write(
        f"# Markups fiducial file version = {FCSV_VERSION}\n"
        "# CoordinateSystem = LPS\n"
        f"# columns = {','.join(FCSV_COLUMNS)}\n"
    )
    writer = csv.writer(stream, lineterminator="\n")
    points = landmarks.points_lps
    for i, (name, present) in enumerate(zip(landmarks.names, landmarks.present)):
        if not present:
            continue  # fcsv has no missing state that Slicer 4 understands: leave the point out
        x, y, z = (list(points[i]) + [0.0])[:3]
        writer.writerow(
            [
                str(i + 1),
                _number_text(x),
                _number_text(y),
                _number_text(z),
                "0",
                "0",
                "0",
                "1",
                "1",
                "1",
                "0",
                name,
                status[i],
                "",
            ]
        )
    return stream.getvalue()


# ----------------------------------------------------------------------------------------------------
# CSV tables


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Lower-cased header and (line number, row) pairs of a CSV file with a header row."""
    reader = csv.reader(io.StringIO(_read_text(path)))
    header = [name.strip().lower() for name in next(reader, [])]
    if not header:
        raise DataError(f"{path}: empty CSV file (a header row is required)")
    rows = [(reader.line_num, dict(zip(header, cells))) for cells in reader if any(cell.strip() for cell in cells)]
    return header, rows


def _table_axes(path: Path, header: list[str], dimension: int | None) -> tuple[str, ...]:
    """The coordinate columns to read: x, y and (when present and wanted) z."""
    for required in ("x", "y"):
        if required not in header:
            raise DataError(f"{path}: the CSV header {header} has no '{required}' column")
    if "z" in header and dimension != 2:
        return ("x", "y", "z")
    if "z" not in header and dimension == 3:
        raise DataError(f"{path}: the landmarks are 2D (no 'z' column) but the model expects 3D landmarks")
    return ("x", "y")


def _landmark_column(path: Path, header: list[str]) -> str:
    # `landmark_name` is accepted too: the cephalometric tables of the shared data use it.
    for column in ("landmark", "landmark_name"):
        if column in header:
            return column
    raise DataError(f"{path}: the CSV header {header} has no 'landmark' column")


def _value_columns(header: list[str]) -> list[str]:
    """The per-point value columns a table may have, in LandmarkSet order: confidence, expected error
    and (the first) coverage radius column."""
    radius = [column for column in header if _coverage_of(column)]
    return ["confidence", EXPECTED_ERROR_COLUMN, *radius[:1]]


def _parse_table(
    path: Path,
    header: list[str],
    rows: list[tuple[int, dict[str, str]]],
    dimension: int | None,
    image_column: str | None,
) -> tuple[list[str], dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """Landmark names in first-seen order and {image: {landmark: (point, values of `_value_columns`)}}."""
    axes = _table_axes(path, header, dimension)
    landmark_column = _landmark_column(path, header)
    names: list[str] = []
    table: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for line, row in rows:
        image = (row.get(image_column) or "").strip() if image_column else ""
        name = (row.get(landmark_column) or "").strip()
        if not name:
            raise DataError(f"{path}, line {line}: empty landmark name")
        if image_column and not image:
            raise DataError(f"{path}, line {line}: empty image name")
        point = [_parse_float(row.get(axis) or "", path, line, axis, name) for axis in axes]
        if not all(math.isfinite(v) for v in point):
            point = [math.nan] * len(axes)
        values = [
            _parse_float(row.get(column) or "", path, line, column, name) if column in header else math.nan
            for column in _value_columns(header)
        ]
        per_image = table.setdefault(image, {})
        if name in per_image:
            where = f" for image '{image}'" if image_column else ""
            raise DataError(f"{path}, line {line}: landmark '{name}' occurs more than once{where}")
        per_image[name] = (point, values)
        if name not in names:
            names.append(name)
    return names, table


def _table_set(
    names: list[str], entries: dict[str, tuple[list[float], list[float]]], dimension: int, header: list[str]
) -> LandmarkSet:
    points = np.full((len(names), dimension), np.nan)
    columns = _value_columns(header)
    per_point = [np.full(len(names), np.nan) if column in header else None for column in columns]
    for i, name in enumerate(names):
        if name in entries:
            points[i], values = entries[name]
            for column, value in zip(per_point, values):
                if column is not None:
                    column[i] = value
    radii, coverage = (per_point[2], _coverage_of(columns[2])) if len(columns) > 2 else (None, None)
    return LandmarkSet(names, points, per_point[0], per_point[1], radii, coverage)


def _read_single_csv(path: Path, names: list[str] | None, dimension: int | None) -> LandmarkSet:
    header, rows = _read_table(path)
    image_column = "image" if "image" in header else None
    found, table = _parse_table(path, header, rows, dimension, image_column)
    if len(table) > 1:
        raise DataError(f"{path}: the table holds landmarks of {len(table)} images; read it with read_landmarks_csv")
    entries = next(iter(table.values()), {})
    point_dimension = len(_table_axes(path, header, dimension))
    return _table_set(_check_names(path, found, names), entries, point_dimension, header)


def _table_rows(landmarks: LandmarkSet) -> Iterable[list[str]]:
    """[landmark, x, y[, z], confidence] cells; blank coordinates for missing landmarks."""
    for i, (name, present) in enumerate(zip(landmarks.names, landmarks.present)):
        coordinates = [_number_text(v) if present else "" for v in landmarks.points_lps[i]]
        yield [name, *coordinates, _value_text(landmarks.confidences, i)]


def _csv_text(header: list[str], rows: Iterable[list[str]]) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return stream.getvalue()


# ----------------------------------------------------------------------------------------------------
# public API


def read_landmarks(
    path: str | os.PathLike, names: list[str] | None = None, dimension: int | None = None
) -> LandmarkSet:
    """Read the landmarks of one image from a .mrk.json/.json, .fcsv or single-image .csv file.

    Args:
        path: landmark file; RAS files are converted, the result is always LPS.
        names: the model's landmark names; the result follows this order, names absent from the
            file become missing (NaN). None keeps the file's order. When the labels of a .mrk.json or
            .fcsv file are not these names but its descriptions are, the descriptions are used (logged).
        dimension: 2 drops z (Slicer stores 2D points with z = 0); 3 requires 3D points.

    Returns:
        LandmarkSet with points_lps of shape (N, dimension or 3) in mm (px for pixel-unit images) and,
        where the file has them, (N,) confidences.

    Raises:
        DataError: missing/unreadable/malformed file, an infinite coordinate, empty or duplicate labels,
            or a landmark that is not in `names`; the message names the file (and line and landmark).
    """
    path = Path(path)
    kind = _format(path)
    if kind == "csv":
        return _read_single_csv(path, names, dimension)
    if kind == "json":
        labels, descriptions, points, per_point = _read_markups_json(path)
    else:
        labels, descriptions, points = _read_fcsv(path)
        per_point = {}
    labels = labels_or_descriptions(path, labels, descriptions, names)
    return _make_set(path, labels, points, names, dimension, **per_point)


def table_index_to_physical(
    path: Path, image: str, index: np.ndarray, geometries: dict[str, ImageGeometry] | None
) -> np.ndarray:
    """(N, d) pixel indices of one image of a table -> physical LPS, by that image's geometry."""
    geometry = (geometries or {}).get(image)
    if geometry is None:
        raise DataError(f"{path}: no image geometry for '{image}' to convert its pixel indices")
    if geometry.dimension != index.shape[1]:
        raise DataError(f"{path}: image '{image}' is {geometry.dimension}D but its landmarks are {index.shape[1]}D")
    return geometry.index_to_physical(index)


def read_landmarks_csv(
    path: str | os.PathLike,
    coordinates: str = "physical",
    geometries: dict[str, ImageGeometry] | None = None,
    names: list[str] | None = None,
    dimension: int | None = None,
    images: Iterable[str] | None = None,
) -> dict[str, LandmarkSet]:
    """Read a table ``image,landmark,x,y[,z][,confidence]`` holding landmarks of many images.

    Args:
        path: CSV file with a header row; other columns are ignored. A missing row or empty/``nan``
            coordinates mean a missing landmark.
        coordinates: "physical" (LPS mm, or px for pixel-unit images) or "index" (continuous pixel
            indices: x = column, y = row[, z = slice], voxel centers at integers).
        geometries: image geometry per `image` column value; required for "index".
        names: the model's landmark names (result order); None = order of first appearance.
        dimension: 2 ignores a z column; 3 requires one.
        images: only return these images (None = all); others need no geometry.

    Returns:
        {image: LandmarkSet} in the file's image order; every set has the same names, points_lps of
        shape (N, d) in physical LPS units and, when the table has a confidence column, confidences.

    Raises:
        DataError: malformed table or number (names file and line), a landmark not in `names`, or a
            missing/mismatched geometry for "index" coordinates.
    """
    path = Path(path)
    if coordinates not in ("physical", "index"):
        raise ValueError(f"coordinates must be 'physical' or 'index', got '{coordinates}'")
    header, rows = _read_table(path)
    if "image" not in header:
        raise DataError(f"{path}: the CSV header {header} has no 'image' column")
    found, table = _parse_table(path, header, rows, dimension, "image")
    names = _check_names(path, found, names)
    point_dimension = len(_table_axes(path, header, dimension))
    result: dict[str, LandmarkSet] = {}
    wanted = None if images is None else set(images)
    for image, entries in table.items():
        if wanted is not None and image not in wanted:
            continue
        landmarks = _table_set(names, entries, point_dimension, header)
        if coordinates == "index":
            landmarks.points_lps = table_index_to_physical(path, image, landmarks.points_lps, geometries)
        result[image] = landmarks
    return result


def write_landmarks(
    landmarks: LandmarkSet, path: str | os.PathLike, status: Sequence[str] | None = None, unit: str = "mm"
) -> None:
    """Write one image's landmarks as .mrk.json/.json, .fcsv or .csv (LPS), replacing atomically.

    .mrk.json: a Slicer "Fiducial" markup (coordinateSystem LPS, coordinateUnits `unit`), one control point per
    landmark (label = name, id "1".."N"; 2D points get z = 0; NaN rows get positionStatus "missing");
    confidences as a markup measurement "confidence" with one value per control point, expected
    errors (when known) as a measurement "expected error" in `unit`, coverage radii (when known) as
    a measurement "coverage radius 90%" in `unit` (for 90 %). .fcsv: version 4.11, LPS, missing
    landmarks left out (no confidences). .csv:
    ``landmark,x,y[,z],confidence[,expected_error][,coverage_radius_90][,status]`` with blank cells
    for missing values.

    Args:
        landmarks: the landmarks, points_lps (N, 2|3).
        path: target file; the suffix selects the format.
        status: optional (N,) detection status text per landmark (e.g. "detected", "low confidence",
            "missing"), stored as the control point description (.mrk.json, .fcsv) or a "status"
            column (.csv) so a Slicer user sees it next to each point.
        unit: the unit of the positions and expected errors: "mm", or "px" for images without
            spacing (PNG, JPEG...), where a position is a pixel position and must not read as mm.

    Raises:
        DataError: the file cannot be written or has an unsupported suffix.
        ValueError: `status` does not have one entry per landmark.
    """
    path = Path(path)
    kind = _format(path)
    texts = _status_texts(landmarks, status)
    if kind == "json":
        text = _markups_json_text(landmarks, texts, unit)
    elif kind == "fcsv":
        text = _fcsv_text(landmarks, texts)
    else:
        axes = ["x", "y", "z"][: landmarks.dimension]
        header = ["landmark", *axes, "confidence"]
        rows = list(_table_rows(landmarks))
        if landmarks.expected_errors is not None:
            header.append(EXPECTED_ERROR_COLUMN)
            rows = [[*row, _value_text(landmarks.expected_errors, i)] for i, row in enumerate(rows)]
        if landmarks.coverage_radii is not None and landmarks.coverage is not None:
            header.append(coverage_radius_column(landmarks.coverage))
            rows = [[*row, _value_text(landmarks.coverage_radii, i)] for i, row in enumerate(rows)]
        if status is not None:
            header.append("status")
            rows = [[*row, note] for row, note in zip(rows, texts)]
        text = _csv_text(header, rows)
    _write_text_atomically(path, text)


def write_landmarks_csv(path: str | os.PathLike, landmark_sets: dict[str, LandmarkSet]) -> None:
    """Write landmarks of many images as ``image,landmark,x,y[,z],confidence`` (physical LPS).

    The file reads back with `read_landmarks_csv(path)`; missing landmarks get blank coordinates.

    Args:
        path: target .csv file, replaced atomically.
        landmark_sets: {image key: LandmarkSet}; all sets must have the same dimension.

    Raises:
        DataError: the file cannot be written.
        ValueError: the sets have different dimensions.
    """
    path = Path(path)
    dimensions = {landmarks.dimension for landmarks in landmark_sets.values()}
    if len(dimensions) > 1:
        raise ValueError(f"all landmark sets must have the same dimension, got {sorted(dimensions)}")
    dimension = dimensions.pop() if dimensions else 3
    rows = [[image, *row] for image, landmarks in landmark_sets.items() for row in _table_rows(landmarks)]
    _write_text_atomically(path, _csv_text(["image", "landmark", *["x", "y", "z"][:dimension], "confidence"], rows))

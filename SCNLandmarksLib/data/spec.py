"""Dataset spec (TOML): which images, which landmark files, which landmark names, which splits.

Example::

    dimension = 2
    landmarks = ["Sella", "Nasion"]        # names in model order
    landmarks_csv = "landmarks.csv"         # optional table image,landmark,x,y[,z] (or id,x_0,y_0,...)
    csv_coordinates = "index"               # "physical" (LPS mm) or "index" (continuous pixel index)
    landmarks_format = "auto"               # or one of LANDMARK_INPUT_FORMATS for every landmark file
    spacing = [0.1, 0.1]                    # optional: mm per pixel (x, y) of pictures (PNG, JPEG, ...)

    [[images]]
    id = "001"
    image = "images/001.png"
    landmarks = "001.mrk.json"              # optional per-image file (.mrk.json, .fcsv, LabelMe, ISBI .txt)
    split = "train"                         # optional; or list ids under [splits]
    spacing = [0.12, 0.12]                  # optional: this picture's own, instead of the one above

    [splits]
    validation = ["002"]

Paths are relative to the spec file. A landmark absent from an image's file is missing for that
image: it is left out of the loss, never treated as zero. `landmarks_format` "auto" detects each file's
format (see `SCNLandmarksLib.io.landmark_formats`); the table's rows name images by their id.

Pictures (PNG, JPEG, BMP, TIFF) carry no physical spacing: without `spacing` their positions are pixels
("px"); with it they are millimetres, for the images and for landmarks given in pixel coordinates alike
(pixel index x spacing, origin 0, identity direction). Files that carry a spacing (NRRD, MHA, NIfTI,
DICOM) keep theirs: the top-level `spacing` does not apply to them, and an entry's own is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from ..errors import DataError
from ..geometry import ImageGeometry
from ..io.atomic import write_text_atomically
from ..io.images import (
    carries_spacing,
    checked_spacing,
    read_image,
    read_image_information,
    slice_placement,
    spacing_unit,
)
from ..io.landmark_formats import (
    LANDMARK_INPUT_FORMATS,
    PER_IMAGE_FORMATS,
    PIXEL_FORMATS,
    TABLE_FORMATS,
    detect_format,
    read_landmark_file,
    read_landmark_table,
)
from ..io.paths import image_stem
from ..io.toml import dumps_toml, read_toml
from ..landmark_set import LandmarkSet

if TYPE_CHECKING:
    from ..bundle import ModelDescription  # imports torch, which reading a spec does not need


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset spec.

    Attributes:
        spacing: the spacing stated for a picture (mm per pixel, x then y[, z]): its own, else the
            spec's; None for files that carry their own and for pictures left in pixels.
    """

    id: str
    image: Path
    landmarks: Path | None
    split: str | None
    spacing: tuple[float, ...] | None = None

    @property
    def unit(self) -> str:
        """The unit of the image's positions: 'mm', or 'px' for a picture without a stated spacing."""
        return spacing_unit(self.image, self.spacing)

    def read(self, dimension: int | None = None) -> sitk.Image:
        """The image with its geometry (the stated spacing for a picture), as io.images.read_image."""
        return read_image(self.image, dimension, self.spacing)

    def read_information(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The image's size and spacing from its header alone, as `read` gives them."""
        return read_image_information(self.image, self.spacing)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset spec as `load_dataset_spec` reads it and `write` writes it (the one reader and the
    one writer of the format).

    Attributes:
        spacing: the top-level spacing stated for the pictures (entries hold what applies to each).
    """

    path: Path
    dimension: int
    landmark_names: tuple[str, ...]
    entries: tuple[ImageEntry, ...]
    landmarks_csv: Path | None = None
    csv_coordinates: str = "physical"
    landmarks_format: str = "auto"
    spacing: tuple[float, ...] | None = None

    def text(self, comment: str = "") -> str:
        """The spec as TOML: paths relative to the spec's folder when they lie inside it, else absolute;
        an entry's spacing only where it differs from the top-level one (files that carry their own
        get none: `load_dataset_spec` applies the top-level one to pictures only)."""
        base = Path(self.path).resolve().parent

        def relative(path: Path) -> str:
            path = Path(path).resolve()
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)

        values: dict[str, Any] = {"dimension": self.dimension, "landmarks": list(self.landmark_names)}
        if self.landmarks_format != "auto":
            values["landmarks_format"] = self.landmarks_format
        if self.landmarks_csv is not None:
            values |= {"landmarks_csv": relative(self.landmarks_csv), "csv_coordinates": self.csv_coordinates}
        if self.spacing is not None:
            values["spacing"] = list(self.spacing)
        images = []
        for entry in self.entries:
            item: dict[str, Any] = {"id": entry.id, "image": relative(entry.image)}
            if entry.landmarks is not None:
                item["landmarks"] = relative(entry.landmarks)
            if entry.split is not None:
                item["split"] = entry.split
            if entry.spacing is not None and tuple(entry.spacing) != self.spacing:
                item["spacing"] = list(entry.spacing)
            images.append(item)
        values["images"] = images
        return (f"# {comment}\n" if comment else "") + dumps_toml(values)

    def write(self, comment: str = "") -> Path:
        """Write the spec to `path` atomically (see `text`); returns `path`.

        Raises:
            DataError: the file cannot be written.
        """
        try:
            write_text_atomically(self.path, self.text(comment))
        except OSError as error:
            raise DataError(f"{self.path}: cannot write the dataset spec ({error})") from None
        return Path(self.path)

    def split(self, name: str) -> list[ImageEntry]:
        """Entries of one split, in spec order; an empty split is an error naming the spec file."""
        chosen = [e for e in self.entries if e.split == name]
        if not chosen:
            known = sorted({e.split for e in self.entries if e.split})
            raise DataError(f"{self.path}: split '{name}' has no images (splits: {known})")
        return chosen

    def check_model_unit(self, entries: list[ImageEntry], model: ModelDescription) -> None:
        """Refuse pictures left in pixels for a model in mm (their pixels would be taken for mm).

        Raises:
            DataError: naming the spec and the first such image, and how to state its spacing.
        """
        for entry in entries:
            model.check_image_unit(
                entry.unit,
                f"{self.path}: image '{entry.id}' ({entry.image})",
                "state the pictures' spacing in the spec (spacing = [x, y], mm per pixel)",
            )

    def load_landmarks(
        self, entries: list[ImageEntry], geometries: dict[str, ImageGeometry] | None = None
    ) -> dict[str, LandmarkSet]:
        """Landmarks per entry id in `landmark_names` order (LPS), from per-image files and/or the CSV."""
        names = list(self.landmark_names)
        geometries = dict(geometries or {})

        def geometry(entry: ImageEntry) -> ImageGeometry:
            if entry.id not in geometries:
                geometries[entry.id] = ImageGeometry.of(entry.read(self.dimension))
            return geometries[entry.id]

        table: dict[str, LandmarkSet] = {}
        if self.landmarks_csv is not None:
            if self.csv_coordinates == "index":
                for entry in entries:
                    geometry(entry)
            table = read_landmark_table(
                self.landmarks_csv,
                self.landmarks_format,
                self.csv_coordinates,
                geometries,
                names,
                self.dimension,
                images=[e.id for e in entries],
            )
        result = {}
        for entry in entries:
            if entry.landmarks is not None:
                kind = detect_format(entry.landmarks) if self.landmarks_format == "auto" else self.landmarks_format
                # A slice outside the axial plane has its landmarks in space: they go into its plane.
                placement = slice_placement(entry.image) if self.dimension == 2 else None
                landmarks = read_landmark_file(
                    entry.landmarks,
                    kind,
                    names,
                    None if placement is not None else self.dimension,
                    geometry(entry) if kind in PIXEL_FORMATS else None,
                )
                if placement is not None and landmarks.points_lps.shape[1] == 3:
                    landmarks = dataclasses.replace(landmarks, points_lps=placement.to_plane(landmarks.points_lps))
                result[entry.id] = landmarks
            elif entry.id in table:
                result[entry.id] = table[entry.id]
            else:
                raise DataError(
                    f"{self.path}: image '{entry.id}' has no landmark file and no rows in "
                    f"{self.landmarks_csv or 'a landmarks_csv'}"
                )
        return result


def load_dataset_spec(path: str | Path) -> DatasetSpec:
    """Read and check a dataset spec TOML (files exist, names unique, splits known)."""
    path = Path(path).resolve()
    values = read_toml(path, "dataset spec")
    base = path.parent

    dimension = values.get("dimension")
    if dimension not in (2, 3):
        raise DataError(f"{path}: 'dimension' must be 2 or 3, got {dimension!r}")
    names = values.get("landmarks")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'landmarks' must be a non-empty list of landmark names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate landmark names in 'landmarks'")
    coordinates = values.get("csv_coordinates", "physical")
    if coordinates not in ("physical", "index"):
        raise DataError(f"{path}: csv_coordinates must be 'physical' or 'index', got {coordinates!r}")
    csv_path = base / values["landmarks_csv"] if "landmarks_csv" in values else None
    if csv_path is not None and not csv_path.is_file():
        raise DataError(f"{path}: landmarks_csv {csv_path} not found")
    landmarks_format = values.get("landmarks_format", "auto")
    if landmarks_format not in ("auto", *LANDMARK_INPUT_FORMATS):
        raise DataError(
            f"{path}: landmarks_format must be 'auto' or one of {list(LANDMARK_INPUT_FORMATS)}, "
            f"got {landmarks_format!r}"
        )
    if csv_path is not None and landmarks_format not in ("auto", *TABLE_FORMATS):
        raise DataError(
            f"{path}: landmarks_csv is a table, but landmarks_format '{landmarks_format}' is a "
            f"format of one image's landmarks (tables: {list(TABLE_FORMATS)})"
        )

    spacing = checked_spacing(values["spacing"], str(path), dimension) if "spacing" in values else None

    split_of = {}
    for split_name, ids in values.get("splits", {}).items():
        for image_id in ids:
            split_of[str(image_id)] = split_name
    entries = []
    for number, item in enumerate(values.get("images", []), start=1):
        if "image" not in item:
            raise DataError(f"{path}: [[images]] entry {number} has no 'image'")
        image_id = str(item.get("id", image_stem(item["image"])))
        image = base / item["image"]
        if not image.exists():
            raise DataError(f"{path}: image {image} (id '{image_id}') not found")
        landmarks = base / item["landmarks"] if "landmarks" in item else None
        if landmarks is not None and not landmarks.is_file():
            raise DataError(f"{path}: landmark file {landmarks} (id '{image_id}') not found")
        if landmarks is not None and landmarks_format not in ("auto", *PER_IMAGE_FORMATS):
            raise DataError(
                f"{path}: landmarks_format '{landmarks_format}' is a table format, but image "
                f"'{image_id}' has its own landmark file"
            )
        own = _entry_spacing(path, item, image_id, image, dimension)
        stated = own or (None if carries_spacing(image) else spacing)
        entries.append(ImageEntry(image_id, image, landmarks, item.get("split", split_of.get(image_id)), stated))
    if not entries:
        raise DataError(f"{path}: the dataset has no images ([[images]] entries)")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate image ids")
    unknown = sorted(set(split_of) - set(ids))
    if unknown:
        raise DataError(f"{path}: [splits] name unknown image ids {unknown}")
    return DatasetSpec(path, dimension, tuple(names), tuple(entries), csv_path, coordinates, landmarks_format, spacing)


def _entry_spacing(path: Path, item: dict, image_id: str, image: Path, dimension: int) -> tuple[float, ...] | None:
    """An [[images]] entry's own spacing; an error for a file that carries one (never overridden)."""
    if "spacing" not in item:
        return None
    where = f"{path}: image '{image_id}' ({image})"
    if carries_spacing(image):
        raise DataError(
            f"{where} carries its own spacing in its file; 'spacing' is only for pictures without one "
            "(PNG, JPEG, BMP, TIFF)"
        )
    return checked_spacing(item["spacing"], where, dimension)

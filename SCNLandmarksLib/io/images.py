"""Image reading and writing: every image enters the library as a scalar float32 SimpleITK image.

2D images are kept 2D (including 3D files that hold a single slice, such as W x H x 1 MetaImages),
3D images stay 3D; physical geometry (origin, spacing, direction) is preserved so that landmark
positions in LPS millimetres stay valid.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import in_axial_plane
from SCNLandmarksLib.io.atomic import atomic_output
from SCNLandmarksLib.io.paths import format_suffix

logger = logging.getLogger(__name__)

# Photo/raster formats: their resolution tags (PNG pHYs, TIFF resolution, JPEG density) describe print
# size, not anatomy, so read_image ignores them and such images are measured in pixels.
PIXEL_UNIT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ITU-R BT.601 luma weights for R, G, B.
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
# Grey pictures stored as colour (X-rays saved as RGB PNG or JPEG, e.g. the ISBI 2015 cephalograms) have
# equal red, green and blue, up to JPEG's rounding of its colour planes: this many levels apart at most.
GREY_TOLERANCE = 2

# Single-file images a folder given to batch detection is searched for.
IMAGE_SUFFIXES = PIXEL_UNIT_SUFFIXES + (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

# Formats whose header names a separate data file, so the written header cannot be renamed afterwards.
_MULTI_FILE_SUFFIXES = (".mhd", ".hdr", ".nhdr")


def carries_spacing(path: str | os.PathLike) -> bool:
    """Whether an image file (or DICOM directory) states its own physical spacing: False for pictures
    (PNG, JPEG, BMP, TIFF), whose spacing is 1 unless one is stated for them."""
    return format_suffix(path) not in PIXEL_UNIT_SUFFIXES


def spacing_unit(path: str | os.PathLike, spacing: Sequence[float] | None = None) -> str:
    """Unit of physical coordinates of images read from `path`.

    Args:
        path: image file (or DICOM directory).
        spacing: the spacing stated for a picture (mm per pixel; see `read_image`), or None.

    Returns:
        "px" for pictures (PNG, JPEG, BMP, TIFF) without a stated spacing, else "mm".
    """
    return "mm" if spacing is not None or carries_spacing(path) else "px"


def checked_spacing(values: object, source: str, dimension: int | None = None) -> tuple[float, ...]:
    """A spacing stated by a user for pictures: 2 or 3 finite positive numbers (mm per pixel, x then
    y[, z]), `dimension` of them when given.

    Raises:
        DataError: naming `source` (the spec, or the command-line option) and the values.
    """
    numbers = values if isinstance(values, (list, tuple)) else []
    if len(numbers) not in (2, 3) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in numbers
    ):
        raise DataError(
            f"{source}: spacing must be 2 or 3 positive numbers (mm per pixel, x then y[, z]), got {values!r}"
        )
    if dimension is not None and len(numbers) != dimension:
        raise DataError(f"{source}: spacing {list(numbers)} has {len(numbers)} values; the images are {dimension}D")
    return tuple(float(v) for v in numbers)


def _picture_spacing(path: Path, spacing: Sequence[float] | None, dimension: int) -> tuple[float, ...]:
    """The spacing a picture is read with: the stated one, else 1 (its positions are then pixels)."""
    if spacing is None:
        return (1.0,) * dimension
    if len(spacing) != dimension:
        raise DataError(f"{path}: a {len(spacing)}D spacing {tuple(spacing)} was stated for a {dimension}D image")
    return tuple(float(s) for s in spacing)


def _refuse_stated_spacing(path: Path, spacing: Sequence[float] | None) -> None:
    # A file's own spacing is never overridden: a stated one there is a mistake to report.
    if spacing is not None and carries_spacing(path):
        raise DataError(
            f"{path}: the file carries its own spacing; a spacing is stated only for pictures without one "
            f"({', '.join(PIXEL_UNIT_SUFFIXES)})"
        )


def image_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """The images named by command-line arguments: files as they are; a folder is one DICOM series
    when it holds one, otherwise the image files in it (sorted by name).

    Raises:
        DataError: a path does not exist, or a folder holds no images.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if not path.is_dir():
            found.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if p.is_file() and format_suffix(p) in IMAGE_SUFFIXES)
        # Only a folder of DICOM files (or of files without a known suffix) can be a series; probing any
        # other folder makes GDCM print "No Series were found" before the results.
        if all(format_suffix(p) == ".dcm" for p in inside) and _dicom_series_ids(path):
            found.append(path)
            continue
        if not inside:
            raise DataError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
        found += inside
    return found


def _dicom_series_ids(directory: Path) -> tuple[str, ...]:
    """The DICOM series in `directory`, without GDCM's warning when there is none (the caller says so).

    ITK's warning switch is global: only for finding inputs, before any reading thread starts."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_series(directory: Path) -> sitk.Image:
    """Read the DICOM series in `directory`; with several series, the one with the most files."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    if not series_ids:
        raise DataError(f"{directory}: the directory holds no DICOM series")
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid) for sid in series_ids}
    series_id = max(series_ids, key=lambda sid: len(files_by_series[sid]))
    if len(series_ids) > 1:
        logger.warning(
            "%s holds %d DICOM series; reading %s (%d files)",
            directory,
            len(series_ids),
            series_id,
            len(files_by_series[series_id]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_by_series[series_id])
    return reader.Execute()


def is_grey(pixels: np.ndarray) -> bool:
    """True when colour pixels hold a grey picture: red, green and blue within GREY_TOLERANCE everywhere.

    The one rule for grey images stored as RGB, for the library, the Slicer module and the web app.

    Args:
        pixels: (..., 3) RGB or (..., 4) RGBA values, channels last (alpha is not looked at).
    """
    red = pixels[..., 0].astype(np.float64)
    return all(np.abs(red - pixels[..., channel]).max(initial=0.0) <= GREY_TOLERANCE for channel in (1, 2))


def _to_scalar_float(image: sitk.Image, path: Path | str) -> sitk.Image:
    """Cast to float32; RGB/RGBA images become their grey channel (`is_grey`), else their luminance
    (alpha is dropped)."""
    components = image.GetNumberOfComponentsPerPixel()
    if "complex" in image.GetPixelIDTypeAsString():
        raise DataError(f"{path}: complex-valued images are not supported")
    if components == 1:
        if image.GetPixelIDTypeAsString().startswith("vector"):
            image = sitk.VectorIndexSelectionCast(image, 0)
        # Cast copies even to the same type; an image read as float32 is used as it is.
        return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
    if components not in (3, 4):
        raise DataError(
            f"{path}: images with {components} components per pixel are not supported (expected grayscale, RGB or RGBA)"
        )
    if is_grey(sitk.GetArrayViewFromImage(image)):
        return sitk.Cast(sitk.VectorIndexSelectionCast(image, 0), sitk.sitkFloat32)
    logger.info("%s: a colour image (red, green and blue differ); landmarks are detected on its luminance", path)
    red, green, blue = (
        sitk.Cast(sitk.VectorIndexSelectionCast(image, channel), sitk.sitkFloat32) * weight
        for channel, weight in enumerate(LUMINANCE_WEIGHTS)
    )
    return red + green + blue


def _drop_single_slice(image: sitk.Image, path: Path | str) -> sitk.Image:
    """A 3D image with one slice along the last axis -> 2D: in the axial plane with its in-plane
    geometry; in another plane (e.g. a sagittal X-ray) in its own plane (see `SlicePlacement`)."""
    width, height, _ = image.GetSize()
    if in_axial_plane(np.reshape(image.GetDirection(), (3, 3))):
        return sitk.Extract(image, [width, height, 0], [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    logger.info("%s: a single slice outside the axial plane; detected in its own plane", path)
    plane = sitk.Extract(image, [width, height, 0], [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
    plane.SetOrigin((0.0, 0.0))
    return plane


@dataclass(frozen=True)
class SlicePlacement:
    """Where a file's single slice outside the axial plane (e.g. a sagittal X-ray) lies in LPS space.

    No two LPS axes describe such a slice, so `read_image` gives it in its own plane: origin 0,
    identity direction, its spacing; a 2D position is mm along its rows and columns from its first
    pixel. Its landmarks are written in space (3D LPS points) and read back into the plane.

    Attributes:
        origin: (3,) LPS position of the first pixel.
        spacing: (3,) the file's spacing (the third: its slice thickness).
        direction: (3, 3) LPS directions of the file's axes (columns: rows, columns, slice normal).
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    def to_space(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) positions in the plane -> (N, 3) LPS points (NaN rows kept)."""
        return self.origin + np.asarray(points, dtype=np.float64) @ self.direction[:, :2].T

    def to_plane(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) LPS points -> (N, 2) positions in the plane (a point off it goes to its projection)."""
        return (np.asarray(points, dtype=np.float64) - self.origin) @ self.direction[:, :2]

    def in_space(self, plane_image: sitk.Image) -> sitk.Image:
        """A 2D image on the slice's own grid (e.g. a heatmap) as the one-slice 3D image the file is."""
        volume = sitk.JoinSeries(plane_image)
        volume.SetOrigin(self.origin.tolist())
        volume.SetSpacing(self.spacing.tolist())
        volume.SetDirection(self.direction.ravel().tolist())
        return volume


def _header(path: Path) -> sitk.ImageFileReader:
    """A reader holding an image file's header (size, spacing, origin, direction), pixels unread.

    Raises:
        DataError: naming the path.
    """
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read image ({_reason(error)})") from error
    return reader


def slice_placement(path: str | os.PathLike) -> SlicePlacement | None:
    """The placement of an image file holding one slice outside the axial plane (from its header);
    None for any other image (pictures are 2D; folders, a DICOM series, are not read here)."""
    path = Path(path)
    if path.is_dir() or not carries_spacing(path):  # (folders and pictures: no header to read)
        return None
    reader = _header(path)
    size = reader.GetSize()
    if len(size) != 3 or size[2] != 1:
        return None
    direction = np.reshape(reader.GetDirection(), (3, 3))
    if in_axial_plane(direction):
        return None
    return SlicePlacement(
        np.asarray(reader.GetOrigin(), dtype=np.float64), np.asarray(reader.GetSpacing(), dtype=np.float64), direction
    )


def as_scalar_image(image: sitk.Image, dimension: int | None, source: str = "image") -> sitk.Image:
    """An in-memory image as the networks take it: scalar float32, 2D or 3D.

    Color becomes luminance; a 3D image with one slice along the last axis becomes 2D.

    Args:
        image: any SimpleITK image.
        dimension: expected dimension (2 or 3); None accepts both.
        source: how to name the image in error messages (e.g. its file path).

    Raises:
        DataError: unsupported dimension or pixel type, or a dimension other than `dimension`.
    """
    if image.GetDimension() not in (2, 3):
        raise DataError(f"{source}: {image.GetDimension()}D images are not supported (only 2D and 3D)")
    image = _to_scalar_float(image, source)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and dimension != 3:
        image = _drop_single_slice(image, source)
    if dimension is not None and image.GetDimension() != dimension:
        raise DataError(f"{source}: the image is {image.GetDimension()}D but the model expects {dimension}D images")
    return image


def _reason(error: Exception) -> str:
    # SimpleITK's messages start with the C++ source location; the last line holds the reason.
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def read_image(
    path: str | os.PathLike, dimension: int | None = None, spacing: Sequence[float] | None = None
) -> sitk.Image:
    """Read a 2D or 3D image as a scalar float32 SimpleITK image with its physical geometry.

    Supported: 2D PNG, TIFF, JPEG, BMP, MHA/NRRD and single DICOM files; 3D NIfTI, NRRD, MHA and
    DICOM series directories. A 3D image with exactly one slice along the last axis becomes 2D.
    For PNG/JPEG/BMP/TIFF the spacing is `spacing` when stated (positions in mm), else 1 (positions
    in pixels; see `spacing_unit`); origin and direction are as SimpleITK reads them (0, identity).

    Args:
        path: image file, or a directory holding a DICOM series.
        dimension: expected dimension (2 or 3); None accepts both.
        spacing: mm per pixel (x then y[, z]) for a picture; an error for a file with its own spacing.

    Returns:
        sitk.Image of pixel type sitkFloat32 and dimension 2 or 3; origin/spacing/direction in LPS mm.

    Raises:
        DataError: the file is missing or unreadable, has an unsupported pixel type or dimension,
            or its dimension differs from `dimension`; `spacing` is given for a file with its own, or
            has another dimension than the image. The message names the path.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    _refuse_stated_spacing(path, spacing)
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read image ({_reason(error)})") from error

    image = as_scalar_image(image, dimension, str(path))
    if not carries_spacing(path):
        image.SetSpacing(_picture_spacing(path, spacing, image.GetDimension()))
    return image


def read_image_information(
    path: str | os.PathLike, spacing: Sequence[float] | None = None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and spacing of an image file from its header alone, as `read_image` gives them (a
    picture's spacing is the stated one, else 1); a 3D file of one slice keeps its third axis.

    Raises:
        DataError: as `read_image`, naming the path.
    """
    path = Path(path)
    _refuse_stated_spacing(path, spacing)
    reader = _header(path)
    size = tuple(reader.GetSize())
    if carries_spacing(path):
        return size, tuple(reader.GetSpacing())
    return size, _picture_spacing(path, spacing, len(size))


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write `image` to `path` (format from the suffix), replacing any existing file atomically.

    The file is written to a temporary name in the same folder and then renamed, so a failure never
    leaves a half-written file (except for header+data formats .mhd/.hdr, written in place).

    Args:
        image: any SimpleITK image the target format can hold (e.g. PNG needs 8/16-bit integers).
        path: target file; NRRD, NIfTI and MetaImage files are compressed.

    Raises:
        DataError: the image cannot be written (names the path and the reason).
    """
    path = Path(path)
    suffix = format_suffix(path)
    compress = suffix in (".nrrd", ".seg.nrrd", ".nii", ".nii.gz", ".mha")
    try:
        if suffix in _MULTI_FILE_SUFFIXES:
            sitk.WriteImage(image, str(path), compress)
            return
        with atomic_output(path, suffix) as temporary:
            sitk.WriteImage(image, str(temporary), compress)
    except (RuntimeError, OSError) as error:
        raise DataError(f"{path}: cannot write image ({_reason(error)})") from error

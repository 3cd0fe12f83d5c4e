"""Batch detection's outputs: which files a run writes for which image, writing them, and the review
summary.

`scn-landmarks detect` runs the images in one process, `cluster.py` on Dask workers; both name and
check their outputs with `batch_images` and `check_outputs` and write each image's with
`write_outputs`, so a cohort's files are the same however it ran.

Imports no torch: the command line plans (and refuses) before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .errors import DataError
from .io.atomic import write_text_atomically
from .io.bids import BIDS_DESCRIPTION, bids_t1w_images, derivative_description, is_bids_dataset
from .io.images import (
    carries_spacing,
    checked_spacing,
    image_inputs,
    read_image,
    slice_placement,
    spacing_unit,
    write_image,
)
from .io.landmarks import write_landmarks
from .io.paths import output_stems, refuse_existing
from .landmark_set import LandmarkSet
from .vocabulary import HeatmapKind, LandmarkStatus

if TYPE_CHECKING:  # these import torch, which planning a batch does not need
    from .bundle import ModelDescription
    from .calibration import ImageReview
    from .inference import Prediction

# Written by `detect` beside the landmark files: the images in the order to review them.
REVIEW_SUMMARY = "summary.csv"


@dataclass(frozen=True)
class BatchRequest:
    """What a batch writes, the same for every image.

    Attributes:
        out: the output folder.
        landmark_suffix: the landmark files' format: ".mrk.json", ".fcsv" or ".csv".
        heatmaps: also write the final, local-appearance and spatial-configuration heatmaps (.nrrd).
    """

    out: Path
    landmark_suffix: str = ".mrk.json"
    heatmaps: bool = False


@dataclass(frozen=True)
class BatchImage:
    """One input image and where its outputs go.

    Attributes:
        path: the image file (or DICOM series folder).
        stem: its outputs' path below the output folder, without suffix: the image's stem, or for a
            BIDS dataset's image its place in a derivatives tree ('sub-01/ses-1/anat/sub-01_ses-1_T1w').
        dataset: the BIDS dataset the image comes from; None for other inputs.
        spacing: the spacing stated for a picture (`detect --spacing`, mm per pixel); None for files
            that carry their own and for pictures left in pixels.
    """

    path: Path
    stem: str
    dataset: Path | None = None  # the BIDS dataset the image comes from
    spacing: tuple[float, ...] | None = None

    @property
    def unit(self) -> str:
        """The unit of the image's positions: 'mm', or 'px' for pictures without (stated) spacing."""
        return spacing_unit(self.path, self.spacing)

    def read(self, model: ModelDescription, ahead: sitk.Image | None = None) -> sitk.Image:
        """The image as `model` detects it: with the stated spacing, in the model's dimension.

        Args:
            ahead: the image already read without a dimension (a one-slice volume is then 2D), used
                when it has the model's.

        Raises:
            DataError: the file cannot be read, or it is a picture in pixels for a model in mm (the
                message says to give --spacing), naming the file.
        """
        image = ahead
        if image is None or image.GetDimension() != model.dimension:
            image = read_image(self.path, model.dimension, self.spacing)
        # After reading: a broken file says so first.
        model.check_image_unit(
            self.unit, str(self.path), "give its spacing in mm per pixel with --spacing X Y (e.g. --spacing 0.1 0.1)"
        )
        return image

    def landmark_file(self, request: BatchRequest) -> Path:
        return request.out / f"{self.stem}{request.landmark_suffix}"

    def heatmap_file(self, request: BatchRequest, kind: str) -> Path:
        return request.out / f"{self.stem}_heatmap_{kind}.nrrd"

    def outputs(self, request: BatchRequest) -> list[Path]:
        """Every file the image gets; the landmark file last, as `write_outputs` writes them."""
        heatmaps = [self.heatmap_file(request, kind) for kind in HeatmapKind] if request.heatmaps else []
        return [*heatmaps, self.landmark_file(request)]


@dataclass
class ImageOutcome:
    """What became of one image: its landmarks as written, or why it has none.

    Attributes:
        landmarks: positions in the image's unit, confidences and expected errors; None on failure.
        status: per landmark: detected, low confidence or missing.
        flagged: (N,) points expected to be worse than their landmark usually is; None when the model
            is not calibrated.
        mirrored: found on the image's mirror image.
        error: why the image has no landmarks ("" when it has them), naming the file.
    """

    image: BatchImage
    landmarks: LandmarkSet | None = None
    status: list[str] = field(default_factory=list)
    flagged: np.ndarray | None = None
    mirrored: bool = False
    error: str = ""

    def review(self) -> ImageReview:
        """The image's line of the review summary."""
        from .calibration import ImageReview, image_review

        name = self.image.path.name
        if self.landmarks is None:
            return ImageReview(name, None, float("nan"), self.error)
        return image_review(name, self.landmarks, self.flagged)

    def describe(self, request: BatchRequest) -> str:
        """One line for the user: what was found and where it was written, or the error."""
        if self.landmarks is None:
            return f"error: {self.error}"
        found = sum(status != LandmarkStatus.MISSING for status in self.status)
        mirrored = " (found on the mirror image)" if self.mirrored else ""
        return (
            f"{self.image.path}: {found}/{len(self.status)} landmarks{mirrored} -> {self.image.landmark_file(request)}"
        )


def batch_images(arguments: list[str | os.PathLike], spacing: Sequence[float] | None = None) -> list[BatchImage]:
    """The images named on the command line, each with its distinct output stem.

    Files are taken as they are; a BIDS dataset folder stands for its T1-weighted images (whose
    outputs go to the same places in a derivatives tree); another folder for the images in it, or
    its DICOM series (see io.images.image_inputs).

    Args:
        spacing: mm per pixel (x, y[, z]) of the pictures among them (PNG, JPEG, BMP, TIFF); files
            that carry their own spacing keep it.

    Raises:
        DataError: a path does not exist, a folder holds no images, a dataset no T1w image, two
            inputs would write the same files, or `spacing` is given but no image is a picture.
    """
    entries: list[tuple[Path, str | None, Path | None]] = []
    for argument in map(Path, arguments):
        if argument.is_dir() and is_bids_dataset(argument):
            entries += [(image, stem, argument) for image, stem in bids_t1w_images(argument)]
        else:
            entries += [(image, None, None) for image in image_inputs([argument])]
    plain = iter(output_stems([image for image, stem, _ in entries if stem is None]))
    stated = None if spacing is None else checked_spacing(spacing, "--spacing")
    images = [
        BatchImage(image, next(plain) if stem is None else stem, dataset, None if carries_spacing(image) else stated)
        for image, stem, dataset in entries
    ]
    if stated is not None and all(image.spacing is None for image in images):
        raise DataError(
            f"--spacing is for pictures without spacing (PNG, JPEG, BMP, TIFF); {images[0].path}"
            f"{' and the others' if len(images) > 1 else ''} carry their own"
        )
    seen: dict[str, Path] = {}
    for image in images:
        earlier = seen.setdefault(image.stem.casefold(), image.path)
        if earlier != image.path:
            raise DataError(f"{image.path}: its results would overwrite those of {earlier}; rename one of them")
    return images


def check_outputs(
    images: list[BatchImage], request: BatchRequest, overwrite: bool, more: list[Path] | None = None
) -> None:
    """Check, before the first file is written, every file a batch could write: a clinician's corrected
    file in the output folder is never replaced unless asked.

    Args:
        more: the batch's other files (beside the summary and, for BIDS input, the derivatives'
            dataset_description.json).

    Raises:
        DataError: an image's file would take a batch file's name, or (unless `overwrite`) a file exists.
    """
    batch_files = [request.out / REVIEW_SUMMARY, *(more or [])]
    if any(image.dataset is not None for image in images):
        batch_files.append(request.out / BIDS_DESCRIPTION)
    names = {path.name.casefold() for path in batch_files}
    for image in images:
        for target in image.outputs(request):
            if target.parent == request.out and target.name.casefold() in names:
                raise DataError(
                    f"{target}: the landmark file of {image.path} would take the name of the batch's own "
                    f"{target.name}; choose another --format or rename that image"
                )
    refuse_existing([*(target for image in images for target in image.outputs(request)), *batch_files], overwrite)


def write_outputs(image: BatchImage, prediction: Prediction, request: BatchRequest) -> ImageOutcome:
    """Write one image's files (each atomically; the landmark file last) and say what was found.

    Args:
        prediction: the image's, with its heatmaps when the request has them.

    Raises:
        DataError: a file cannot be written (names it).
    """
    # A slice outside the axial plane was detected in its own plane: its outputs go back into space.
    placement = slice_placement(image.path)
    for kind in prediction.heatmap_kinds:
        heatmap = prediction.heatmap(kind)
        write_image(heatmap if placement is None else placement.in_space(heatmap), image.heatmap_file(request, kind))
    landmarks = prediction.landmarks
    if placement is not None:
        landmarks = dataclasses.replace(landmarks, points_lps=placement.to_space(landmarks.points_lps))
    # Positions and expected errors are in the image's frame, whatever unit the model learned in.
    write_landmarks(landmarks, image.landmark_file(request), prediction.status, image.unit)
    return ImageOutcome(
        image,
        landmarks,
        [str(status) for status in prediction.status],
        prediction.flagged,
        prediction.mirrored,
    )


def write_summary(request: BatchRequest, outcomes: list[ImageOutcome]) -> Path:
    """Write summary.csv (images to look at first first, failed ones at the top) for `outcomes`, in
    input order; for BIDS input, also the derivatives' dataset_description.json."""
    from .calibration import write_review_summary

    sources = sorted({outcome.image.dataset for outcome in outcomes if outcome.image.dataset is not None})
    if sources:
        description = json.dumps(derivative_description(sources), indent=2) + "\n"
        write_text_atomically(request.out / BIDS_DESCRIPTION, description)
    unit = "/".join(sorted({outcome.image.unit for outcome in outcomes}))
    coverage = next((o.landmarks.coverage for o in outcomes if o.landmarks is not None and o.landmarks.coverage), None)
    rows = [outcome.review() for outcome in outcomes]
    return write_review_summary(request.out / REVIEW_SUMMARY, rows, unit, coverage)

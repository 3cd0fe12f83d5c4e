"""Annotation check: what silently damages training, found before training.

`check_dataset` reads every image and landmark file of a dataset spec and reports, each finding
naming the image (and landmark):

* images pixel-identical to another image of the set (one radiograph annotated twice leaks between
  splits and weighs double);
* points outside their image, images without any landmark, landmarks missing in many images;
* misplaced or swapped labels: every image's configuration is aligned to the set's mean
  configuration by a similarity transform (reflections allowed, so left/right-facing images align),
  and a point far from where the alignment puts its landmark, measured against that landmark's
  usual spread, is reported; when exchanging two labels of the image fits the mean configuration
  well, the pair is reported as swapped instead;
* images of another dimension, unit (pixels vs mm) or a very different spacing from the rest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import DataError
from ..geometry import ImageGeometry
from ..landmark_set import LandmarkSet
from ..pose import Pose, similarity_fit
from .spec import DatasetSpec, ImageEntry, load_dataset_spec


class FindingKind(StrEnum):
    UNREADABLE = "unreadable"
    DUPLICATE_IMAGE = "duplicate image"
    OUTSIDE_IMAGE = "outside image"
    NO_LANDMARKS = "no landmarks"
    OFTEN_MISSING = "often missing"
    MISPLACED = "misplaced landmark"
    SWAPPED = "swapped labels"
    DIMENSION = "inconsistent dimension"
    SPACING = "inconsistent spacing"


@dataclass(frozen=True)
class Finding:
    """One problem: the image id (None for the whole set), the landmark (None for the whole image)."""

    image: str | None
    landmark: str | None
    kind: FindingKind
    message: str

    def as_dict(self) -> dict[str, str | None]:
        return {**asdict(self), "kind": str(self.kind)}

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.image, self.landmark) if part)
        return f"{where}: {self.message}" if where else self.message


# A landmark absent from more than this share of the images is reported once for the set.
OFTEN_MISSING_SHARE = 0.25
# Residual distances of a correctly placed point follow about a Rayleigh law; beyond this many of
# its sigmas a point is reported (for 2000 good points, fewer than 0.01 false reports expected).
MISPLACED_SIGMAS = 5.0
# A swap must bring both points within this many sigmas of their landmarks.
SWAP_FITS_SIGMAS = 3.0
# Spread floor, as a share of the mean configuration's size: exact (synthetic) or very consistent
# annotations must not make every sub-millimetre difference an outlier.
MIN_SPREAD_SHARE = 0.01
# A landmark is judged by this many nearest landmarks of the mean configuration: a group moving
# together (an open jaw, a spread finger) is anatomy, a point leaving its neighbours is a mistake.
NEIGHBOURS = 6
# The shape check needs enough images to say what "usual" is.
MIN_IMAGES_FOR_SHAPE = 5
# An image's fit starts from its best-fitting share of points, then takes in every point within
# TRIM_FACTOR times their median residual.
TRIMMED_SHARE = 0.6
TRIM_FACTOR = 4.0
# Spacings more than this factor from the set's median are reported.
SPACING_FACTOR = 2.0
# Median of a Rayleigh distribution in units of its sigma: sqrt(2 ln 2).
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))

# Called after each image is read: (done, total, image id).
ImageProgress = Callable[[int, int, str], None]


@dataclass
class _Case:
    entry: ImageEntry
    geometry: ImageGeometry
    unit: str
    pixels_hash: str
    landmarks: LandmarkSet | None = None


def check_dataset(spec: DatasetSpec | str | Path, progress: ImageProgress | None = None) -> list[Finding]:
    """All findings for every image of the dataset (all splits), in image order then kind.

    Args:
        spec: a dataset spec or its TOML path.
        progress: optional callable(done, total, image id), called after each image is read.

    Raises:
        DataError: the spec itself cannot be read (a broken image or landmark file is a finding).
    """
    spec = spec if isinstance(spec, DatasetSpec) else load_dataset_spec(spec)
    findings: list[Finding] = []
    cases: list[_Case] = []
    for number, entry in enumerate(spec.entries, start=1):
        try:
            image = entry.read()
        except DataError as error:
            findings.append(Finding(entry.id, None, FindingKind.UNREADABLE, str(error)))
            continue
        finally:
            if progress is not None:
                progress(number, len(spec.entries), entry.id)
        case = _Case(entry, ImageGeometry.of(image), entry.unit, _pixels_hash(image))
        cases.append(case)
        if case.geometry.dimension != spec.dimension:
            findings.append(
                Finding(
                    entry.id,
                    None,
                    FindingKind.DIMENSION,
                    f"the image is {case.geometry.dimension}D; the dataset is {spec.dimension}D",
                )
            )
            continue
        try:
            case.landmarks = spec.load_landmarks([entry], {entry.id: case.geometry})[entry.id]
        except DataError as error:
            findings.append(Finding(entry.id, None, FindingKind.UNREADABLE, str(error)))
    usable = [c for c in cases if c.landmarks is not None]
    findings += _duplicate_images(cases)
    findings += _spacing_findings(cases)
    outside = _outside_and_empty(usable)
    findings += outside
    findings += _often_missing(usable, list(spec.landmark_names))
    # A point off its image is reported as that alone, not also as misplaced.
    reported = {(f.image, f.landmark) for f in outside}
    findings += _configuration_findings(usable, list(spec.landmark_names), reported)
    order = {c.entry.id: i for i, c in enumerate(cases)}
    kinds = list(FindingKind)
    return sorted(findings, key=lambda f: (order.get(f.image or "", -1), kinds.index(f.kind), f.landmark or ""))


def _pixels_hash(image: sitk.Image) -> str:
    array = sitk.GetArrayViewFromImage(image)
    return hashlib.sha256(str(array.shape).encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


def _duplicate_images(cases: list[_Case]) -> list[Finding]:
    first_with: dict[str, str] = {}
    findings = []
    for case in cases:
        earlier = first_with.setdefault(case.pixels_hash, case.entry.id)
        if earlier != case.entry.id:
            findings.append(
                Finding(
                    case.entry.id,
                    None,
                    FindingKind.DUPLICATE_IMAGE,
                    f"pixel-identical to image '{earlier}' ({case.entry.image.name}); keep one, "
                    "or keep both in the same split",
                )
            )
    return findings


def _spacing_findings(cases: list[_Case]) -> list[Finding]:
    findings = []
    units = [c.unit for c in cases]
    majority_unit = max(set(units), key=units.count) if units else "mm"
    for case in cases:
        if case.unit != majority_unit:
            findings.append(
                Finding(
                    case.entry.id,
                    None,
                    FindingKind.SPACING,
                    f"measured in {case.unit}"
                    + (" (a picture without a stated spacing)" if case.unit == "px" else "")
                    + f" while the other images are in {majority_unit}",
                )
            )
    same_unit = [c for c in cases if c.unit == majority_unit and c.geometry.dimension == cases[0].geometry.dimension]
    if len(same_unit) < 2:
        return findings
    median = np.median([c.geometry.spacing for c in same_unit], axis=0)
    for case in same_unit:
        ratio = np.asarray(case.geometry.spacing) / median
        if np.any(ratio > SPACING_FACTOR) or np.any(ratio < 1.0 / SPACING_FACTOR):
            spacing = " x ".join(f"{s:.4g}" for s in case.geometry.spacing)
            usual = " x ".join(f"{s:.4g}" for s in median)
            findings.append(
                Finding(
                    case.entry.id,
                    None,
                    FindingKind.SPACING,
                    f"spacing {spacing} {case.unit} is far from the set's usual {usual}",
                )
            )
    return findings


def _outside_and_empty(cases: list[_Case]) -> list[Finding]:
    findings = []
    for case in cases:
        landmarks = case.landmarks
        assert landmarks is not None
        if not landmarks.present.any():
            findings.append(
                Finding(case.entry.id, None, FindingKind.NO_LANDMARKS, "the image has no landmark (all are missing)")
            )
            continue
        index = case.geometry.physical_to_index(landmarks.points_lps)
        # A voxel covers its center +- half a voxel: beyond that the point is off the image.
        outside = np.any((index < -0.5) | (index > np.asarray(case.geometry.size) - 0.5), axis=1)
        for i in np.flatnonzero(outside & landmarks.present):
            position = ", ".join(f"{v:.1f}" for v in index[i])
            size = " x ".join(str(n) for n in case.geometry.size)
            findings.append(
                Finding(
                    case.entry.id,
                    landmarks.names[i],
                    FindingKind.OUTSIDE_IMAGE,
                    f"the point lies outside the image (voxel index {position}; the image is {size})",
                )
            )
    return findings


def _often_missing(cases: list[_Case], names: list[str]) -> list[Finding]:
    if not cases:
        return []
    present = np.array([c.landmarks.present for c in cases if c.landmarks is not None])
    findings = []
    for j, name in enumerate(names):
        missing = int((~present[:, j]).sum())
        if missing >= 2 and missing > OFTEN_MISSING_SHARE * len(cases):
            findings.append(
                Finding(None, name, FindingKind.OFTEN_MISSING, f"missing in {missing} of {len(cases)} images")
            )
    return findings


@dataclass
class _Alignment:
    """The set's mean configuration and, per image, the points its fit to that mean trusted."""

    mean: np.ndarray  # (landmarks, d), centered, unit RMS size
    fitted: np.ndarray  # (images, landmarks) bool: the points each image's fit kept


def _fit(points: np.ndarray, target: np.ndarray, use: np.ndarray) -> Pose:
    """The similarity (reflections allowed) taking an image's `use` points onto the mean configuration."""
    return similarity_fit(points, target, use.astype(np.float64), with_scale=True, mirrored=None)


def _trimmed_fit(
    points: np.ndarray, target: np.ndarray, use: np.ndarray, start: np.ndarray | None = None
) -> tuple[Pose, np.ndarray]:
    """`_fit` that a few swapped or misplaced labels cannot pull.

    Least trimmed squares: the fit is refined on the best-fitting share of the points until that
    subset settles, then redone on every point within a few times that subset's typical residual.
    `start` (default `use`) is the subset the refinement starts from. Returns the fit and the points
    it used.
    """
    count = int(use.sum())
    best_share = max(points.shape[1] + 1, math.ceil(TRIMMED_SHARE * count))
    subset = use.copy() if start is None or (start & use).sum() <= points.shape[1] else start & use
    for _ in range(20):
        residuals = np.linalg.norm(_fit(points, target, subset).to_image(points) - target, axis=1)
        best = np.zeros_like(use)
        best[np.argsort(np.where(use, residuals, np.inf))[:best_share]] = True
        if np.array_equal(best, subset):
            break
        subset = best
    typical = float(np.median(residuals[subset]))
    fitted = use & (residuals <= max(TRIM_FACTOR * typical, MIN_SPREAD_SHARE))
    return _fit(points, target, fitted), fitted


def _align(points: np.ndarray, present: np.ndarray) -> _Alignment:
    """Generalised Procrustes alignment of all images, each fitted on its trimmed points."""
    dimension = points.shape[2]
    fullest = int(np.argmax(present.sum(axis=1)))
    mean = np.where(present[fullest][:, None], points[fullest], np.nan)
    aligned = np.full_like(points, np.nan)
    fitted = np.zeros_like(present)
    for _ in range(10):
        mean = mean - np.nanmean(mean, axis=0)
        mean = mean / math.sqrt(np.nansum(mean**2) / max(np.isfinite(mean[:, 0]).sum(), 1))
        for i in range(len(points)):
            use = present[i] & np.isfinite(mean[:, 0])
            if use.sum() < dimension + 1:
                continue
            pose, fitted[i] = _trimmed_fit(points[i], mean, use)
            aligned[i] = pose.to_image(points[i])
        with np.errstate(invalid="ignore"):
            kept = np.where(fitted[:, :, None], aligned, np.nan)
            new_mean = np.nanmean(kept, axis=0) if np.isfinite(kept).any() else mean
        new_mean = np.where(np.isfinite(new_mean), new_mean, mean)
        if np.allclose(new_mean, mean, equal_nan=True, atol=1e-9):
            break
        mean = new_mean
    return _Alignment(mean, fitted)


@dataclass
class _LocalFits:
    """Each landmark judged by its neighbours: per image and landmark, the similarity transform
    fitted on that landmark's nearest neighbours (in the mean configuration) into the mean frame."""

    poses: list[list[Pose | None]]  # [image][landmark]; None where too few neighbours were found

    def place(self, image: int, landmark: int, point: np.ndarray) -> np.ndarray:
        """`point` of `image` mapped into the mean frame as `landmark`'s neighbours see it (NaN without a fit)."""
        pose = self.poses[image][landmark]
        return np.full(len(point), np.nan) if pose is None else pose.to_image(point)

    def scale(self, image: int, landmark: int) -> float:
        """Mean-frame units per image unit of that fit."""
        pose = self.poses[image][landmark]
        return math.nan if pose is None else pose.scale


def _local_fits(points: np.ndarray, present: np.ndarray, alignment: _Alignment) -> _LocalFits:
    mean = alignment.mean
    images, count, dimension = points.shape
    fits = _LocalFits([[None] * count for _ in range(images)])
    distances = np.linalg.norm(mean[:, None] - mean[None], axis=2)
    for j in range(count):
        order = [k for k in np.argsort(np.nan_to_num(distances[j], nan=np.inf)) if k != j]
        neighbours = np.zeros(count, dtype=bool)
        neighbours[order[:NEIGHBOURS]] = True
        for i in range(images):
            use = neighbours & present[i] & np.isfinite(mean[:, 0])
            if use.sum() < dimension + 1:
                continue
            # Started from the points the image's whole-configuration fit trusted, so that a grossly
            # wrong neighbour cannot steer the first, untrimmed fit.
            fits.poses[i][j] = _trimmed_fit(points[i], mean, use, alignment.fitted[i])[0]
    return fits


def _configuration_findings(
    cases: list[_Case], names: list[str], reported: set[tuple[str | None, str | None]]
) -> list[Finding]:
    if len(cases) < MIN_IMAGES_FOR_SHAPE:
        return []
    points = np.array([c.landmarks.points_lps for c in cases if c.landmarks is not None])
    present = np.all(np.isfinite(points), axis=2)
    for i, case in enumerate(cases):
        for j, name in enumerate(names):
            if (case.entry.id, name) in reported:
                present[i, j] = False
                points[i, j] = np.nan
    alignment = _align(points, present)
    mean = alignment.mean
    fits = _local_fits(points, present, alignment)
    placed = np.array([[fits.place(i, j, points[i, j]) for j in range(len(names))] for i in range(len(points))])
    distances = np.linalg.norm(placed - mean, axis=2)
    # A landmark's usual spread is a median over the images, which a few wrong points barely move.
    spreads = np.array(
        [
            max(float(np.nanmedian(distances[:, j])) / _RAYLEIGH_MEDIAN, MIN_SPREAD_SHARE)
            if np.isfinite(distances[:, j]).any()
            else MIN_SPREAD_SHARE
            for j in range(len(names))
        ]
    )
    residuals = distances / spreads
    suspicious = present & np.nan_to_num(residuals > MISPLACED_SIGMAS)

    findings = []
    unit = cases[0].unit
    for i, case in enumerate(cases):
        handled: set[int] = set()
        for j in map(int, np.flatnonzero(suspicious[i])):
            if j in handled:
                continue
            partner = _swap_partner(fits, points, mean, spreads, residuals, present, i, j)
            if partner is not None:
                handled.update((j, partner))
                first, second = sorted((j, partner))
                findings.append(
                    Finding(
                        case.entry.id,
                        names[first],
                        FindingKind.SWAPPED,
                        f"'{names[first]}' and '{names[second]}' look swapped: exchanged, both fit "
                        "where the rest of the set puts them",
                    )
                )
                continue
            handled.add(j)
            to_image = 1.0 / fits.scale(i, j)
            findings.append(
                Finding(
                    case.entry.id,
                    names[j],
                    FindingKind.MISPLACED,
                    f"the point is {distances[i, j] * to_image:.1f} {unit} from where its neighbouring "
                    f"landmarks put it ({residuals[i, j]:.1f} times the landmark's usual spread of "
                    f"{spreads[j] * to_image:.1f} {unit})",
                )
            )
    return findings


def _swap_partner(
    fits: _LocalFits,
    points: np.ndarray,
    mean: np.ndarray,
    spreads: np.ndarray,
    residuals: np.ndarray,
    present: np.ndarray,
    image: int,
    landmark: int,
) -> int | None:
    """The landmark whose exchange with `landmark` makes both fit, best first; None if none does."""
    best, best_cost = None, math.inf
    for other in np.flatnonzero(present[image]):
        if other == landmark:
            continue
        here = np.linalg.norm(fits.place(image, landmark, points[image, other]) - mean[landmark]) / spreads[landmark]
        there = np.linalg.norm(fits.place(image, int(other), points[image, landmark]) - mean[other]) / spreads[other]
        if max(here, there) > SWAP_FITS_SIGMAS:
            continue
        cost = here**2 + there**2
        if cost < best_cost and cost < residuals[image, landmark] ** 2 + residuals[image, other] ** 2:
            best, best_cost = int(other), cost
    return best

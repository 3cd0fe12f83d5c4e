"""Pose normalisation: the same anatomy wherever the head lies.

A network trained on images in one pose (the training images' physical orientation and, for models
in pixels, their resolution) finds points that move when the same anatomy arrives rotated in the
scanner frame or at another resolution. Detection therefore runs twice when needed:

1. a first pass in the image's own pose (models in pixels: over a ladder of trial scales, the most
   plausible first, until one is confident);
2. a rigid fit (models in mm: the image's spacing gives the scale) or similarity fit (models in
   pixels: their pixels have no physical size, so the scale is found from the anatomy) of the model's
   mean landmark configuration to the first pass's points: the image's `Pose`;
3. unless that pose is already canonical (within `CANONICAL_ROTATION_DEG` and `CANONICAL_SCALE`), a
   second pass, refinement included, on the image given the canonical frame by its header alone
   (origin, direction, spacing: no resampling beyond the network grid's own), mapped back exactly.
   Its coarse grid is fixed in the canonical frame (the training grid's size, centered on the mean
   configuration), so the anatomy meets the same grid cells whatever the image's extent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import ModelFileError
from .geometry import ImageGeometry
from .landmark_set import LandmarkSet

# A first pass whose fitted pose is within these of the canonical one is kept as it is: the second
# pass would cost as much again and move the points by less than the network's own jitter.
CANONICAL_ROTATION_DEG = 1.0
CANONICAL_SCALE = 0.01  # relative
# Trial scales of the first pass of a model in pixels, as factors of 2**(1/2): neighbours are 1.41x
# apart, and the cephalometric network keeps its points within a few pixels at 0.8x-1.25x.
TRIAL_SCALE_STEPS = (-2, -1, 0, 1, 2)
# In the fit, points whose residual exceeds this many times the median residual are left out (a
# first pass may miss a landmark by far; one such point would tilt the whole fit).
OUTLIER_RESIDUALS = 3.0
# Rounds of the generalised Procrustes mean in `anatomical_scales`: the scales settle within 1e-4 in two.
PROCRUSTES_ROUNDS = 3


@dataclass(frozen=True)
class MeanConfiguration:
    """Where a model's landmarks lie, on average, in its training images' physical frame.

    Attributes:
        points: (N, d) positions in the model's unit, model order; a row of NaN for a landmark
            that no training image has.
        source: how it was obtained (e.g. "mean of the 81 training images' landmarks").
    """

    points: tuple[tuple[float, ...], ...]
    source: str

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"points": [[None if math.isnan(v) else v for v in row] for row in self.points], "source": self.source}

    @classmethod
    def from_json(cls, values: Any, names: tuple[str, ...], dimension: int, source: str) -> MeanConfiguration:
        """Parse a model file's mean configuration.

        Raises:
            ModelFileError: naming `source`, when it does not have one finite point of `dimension`
                coordinates per landmark.
        """
        try:
            rows = [[math.nan if v is None else float(v) for v in row] for row in values["points"]]
            text = str(values.get("source", ""))
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ModelFileError(f"{source}: malformed mean_configuration ({error})") from None
        if len(rows) != len(names) or any(len(row) != dimension for row in rows):
            raise ModelFileError(
                f"{source}: mean_configuration must have {len(names)} points of {dimension} "
                f"coordinates (one per landmark), got {len(rows)} points"
            )
        if (
            any(math.isinf(v) for row in rows for v in row)
            or sum(not any(map(math.isnan, r)) for r in rows) <= dimension
        ):
            raise ModelFileError(
                f"{source}: mean_configuration needs more than {dimension} finite points and no infinite coordinate"
            )
        return cls(tuple(tuple(row) for row in rows), text)


def mean_configuration(landmark_sets: Iterable[LandmarkSet], source: str) -> MeanConfiguration:
    """The per-landmark mean position over landmark sets in one physical frame (missing points ignored)."""
    stacked = np.stack([s.points_lps for s in landmark_sets])
    present = np.isfinite(stacked).all(axis=2)
    counts = present.sum(axis=0)
    sums = np.where(present[..., None], stacked, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)
    return MeanConfiguration(tuple(tuple(float(v) for v in row) for row in mean), source)


@dataclass(frozen=True)
class Pose:
    """Where an image's anatomy lies relative to a canonical frame: x_image = scale * rotation @ y + translation.

    Attributes:
        rotation: (d, d) orthogonal; determinant -1 when the image is a mirror image of the canonical one.
        scale: image units per canonical unit.
        translation: (d,).
    """

    rotation: np.ndarray
    scale: float
    translation: np.ndarray

    @classmethod
    def identity(cls, dimension: int) -> Pose:
        return cls(np.eye(dimension), 1.0, np.zeros(dimension))

    @classmethod
    def scaling_about(cls, center: np.ndarray, scale: float) -> Pose:
        """The pose that scales about `center` (which stays where it is)."""
        center = np.asarray(center, dtype=np.float64)
        return cls(np.eye(len(center)), float(scale), center - scale * center)

    @classmethod
    def mirror(cls, axis: int, center: np.ndarray) -> Pose:
        """The reflection through the plane normal to physical `axis` at `center` (its own inverse)."""
        center = np.asarray(center, dtype=np.float64)
        rotation = np.eye(len(center))
        rotation[axis, axis] = -1.0
        translation = np.zeros(len(center))
        translation[axis] = 2.0 * center[axis]
        return cls(rotation, 1.0, translation)

    @property
    def mirrored(self) -> bool:
        return bool(np.linalg.det(self.rotation) < 0)

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation (of its proper part for a mirror pose; a mirror alone is 0), degrees."""
        proper = self.rotation.copy()
        if self.mirrored:
            proper[:, 0] *= -1.0
        if len(proper) == 2:
            return abs(math.degrees(math.atan2(proper[1, 0], proper[0, 0])))
        return math.degrees(math.acos(float(np.clip((np.trace(proper) - 1.0) / 2.0, -1.0, 1.0))))

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Canonical points (..., d) -> image points (NaN stays NaN)."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        """Image points (..., d) -> canonical points (NaN stays NaN)."""
        return (np.asarray(points, dtype=np.float64) - self.translation) @ self.rotation / self.scale

    def inverse(self) -> Pose:
        rotation = self.rotation.T
        return Pose(rotation, 1.0 / self.scale, -(rotation @ self.translation) / self.scale)

    def after(self, other: Pose) -> Pose:
        """The pose x = self(other(y))."""
        return Pose(
            self.rotation @ other.rotation,
            self.scale * other.scale,
            self.scale * self.rotation @ other.translation + self.translation,
        )

    def is_canonical(self) -> bool:
        """Close enough to the identity that a second pass would not pay (translation aside: the
        network grid follows the image, so a shift alone changes nothing)."""
        return (
            not self.mirrored
            and self.rotation_deg <= CANONICAL_ROTATION_DEG
            and abs(math.log(self.scale)) <= math.log1p(CANONICAL_SCALE)
        )

    def canonical_geometry(self, geometry: ImageGeometry) -> ImageGeometry:
        """The geometry that shows an image's voxels in the canonical frame (same voxels, header only)."""
        return self.inverse().moved(geometry)

    def moved(self, geometry: ImageGeometry) -> ImageGeometry:
        """A canonical-frame geometry (e.g. a network grid) placed in the image frame."""
        direction = self.rotation @ geometry.direction_matrix
        return ImageGeometry(
            geometry.size,
            tuple(float(s) * self.scale for s in geometry.spacing),
            tuple(float(v) for v in self.to_image(np.asarray(geometry.origin))),
            tuple(float(v) for v in direction.ravel()),
        )

    def canonical_image(self, image: sitk.Image) -> sitk.Image:
        """The image in the canonical frame: a copy sharing its voxels, with a new header (the image
        itself when the header would not change: setting one makes SimpleITK copy the voxels)."""
        geometry = ImageGeometry.of(image)
        canonical = self.canonical_geometry(geometry)
        return image if canonical == geometry else canonical.apply_to(sitk.Image(image))


def fit_pose(
    reference: np.ndarray, points: np.ndarray, weights: np.ndarray, with_scale: bool, mirrored: bool = False
) -> Pose | None:
    """The rigid (or similarity, `with_scale`) pose taking `reference` points onto `points`.

    Weighted least squares (Umeyama 1991) on the points finite in both, with weights (e.g. the
    confidences), refitted once without the points whose residual is an outlier.

    Args:
        reference: (N, d) canonical points (the model's mean configuration).
        points: (N, d) points found in the image (NaN rows = missing).
        weights: (N,) >= 0.
        mirrored: fit a mirror pose (rotation with determinant -1): the points were found on the
            image's mirror image.
    Returns:
        The pose, or None when fewer than d + 1 points are usable.
    """
    reference = np.asarray(reference, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    d = reference.shape[1]
    usable = np.isfinite(reference).all(axis=1) & np.isfinite(points).all(axis=1) & (np.asarray(weights) > 0)
    weights = np.where(usable, np.asarray(weights, dtype=np.float64), 0.0)
    pose = None
    for _ in range(2):
        if np.count_nonzero(weights) <= d:
            return pose
        pose = similarity_fit(reference, points, weights, with_scale, mirrored)
        residuals = np.linalg.norm(pose.to_image(np.nan_to_num(reference)) - np.nan_to_num(points), axis=1)
        limit = OUTLIER_RESIDUALS * float(np.median(residuals[weights > 0]))
        weights = np.where(residuals <= limit, weights, 0.0)
    return pose


def similarity_fit(
    reference: np.ndarray, points: np.ndarray, weights: np.ndarray, with_scale: bool, mirrored: bool | None
) -> Pose:
    """The weighted least-squares pose taking `reference` onto `points` (Umeyama 1991), over the rows
    with a positive weight.

    Args:
        with_scale: a similarity (else rigid, scale 1).
        mirrored: True or False forces a mirror pose (determinant -1) or a proper one; None takes
            whichever fits best.
    """
    use = np.asarray(weights) > 0
    reference, points, w = reference[use], points[use], weights[use] / weights[use].sum()
    mean_reference, mean_points = w @ reference, w @ points
    a, b = reference - mean_reference, points - mean_points
    covariance = (b * w[:, None]).T @ a
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(len(singular))
    wanted = np.sign(np.linalg.det(u) * np.linalg.det(vt)) if mirrored is None else (-1.0 if mirrored else 1.0)
    if np.sign(np.linalg.det(u) * np.linalg.det(vt)) != wanted:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / (w @ (a * a).sum(axis=1))) if with_scale else 1.0
    return Pose(rotation, scale, mean_points - scale * rotation @ mean_reference)


def anatomical_scales(
    landmark_sets: list[LandmarkSet], source: str, reference: MeanConfiguration | None = None
) -> tuple[MeanConfiguration, np.ndarray]:
    """How large each set's anatomy is relative to a canonical size, for images in pixels, whose
    pixels have no physical size (e.g. cephalograms from two devices).

    Each scale is that of the similarity fit of the mean configuration to the set's points (image
    units per canonical unit), so dividing a set's positions by it brings the anatomy to the canonical
    size wherever the head lies and however it is turned. Without `reference`, the mean
    configuration is a generalised Procrustes mean whose size is the median set's; with one (a base
    model's), it stays as it is.

    Returns:
        The mean configuration in the canonical size (the canonical positions' mean), and the (n,)
        scales; 1 for a set with too few points to fit.
    """
    points = [landmarks.points_lps for landmarks in landmark_sets]

    def fitted_scales(mean: MeanConfiguration) -> np.ndarray:
        poses = [fit_pose(mean.array, p, np.ones(len(p)), with_scale=True) for p in points]
        return np.array([1.0 if pose is None else pose.scale for pose in poses])

    if reference is not None:
        return reference, fitted_scales(reference)
    mean = mean_configuration(landmark_sets, source)
    for _ in range(PROCRUSTES_ROUNDS):
        scales = fitted_scales(mean)
        scales /= float(np.median(scales))
        mean = mean_configuration(
            [LandmarkSet(s.names, p / scale) for s, p, scale in zip(landmark_sets, points, scales)], source
        )
    return mean, scales


def trial_scales(image_extent: np.ndarray, model_extent: np.ndarray) -> list[float]:
    """The first pass's trial scales for a model in pixels, most plausible first.

    The most plausible is the ladder step nearest to the image's extent over the model's training
    grid extent (right when the image shows the field of view the training images did); the
    others follow in order of distance from it.
    """
    guess = float(np.mean(np.log2(np.asarray(image_extent, dtype=np.float64) / np.asarray(model_extent))))
    steps = sorted(TRIAL_SCALE_STEPS, key=lambda k: (abs(k / 2.0 - guess), k))
    return [2.0 ** (k / 2.0) for k in steps]


__all__ = [
    "MeanConfiguration",
    "mean_configuration",
    "Pose",
    "fit_pose",
    "anatomical_scales",
    "trial_scales",
    "CANONICAL_ROTATION_DEG",
    "CANONICAL_SCALE",
]

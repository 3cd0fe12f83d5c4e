"""A clinic's landmark convention as a per-landmark offset, and deciding between candidate models.

Annotators differ mostly by a systematic displacement of each landmark relative to the anatomy
(where exactly "Gonion" sits on the jaw's curve). `ConventionOffset` holds that displacement in the
model's canonical frame (the pose its mean configuration is fitted to, see pose.py), so it turns and
scales with the head; it is learned from corrected cases (`fit_offsets`), shrunk toward zero by how
well the cases agree on it, stored in the model file and added after detection.

`better_beyond_noise` is the one rule by which a candidate replaces what the user has: a paired
comparison of per-point errors on the same cases that asks for a gain above both the noise of the
comparison and a fixed share of the error, so that a model identical to its base never wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFileError
from .pose import Pose

# A candidate must cut the mean point error by this share of the reference's: below it, a gain is
# not worth a change of model (and rounding differences between CPUs never reach it).
MIN_RELATIVE_GAIN = 0.01
# ... and by this many standard errors of the mean paired difference (one-sided, about 98 %).
MIN_STANDARD_ERRORS = 2.0


@dataclass(frozen=True)
class ConventionOffset:
    """Per-landmark displacement added to detected points, in the model's canonical frame.

    Attributes:
        offsets: (N, d) in the model's unit (mm, or px for models in pixels), model landmark order;
            zero where no displacement was learned.
        cases: how many corrected cases it was learned from.
    """

    offsets: np.ndarray
    cases: int

    def applied(self, points: np.ndarray, pose: Pose | None) -> np.ndarray:
        """`points` (N, d) in the image, moved by the offsets turned and scaled into the image's pose
        (the image's own axes without a pose); missing points stay missing."""
        frame = pose or Pose.identity(points.shape[1])
        return frame.to_image(frame.to_canonical(points) + self.offsets)

    def to_json(self) -> dict[str, Any]:
        return {"offsets": self.offsets.tolist(), "cases": self.cases}

    @classmethod
    def from_json(cls, values: Any, landmarks: int, dimension: int, source: str) -> ConventionOffset:
        """Raises ModelFileError naming `source` when the offsets do not fit the model."""
        try:
            offsets = np.asarray(values["offsets"], dtype=np.float64)
            cases = int(values["cases"])
        except (TypeError, KeyError, ValueError) as error:
            raise ModelFileError(f"{source}: malformed convention offset ({error})") from None
        if offsets.shape != (landmarks, dimension) or not np.all(np.isfinite(offsets)):
            raise ModelFileError(
                f"{source}: the convention offset must be {landmarks} finite {dimension}D displacements, "
                f"got shape {offsets.shape}"
            )
        return cls(offsets, cases)


def canonical_residuals(detected: np.ndarray, truth: np.ndarray, pose: Pose | None) -> np.ndarray:
    """Where the truth lies from the detected point, in the canonical frame: (N, d), NaN where
    either point is missing."""
    frame = pose or Pose.identity(detected.shape[1])
    return frame.to_canonical(truth) - frame.to_canonical(detected)


def fit_offsets(residuals: np.ndarray) -> np.ndarray:
    """The convention offset from the canonical residuals of several cases (C, N, d; NaN = missing).

    Each landmark's mean residual is shrunk toward zero by the positive-part James-Stein factor
    1 - d s^2 / (n |mean|^2): a mean no larger than the cases' scatter predicts for no offset at all
    becomes zero, and the more cases support a displacement, the less it is shrunk. Fewer than two
    cases give no offset (their scatter is unknown).
    """
    dimension = residuals.shape[2]
    offsets = np.zeros(residuals.shape[1:])
    for landmark in range(residuals.shape[1]):
        values = residuals[:, landmark]
        values = values[np.all(np.isfinite(values), axis=1)]
        if len(values) < 2:
            continue
        mean = values.mean(axis=0)
        scatter = float(np.sum((values - mean) ** 2) / (dimension * (len(values) - 1)))
        squared = float(mean @ mean)
        if squared > 0.0:
            offsets[landmark] = max(0.0, 1.0 - dimension * scatter / (len(values) * squared)) * mean
    return offsets


def leave_one_out_offsets(residuals: np.ndarray) -> np.ndarray:
    """For each case, the offset fitted to all the other cases: (C, N, d)."""
    cases = len(residuals)
    return np.stack([fit_offsets(residuals[np.arange(cases) != case]) for case in range(cases)])


def better_beyond_noise(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """True when `candidate`'s point errors are lower than `reference`'s on the same points by more
    than MIN_RELATIVE_GAIN of the reference's mean and MIN_STANDARD_ERRORS standard errors of the
    paired difference. Both are flat arrays over the same points (NaN where a point has no truth)."""
    both = np.isfinite(candidate) & np.isfinite(reference)
    gains = reference[both] - candidate[both]
    if len(gains) < 2:
        return False
    mean_gain = float(gains.mean())
    standard_error = float(gains.std(ddof=1) / np.sqrt(len(gains)))
    return mean_gain > MIN_RELATIVE_GAIN * float(reference[both].mean()) and mean_gain > (
        MIN_STANDARD_ERRORS * standard_error
    )

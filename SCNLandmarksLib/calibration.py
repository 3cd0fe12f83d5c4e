"""Expected error per landmark: how a model's point error grows as the network's evidence weakens.

A `Calibration`, fitted on validation images whose landmarks are known and stored in the model
file, turns the evidence behind each detected point into an expected error in the model's unit:

    expected error = base error of the landmark * exp(sum_k weight_k * evidence_k)

Every evidence measure is 0 for a textbook detection and grows as the evidence weakens, and every
weight is >= 0, so the expected error never falls as the evidence weakens. The fit is least squares
on the logarithm of the measured error (robust to the few gross errors that dominate a mean), with
one base per landmark (Sella is easier than Gonion) shrunk towards the pooled base, then scaled so
that the mean expected error of each landmark equals its mean measured error on the fitting images.

A calibration may also give each point a coverage radius: the distance from the point within which
the true point lies with a stated probability (`coverage`, e.g. 0.9). It is split conformal, per
landmark: on images with known landmarks, each point's score is its error over its expected error,
and a landmark's radius factor is the ceil((n + 1) * coverage)-th smallest of its n scores, so that
the radius (factor times expected error) holds the true point of a new image with at least that
probability for every landmark, not only on average (points found; a missed point has no radius).

Evidence measures (`EVIDENCE`; all dimensionless):
  peak: -log of the heatmap peak over the ideal peak of the landmark's learned Gaussian.
  width: log of the heatmap's spread around its peak (RMS radius within two sigmas) over the sigma.
  refinement_shift: log(1 + distance between the coarse and the refined point in coarse grid cells),
      for coarse-to-fine models.
  shift_spread: log(1 + RMS distance of the points found on the coarse grid shifted by half a cell,
      in cells); costs two more coarse network passes, so it is computed only when a calibration uses it.
  view_spread: log(1 + RMS distance of the refinement's views' points from their mean, in refinement
      cells), for models with several `refinement_views` (0 otherwise): a refiner that answers at
      different structures from patches a few cells apart is unsure.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .errors import DataError, ModelFileError
from .io.atomic import write_text_atomically
from .io.landmarks import coverage_radius_column
from .landmark_set import LandmarkSet

EVIDENCE = ("peak", "width", "refinement_shift", "shift_spread", "view_spread")
CHEAP_EVIDENCE = ("peak", "width", "refinement_shift")  # from the passes detection runs anyway
# The heatmap spread is measured within this many sigmas of the peak (beyond it lie other landmarks).
WIDTH_WINDOW_SIGMAS = 2.0
# Errors below this fraction of a landmark's median error are raised to it before the logarithm:
# the truth's own noise makes smaller errors meaningless, and log(0) is not a number.
ERROR_FLOOR = 0.1
# Weight of the pooled base against a landmark's own errors, in images: few images pull a landmark's
# base towards the pooled one.
BASE_PRIOR_IMAGES = 3.0


@dataclass(frozen=True)
class Calibration:
    """A model's expected-error calibration (see the module docstring).

    Attributes:
        landmark_names: the model's landmarks, in model order.
        base_errors: expected error of each landmark when every evidence measure is 0 (model unit).
        evidence: the evidence measures used, a subset of EVIDENCE.
        weights: one weight >= 0 per evidence measure.
        usual_errors: mean measured error of each landmark on the fitting images; a point whose
            expected error exceeds it is flagged for review.
        fitted_on: how it was fitted and what it scored held out (dataset, split, images, figures;
            "coverage": where the radius factors were fitted and the coverage measured held out).
        coverage: the probability that a point's coverage radius holds its true point (None: no
            coverage radius; calibrations written before them load so).
        radius_factors: per landmark, coverage radius over expected error (None with `coverage`).
    """

    landmark_names: tuple[str, ...]
    base_errors: tuple[float, ...]
    evidence: tuple[str, ...]
    weights: tuple[float, ...]
    usual_errors: tuple[float, ...]
    fitted_on: dict[str, Any] = field(default_factory=dict)
    coverage: float | None = None
    radius_factors: tuple[float, ...] | None = None

    def expected_errors(self, evidence: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) expected error per landmark from its evidence (NaN where a measure is NaN)."""
        score = np.zeros(len(self.landmark_names))
        for name, weight in zip(self.evidence, self.weights):
            score = score + weight * np.asarray(evidence[name], dtype=np.float64)
        return np.asarray(self.base_errors) * np.exp(score)

    def flagged(self, expected_errors: np.ndarray) -> np.ndarray:
        """(N,) bool: the points expected to be worse than their landmark usually is."""
        with np.errstate(invalid="ignore"):
            return np.asarray(expected_errors) > np.asarray(self.usual_errors)

    def coverage_radii(self, expected_errors: np.ndarray) -> np.ndarray | None:
        """(..., N) coverage radii of points with these expected errors (same unit; NaN where the
        expected error is NaN), or None when the calibration has no radius factors."""
        if self.radius_factors is None:
            return None
        return np.asarray(expected_errors, dtype=np.float64) * np.asarray(self.radius_factors)

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "landmark_names": list(self.landmark_names),
            "base_errors": list(self.base_errors),
            "evidence": list(self.evidence),
            "weights": list(self.weights),
            "usual_errors": list(self.usual_errors),
            "fitted_on": self.fitted_on,
        }
        if self.radius_factors is not None:
            values["coverage"] = self.coverage
            values["radius_factors"] = list(self.radius_factors)
        return values

    @classmethod
    def from_json(cls, values: Any, landmark_names: tuple[str, ...], source: str) -> Calibration:
        """Parse and check a model file's calibration section.

        Raises:
            ModelFileError: naming `source`, when the section is malformed or its landmarks are not
                the model's.
        """
        try:
            factors = values.get("radius_factors")
            calibration = cls(
                tuple(str(n) for n in values["landmark_names"]),
                tuple(float(v) for v in values["base_errors"]),
                tuple(str(e) for e in values["evidence"]),
                tuple(float(w) for w in values["weights"]),
                tuple(float(v) for v in values["usual_errors"]),
                dict(values.get("fitted_on") or {}),
                None if factors is None else float(values["coverage"]),
                None if factors is None else tuple(float(v) for v in factors),
            )
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ModelFileError(f"{source}: malformed calibration section ({error!r})") from None
        if calibration.landmark_names != tuple(landmark_names):
            raise ModelFileError(
                f"{source}: the calibration is for landmarks {list(calibration.landmark_names)}, "
                f"not the model's {list(landmark_names)}"
            )
        count = len(landmark_names)
        if len(calibration.base_errors) != count or len(calibration.usual_errors) != count:
            raise ModelFileError(f"{source}: the calibration needs one base and one usual error per landmark")
        unknown = [e for e in calibration.evidence if e not in EVIDENCE]
        if unknown or len(calibration.weights) != len(calibration.evidence):
            raise ModelFileError(
                f"{source}: calibration evidence {list(calibration.evidence)} with weights "
                f"{list(calibration.weights)}: expected one weight per measure of {list(EVIDENCE)}"
            )
        values_ok = [*calibration.base_errors, *calibration.usual_errors]
        if not all(math.isfinite(v) and v > 0 for v in values_ok) or min(calibration.weights, default=0.0) < 0:
            raise ModelFileError(f"{source}: calibration errors must be positive and weights non-negative")
        factors = calibration.radius_factors
        if factors is not None:
            if len(factors) != count or not all(math.isfinite(v) and v > 0 for v in factors):
                raise ModelFileError(f"{source}: the calibration needs one positive radius factor per landmark")
            if not 0.0 < float(calibration.coverage or 0.0) < 1.0:
                raise ModelFileError(f"{source}: the calibration's coverage {calibration.coverage} is not in (0, 1)")
        return calibration


# ----------------------------------------------------------------------------------------------------
# evidence from heatmaps


def peak_evidence(
    heatmaps: torch.Tensor,
    index: torch.Tensor,
    value: torch.Tensor,
    ideal: torch.Tensor,
    sigmas: torch.Tensor,
    spacing: tuple[float, ...],
) -> dict[str, np.ndarray]:
    """The "peak" and "width" evidence of each landmark's heatmap.

    Args:
        heatmaps: (N, [z,] y, x) on a grid of `spacing`.
        index: (N, d) refined peak indices (x, y[, z]); value: (N,) peak values; ideal: (N,) the
            peak of a perfect target; sigmas: (N,) learned sigmas, in the unit of `spacing`.
    """
    ratio = (value / ideal).double().cpu().numpy()
    peak = -np.log(np.clip(ratio, 1e-3, None))
    d = heatmaps.dim() - 1
    spacing_zyx = torch.tensor(spacing[::-1], dtype=torch.float64)
    width = np.empty(len(ratio))
    for k in range(len(ratio)):
        sigma = float(sigmas[k])
        center_zyx = index[k].flip(0).double().cpu()
        half = [max(1, math.ceil(WIDTH_WINDOW_SIGMAS * sigma / s)) for s in spacing[::-1]]
        low = [max(0, int(round(float(c))) - h) for c, h in zip(center_zyx, half)]
        high = [min(size, int(round(float(c))) + h + 1) for c, size, h in zip(center_zyx, heatmaps.shape[1:], half)]
        region: tuple[int | slice, ...] = (k, *(slice(a, b) for a, b in zip(low, high)))
        window = heatmaps[region].double().cpu().clamp(min=0.0)
        axes = torch.meshgrid(*(torch.arange(a, b, dtype=torch.float64) for a, b in zip(low, high)), indexing="ij")
        squared = sum(((axis - c) * s) ** 2 for axis, c, s in zip(axes, center_zyx, spacing_zyx))
        total = float(window.sum())
        spread = math.sqrt(float((window * squared).sum()) / total / d) if total > 0 else WIDTH_WINDOW_SIGMAS * sigma
        width[k] = math.log(max(spread, 1e-3 * sigma) / sigma)
    return {"peak": peak, "width": width}


def distance_evidence(points: np.ndarray, others: list[np.ndarray], cell: float) -> np.ndarray:
    """log(1 + RMS distance from `points` to the `others`, in grid cells of size `cell`)."""
    squared = np.mean([np.sum((other - points) ** 2, axis=1) for other in others], axis=0)
    return np.log1p(np.sqrt(squared) / cell)


# ----------------------------------------------------------------------------------------------------
# fitting and scoring


def _floored_log_errors(errors: np.ndarray) -> np.ndarray:
    """log(error), each landmark's errors floored at ERROR_FLOOR times its median error."""
    floor = ERROR_FLOOR * np.nanmedian(errors, axis=0, keepdims=True)
    return np.log(np.maximum(errors, np.maximum(floor, 1e-9)))


def fit_calibration(
    landmark_names: list[str],
    errors: np.ndarray,
    evidence: dict[str, np.ndarray],
    measures: tuple[str, ...],
    fitted_on: dict[str, Any] | None = None,
) -> Calibration:
    """Fit a calibration to measured errors.

    Args:
        errors: (images, N) measured point errors (NaN: landmark missed or without truth: ignored).
        evidence: measure -> (images, N) evidence of the same points.
        measures: the evidence measures to use; one whose least-squares weight comes out negative
            (stronger evidence, larger error) is dropped and the fit repeated, so the model stays monotone.
    """
    errors = np.asarray(errors, dtype=np.float64)
    usable = np.isfinite(errors) & np.all([np.isfinite(evidence[m]) for m in measures] or [True], axis=0)
    if usable.sum(axis=0).min() < 2:
        raise ValueError("every landmark needs at least two detected points with known truth to calibrate")
    target = _floored_log_errors(np.where(usable, errors, np.nan))
    used = list(measures)
    while True:
        offsets, weights = _least_squares(target, {m: evidence[m] for m in used}, usable)
        negative = [m for m, w in zip(used, weights) if w < 0]
        if not negative:
            break
        used.remove(min(negative, key=lambda m: weights[used.index(m)]))
    score = sum((w * np.where(usable, evidence[m], 0.0) for m, w in zip(used, weights)), np.zeros_like(errors))
    relative = np.where(usable, np.exp(offsets[None, :] + score), np.nan)
    measured_mean = np.nanmean(np.where(usable, errors, np.nan), axis=0)
    # Scale each landmark so that its mean expected error is its mean measured error.
    base = np.exp(offsets) * measured_mean / np.nanmean(relative, axis=0)
    return Calibration(
        tuple(landmark_names),
        tuple(float(b) for b in base),
        tuple(used),
        tuple(float(w) for w in weights),
        tuple(float(v) for v in measured_mean),
        fitted_on or {},
    )


def _least_squares(
    target: np.ndarray, evidence: dict[str, np.ndarray], usable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-landmark offsets (shrunk towards their mean) and shared weights minimising the squared
    residual of the log errors."""
    rows, cols = np.nonzero(usable)
    count = target.shape[1]
    design = np.zeros((len(rows), count + len(evidence)))
    design[np.arange(len(rows)), cols] = 1.0
    for k, values in enumerate(evidence.values()):
        design[:, count + k] = values[rows, cols]
    y = target[rows, cols]
    # Shrinkage: BASE_PRIOR_IMAGES pseudo-observations pull each offset towards the pooled offset.
    pooled = float(np.mean(y))
    prior = np.zeros((count, design.shape[1]))
    prior[np.arange(count), np.arange(count)] = math.sqrt(BASE_PRIOR_IMAGES)
    solution, *_ = np.linalg.lstsq(
        np.vstack([design, prior]),
        np.concatenate([y, np.full(count, math.sqrt(BASE_PRIOR_IMAGES) * pooled)]),
        rcond=None,
    )
    return solution[:count], solution[count:]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for telling `positive` points (NaN scores ignored);
    NaN when one class is empty. Ties count one half (Mann-Whitney)."""
    scores, positive = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive, dtype=bool).ravel()
    keep = np.isfinite(scores)
    scores, positive = scores[keep], positive[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flagging_scores(expected: np.ndarray, errors: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    """How well expected errors flag bad points: AUROC per threshold, and the means they compare.

    Args:
        expected, errors: (images, N) expected and measured errors (NaN = not detected / no truth).
        thresholds: label -> error threshold in the model unit (points beyond it should be flagged).
    """
    both = np.isfinite(expected) & np.isfinite(errors)
    result: dict[str, Any] = {
        "points": int(both.sum()),
        "mean_expected": float(np.mean(expected[both])) if both.any() else math.nan,
        "mean_measured": float(np.mean(errors[both])) if both.any() else math.nan,
        "auroc": {},
    }
    for label, threshold in thresholds.items():
        result["auroc"][label] = {
            "threshold": float(threshold),
            "points_beyond": int((errors[both] > threshold).sum()),
            "auroc": auroc(expected[both], errors[both] > threshold),
        }
    return result


def cross_validated_expected(
    landmark_names: list[str],
    errors: np.ndarray,
    evidence: dict[str, np.ndarray],
    measures: tuple[str, ...],
    folds: int,
) -> np.ndarray:
    """(images, N) expected errors, each image's from a calibration fitted without it (images in
    `folds` interleaved groups): held-out figures from the validation images alone."""
    expected = np.full(errors.shape, np.nan)
    for fold in range(folds):
        held_out = np.arange(len(errors)) % folds == fold
        calibration = fit_calibration(
            landmark_names, errors[~held_out], {m: v[~held_out] for m, v in evidence.items()}, measures
        )
        for i in np.flatnonzero(held_out):
            expected[i] = calibration.expected_errors({m: v[i] for m, v in evidence.items()})
    return expected


# ----------------------------------------------------------------------------------------------------
# coverage radius (split conformal, per landmark)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest of n scores (NaN ignored): a new score exchangeable
    with them is at most this with probability >= coverage.

    Raises:
        ValueError: fewer scores than that rank (a radius for this coverage needs more points).
    """
    values = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    # The epsilon keeps (n + 1) * coverage, an integer on paper (20 * 0.9), from rounding up one rank.
    rank = math.ceil((len(values) + 1) * coverage - 1e-9)
    if rank > len(values):
        raise ValueError(
            f"{len(values)} points; a radius for coverage {coverage:g} needs at least "
            f"{math.ceil(coverage / (1.0 - coverage) - 1e-9)}"
        )
    return float(values[rank - 1])


def with_radius_factors(
    calibration: Calibration, errors: np.ndarray, expected: np.ndarray, coverage: float
) -> Calibration:
    """`calibration` with radius factors fitted on points with these errors and expected errors.

    Args:
        errors, expected: (images, N) measured and expected errors (NaN: not found or no truth); the
            expected errors should not have been fitted on these errors (held out), as split
            conformal prediction assumes.

    Raises:
        DataError: a landmark has too few points for `coverage` (names it).
    """
    if not 0.0 < coverage < 1.0:
        raise DataError(f"the coverage must be a probability between 0 and 1, not {coverage}")
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.asarray(errors, dtype=np.float64) / np.asarray(expected, dtype=np.float64)
    factors = []
    for j, name in enumerate(calibration.landmark_names):
        try:
            factors.append(conformal_quantile(scores[:, j], coverage))
        except ValueError as error:
            raise DataError(f"landmark '{name}': {error} (give more images or a lower --coverage)") from None
    return dataclasses.replace(calibration, coverage=coverage, radius_factors=tuple(factors))


def fit_with_radii(
    landmark_names: list[str],
    errors: np.ndarray,
    evidence: dict[str, np.ndarray],
    measures: tuple[str, ...],
    coverage: float,
    folds: int,
    fitted_on: dict[str, Any] | None = None,
) -> Calibration:
    """`fit_calibration` on all images, with radius factors from each image's expected errors as a
    calibration fitted without its fold gives them (scores held out, as split conformal needs)."""
    held_out = cross_validated_expected(landmark_names, errors, evidence, measures, folds)
    calibration = fit_calibration(landmark_names, errors, evidence, measures, fitted_on)
    return with_radius_factors(calibration, errors, held_out, coverage)


def held_out_radii(
    landmark_names: list[str],
    errors: np.ndarray,
    evidence: dict[str, np.ndarray],
    measures: tuple[str, ...],
    coverage: float,
    folds: int,
    calibration: Calibration | None = None,
    expected: np.ndarray | None = None,
) -> np.ndarray:
    """(images, N) coverage radii, each image's from a fit without its fold (images in `folds`
    interleaved groups).

    Not leaving one image out: with fixed expected errors, a point would then be covered exactly when
    its score is not among the largest of all, so the figure would be the rank's, whatever the data.

    Without `calibration`, each fit is the whole of `fit_with_radii` (expected error and radius
    factors, `folds` inner folds); with it, only the radius factors are fitted, on its `expected`
    errors (images, N), and its expected errors kept.
    """
    radii = np.full(errors.shape, np.nan)
    for fold in range(folds):
        held = np.arange(len(errors)) % folds == fold
        if calibration is None:
            part = {m: v[~held] for m, v in evidence.items()}
            fitted = fit_with_radii(landmark_names, errors[~held], part, measures, coverage, folds)
            held_expected = np.array(
                [fitted.expected_errors({m: v[i] for m, v in evidence.items()}) for i in np.flatnonzero(held)]
            )
        else:
            assert expected is not None
            fitted = with_radius_factors(calibration, errors[~held], expected[~held], coverage)
            held_expected = expected[held]
        radii[held] = fitted.coverage_radii(held_expected)
    return radii


def coverage_figures(landmark_names: list[str], errors: np.ndarray, radii: np.ndarray) -> dict[str, Any]:
    """How often the radii held the true point: overall, per landmark and the worst landmark, over
    the points with both an error and a radius (a missed point has neither)."""
    both = np.isfinite(errors) & np.isfinite(radii)
    inside = both & (np.nan_to_num(errors, nan=np.inf) <= np.nan_to_num(radii, nan=-np.inf))
    per_landmark = {
        name: float(inside[:, j].sum() / both[:, j].sum()) if both[:, j].any() else math.nan
        for j, name in enumerate(landmark_names)
    }
    known = {name: value for name, value in per_landmark.items() if math.isfinite(value)}
    worst = min(known, key=known.__getitem__) if known else ""
    return {
        "points": int(both.sum()),
        "coverage": float(inside.sum() / both.sum()) if both.any() else math.nan,
        "worst_landmark": worst,
        "worst_coverage": known.get(worst, math.nan),
        "per_landmark": per_landmark,
    }


# ----------------------------------------------------------------------------------------------------
# measuring a model on images with known landmarks


@dataclass
class Measurements:
    """A model's errors and evidence on images whose landmarks are known.

    Attributes:
        image_ids: one per row.
        errors: (images, N) point errors in the model unit (NaN: missed, or no truth).
        evidence: measure -> (images, N) values, every measure of EVIDENCE.
        expected: (images, N) expected errors of the model's own calibration (None: not calibrated).
    """

    image_ids: list[str]
    errors: np.ndarray
    evidence: dict[str, np.ndarray]
    expected: np.ndarray | None = None


def measure(
    predictor: Any,
    cases: Iterable[tuple[str, sitk.Image, LandmarkSet]],
    progress: Callable[[int, str], None] | None = None,
) -> Measurements:
    """Detect on each (id, image, truth) case with every evidence measure on; truths in model order."""
    kept = predictor.evidence_measures
    predictor.evidence_measures = EVIDENCE
    ids, errors, expected = [], [], []
    evidence: dict[str, list[np.ndarray]] = {m: [] for m in EVIDENCE}
    try:
        for number, (image_id, image, truth) in enumerate(cases, start=1):
            prediction = predictor.predict(image, source=str(image_id))
            ids.append(str(image_id))
            errors.append(np.linalg.norm(prediction.landmarks.points_lps - truth.points_lps, axis=1))
            for m in EVIDENCE:
                evidence[m].append(prediction.evidence[m])
            expected.append(prediction.landmarks.expected_errors)
            if progress is not None:
                progress(number, str(image_id))
    finally:
        predictor.evidence_measures = kept
    return Measurements(
        ids,
        np.array(errors),
        {m: np.array(v) for m, v in evidence.items()},
        None if predictor.calibration is None else np.array(expected),
    )


def compare_evidence(
    names: list[str], measured: Measurements, thresholds: dict[str, float], folds: int
) -> dict[str, dict[str, Any]]:
    """Held-out flagging scores (cross-validated by image) of calibrations using no evidence (a base
    per landmark only), each measure alone, the cheap measures and all of them."""
    candidates = {
        "landmark base only": (),
        **{m: (m,) for m in EVIDENCE},
        "cheap (" + " + ".join(CHEAP_EVIDENCE) + ")": CHEAP_EVIDENCE,
        "all": EVIDENCE,
    }
    return {
        label: flagging_scores(
            cross_validated_expected(names, measured.errors, measured.evidence, measures, folds),
            measured.errors,
            thresholds,
        )
        for label, measures in candidates.items()
    }


def calibrated_means(names: list[str], expected: np.ndarray, errors: np.ndarray) -> dict[str, dict[str, float]]:
    """Per landmark: mean expected and mean measured error over the points that have both."""
    result = {}
    for j, name in enumerate(names):
        both = np.isfinite(expected[:, j]) & np.isfinite(errors[:, j])
        result[name] = {
            "expected": float(np.mean(expected[both, j])) if both.any() else math.nan,
            "measured": float(np.mean(errors[both, j])) if both.any() else math.nan,
        }
    return result


def calibrate(
    predictor: Any,
    measured: Measurements,
    measures: tuple[str, ...],
    thresholds: dict[str, float],
    folds: int,
    source: str,
    coverage: float = 0.9,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the calibration and its coverage radius on all measured images, after scoring them held
    out (cross-validated by image).

    Returns:
        The calibration (its `fitted_on` holds the held-out figures) and the comparison of evidence
        measures (`compare_evidence`).
    """
    unknown = [m for m in measures if m not in EVIDENCE]
    if unknown:
        raise DataError(f"unknown evidence measure(s) {unknown}; choose from {list(EVIDENCE)}")
    names = predictor.landmark_names
    held_out_expected = cross_validated_expected(names, measured.errors, measured.evidence, measures, folds)
    held_out = flagging_scores(held_out_expected, measured.errors, thresholds)
    held_out["per_landmark"] = calibrated_means(names, held_out_expected, measured.errors)
    fitted_on = {
        "source": source,
        "images": len(measured.image_ids),
        "folds": folds,
        "thresholds": thresholds,
        "held_out": held_out,
        "coverage": _coverage_record(
            names,
            source,
            measured,
            coverage,
            folds,
            lambda: held_out_radii(names, measured.errors, measured.evidence, measures, coverage, folds),
        ),
    }
    calibration = fit_with_radii(names, measured.errors, measured.evidence, measures, coverage, folds, fitted_on)
    return calibration, compare_evidence(names, measured, thresholds, folds)


def add_coverage(
    calibration: Calibration, measured: Measurements, coverage: float, folds: int, source: str
) -> Calibration:
    """`calibration` (its expected errors unchanged) with radius factors fitted on `measured`, which a
    predictor with this calibration measured, after measuring their coverage held out (`folds`-fold
    cross-validation by image).

    For a calibration fitted elsewhere (pooled fold models, or data unlike these images): its
    expected errors were not fitted on these images, so their scores are held out.
    """
    if measured.expected is None:
        raise DataError("the coverage radius needs a calibrated model's expected errors")
    names = list(calibration.landmark_names)
    expected = measured.expected
    record = _coverage_record(
        names,
        source,
        measured,
        coverage,
        folds,
        lambda: held_out_radii(names, measured.errors, {}, (), coverage, folds, calibration, expected),
    )
    fitted = dataclasses.replace(calibration, fitted_on={**calibration.fitted_on, "coverage": record})
    return with_radius_factors(fitted, measured.errors, measured.expected, coverage)


def _coverage_record(
    names: list[str],
    source: str,
    measured: Measurements,
    coverage: float,
    folds: int,
    held_out_radii: Callable[[], np.ndarray],
) -> dict[str, Any]:
    """What a calibration's `fitted_on["coverage"]` says: where the radius was fitted and the coverage
    its held-out radii give, or why that could not be measured (folds too small for the radius)."""
    held_out: dict[str, Any] = {"method": f"{folds}-fold cross-validation by image"}
    try:
        held_out.update(coverage_figures(names, measured.errors, held_out_radii()))
    except DataError as error:
        held_out["not_measured"] = f"too few images per fold: {error}"
    return {"coverage": coverage, "source": source, "images": len(measured.image_ids), "held_out": held_out}


def calibration_report(model: str | Path, calibration: Calibration, comparison: dict[str, Any]) -> dict[str, Any]:
    """What `calibrate` prints: the model written, the evidence used, the held-out figures and the
    comparison of evidence measures."""
    return {
        "model": str(model),
        "evidence": list(calibration.evidence),
        "weights": list(calibration.weights),
        "held_out": calibration.fitted_on["held_out"],
        "coverage": calibration.fitted_on.get("coverage"),
        "radius_factors": list(calibration.radius_factors or ()),
        "evidence_compared": comparison,
    }


def dataset_cases(
    predictor: Any, dataset: str | Path, split: str
) -> tuple[int, Iterator[tuple[str, sitk.Image, LandmarkSet]]]:
    """The number of images of a dataset split and its (id, image, truth) cases, read one at a time."""
    from .data.spec import load_dataset_spec

    spec = load_dataset_spec(dataset)
    if list(spec.landmark_names) != predictor.landmark_names:
        raise DataError(
            f"{spec.path}: landmark names {list(spec.landmark_names)} differ from the model's "
            f"{predictor.landmark_names}"
        )
    entries = spec.split(split)
    spec.check_model_unit(entries, predictor.description)
    truths = spec.load_landmarks(entries)
    return len(entries), ((e.id, e.read(predictor.dimension), truths[e.id]) for e in entries)


def default_thresholds(unit: str, values: list[float] | None) -> dict[str, float]:
    """Flagging thresholds by label ("> 3 mm"): the given values, or 3 mm for mm models.

    Raises:
        DataError: a pixel model without values (no error in pixels means the same on every image source).
    """
    if not values:
        if unit != "mm":
            raise DataError(
                "give the error thresholds to flag points above (--flag-above, in px), e.g. twice and "
                "once the annotators' median disagreement"
            )
        values = [3.0]
    return {f"> {v:g} {unit}": float(v) for v in values}


# ----------------------------------------------------------------------------------------------------
# review first, across images


@dataclass(frozen=True)
class ImageReview:
    """One image's line of a batch's review summary."""

    image: str
    flagged: int | None  # points expected to be worse than usual (None: model not calibrated)
    largest_expected_error: float  # NaN when not calibrated or nothing was found
    error: str = ""  # why the image has no landmarks (it could not be read), "" when it has them
    largest_coverage_radius: float = math.nan  # NaN when the model gives no coverage radius


def review_summary(rows: Iterable[ImageReview]) -> list[ImageReview]:
    """Images to look at first come first: images that failed, then the largest expected error, then
    the most flagged points, then the image name; images without expected errors last."""

    def key(row: ImageReview) -> tuple:
        known = math.isfinite(row.largest_expected_error)
        return (not row.error, not known, -row.largest_expected_error if known else 0.0, -(row.flagged or 0), row.image)

    return sorted(rows, key=key)


def _largest(values: np.ndarray | None) -> float:
    finite = values[np.isfinite(values)] if values is not None else np.empty(0)
    return float(finite.max()) if finite.size else math.nan


def image_review(image: str, landmarks: LandmarkSet, flagged: np.ndarray | None) -> ImageReview:
    """The review summary line of one image's prediction."""
    return ImageReview(
        image,
        None if flagged is None else int(np.sum(flagged)),
        _largest(landmarks.expected_errors),
        largest_coverage_radius=_largest(landmarks.coverage_radii),
    )


def write_review_summary(
    path: str | Path, rows: Iterable[ImageReview], unit: str, coverage: float | None = None
) -> Path:
    """Write summary.csv: image, flagged points, largest expected error, error (why an image has no
    landmarks), review-first order; with a `coverage` (the model gives coverage radii), the largest
    coverage radius last (column "largest_coverage_radius_90_mm" for 90 %)."""

    def number(value: float) -> str:
        return f"{value:.2f}" if math.isfinite(value) else ""

    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    radius = [] if coverage is None else [f"largest_{coverage_radius_column(coverage)}_{unit}"]
    writer.writerow(["image", "flagged_points", f"largest_expected_error_{unit}", "error", *radius])
    for row in review_summary(rows):
        cells = [row.image, "" if row.flagged is None else row.flagged, number(row.largest_expected_error), row.error]
        writer.writerow([*cells, *([number(row.largest_coverage_radius)] if radius else [])])
    write_text_atomically(Path(path), stream.getvalue())
    return Path(path)

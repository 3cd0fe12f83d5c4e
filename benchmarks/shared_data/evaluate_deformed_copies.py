"""Accuracy on held-out deformed copies of a training image (for single-template models such as brain-afids-32).

    python benchmarks/shared_data/evaluate_deformed_copies.py MODEL IMAGE LANDMARKS [--copies 10] [--seed 1000]
        [--single-resolution] [--harder] [--registration]
        [--calibrate OUT [--calibration-copies 30] [--calibration-seed 2000] [--calibration-harder]]
        [--coverage OUT [--coverage-copies 30] [--coverage-seed 3000] [--coverage-folds 3]]

Each copy is the image pushed through a random rigid + scaling + smooth elastic transform (seeds the
training never drew) on a 1 mm grid, with its landmarks mapped through the exact inverse; a copy
with its whole header rigidly moved (rotation and translation of origin/direction) is added too.
Prints one JSON line per copy and a summary line (mean/median error in mm).

With --calibrate, the expected-error calibration is first fitted on other deformed copies (seeds
from --calibration-seed; its held-out figures cross-validated by copy) and written with the model to
OUT; the evaluation copies then also score it (AUROC of flagging points beyond 3 mm, mean expected
against mean measured error): copies neither the network nor the calibration saw. With
--calibration-harder those copies are harder copies (see --harder): expected errors for a brain as far
from the template as the proxy, which run high on brains close to it.

With --coverage, the model's calibration (expected errors unchanged) first gets a 90 % coverage radius
fitted on harder copies (seeds from --coverage-seed; a brain the model never saw is at least that far
from the template, so a radius fitted on the milder copies would be too small), its coverage measured
by cross-validation over those copies, and is written with the model to OUT; the evaluation copies
then also report the coverage they measure.

--harder makes the evaluation copies a harder proxy for a brain the model never saw: deformations
beyond the training's (±25 mm, ±25°, ±20 % scaling, ±10 % per axis, 6 mm elastic on a 30 mm grid,
against brain-afids-32's 15 / 20 / 15 / 5 / 5 on 35), then intensity changes beyond its training: a
random monotonic intensity curve (another scanner's contrast; `intensity_curve` at 0.25, trained at
0.1), gamma exp(±0.7) (trained ±0.5), a bias field of log-std 0.4 (0.3), a lower resolution
(Gaussian blur of 1 mm; trained up to 2 mm) and noise of 3 % of the intensity range.

--registration measures the baseline a single-template model must beat, and the ingredient it could
borrow: the template registered to each case (a similarity transform, by mutual information) carries
its landmarks there, which the model's refinement stage then refines as it refines the SCN's points
(with --single-resolution: the registration alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import SimpleITK as sitk
import torch

from SCNLandmarksLib.bundle import save_description
from SCNLandmarksLib.calibration import (
    CHEAP_EVIDENCE,
    Measurements,
    add_coverage,
    calibrate,
    calibrated_means,
    coverage_figures,
    flagging_scores,
    measure,
)
from SCNLandmarksLib.config import AugmentationConfig
from SCNLandmarksLib.data.augmentation import augmented_sample, intensity_curve, rotation_matrix, smooth_noise_field
from SCNLandmarksLib.data.preparation import PreparedImage
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.io.landmarks import read_landmarks
from SCNLandmarksLib.landmark_set import LandmarkSet

DEFORMATION = AugmentationConfig(
    translation=15.0,
    rotation_deg=15.0,
    scale=0.1,
    scale_per_axis=0.05,
    elastic_mm=4.0,
    elastic_control_spacing_mm=40.0,
    intensity_shift=0.0,
    intensity_scale=0.0,
)

HARDER_DEFORMATION = dataclasses.replace(
    DEFORMATION,
    translation=25.0,
    rotation_deg=25.0,
    scale=0.2,
    scale_per_axis=0.1,
    elastic_mm=6.0,
    elastic_control_spacing_mm=30.0,
)
HARDER_CURVE = 0.25  # inner knots of the random intensity curve move by up to this (brain training: 0.1)


def deformed_copy(
    image: sitk.Image, points: np.ndarray, seed: int, deformation: AugmentationConfig = DEFORMATION
) -> tuple[sitk.Image, np.ndarray]:
    geometry = ImageGeometry.of(image)
    raw = PreparedImage(torch.from_numpy(sitk.GetArrayFromImage(image)).float()[None], geometry, 0.0)
    spacing = (1.0,) * geometry.dimension
    extent = np.ptp(geometry.corners_physical(), axis=0)
    size = tuple(int(math.ceil(e)) + 1 for e in extent)
    sample, index, grid = augmented_sample(raw, points, size, spacing, deformation, torch.Generator().manual_seed(seed))
    copy = grid.apply_to(sitk.GetImageFromArray(sample[0].numpy()))
    return copy, grid.index_to_physical(index.numpy())


def harder_copy(image: sitk.Image, points: np.ndarray, seed: int) -> tuple[sitk.Image, np.ndarray]:
    """A copy deformed beyond the training's, with intensity changes the training never made (--harder)."""
    copy, moved = deformed_copy(image, points, seed, HARDER_DEFORMATION)
    random = np.random.default_rng(seed)
    blurred = sitk.SmoothingRecursiveGaussian(copy, 1.0)
    values = sitk.GetArrayFromImage(blurred).astype(np.float64)
    low, high = np.percentile(values, [1, 99])
    generator = torch.Generator().manual_seed(seed)
    normalized = torch.from_numpy(np.clip((values - low) / (high - low), 0.0, None) * 2.0 - 1.0).float()
    unit = (intensity_curve(normalized, HARDER_CURVE, generator).numpy() + 1.0) / 2.0
    unit = np.clip(unit, 0.0, None) ** math.exp(random.uniform(-0.7, 0.7))
    unit = unit * np.exp(smooth_noise_field(ImageGeometry.of(copy), 1, 0.4, 80.0, generator, "cpu")[0].numpy())
    unit = unit + random.normal(0.0, 0.03, unit.shape)
    harder = sitk.GetImageFromArray((low + unit * (high - low)).astype(np.float32))
    harder.CopyInformation(copy)
    return harder, moved


def moved_header(
    image: sitk.Image, points: np.ndarray, degrees: tuple[float, float, float], translation: tuple[float, float, float]
) -> tuple[sitk.Image, np.ndarray]:
    rotation = rotation_matrix(torch.tensor(np.radians(degrees)), 3).numpy()
    moved = sitk.Image(image)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    moved.SetDirection((rotation @ direction).ravel().tolist())
    moved.SetOrigin((rotation @ np.asarray(image.GetOrigin()) + translation).tolist())
    return moved, points @ rotation.T + np.asarray(translation)


def registered_points(template: sitk.Image, template_points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """The template's landmarks carried onto `image` by a similarity registration of the template
    (Mattes mutual information, three resolutions), the baseline of --registration."""
    fixed, moving = sitk.Cast(image, sitk.sitkFloat32), sitk.Cast(template, sitk.sitkFloat32)
    similarity = sitk.Similarity3DTransform() if image.GetDimension() == 3 else sitk.Similarity2DTransform()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 200, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(
        sitk.CenteredTransformInitializer(fixed, moving, similarity, sitk.CenteredTransformInitializerFilter.MOMENTS),
        inPlace=False,
    )
    # The transform maps the image's points into the template; its landmarks go the other way.
    to_image = method.Execute(fixed, moving).GetInverse()
    return np.array([to_image.TransformPoint(tuple(float(c) for c in point)) for point in template_points])


def errors_of(
    predictor: Predictor,
    image: sitk.Image,
    truth: np.ndarray,
    refine: bool,
    template: tuple[sitk.Image, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Point errors, expected errors (None: model not calibrated, or registration) and seconds; with a
    `template` (image, landmarks), of the registration baseline instead of the model's detection."""
    started = time.perf_counter()
    if template is None:
        prediction = predictor.predict(image, refine=refine)
        points, expected = prediction.landmarks.points_lps, prediction.landmarks.expected_errors
    else:
        points, expected = registered_points(*template, image), None
        if refine:
            points = predictor.refine_points(image, points)
    return np.linalg.norm(points - truth, axis=1), expected, time.perf_counter() - started


def calibrate_on_copies(
    predictor: Predictor, image: sitk.Image, truth: np.ndarray, copies: int, seed: int, harder: bool, out: str
) -> Predictor:
    """Fit the expected-error calibration on deformed (or harder) copies and write the calibrated model
    to `out`."""
    names = predictor.landmark_names
    make_copy, kind = (harder_copy, "harder copies") if harder else (deformed_copy, "deformed copies")
    cases = ((f"seed {seed + n}", *make_copy(image, truth, seed + n)) for n in range(copies))
    measured = measure(
        predictor,
        ((i, copy, LandmarkSet(names, points)) for i, copy, points in cases),
        lambda done, case: print(f"calibration copy {done}/{copies} ({case})", flush=True),
    )
    calibration, comparison = calibrate(
        predictor,
        measured,
        CHEAP_EVIDENCE,
        {"> 3 mm": 3.0},
        5,
        f"{copies} {kind} of the template, seeds {seed}-{seed + copies - 1}",
    )
    save_description(predictor.path, out, dataclasses.replace(predictor.description, calibration=calibration))
    print(
        json.dumps(
            {
                "calibrated model": out,
                "evidence": calibration.evidence,
                "weights": calibration.weights,
                "held_out": calibration.fitted_on["held_out"],
                "evidence_compared": comparison,
            }
        )
    )
    return Predictor.from_file(out, predictor.device)


def add_coverage_on_copies(
    predictor: Predictor, image: sitk.Image, truth: np.ndarray, copies: int, seed: int, folds: int, out: str
) -> Predictor:
    """Fit the calibration's 90 % coverage radius on harder copies and write the model to `out`."""
    if predictor.calibration is None:
        raise SystemExit(f"{predictor.path}: not calibrated; --coverage adds a radius to a calibration")
    errors, expected = [], []
    for n in range(copies):
        copy, points = harder_copy(image, truth, seed + n)
        copy_errors, copy_expected, seconds = errors_of(predictor, copy, points, refine=True)
        errors.append(copy_errors)
        expected.append(copy_expected)
        print(f"coverage copy {n + 1}/{copies} (seed {seed + n}, {seconds:.1f} s)", flush=True)
    ids = [f"seed {seed + n}" for n in range(copies)]
    source = f"{copies} harder copies of the template (--harder), seeds {seed}-{seed + copies - 1}"
    measured = Measurements(ids, np.array(errors), {}, np.array(expected))
    calibration = add_coverage(predictor.calibration, measured, 0.9, folds, source)
    save_description(predictor.path, out, dataclasses.replace(predictor.description, calibration=calibration))
    print(json.dumps({"model": out, "radius_factors": calibration.radius_factors, **calibration.fitted_on["coverage"]}))
    return Predictor.from_file(out, predictor.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("landmarks")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--single-resolution",
        action="store_true",
        help="skip a coarse-to-fine model's refinement (the coarse SCN alone), for comparison",
    )
    parser.add_argument(
        "--harder", action="store_true", help="evaluation copies deformed and altered beyond training (see above)"
    )
    parser.add_argument(
        "--calibrate", metavar="OUT", help="fit the expected-error calibration first, write the calibrated model here"
    )
    parser.add_argument(
        "--registration",
        action="store_true",
        help="the baseline instead of detection: the template registered to each case (similarity, mutual "
        "information) and its landmarks refined by the model's refinement stage (unless --single-resolution)",
    )
    parser.add_argument("--calibration-copies", type=int, default=30)
    parser.add_argument("--calibration-seed", type=int, default=2000)
    parser.add_argument(
        "--calibration-harder", action="store_true", help="fit the calibration on harder copies (see --harder)"
    )
    parser.add_argument(
        "--coverage", metavar="OUT", help="fit the 90 %% coverage radius on harder copies, write the model here"
    )
    parser.add_argument("--coverage-copies", type=int, default=30)
    parser.add_argument("--coverage-seed", type=int, default=3000)
    parser.add_argument("--coverage-folds", type=int, default=3, help="folds by copy for the held-out coverage")
    args = parser.parse_args()
    predictor = Predictor.from_file(args.model, args.device)
    image = read_image(args.image, predictor.dimension)
    truth = read_landmarks(args.landmarks, names=predictor.landmark_names, dimension=predictor.dimension).points_lps
    if args.calibrate:
        predictor = calibrate_on_copies(
            predictor,
            image,
            truth,
            args.calibration_copies,
            args.calibration_seed,
            args.calibration_harder,
            args.calibrate,
        )
    if args.coverage:
        predictor = add_coverage_on_copies(
            predictor, image, truth, args.coverage_copies, args.coverage_seed, args.coverage_folds, args.coverage
        )
    cases = {
        "original": (image, truth),
        "moved header (12, -8, 10 deg; 25, -40, 30 mm)": moved_header(
            image, truth, (12.0, -8.0, 10.0), (25.0, -40.0, 30.0)
        ),
    }
    make_copy, kind = (harder_copy, "harder copy") if args.harder else (deformed_copy, "deformed copy")
    for number in range(args.copies):
        cases[f"{kind} seed {args.seed + number}"] = make_copy(image, truth, args.seed + number)
    deformed, expected = [], []
    for name, (case_image, case_truth) in cases.items():
        errors, expected_errors, seconds = errors_of(
            predictor,
            case_image,
            case_truth,
            refine=not args.single_resolution,
            template=(image, truth) if args.registration else None,
        )
        if name.startswith(kind):
            deformed.append(errors)
            expected.append(expected_errors)
        print(
            json.dumps(
                {
                    "case": name,
                    "mean_mm": round(float(np.nanmean(errors)), 2),
                    "median_mm": round(float(np.nanmedian(errors)), 2),
                    "max_mm": round(float(np.nanmax(errors)), 2),
                    "missed": int(np.isnan(errors).sum()),
                    "detection_s": round(seconds, 3),
                }
            ),
            flush=True,
        )
    if deformed:
        errors = np.concatenate(deformed)
        print(
            json.dumps(
                {
                    "case": f"all {len(deformed)} {kind.replace('copy', 'copies')}",
                    "mean_mm": round(float(np.nanmean(errors)), 2),
                    "median_mm": round(float(np.nanmedian(errors)), 2),
                    "max_mm": round(float(np.nanmax(errors)), 2),
                    "missed": int(np.isnan(errors).sum()),
                }
            )
        )
        if predictor.calibration is not None and not args.registration:
            measured, predicted = np.array(deformed), np.array(expected)
            print(
                json.dumps(
                    {
                        "case": f"expected error on the {len(deformed)} {kind.replace('copy', 'copies')}",
                        **flagging_scores(predicted, measured, {"> 3 mm": 3.0}),
                        "per_landmark": calibrated_means(predictor.landmark_names, predicted, measured),
                    }
                )
            )
            radii = predictor.calibration.coverage_radii(predicted)
            if radii is not None:
                figures = coverage_figures(predictor.landmark_names, measured, radii)
                copies = kind.replace("copy", "copies")
                print(json.dumps({"case": f"coverage radius on the {len(deformed)} {copies}", **figures}))


if __name__ == "__main__":
    main()

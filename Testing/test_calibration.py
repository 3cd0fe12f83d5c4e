"""Expected error per landmark and the coverage radius: a calibration stored in the model file, the
evidence it reads, the review order it gives, and the commands that fit, report and use it."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli

from SCNLandmarksLib.bundle import read_description, save_description
from SCNLandmarksLib.calibration import (
    Calibration,
    ImageReview,
    Measurements,
    add_coverage,
    auroc,
    conformal_quantile,
    fit_with_radii,
    measure,
    review_summary,
    write_review_summary,
)
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import ModelFileError
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks, write_landmarks
from SCNLandmarksLib.vocabulary import LandmarkStatus
from SCNLandmarksMRML.review import next_to_review, review_order


def occluded(image: sitk.Image, point: np.ndarray, radius_mm: float, seed: int) -> sitk.Image:
    """The image with a disc of background noise over `point`: the landmark's evidence is gone."""
    geometry = ImageGeometry.of(image)
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(geometry.size)], indexing="ij")[::-1], axis=-1)
    physical = geometry.index_to_physical(index.reshape(-1, geometry.dimension)).reshape(*values.shape, -1)
    inside = np.linalg.norm(physical - point, axis=-1) < radius_mm
    background = np.percentile(values, 10)
    values[inside] = background + np.random.default_rng(seed).normal(0.0, 0.05 * np.ptp(values), inside.sum())
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


@pytest.fixture(scope="module")
def cases_2d(dataset_2d):
    """(id, image, truth) of the training images, each as it is and with one landmark occluded."""
    spec = load_dataset_spec(dataset_2d)
    entries = spec.split("train")
    truths = spec.load_landmarks(entries)
    cases = []
    for number, entry in enumerate(entries):
        image = read_image(entry.image, 2)
        truth = truths[entry.id]
        cases.append((entry.id, image, truth))
        k = number % len(truth.names)
        cases.append((f"{entry.id}-occluded", occluded(image, truth.points_lps[k], 6.0, number), truth))
    return cases


@pytest.fixture(scope="module")
def calibrated_2d(tiny_model_2d, cases_2d, tmp_path_factory):
    """The tiny 2D model with a calibration and 90 % coverage radii fitted on its training images
    (plain and occluded)."""
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    measured = measure(predictor, cases_2d)
    calibration = fit_with_radii(
        predictor.landmark_names, measured.errors, measured.evidence, ("peak", "width"), 0.9, 5, {"source": "test"}
    )
    path = tmp_path_factory.mktemp("calibrated") / "model.safetensors"
    save_description(tiny_model_2d, path, dataclasses.replace(predictor.description, calibration=calibration))
    return path, calibration


def test_calibration_is_stored_read_back_and_weights_stay_untouched(tiny_model_2d, calibrated_2d, dataset_2d, tmp_path):
    path, calibration = calibrated_2d
    assert read_description(path).calibration == calibration
    assert any(w > 0 for w in calibration.weights)
    plain, calibrated = Predictor.from_file(tiny_model_2d, "cpu"), Predictor.from_file(path, "cpu")
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    image = read_image(entry.image, 2)
    before, after = plain.predict(image), calibrated.predict(image)
    np.testing.assert_array_equal(before.landmarks.points_lps, after.landmarks.points_lps)
    expected = after.landmarks.expected_errors
    assert expected.shape == (4,) and np.all(np.isfinite(expected)) and np.all(expected > 0)
    assert after.flagged.dtype == bool and after.flagged.shape == (4,)
    radii = after.landmarks.coverage_radii
    assert after.landmarks.coverage == 0.9 and calibration.coverage == 0.9
    np.testing.assert_allclose(radii, expected * np.asarray(calibration.radius_factors))
    assert np.all(radii > 0)
    for suffix in (".mrk.json", ".csv"):
        write_landmarks(after.landmarks, tmp_path / f"points{suffix}", after.status, "mm")
        read = read_landmarks(tmp_path / f"points{suffix}", dimension=2)
        np.testing.assert_allclose(read.expected_errors, expected)
        np.testing.assert_allclose(read.confidences, after.landmarks.confidences)
        np.testing.assert_allclose(read.coverage_radii, radii)
        assert read.coverage == 0.9
    assert "coverage_radius_90" in (tmp_path / "points.csv").read_text().splitlines()[0].split(",")
    markup = json.loads((tmp_path / "points.mrk.json").read_text())["markups"][0]
    radius = next(m for m in markup["measurements"] if m["name"] == "coverage radius 90%")
    assert radius["units"] == "mm" and "probability 90 %" in radius["description"]
    # The review summary gives each image's largest radius, in a column that states the probability.
    rows = [ImageReview("a.png", 1, 2.0, largest_coverage_radius=5.25), ImageReview("b.png", 0, 1.0)]
    write_review_summary(tmp_path / "summary.csv", rows, "mm", 0.9)
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["largest_coverage_radius_90_mm"] for r in summary] == ["5.25", ""]


def test_a_calibration_from_before_coverage_radii_still_loads_and_says_so(calibrated_2d, dataset_2d, tmp_path):
    path, calibration = calibrated_2d
    description = read_description(path)
    older = dataclasses.replace(calibration, coverage=None, radius_factors=None)
    assert not {"coverage", "radius_factors"} & set(older.to_json())  # what a file of before holds
    target = save_description(path, tmp_path / "older.safetensors", dataclasses.replace(description, calibration=older))
    assert read_description(target).calibration == older
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    landmarks = Predictor.from_file(target, "cpu").predict(read_image(entry.image, 2)).landmarks
    assert np.all(np.isfinite(landmarks.expected_errors)) and landmarks.coverage_radii is None
    write_landmarks(landmarks, tmp_path / "older.csv")
    assert "coverage_radius" not in (tmp_path / "older.csv").read_text()
    detected = cli("detect", str(target), str(entry.image), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert detected.returncode == 0, detected.stderr[-2000:]
    assert "predates coverage radii" in detected.stderr
    assert "largest_coverage_radius" not in (tmp_path / "out" / "summary.csv").read_text()
    # A radius factor that is not a positive number is refused, naming the file.
    broken = dataclasses.replace(calibration, radius_factors=(1.0, -2.0, 1.0, 1.0))
    bad = save_description(path, tmp_path / "bad.safetensors", dataclasses.replace(description, calibration=broken))
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: the calibration needs one positive radius factor"):
        read_description(bad)


def test_split_conformal_radius_covers_each_landmark_at_the_stated_probability():
    # The rank: ceil((n + 1) * 0.9), NaN ignored; too few points for 90 % is an error, not a radius.
    assert conformal_quantile(np.arange(1.0, 20.0), 0.9) == 18.0
    assert conformal_quantile(np.r_[np.arange(1.0, 10.0), np.nan], 0.9) == 9.0
    with pytest.raises(ValueError, match="at least 9"):
        conformal_quantile(np.arange(1.0, 9.0), 0.9)
    # Three landmarks whose errors over their expected errors follow different laws: a pooled factor
    # would cover the heavy-tailed one less than 90 % and the light one more; per landmark, each gets 90 %.
    rng = np.random.default_rng(0)
    laws = [
        lambda n: rng.rayleigh(1.0, n),
        lambda n: rng.lognormal(0.0, 1.0, n),
        lambda n: rng.uniform(0.5, 1.0, n),
    ]
    images = 300
    expected = rng.uniform(0.5, 4.0, (images, 3))
    scores = np.stack([law(images) for law in laws], axis=1)
    calibration = Calibration(("a", "b", "c"), (1.0,) * 3, (), (), (1.0,) * 3)
    measured = Measurements([str(i) for i in range(images)], scores * expected, {}, expected)
    fitted = add_coverage(calibration, measured, 0.9, 5, "synthetic")
    factors = fitted.radius_factors
    assert factors[1] > factors[0] > factors[2]  # the heavy tail gets the widest radius
    held_out = fitted.fitted_on["coverage"]["held_out"]
    assert held_out["points"] == 3 * images and 0.87 <= held_out["coverage"] <= 0.93
    assert all(0.85 <= c <= 0.95 for c in held_out["per_landmark"].values()), held_out
    # Fresh draws: each landmark's radius holds the true point about 90 % of the time.
    fresh_expected = rng.uniform(0.5, 4.0, (20000, 3))
    fresh_errors = np.stack([law(20000) for law in laws], axis=1) * fresh_expected
    covered = np.mean(fresh_errors <= fitted.coverage_radii(fresh_expected), axis=0)
    assert np.all((covered > 0.87) & (covered < 0.94)), covered
    # Averaged over many calibration sets of 19 images, coverage is exactly the rank's 18 / 20.
    draws = [rng.rayleigh(1.0, 20) for _ in range(4000)]
    mean = np.mean([d[19] <= conformal_quantile(d[:19], 0.9) for d in draws])
    assert abs(mean - 0.9) < 0.015, mean


def test_a_model_without_calibration_still_loads_and_says_so(tiny_model_2d, dataset_2d, tmp_path):
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    assert predictor.calibration is None
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    prediction = predictor.predict(read_image(entry.image, 2))
    assert prediction.landmarks.expected_errors is None and prediction.flagged is None
    write_landmarks(prediction.landmarks, tmp_path / "old.mrk.json", prediction.status)
    assert read_landmarks(tmp_path / "old.mrk.json").expected_errors is None
    detected = cli("detect", str(tiny_model_2d), str(entry.image), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert detected.returncode == 0, detected.stderr[-2000:]
    assert "not calibrated" in detected.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert rows == [{"image": entry.image.name, "flagged_points": "", "largest_expected_error_mm": "", "error": ""}]


def test_expected_error_grows_when_a_landmark_is_occluded(calibrated_2d, dataset_2d):
    predictor = Predictor.from_file(calibrated_2d[0], "cpu")
    spec = load_dataset_spec(dataset_2d)
    entry = spec.split("validation")[0]  # never seen by the network nor the calibration
    image = read_image(entry.image, 2)
    truth = spec.load_landmarks([entry])[entry.id]
    clean = predictor.predict(image).landmarks.expected_errors
    for k in range(len(truth.names)):
        hidden = predictor.predict(occluded(image, truth.points_lps[k], 6.0, k)).landmarks.expected_errors
        # Either no point at all (reported missing: the evidence is gone) or a larger expected error.
        assert np.isnan(hidden[k]) or hidden[k] > 1.5 * clean[k], (k, clean, hidden)


def test_a_calibration_for_other_landmarks_is_refused_naming_the_file(calibrated_2d, tmp_path):
    path, calibration = calibrated_2d
    description = read_description(path)
    other = dataclasses.replace(calibration, landmark_names=tuple(reversed(calibration.landmark_names)))
    target = save_description(
        path, tmp_path / "mismatched.safetensors", dataclasses.replace(description, calibration=other)
    )
    with pytest.raises(ModelFileError, match=r"mismatched\.safetensors: the calibration is for landmarks"):
        read_description(target)
    with pytest.raises(ModelFileError, match=r"mismatched\.safetensors"):
        Predictor.from_file(target, "cpu")


def test_auroc_and_review_orders():
    assert auroc(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([False, True])) == 0.5
    statuses = [
        LandmarkStatus.DETECTED,
        LandmarkStatus.MOVED,
        LandmarkStatus.LOW_CONFIDENCE,
        LandmarkStatus.DETECTED,
        LandmarkStatus.MISSING,
    ]
    expected = [2.0, 9.0, 5.0, np.nan, np.nan]
    assert review_order(expected, statuses) == [2, 0, 3]  # moved and missing points need no review
    assert next_to_review(expected, statuses, None) == 2
    assert next_to_review(expected, statuses, 2) == 0
    assert next_to_review(expected, statuses, 3) is None
    # The point just moved (by the reviewer, on their walk 2, 0) still marks the place: the walk goes on
    # after it, not from the top again.
    moved = [LandmarkStatus.MOVED if i == 0 else status for i, status in enumerate(statuses)]
    assert next_to_review(expected, moved, 0) == 3
    moved = [LandmarkStatus.MOVED if i == 2 else status for i, status in enumerate(statuses)]
    assert next_to_review(None, moved, 2) == 3  # not calibrated: landmark order, after the moved point
    assert review_order(None, statuses) == [0, 2, 3]  # not calibrated: landmark order
    rows = [
        ImageReview("a.png", 1, 4.0),
        ImageReview("b.png", 3, 9.0),
        ImageReview("c.png", None, float("nan")),
        ImageReview("d.png", 5, 9.0),
    ]
    assert [r.image for r in review_summary(rows)] == ["d.png", "b.png", "a.png", "c.png"]


def test_cli_calibrate_evaluate_and_detect_summary(tiny_model_2d, dataset_2d, calibrated_2d, tmp_path):
    out = tmp_path / "calibrated.safetensors"
    fitted = cli(
        "calibrate",
        str(tiny_model_2d),
        str(dataset_2d),
        "--split",
        "train",
        "--out",
        str(out),
        "--flag-above",
        "1.0",
        "0.5",
        "--folds",
        "2",
        "--coverage",
        "0.8",
        "--device",
        "cpu",
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    report = json.loads(fitted.stdout)
    assert set(report["held_out"]["auroc"]) == {"> 1 mm", "> 0.5 mm"}
    assert "landmark base only" in report["evidence_compared"]
    fitted_calibration = read_description(out).calibration
    assert fitted_calibration.fitted_on["thresholds"] == {"> 1 mm": 1.0, "> 0.5 mm": 0.5}
    assert fitted_calibration.coverage == 0.8 and len(fitted_calibration.radius_factors) == 4
    assert report["radius_factors"] == list(fitted_calibration.radius_factors)
    held_out = report["coverage"]["held_out"]
    assert held_out["method"] == "2-fold cross-validation by image" and 0.0 <= held_out["coverage"] <= 1.0
    assert set(held_out["per_landmark"]) == set(fitted_calibration.landmark_names)
    again = cli(
        "calibrate", str(tiny_model_2d), str(dataset_2d), "--split", "train", "--out", str(out), "--device", "cpu"
    )
    assert again.returncode == 2 and "would replace existing file" in again.stderr and "--overwrite" in again.stderr

    evaluated = cli(
        "evaluate",
        str(out),
        "--dataset",
        str(dataset_2d),
        "--split",
        "validation",
        "--out",
        str(tmp_path / "evaluation"),
        "--device",
        "cpu",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["expected_error"]["auroc"]) == {"> 1 mm", "> 0.5 mm"}
    coverage = metrics["expected_error"]["coverage"]
    assert coverage["target"] == 0.8 and len(coverage["per_landmark"]) == 4 and coverage["points"] > 0
    report_text = (tmp_path / "evaluation" / "report.md").read_text(encoding="utf-8")
    assert "## Expected error" in report_text and "Coverage radius (the model's 80 %" in report_text
    assert (tmp_path / "evaluation" / "calibration.png").is_file()

    # Review first: the image with an occluded landmark comes first in summary.csv.
    spec = load_dataset_spec(dataset_2d)
    entries = spec.split("validation")
    truth = spec.load_landmarks(entries)[entries[1].id]
    hidden = tmp_path / "hidden.mha"
    write_image(occluded(read_image(entries[1].image, 2), truth.points_lps[2], 6.0, 7), hidden)
    detected = cli(
        "detect",
        str(calibrated_2d[0]),
        *[str(e.image) for e in entries],
        str(hidden),
        "--out",
        str(tmp_path / "detected"),
        "--format",
        "csv",
        "--device",
        "cpu",
    )
    assert detected.returncode == 0, detected.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "detected" / "summary.csv")))
    assert rows[0]["image"] == "hidden.mha" and len(rows) == 3
    largest = [float(r["largest_expected_error_mm"]) for r in rows]
    assert largest == sorted(largest, reverse=True)
    assert all(float(r["largest_coverage_radius_90_mm"]) > 0 for r in rows)
    header = (tmp_path / "detected" / "hidden.csv").read_text().splitlines()[0].split(",")
    assert {"expected_error", "coverage_radius_90"} <= set(header)

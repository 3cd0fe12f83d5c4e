"""Expected error per landmark: a calibration stored in the model file, the evidence it reads, the
review order it gives, and the commands that fit, report and use it."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli

from SCNLandmarksLib.bundle import read_description, save_description
from SCNLandmarksLib.calibration import ImageReview, auroc, fit_calibration, measure, review_summary
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
    """The tiny 2D model with a calibration fitted on its training images (plain and occluded)."""
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    measured = measure(predictor, cases_2d)
    calibration = fit_calibration(
        predictor.landmark_names, measured.errors, measured.evidence, ("peak", "width"), {"source": "test"}
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
    for suffix in (".mrk.json", ".csv"):
        write_landmarks(after.landmarks, tmp_path / f"points{suffix}", after.status, "mm")
        read = read_landmarks(tmp_path / f"points{suffix}", dimension=2)
        np.testing.assert_allclose(read.expected_errors, expected)
        np.testing.assert_allclose(read.confidences, after.landmarks.confidences)


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
        "--device",
        "cpu",
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    report = json.loads(fitted.stdout)
    assert set(report["held_out"]["auroc"]) == {"> 1 mm", "> 0.5 mm"}
    assert "landmark base only" in report["evidence_compared"]
    assert read_description(out).calibration.fitted_on["thresholds"] == {"> 1 mm": 1.0, "> 0.5 mm": 0.5}
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
    assert "## Expected error" in (tmp_path / "evaluation" / "report.md").read_text(encoding="utf-8")
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
    assert "expected_error" in (tmp_path / "detected" / "hidden.csv").read_text().splitlines()[0]

"""The models that ship (Resources/Models/models.json) load safely and behave on the bundled sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.bundle import read_description
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"
CATALOGUE = json.loads((MODELS / "models.json").read_text())["models"]


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e["id"] for e in CATALOGUE])
def test_catalogue_entry_is_complete(entry):
    model = MODELS / entry["file"]
    assert model.is_file() and model.stat().st_size < 30e6
    assert (MODELS / entry["card"]).is_file()
    description = read_description(model)
    assert description.dimension == entry["dimension"]
    assert "config" in description.provenance


def _brain() -> tuple[Predictor, sitk.Image]:
    entry = next(e for e in CATALOGUE if e["id"] == "brain-afids-32")
    return Predictor.from_file(MODELS / entry["file"], "cpu"), read_image(MODELS / entry["sample"])


def test_brain_model_finds_plausible_anatomy_on_the_bundled_sample():
    predictor, image = _brain()
    prediction = predictor.predict(image)
    names = prediction.landmarks.names
    assert len(names) == 32 and prediction.status.count("missing") == 0
    points = dict(zip(names, prediction.landmarks.points_lps))
    ac_pc = np.linalg.norm(points["AC"] - points["PC"])
    assert 20.0 < ac_pc < 35.0, f"AC-PC distance {ac_pc:.1f} mm"
    # Left landmarks lie at larger LPS x (patient left) than their right partners.
    for right, left in (("RMB", "LMB"), ("RLVAC", "LLVAC"), ("ROSF", "LOSF")):
        assert points[left][0] > points[right][0]


def test_brain_landmarks_follow_a_rigidly_moved_header():
    """Real scans are not in template space: the points must move with the head in the scanner frame."""
    predictor, image = _brain()
    before = predictor.predict(image).landmarks.points_lps
    a, b = math.radians(12.0), math.radians(-10.0)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]]
    )
    translation = np.array([30.0, -45.0, 20.0])
    moved = sitk.Image(image)
    moved.SetDirection((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    moved.SetOrigin((rotation @ np.asarray(image.GetOrigin()) + translation).tolist())
    after = predictor.predict(moved).landmarks.points_lps
    expected = before @ rotation.T + translation
    shift = np.linalg.norm(after - expected, axis=1)
    assert np.mean(shift) < 2.0 and np.max(shift) < 6.0, f"mean {np.mean(shift):.2f}, max {np.max(shift):.2f} mm"


def test_hand_model_works_in_millimetres_on_left_and_right_hands():
    """hand-xray-37 ships without a sample (its training images are GPL data); its file must say what
    the card says: 37 landmarks in model order, mm, a mirror pass for right hands, coarse-to-fine,
    calibrated on the folds' held-out hands."""
    entry = next(e for e in CATALOGUE if e["id"] == "hand-xray-37")
    assert "sample" not in entry
    description = read_description(MODELS / entry["file"])
    assert list(description.landmark_names) == [str(index) for index in range(37)]
    assert description.unit == "mm" and not description.in_pixels
    assert description.inference.mirror_axis == 0
    assert description.refinement is not None
    assert description.calibration is not None and description.calibration.fitted_on["images"] == 6


def test_brain_refinement_brings_displaced_points_back_to_the_anatomy():
    """Points placed by other means (a registered template's) go through the same refinement."""
    predictor, image = _brain()
    found = predictor.predict(image).landmarks.points_lps
    directions = np.random.default_rng(0).normal(size=found.shape)
    displaced = found + 4.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    distance = np.linalg.norm(predictor.refine_points(image, displaced) - found, axis=1)
    assert np.mean(distance) < 1.0, f"mean {np.mean(distance):.2f} mm from the detected points, 4 mm before"

"""A clinic's convention offset and the decision between the base, the offset and the fine-tuned
model: learned in the canonical frame, moved with the image, stored in the model file, and chosen
only when better beyond noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.bundle import load_model, read_description, save_model
from SCNLandmarksLib.convention import (
    ConventionOffset,
    better_beyond_noise,
    canonical_residuals,
    fit_offsets,
    leave_one_out_offsets,
)
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import ModelFileError
from SCNLandmarksLib.finetune import BASE, BASE_OFFSET, FINE_TUNED, decide
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.landmark_set import LandmarkSet
from SCNLandmarksLib.pose import Pose
from SCNLandmarksLib.train import TrainingImage, load_split


def _rotation(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def test_a_shared_shift_is_learned_and_pure_scatter_is_shrunk_to_nothing():
    rng = np.random.default_rng(0)
    shift = np.array([[2.0, -1.0], [0.0, 3.0], [-1.5, 0.0]])
    shifted = shift + rng.normal(0.0, 0.5, (10, 3, 2))
    learned = fit_offsets(shifted)
    assert np.abs(learned - shift).max() < 0.5
    assert fit_offsets(shifted[:1]).tolist() == np.zeros((3, 2)).tolist()  # one case: no scatter known
    scatter = rng.normal(0.0, 2.0, (10, 40, 2))
    # No true shift: the means are what scatter alone gives, and mostly shrunk to exactly zero.
    shrunk = np.linalg.norm(fit_offsets(scatter), axis=1)
    means = np.linalg.norm(scatter.mean(axis=0), axis=1)
    assert np.mean(shrunk == 0.0) > 0.5 and shrunk.mean() < 0.4 * means.mean()
    # A missing point leaves its case out of that landmark only.
    shifted[0, 1] = np.nan
    assert np.all(np.isfinite(fit_offsets(shifted)))
    # Leave-one-out: each case's offset is what the others give.
    loo = leave_one_out_offsets(shifted)
    np.testing.assert_allclose(loo[3], fit_offsets(np.delete(shifted, 3, axis=0)))


def test_only_a_gain_beyond_noise_and_a_share_of_the_error_counts():
    rng = np.random.default_rng(1)
    reference = rng.uniform(1.0, 10.0, 200)
    assert not better_beyond_noise(reference, reference)
    # A model identical to its base but for rounding (as on another CPU) never wins.
    assert not better_beyond_noise(reference - 1e-7, reference)
    assert not better_beyond_noise(reference * 0.995, reference)  # 0.5 %: not worth a change
    assert better_beyond_noise(reference * 0.9, reference)
    # A 10 % gain on average, on 20 points whose differences scatter by more than the errors, is noise.
    few = reference[:20]
    scatter = rng.normal(0.0, 1.0, 20)
    gains = 0.1 * few.mean() + 5.0 * (scatter - scatter.mean()) / scatter.std()
    assert not better_beyond_noise(few - gains, few)
    assert better_beyond_noise(few - 0.1 * few.mean(), few)
    with_missing = reference.copy()
    with_missing[:100] = np.nan
    assert better_beyond_noise(reference * 0.9, with_missing)


def test_the_offset_is_learned_in_the_canonical_frame_and_turns_with_the_image():
    offsets = np.array([[3.0, 0.0], [0.0, -2.0]])
    convention = ConventionOffset(offsets, 10)
    points = np.array([[10.0, 20.0], [30.0, 40.0]])
    upright = Pose(np.eye(2), 1.0, np.zeros(2))
    turned = Pose(_rotation(90.0), 2.0, np.array([5.0, -5.0]))  # turned a quarter and twice as large
    np.testing.assert_allclose(convention.applied(points, upright) - points, offsets)
    np.testing.assert_allclose(convention.applied(points, turned) - points, [[0.0, 6.0], [4.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(convention.applied(points, None) - points, offsets)
    # What the corrections show in the turned image is the same offset in the canonical frame.
    corrected = convention.applied(points, turned)
    np.testing.assert_allclose(canonical_residuals(points, corrected, turned), offsets, atol=1e-12)
    missing = np.array([[np.nan, np.nan], [1.0, 1.0]])
    assert np.isnan(convention.applied(missing, turned)[0]).all()


def test_a_stored_offset_moves_detections_with_a_rotated_image(tiny_model_2d, dataset_2d, tmp_path):
    loaded = load_model(tiny_model_2d)
    assert loaded.description.mean_configuration is not None
    offsets = np.tile([[2.0, -1.0]], (len(loaded.description.landmark_names), 1))
    description = dataclasses.replace(loaded.description, convention=ConventionOffset(offsets, 12))
    with_offset = save_model(tmp_path / "offset.safetensors", description, loaded.coarse, loaded.refinement)
    assert read_description(with_offset).convention.offsets.tolist() == offsets.tolist()

    spec = load_dataset_spec(dataset_2d)
    image = sitk.ReadImage(str(spec.entries[0].image))
    geometry = ImageGeometry.of(image)
    turn = _rotation(30.0)
    # The same voxels with a header turned by 30 degrees about the image's center: the anatomy turns.
    center = geometry.center_physical()
    direction = turn @ geometry.direction_matrix
    origin = turn @ (np.asarray(geometry.origin) - center) + center
    rotated = dataclasses.replace(
        geometry, origin=tuple(origin), direction=tuple(float(v) for v in direction.ravel())
    ).apply_to(sitk.Image(image))

    plain, moved = Predictor.from_file(tiny_model_2d, "cpu"), Predictor.from_file(with_offset, "cpu")
    for case in (image, rotated):
        without, found = plain.predict(case), moved.predict(case)
        shift = found.landmarks.points_lps - without.landmarks.points_lps
        frame = found.pose
        np.testing.assert_allclose(shift, frame.scale * offsets @ frame.rotation.T, atol=1e-9)
    # Between the two images the displacement turned with the anatomy (to the pose fit's accuracy).
    upright_shift = moved.predict(image).landmarks.points_lps - plain.predict(image).landmarks.points_lps
    turned_shift = moved.predict(rotated).landmarks.points_lps - plain.predict(rotated).landmarks.points_lps
    np.testing.assert_allclose(turned_shift, upright_shift @ turn.T, atol=0.15)


def test_a_malformed_offset_in_a_model_file_is_refused():
    with pytest.raises(ModelFileError, match="model.safetensors: the convention offset must be 4 finite"):
        ConventionOffset.from_json({"offsets": [[1.0, 2.0]], "cases": 3}, 4, 2, "model.safetensors")
    with pytest.raises(ModelFileError, match="malformed convention offset"):
        ConventionOffset.from_json({"offsets": [[1.0, 2.0]]}, 1, 2, "model.safetensors")


def _cases_labelled_by(predictor: Predictor, spec_path, move) -> list[TrainingImage]:
    """The dataset's images with the predictor's own detections moved by `move(points, pose, case)`
    as their "corrected" landmarks."""
    spec = load_dataset_spec(spec_path)
    cases = []
    for number, item in enumerate(load_split(spec, list(spec.entries))):
        found = predictor.predict(item.image)
        points = move(found.landmarks.points_lps, found.pose, number)
        cases.append(TrainingImage(item.id, item.path, item.image, LandmarkSet(found.landmarks.names, points)))
    return cases


def test_the_decision_picks_the_offset_for_a_pure_shift_and_the_base_for_noise(tiny_model_2d, dataset_2d):
    base = Predictor.from_file(tiny_model_2d, "cpu")
    rng = np.random.default_rng(2)
    convention = np.array([[1.5, 0.0], [0.0, -1.5], [1.0, 1.0], [-1.0, 0.5]])

    def shifted(points, pose, number):
        return ConventionOffset(convention, 1).applied(points, pose) + rng.normal(0.0, 0.2, points.shape)

    def scattered(points, pose, number):
        return points + rng.normal(0.0, 1.0, points.shape)

    # The fine-tuned candidate is the base itself: identical to it, it must never win.
    decision = decide(base, base, _cases_labelled_by(base, dataset_2d, shifted), 3, cap=20.0)
    assert decision.chosen == BASE_OFFSET
    assert decision.leave_one_out[BASE_OFFSET].mean_error < 0.5 * decision.leave_one_out[BASE].mean_error
    assert np.abs(decision.offset - convention).max() < 0.3
    assert decision.held_aside[FINE_TUNED] == decision.held_aside[BASE]

    decision = decide(base, base, _cases_labelled_by(base, dataset_2d, scattered), 3, cap=20.0)
    assert decision.chosen == BASE and decision.offset is None
    assert decision.held_aside[FINE_TUNED] == decision.held_aside[BASE]

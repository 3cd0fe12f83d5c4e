"""Pose normalisation: the same anatomy wherever the image lies (moved header, rotated picture, other
resolution), the pose fit itself, and model files with or without a mean configuration."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.bundle import read_description, save_description
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import ModelFileError
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.pose import Pose, fit_pose


def rotation(dimension: int, degrees: tuple[float, ...]) -> np.ndarray:
    matrix = np.eye(dimension)
    for axis, angle in enumerate(degrees):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        i, j = [a for a in range(3) if a != axis] if dimension == 3 else (0, 1)
        turn = np.eye(dimension)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = turn @ matrix
    return matrix


def validation_case(spec_path):
    spec = load_dataset_spec(spec_path)
    entry = spec.split("validation")[0]
    return read_image(entry.image), spec.load_landmarks([entry])[entry.id].points_lps


def shift(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(a - b, axis=1)))


def test_the_fit_recovers_a_similarity_and_ignores_an_outlier():
    generator = np.random.default_rng(0)
    reference = generator.uniform(-50, 50, (12, 3))
    truth = Pose(rotation(3, (20.0, -15.0, 30.0)), 1.3, np.array([5.0, -7.0, 11.0]))
    points = truth.to_image(reference) + generator.normal(0, 0.2, reference.shape)
    points[3] += 40.0  # one landmark found far away
    points[5] = np.nan  # one missing
    fitted = fit_pose(reference, points, np.ones(12), with_scale=True)
    assert fitted.scale == pytest.approx(1.3, rel=0.01)
    assert np.abs(fitted.rotation - truth.rotation).max() < 0.01
    assert abs(fitted.rotation_deg - truth.rotation_deg) < 0.5
    rigid = fit_pose(reference, points, np.ones(12), with_scale=False)
    assert rigid.scale == 1.0 and not rigid.mirrored
    # A mirror image's points get a mirror pose; canonical <-> image is exact both ways.
    mirror = Pose.mirror(0, np.zeros(3)).after(truth)
    fitted = fit_pose(reference, mirror.to_image(reference), np.ones(12), with_scale=True, mirrored=True)
    assert fitted.mirrored and np.allclose(fitted.to_canonical(fitted.to_image(reference)), reference)
    assert np.allclose(fitted.to_image(reference), mirror.to_image(reference))
    assert fit_pose(reference[:3], points[:3], np.ones(3), with_scale=False) is None  # too few points in 3D


def test_the_canonical_image_is_the_same_voxels_with_a_header_mapping_points_exactly(dataset_3d):
    image, _ = validation_case(dataset_3d)
    pose = Pose(rotation(3, (10.0, 25.0, -5.0)), 0.8, np.array([3.0, 4.0, -5.0]))
    canonical = pose.canonical_image(image)
    assert np.array_equal(sitk.GetArrayViewFromImage(canonical), sitk.GetArrayViewFromImage(image))
    index = np.array([[3.0, 7.0, 2.0], [20.5, 1.0, 11.0]])
    assert np.allclose(
        pose.to_image(ImageGeometry.of(canonical).index_to_physical(index)),
        ImageGeometry.of(image).index_to_physical(index),
    )


def moved_header(image: sitk.Image, move: Pose) -> sitk.Image:
    return move.moved(ImageGeometry.of(image)).apply_to(sitk.Image(image))


def test_a_moved_3d_header_gives_the_same_anatomy(tiny_model_3d, dataset_3d):
    """The scan's header rigidly moved by 25-30 degrees and 40 mm: the points, mapped back through the
    move, stay within 0.25 mm (a tenth of the 2.5 mm network grid) of the unmoved scan's; without the pose
    step they move by more than twice that."""
    predictor = Predictor.from_file(tiny_model_3d, "cpu")
    assert predictor.mean_configuration is not None  # stored by training
    image, _ = validation_case(dataset_3d)
    unmoved = predictor.predict(image).landmarks.points_lps
    mean_configuration, shifts_without = predictor.mean_configuration, []
    for degrees in ((28.0, 0.0, 0.0), (-15.0, 20.0, 25.0)):
        move = Pose(rotation(3, degrees), 1.0, np.array([40.0, -25.0, 10.0]))
        moved = moved_header(image, move)
        predictor.mean_configuration = mean_configuration
        found = predictor.predict(moved)
        assert found.canonical_pass and not found.mirrored
        assert shift(move.to_canonical(found.landmarks.points_lps), unmoved) < 0.25
        predictor.mean_configuration = None
        shifts_without.append(shift(move.to_canonical(predictor.predict(moved).landmarks.points_lps), unmoved))
    assert max(shifts_without) > 0.5


def rotated_picture(image: sitk.Image, degrees: float) -> tuple[sitk.Image, sitk.Euler2DTransform]:
    """The picture's content rotated in plane about its center, resampled on a grid holding all of it."""
    transform = sitk.Euler2DTransform(ImageGeometry.of(image).center_physical().tolist(), math.radians(degrees))
    inverse = transform.GetInverse()
    corners = np.array([inverse.TransformPoint(c.tolist()) for c in ImageGeometry.of(image).corners_physical()])
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = min(image.GetSpacing())
    size = [int(math.ceil(v / spacing)) + 1 for v in high - low]
    return sitk.Resample(
        image, size, transform, sitk.sitkLinear, low.tolist(), (spacing, spacing), (1, 0, 0, 1), 0.0
    ), transform


def test_a_rotated_2d_picture_gives_the_same_points(tiny_model_2d, dataset_2d):
    """Content rotated by 20 degrees (resampled): within a tenth of the 2 mm grid cell of the
    unrotated result, mapped back; a pass in the picture's own pose moves them by more."""
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    image, _ = validation_case(dataset_2d)
    straight, _ = rotated_picture(image, 0.0)  # the same resampling, not rotated
    reference = predictor.predict(straight).landmarks.points_lps
    turned, transform = rotated_picture(image, 20.0)
    found = predictor.predict(turned)
    assert found.canonical_pass
    back = np.array([transform.TransformPoint(p.tolist()) for p in found.landmarks.points_lps])
    assert shift(back, reference) < 0.2
    predictor.mean_configuration = None
    own_pose = np.array([transform.TransformPoint(p.tolist()) for p in predictor.predict(turned).landmarks.points_lps])
    assert shift(own_pose, reference) > shift(back, reference)


@pytest.fixture(scope="module")
def pixel_model(tiny_model_2d, tmp_path_factory):
    """The tiny 2D model as a model in pixels (its training images' spacing unknown), like the
    cephalometric one: its physical millimetres are taken as pixels."""
    description = read_description(tiny_model_2d)
    path = tmp_path_factory.mktemp("pixel") / "model.safetensors"
    return save_description(tiny_model_2d, path, dataclasses.replace(description, unit="px"))


def as_png(image: sitk.Image, factor: float) -> tuple[sitk.Image, np.ndarray]:
    """The picture resampled to `factor` pixels per model pixel (anti-aliased when shrinking), then
    stripped of its geometry like a PNG (spacing 1, origin 0); and its physical origin before that."""
    geometry = ImageGeometry.of(image)
    corners = geometry.corners_physical()
    low = corners.min(axis=0)
    size = [int(math.ceil(v * factor)) + 1 for v in corners.max(axis=0) - low]
    if factor < 1.0:
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 / factor)
    picture = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, low.tolist(), (1 / factor,) * 2, (1, 0, 0, 1), 0.0
    )
    picture.SetOrigin((0.0, 0.0))
    picture.SetSpacing((1.0, 1.0))
    return picture, low


def test_a_picture_without_spacing_at_another_resolution_gives_the_same_points(pixel_model, dataset_2d):
    """A PNG-like picture at 0.6x and 1.7x the model's resolution: the model finds the scale itself; the
    points, in the x1 picture's pixels, stay within a tenth of a 2 px grid cell of the x1 result."""
    predictor = Predictor.from_file(pixel_model, "cpu")
    image, _ = validation_case(dataset_2d)
    native, origin = as_png(image, 1.0)
    reference = predictor.predict(native).landmarks.points_lps
    for factor in (0.6, 1.7):
        picture, _ = as_png(image, factor)
        found = predictor.predict(picture)
        assert found.pose.scale == pytest.approx(factor, rel=0.1) and found.canonical_pass
        assert shift(found.landmarks.points_lps / factor, reference) < 0.2


def test_a_model_file_without_mean_configuration_detects_in_the_image_pose(tiny_model_2d, dataset_2d, tmp_path):
    description = read_description(tiny_model_2d)
    old = save_description(
        tiny_model_2d, tmp_path / "old.safetensors", dataclasses.replace(description, mean_configuration=None)
    )
    predictor = Predictor.from_file(old, "cpu")
    image, truth = validation_case(dataset_2d)
    found = predictor.predict(image)
    assert predictor.mean_configuration is None and found.pose is None and not found.canonical_pass
    assert np.linalg.norm(found.landmarks.points_lps - truth, axis=1).max() < 2.0
    # A mean configuration that does not match the landmarks is refused, naming the file.
    header = description.to_json()
    header["mean_configuration"]["points"] = header["mean_configuration"]["points"][:-1]
    with pytest.raises(ModelFileError, match="bad.safetensors.*mean_configuration must have 4 points"):
        type(description).from_json(json.loads(json.dumps(header)), str(tmp_path / "bad.safetensors"))

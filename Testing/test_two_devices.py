"""One model for pictures of several devices: merged dataset specs, and training that brings every
picture's anatomy to one size (`scale_from_anatomy`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli, tiny_config

from SCNLandmarksLib.autoconfig import config_for_dataset
from SCNLandmarksLib.bundle import read_description
from SCNLandmarksLib.data.dataset_init import merge_datasets
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.finetune import finetune_config
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.io.landmarks import write_landmarks_csv
from SCNLandmarksLib.landmark_set import LandmarkSet
from SCNLandmarksLib.pose import anatomical_scales
from SCNLandmarksLib.train import TrainingImage, _in_canonical_size, train

NAMES = ["Tip", "Base", "Left", "Right", "Middle"]
SHAPE = np.array([[0.0, -20.0], [0.0, 18.0], [-15.0, 4.0], [14.0, 6.0], [1.0, 1.0]])


def rotated(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def test_the_anatomical_scales_are_each_sets_size_and_the_mean_is_at_the_median_size():
    rng = np.random.default_rng(3)
    sizes = np.array([0.7, 0.75, 1.0, 1.1, 1.3])
    sets = [
        LandmarkSet(NAMES, size * SHAPE @ rotated(angle).T + shift + rng.normal(0.0, 0.01, SHAPE.shape))
        for size, angle, shift in zip(sizes, (-10, 5, 0, 12, -3), rng.uniform(20, 60, (5, 2)))
    ]
    mean, scales = anatomical_scales(sets, "five sets")
    assert np.median(scales) == pytest.approx(1.0)
    np.testing.assert_allclose(scales / scales[2], sizes / sizes[2], rtol=1e-3)
    canonical = [s.points_lps / k for s, k in zip(sets, scales)]
    np.testing.assert_allclose(mean.array, np.mean(canonical, axis=0), atol=1e-9)

    # A base model's configuration fixes the canonical size: the scales are relative to it.
    reference = dataclasses.replace(mean, points=tuple(map(tuple, 2.0 * SHAPE)))
    kept, scales = anatomical_scales(sets, "five sets", reference)
    assert kept is reference
    np.testing.assert_allclose(scales, sizes / 2.0, rtol=1e-3)


def test_a_picture_in_the_canonical_size_keeps_every_landmark_on_its_pixel():
    picture = sitk.Image(40, 30, sitk.sitkFloat32)  # a picture: origin 0, pixel 1, identity direction
    landmarks = LandmarkSet(NAMES, 0.5 * SHAPE + [20.0, 15.0])
    item = TrainingImage("case", Path("case.png"), picture, landmarks)
    scaled = _in_canonical_size(item, 0.8)
    assert scaled.image.GetSpacing() == pytest.approx((1.25, 1.25))
    np.testing.assert_allclose(
        ImageGeometry.of(scaled.image).physical_to_index(scaled.landmarks.points_lps),
        ImageGeometry.of(picture).physical_to_index(landmarks.points_lps),
        atol=1e-12,
    )
    assert item.image.GetSpacing() == (1.0, 1.0)  # the original is untouched


def write_source(
    folder: Path, size: tuple[int, int], zoom: float, count: int, spacing: float | None = None, validation: str = ""
) -> Path:
    """A dataset of `count` PNG pictures of a bright blob per landmark, the anatomy drawn `zoom` times
    the shape's size (a device with other pixels), landmarks in one table, `spacing` stated for the
    pictures, image `validation` in the validation split; returns the spec."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(count)
    sets = {}
    for number in range(1, count + 1):
        points = zoom * (SHAPE @ rotated(rng.uniform(-8, 8)).T) + np.array(size) / 2.0 + rng.uniform(-2, 2, 2)
        y, x = np.mgrid[: size[1], : size[0]]
        pixels = sum(np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * (1.5 * zoom) ** 2)) for px, py in points)
        image = sitk.GetImageFromArray((255 * pixels / pixels.max()).astype(np.uint8))
        sitk.WriteImage(image, str(folder / "images" / f"{number:03d}.png"))
        sets[f"{number:03d}"] = LandmarkSet(NAMES, points * (spacing or 1.0))
    write_landmarks_csv(folder / "landmarks.csv", sets)
    lines = [
        "dimension = 2",
        "landmarks = [" + ", ".join(f'"{name}"' for name in NAMES) + "]",
        'landmarks_csv = "landmarks.csv"',
        *([f"spacing = [{spacing}, {spacing}]"] if spacing else []),
        "",
    ]
    for number in range(1, count + 1):
        lines += ["[[images]]", f'id = "{number:03d}"', f'image = "images/{number:03d}.png"']
        lines += ['split = "validation"', ""] if f"{number:03d}" == validation else [""]
    (folder / "dataset.toml").write_text("\n".join(lines))
    return folder / "dataset.toml"


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory) -> tuple[Path, Path]:
    """Two sources in pixels: 64 x 56 pictures, and 48 x 40 ones showing the anatomy 0.7 times as large."""
    root = tmp_path_factory.mktemp("devices")
    return write_source(root / "large", (64, 56), 1.0, 6), write_source(root / "small", (48, 40), 0.7, 5)


def test_merging_keeps_every_image_and_landmark_under_a_prefixed_id(two_devices, tmp_path):
    large, small = two_devices
    merged = merge_datasets([large, small], tmp_path / "both" / "dataset.toml")
    ids = [entry.id for entry in merged.entries]
    assert ids[:2] == ["large-001", "large-002"] and ids[6:8] == ["small-001", "small-002"] and len(ids) == 11
    read_back = load_dataset_spec(merged.path)
    merged_landmarks = read_back.load_landmarks(list(read_back.entries))
    for label, source in (("large", large), ("small", small)):
        spec = load_dataset_spec(source)
        for image_id, landmarks in spec.load_landmarks(list(spec.entries)).items():
            np.testing.assert_array_equal(merged_landmarks[f"{label}-{image_id}"].points_lps, landmarks.points_lps)
    assert {entry.unit for entry in read_back.entries} == {"px"}

    with pytest.raises(DataError, match="existing file"):
        merge_datasets([large, small], merged.path)


def test_merging_keeps_splits_and_stated_spacings_and_refuses_mixed_units(two_devices, tmp_path):
    large, _ = two_devices
    first = write_source(tmp_path / "first", (64, 56), 1.0, 3, spacing=0.4, validation="002")
    second = write_source(tmp_path / "second", (48, 40), 0.7, 3, spacing=0.25)
    with pytest.raises(DataError, match="different units"):
        merge_datasets([large, second], tmp_path / "mixed.toml")
    merged = merge_datasets([first, second], tmp_path / "both.toml", labels=["a", "b"])
    by_id = {entry.id: entry for entry in load_dataset_spec(merged.path).entries}
    assert by_id["a-002"].split == "validation" and by_id["a-001"].split is None
    assert by_id["a-001"].spacing == (0.4, 0.4) and by_id["b-001"].spacing == (0.25, 0.25)
    assert by_id["b-001"].unit == "mm"
    with pytest.raises(DataError, match="labels"):
        merge_datasets([first, second], tmp_path / "x.toml", labels=["same", "same"])


def test_dataset_merge_on_the_command_line(two_devices, tmp_path):
    large, small = two_devices
    out = tmp_path / "merged.toml"
    done = cli("dataset", "merge", str(large), str(small), "--labels", "d1", "d2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "11 images" in done.stdout
    assert (tmp_path / "merged_landmarks.csv").is_file()


def test_pictures_of_two_sizes_train_at_one_anatomical_size(two_devices, tmp_path):
    """`train --dataset` chooses scale_from_anatomy for pictures of two sizes (one source alone: not),
    and the model's canonical configuration is the anatomy at the median image's size."""
    large, small = two_devices
    merged = merge_datasets([large, small], tmp_path / "both" / "dataset.toml")
    assert not config_for_dataset(large, tmp_path / "one", minutes=0.1).scale_from_anatomy
    derived = config_for_dataset(merged.path, tmp_path / "derived", minutes=0.1)
    assert derived.scale_from_anatomy

    config = dataclasses.replace(
        tiny_config(derived.dataset, tmp_path / "run", 2, iterations=4, validate_every=4), scale_from_anatomy=True
    )
    model = train(config, device="cpu").model_path
    mean = np.asarray(read_description(model).mean_configuration.points)
    spec = load_dataset_spec(derived.dataset)
    training = [entry for entry in spec.entries if entry.split == "train"]
    landmarks = spec.load_landmarks(training)
    expected, scales = anatomical_scales([landmarks[entry.id] for entry in training], "training images")
    np.testing.assert_allclose(mean, expected.array, atol=1e-9)
    small_scales = [k for entry, k in zip(training, scales) if entry.id.startswith("small")]
    large_scales = [k for entry, k in zip(training, scales) if entry.id.startswith("large")]
    assert np.mean(small_scales) / np.mean(large_scales) == pytest.approx(0.7, rel=0.05)


def test_scale_from_anatomy_is_refused_for_images_in_mm(dataset_2d, tmp_path):
    config = dataclasses.replace(tiny_config(dataset_2d, tmp_path, 2, iterations=2), scale_from_anatomy=True)
    with pytest.raises(DataError, match="scale_from_anatomy is for images in pixels"):
        train(config, device="cpu")


def test_fine_tuning_a_model_in_pixels_brings_the_cases_to_its_size(tiny_model_2d, tmp_path):
    """Another device's cases meet a base in pixels at the base's own anatomical size."""
    description = read_description(tiny_model_2d)
    pixels = dataclasses.replace(description, unit="px")
    config = finetune_config(tiny_model_2d, pixels, tmp_path / "spec.toml", tmp_path, tuple(pixels.landmark_names))
    assert config.scale_from_anatomy
    config = finetune_config(
        tiny_model_2d, description, tmp_path / "spec.toml", tmp_path, tuple(description.landmark_names)
    )
    assert not config.scale_from_anatomy

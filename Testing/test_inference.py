"""Predictor behaviour: tiling, missing landmarks, color input, heatmap geometry, progress and cancel."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import mirror_case

from SCNLandmarksLib.bundle import Stage, StageDescription
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.data.synthetic import render
from SCNLandmarksLib.errors import Cancelled, DataError
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import (
    Predictor,
    bfloat16_is_faster_on_this_cpu,
    cpu_bfloat16_hardware,
    cpu_vendor,
    resolve_precision,
    tile_starts,
    view_directions,
)
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.models import LocalAppearanceNet


@pytest.fixture(scope="module")
def case_2d(dataset_2d):
    spec = load_dataset_spec(dataset_2d)
    entry = spec.split("validation")[0]
    return read_image(entry.image), spec.load_landmarks([entry])[entry.id]


def test_tile_starts_cover_the_axis_with_overlap():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("dimension", [2, 3])
def test_refinement_views_surround_the_coarse_point_evenly(dimension):
    directions = view_directions(9 if dimension == 2 else 15, dimension)
    assert not directions[0].any()  # the centred view first
    np.testing.assert_allclose(np.linalg.norm(directions[1:], axis=1), 1.0)
    assert np.linalg.norm(directions[1:].mean(axis=0)) < 0.1  # no side favoured
    assert view_directions(1, dimension).shape == (1, dimension)


class _EchoNetwork(torch.nn.Module):
    """A stand-in refinement network whose heatmap for every landmark is its input patch: what the
    refinement makes of a heatmap, not what a network learns, is under test."""

    def __init__(self, landmarks: int):
        super().__init__()
        self.landmarks = landmarks

    def forward(self, patch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(final=patch.repeat(1, self.landmarks, 1, 1))


def test_the_coarse_prior_keeps_the_refinement_on_the_configurations_structure(tiny_model_2d):
    """Two look-alike peaks on a landmark's patch: the brighter 4 mm from the coarse point, the other
    0.5 mm from it. The refinement alone takes the brighter; weighed by the coarse stage's Gaussian
    (sigma 2 mm here), the one where the whole configuration puts the landmark."""
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    landmarks = len(predictor.landmark_names)
    patch = StageDescription("unet", {}, (24, 24), (0.5, 0.5), (1.0,) * landmarks, 1.0)
    predictor.description = dataclasses.replace(predictor.description, refinement=patch)
    predictor.refinement = Stage(_EchoNetwork(landmarks), torch.ones(landmarks))
    predictor.coarse = Stage(predictor.coarse.network, torch.full((landmarks,), 2.0))
    coarse_point = np.array([10.3, 20.2])
    near, far = coarse_point + [0.5, 0.0], coarse_point + [0.0, 4.0]
    image = sitk.Image(64, 96, sitk.sitkFloat32)
    image.SetSpacing((0.5, 0.5))
    positions = ImageGeometry.of(image).index_to_physical(np.stack(np.meshgrid(np.arange(64), np.arange(96)), -1))
    values = sum(
        height * np.exp(-0.5 * np.sum((positions - peak) ** 2, axis=-1)) for peak, height in ((near, 0.7), (far, 1.0))
    )
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((0.5, 0.5))
    points = np.tile(coarse_point, (landmarks, 1))
    for prior, expected in ((False, far), (True, near)):
        predictor.inference = dataclasses.replace(predictor.inference, missing_below=0.0, refinement_prior=prior)
        refined, _ = predictor._refine(image, points)
        assert np.linalg.norm(refined - expected, axis=1).max() < 0.1, (prior, refined[0], expected)


def test_tiled_inference_finds_the_same_landmarks(tiny_model_2d, case_2d):
    image, truth = case_2d
    whole = Predictor.from_file(tiny_model_2d, "cpu")
    tiled = Predictor.from_file(tiny_model_2d, "cpu")
    tiled.inference = dataclasses.replace(tiled.inference, max_grid_voxels=600)  # forces 2 x 2 overlapping tiles
    a, b = whole.predict(image), tiled.predict(image)
    assert b.status == ["detected"] * 4
    assert np.linalg.norm(a.landmarks.points_lps - b.landmarks.points_lps, axis=1).max() < 1.0
    assert np.linalg.norm(b.landmarks.points_lps - truth.points_lps, axis=1).mean() < 1.0


def test_bfloat16_appearance_layers_find_the_float32_points(tiny_model_2d, case_2d):
    image, truth = case_2d
    exact = Predictor.from_file(tiny_model_2d, "cpu", "float32")
    reduced = Predictor.from_file(tiny_model_2d, "cpu", "bfloat16")
    assert (exact.compute_dtype, reduced.compute_dtype) == (torch.float32, torch.bfloat16)
    bodies = [m for m in reduced.coarse.network.modules() if isinstance(m, LocalAppearanceNet)]
    assert bodies and all(m.compute_dtype == torch.bfloat16 for m in bodies)
    a, b = exact.predict(image, heatmaps=True), reduced.predict(image, heatmaps=True)
    moved = np.linalg.norm(a.landmarks.points_lps - b.landmarks.points_lps, axis=1)
    cell = min(exact.description.coarse.grid_spacing)
    assert 0.0 < moved.max() < 0.1 * cell, (moved, cell)  # it ran reduced, to within a tenth of a cell
    np.testing.assert_allclose(b.landmarks.confidences, a.landmarks.confidences, atol=0.02)
    output = reduced.coarse.network(torch.zeros(1, 1, 32, 32))
    assert output.final.dtype == output.local.dtype == torch.float32  # the heatmap layers stay float32
    assert np.linalg.norm(b.landmarks.points_lps - truth.points_lps, axis=1).mean() < 1.0


def test_precision_choice(monkeypatch):
    assert resolve_precision("float32", torch.device("cpu")) == torch.float32
    assert resolve_precision("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda")) == torch.float32  # not measured on GPUs
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert cpu == (torch.bfloat16 if bfloat16_is_faster_on_this_cpu() else torch.float32)
    # Each kind of machine, whichever this one is: bfloat16 where it was measured faster.
    kinds = [
        ("amx", "intel", torch.bfloat16),
        ("avx512_bf16", "amd", torch.bfloat16),
        ("avx512_bf16", "intel", torch.float32),  # its float32 is faster (README, "Speed")
        ("none", "amd", torch.float32),
        ("none", "other", torch.float32),
    ]
    for hardware, vendor, dtype in kinds:
        monkeypatch.setenv("SCN_LANDMARKS_CPU_BFLOAT16", hardware)
        monkeypatch.setenv("SCN_LANDMARKS_CPU_VENDOR", vendor)
        assert cpu_bfloat16_hardware() == (None if hardware == "none" else hardware)
        assert cpu_vendor() == (None if vendor == "other" else vendor)
        assert resolve_precision("auto", torch.device("cpu")) == dtype, (hardware, vendor)
    monkeypatch.setenv("SCN_LANDMARKS_CPU_BFLOAT16", "fast")
    with pytest.raises(DataError, match="SCN_LANDMARKS_CPU_BFLOAT16='fast': use amx, avx512_bf16 or none"):
        cpu_bfloat16_hardware()
    monkeypatch.setenv("SCN_LANDMARKS_CPU_VENDOR", "via")
    with pytest.raises(DataError, match="SCN_LANDMARKS_CPU_VENDOR='via': use intel, amd or other"):
        cpu_vendor()
    with pytest.raises(DataError, match="unknown precision 'half'.*auto, float32, bfloat16"):
        resolve_precision("half", torch.device("cpu"))


def test_absent_landmark_is_reported_missing_not_guessed(tiny_model_2d, case_2d):
    image, truth = case_2d
    geometry = ImageGeometry.of(image)
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    predictor.inference = dataclasses.replace(predictor.inference, missing_below=0.3)
    extent = (np.asarray(geometry.size) - 1) * np.asarray(geometry.spacing)
    blob_mm = 0.035 * float(extent.min()) * (1.0 + 0.5 * np.arange(4) / 3)  # as make_dataset draws them
    without_first = render(geometry, truth.points_lps[1:], blob_mm[1:], np.random.default_rng(0))
    prediction = predictor.predict(without_first)
    assert prediction.status[0] == "missing", prediction.landmarks.confidences
    assert np.isnan(prediction.landmarks.points_lps[0]).all()
    assert prediction.landmarks.confidences[0] < predictor.inference.missing_below
    assert all(s == "detected" for s in prediction.status[1:]) and min(prediction.landmarks.confidences[1:]) > 0.6


def blobs(case_2d) -> np.ndarray:
    """The blob radius of each landmark of the synthetic 2D images (as make_dataset draws them)."""
    image, _ = case_2d
    extent = (np.asarray(image.GetSize()) - 1) * np.asarray(image.GetSpacing())
    return 0.035 * float(extent.min()) * (1.0 + 0.5 * np.arange(4) / 3)


def test_a_visible_landmark_in_an_unusual_pose_gets_a_position_flagged_never_missing(tiny_model_2d, case_2d):
    """Landmark 2 swung by 50 degrees about the others' center, far from every configuration the
    network learnt: its final heatmap is too weak (the spatial configuration does not expect it
    there), yet the image shows it, so it gets a position there, flagged for review, not missing."""
    image, truth = case_2d
    geometry = ImageGeometry.of(image)
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    # As strict as the absent-landmark test: a weak final peak alone would make it missing.
    predictor.inference = dataclasses.replace(predictor.inference, missing_below=0.3)
    others = [0, 1, 3]
    center = truth.points_lps[others].mean(axis=0)
    turn = np.radians(50.0)
    points = truth.points_lps.copy()
    points[2] = center + np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]) @ (points[2] - center)
    assert np.linalg.norm(points[2] - truth.points_lps[2]) > 10.0  # mm: a pose the network never saw
    prediction = predictor.predict(render(geometry, points, blobs(case_2d), np.random.default_rng(0)))
    assert prediction.landmarks.confidences[2] < predictor.inference.missing_below  # the old rule's "missing"
    assert prediction.status[2] == "low confidence"
    assert np.linalg.norm(prediction.landmarks.points_lps[2] - points[2]) < 3.0  # 1.5 cells of the 2 mm grid
    assert [prediction.status[k] for k in others] == ["detected"] * 3


def test_a_landmark_outside_the_field_of_view_or_cut_off_stays_missing(tiny_model_2d, case_2d):
    """The same image cut so that landmark 0 lies outside it (4 mm beyond its edge), or blanked
    beyond that line: landmark 0 is missing, not guessed; the others are found."""
    image, truth = case_2d
    geometry = ImageGeometry.of(image)
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    predictor.inference = dataclasses.replace(predictor.inference, missing_below=0.3)
    index = geometry.physical_to_index(truth.points_lps)
    # Along the image axis on which landmark 0 lies furthest beyond the others.
    axis = int(np.argmax(np.abs(index[0] - index[1:].mean(axis=0)) * np.asarray(geometry.spacing)))
    side = np.sign(index[0, axis] - index[1:, axis].mean())
    edge = int(round(index[0, axis] - side * 4.0 / geometry.spacing[axis]))
    assert all(side * (index[k, axis] - edge) < -2.0 for k in (1, 2, 3))  # the others stay in view
    start, size = [0, 0], list(geometry.size)
    if side > 0:
        size[axis] = edge
    else:
        start[axis], size[axis] = edge + 1, geometry.size[axis] - edge - 1
    cut = sitk.RegionOfInterest(image, size, start)
    values = sitk.GetArrayFromImage(image)
    blank = values.copy()
    rows = [slice(None), slice(None)]
    rows[1 - axis] = slice(edge, None) if side > 0 else slice(None, edge + 1)
    blank[tuple(rows)] = values.min()
    blanked = sitk.GetImageFromArray(blank)
    blanked.CopyInformation(image)
    for case in (cut, blanked):
        prediction = predictor.predict(case)
        assert prediction.status[0] == "missing", (prediction.status, prediction.landmarks.confidences)
        assert np.isnan(prediction.landmarks.points_lps[0]).all()
        assert prediction.status[1:] == ["detected"] * 3


def test_a_mirror_image_is_detected_on_its_mirror_for_models_with_a_mirror_axis(
    tiny_model_2d, mirror_model_2d, case_2d
):
    image, truth = case_2d
    mirror_image, mirror_truth = mirror_case(image, truth.points_lps)
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    unaware = predictor.predict(mirror_image)
    assert not unaware.mirrored and "mirror" not in unaware.timings

    predictor = Predictor.from_file(mirror_model_2d, "cpu")
    messages = []
    found = predictor.predict(mirror_image, heatmaps=True, progress=lambda f, m: messages.append((f, m)))
    assert messages[0][0] == 0.0 and messages[-1] == (1.0, "done") and (0.5, "mirror image: done") in messages
    assert all(b[0] >= a[0] for a, b in zip(messages, messages[1:]))
    assert found.mirrored and found.status == ["detected"] * 4 and "mirror" in found.timings
    assert found.landmarks.confidences.mean() > unaware.landmarks.confidences.mean()
    assert np.linalg.norm(found.landmarks.points_lps - mirror_truth, axis=1).max() < 1.0
    # Heatmaps come back in the image as given: each peak lies at its landmark.
    for k in range(4):
        heatmap = found.heatmap("final", k)
        peak = np.unravel_index(np.argmax(sitk.GetArrayViewFromImage(heatmap)), heatmap.GetSize()[::-1])[::-1]
        assert (
            np.linalg.norm(
                ImageGeometry.of(mirror_image).index_to_physical(np.array(peak, dtype=float))
                - found.landmarks.points_lps[k]
            )
            < 2.0
        )
    # The image as given is more confident than its mirror image, so it is kept.
    direct = predictor.predict(image)
    assert not direct.mirrored and "mirror" in direct.timings
    assert np.linalg.norm(direct.landmarks.points_lps - truth.points_lps, axis=1).max() < 1.0

    # A model whose confidence tells the facings apart skips the mirror pass for images facing its way.
    predictor.inference = dataclasses.replace(predictor.inference, mirror_pass_below=0.6)
    messages.clear()
    direct = predictor.predict(image, progress=lambda f, m: messages.append((f, m)))
    assert direct.landmarks.confidences.mean() >= 0.6
    assert not direct.mirrored and "mirror" not in direct.timings and messages[-1] == (1.0, "done")
    assert not any("mirror image" in message for _, message in messages)
    assert np.linalg.norm(direct.landmarks.points_lps - truth.points_lps, axis=1).max() < 1.0


def test_color_input_becomes_grayscale_and_heatmaps_share_the_input_geometry(tiny_model_2d, case_2d):
    image, truth = case_2d
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    gray = predictor.predict(image, heatmaps=True)
    rgb = sitk.Compose([image, image, image])
    colored = predictor.predict(rgb)
    np.testing.assert_allclose(colored.landmarks.points_lps, gray.landmarks.points_lps, atol=1e-3)
    for kind in ("final", "local", "spatial"):
        heatmap = gray.heatmap(kind, 2)
        assert ImageGeometry.of(heatmap) == ImageGeometry.of(image)
    peak = np.unravel_index(np.argmax(sitk.GetArrayFromImage(gray.heatmap("final", 2))), image.GetSize()[::-1])
    peak_lps = ImageGeometry.of(image).index_to_physical(np.array(peak[::-1], dtype=float))
    assert np.linalg.norm(peak_lps - truth.points_lps[2]) < 2.0
    maximum = sitk.GetArrayFromImage(gray.heatmap("final"))
    assert maximum.max() >= sitk.GetArrayFromImage(gray.heatmap("final", 2)).max()


def test_all_landmarks_heatmap_scaled_per_landmark_shows_each_peak_in_full(tiny_model_2d, case_2d):
    image, _ = case_2d
    prediction = Predictor.from_file(tiny_model_2d, "cpu").predict(image, heatmaps=True)
    each = [sitk.GetArrayFromImage(prediction.heatmap("local", k)) for k in range(len(prediction.landmarks.names))]
    plain = sitk.GetArrayFromImage(prediction.heatmap("local"))
    scaled = sitk.GetArrayFromImage(prediction.heatmap("local", scaled_per_landmark=True))
    # Each landmark divided by its own peak on the network's grid, which resampling to the image
    # lowers by up to a few percent: about 1 at every landmark, whatever its strength.
    np.testing.assert_allclose(scaled, np.max([h / h.max() for h in each], axis=0), atol=0.1)
    for heatmap in each:
        assert scaled[np.unravel_index(np.argmax(heatmap), heatmap.shape)] > 0.85
    assert plain.max() == pytest.approx(max(h.max() for h in each), rel=1e-4)  # the default is unchanged


def test_progress_cancel_and_dimension_errors(tiny_model_2d, tiny_model_3d, case_2d):
    image, _ = case_2d
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    seen = []
    predictor.predict(image, progress=lambda fraction, message: seen.append(fraction))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        predictor.predict(image, cancel=lambda: True)
    with pytest.raises(DataError, match="scan.png: the image is 2D but the model expects 3D"):
        Predictor.from_file(tiny_model_3d, "cpu").predict(image, source="scan.png")
    with pytest.raises(ValueError, match="heatmaps=True"):
        predictor.predict(image).heatmap()


def test_batch_mode_gives_the_single_image_results_in_order_and_survives_a_bad_file(
    tiny_model_2d, dataset_2d, tmp_path
):
    import torch

    spec = load_dataset_spec(dataset_2d)
    paths = [e.image for e in spec.entries[:4]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    predictor = Predictor.from_file(tiny_model_2d, "cpu")
    threads = torch.get_num_threads()
    results = list(predictor.predict_files([paths[0], broken, *paths[1:]]))
    assert torch.get_num_threads() == threads
    assert [path for path, _ in results] == [paths[0], broken, *paths[1:]]
    assert isinstance(results[1][1], DataError) and str(broken) in str(results[1][1])
    for path, prediction in results[:1] + results[2:]:
        single = predictor.predict(read_image(path))
        np.testing.assert_allclose(prediction.landmarks.points_lps, single.landmarks.points_lps, atol=1e-4)
        assert prediction.status == single.status

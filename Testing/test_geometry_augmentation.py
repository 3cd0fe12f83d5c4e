"""Physical space survives resampling and augmentation: 2D and 3D, anisotropic, oblique, flipped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import oblique_direction

from SCNLandmarksLib.config import AugmentationConfig, IntensityConfig, config_from_dict
from SCNLandmarksLib.data import augmentation
from SCNLandmarksLib.data.augmentation import (
    augmented_sample,
    chain_indices,
    intensity_curve,
    random_transform,
    swap_permutation,
)
from SCNLandmarksLib.data.preparation import (
    PreparedImage,
    prepare_image,
    resample_to_grid,
    resample_to_grids,
    shrink_factors,
)
from SCNLandmarksLib.data.synthetic import render
from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import (
    ImageGeometry,
    axis_aligned_grid,
    covering_grid,
    lps_to_ras,
    mirror_points,
    ras_to_lps,
)
from SCNLandmarksLib.heatmaps import refine_peaks

CASES = {
    "2d": dict(size=(70, 50), spacing=(0.8, 1.3)),
    "big 2d": dict(size=(120, 80), spacing=(0.8, 1.3)),
    "3d": dict(size=(40, 36, 22), spacing=(1.0, 1.2, 2.1)),
}


def blob_image(case: str, point_offset: np.ndarray | None = None, blob_mm: float = 3.0):
    """An anisotropic, oblique, flipped image with one Gaussian blob at a known physical point."""
    size, spacing = CASES[case]["size"], CASES[case]["spacing"]
    d = len(size)
    geometry = ImageGeometry(size, spacing, tuple(np.linspace(-20.0, 30.0, d)), tuple(oblique_direction(d).ravel()))
    center = geometry.index_to_physical((np.asarray(size) - 1) / 2.0)
    point = center + (np.zeros(d) if point_offset is None else point_offset)
    image = render(geometry, point[None], np.array([blob_mm]), np.random.default_rng(0), noise=0.0)
    return image, point


def test_index_physical_round_trip_oblique_flipped():
    for d, size, spacing in ((2, (7, 9), (0.3, 2.0)), (3, (5, 6, 7), (0.5, 1.0, 3.0))):
        geometry = ImageGeometry(size, spacing, tuple(range(d)), tuple(oblique_direction(d).ravel()))
        image = geometry.apply_to(sitk.Image(list(size), sitk.sitkFloat32))
        index = np.random.default_rng(1).uniform(0, 5, (10, d))
        physical = geometry.index_to_physical(index)
        expected = [image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index]
        np.testing.assert_allclose(physical, expected, atol=1e-9)
        np.testing.assert_allclose(geometry.physical_to_index(physical), index, atol=1e-9)


def test_lps_ras_is_an_involution():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, 0.0]])
    np.testing.assert_array_equal(lps_to_ras(points), [[-1.0, -2.0, 3.0], [4.0, -5.5, 0.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(points)), points)


def test_a_mirrored_geometry_puts_every_voxel_at_its_mirror_point():
    geometry = ImageGeometry((30, 20, 10), (1.0, 1.5, 3.0), (5.0, -2.0, 7.0), tuple(oblique_direction(3).ravel()))
    center = geometry.center_physical()
    index = np.random.default_rng(2).uniform(0, 9, (12, 3))
    for axis in range(3):
        mirrored = geometry.mirrored(axis, center)
        expected = geometry.index_to_physical(index)
        expected[:, axis] = 2.0 * center[axis] - expected[:, axis]
        np.testing.assert_allclose(mirrored.index_to_physical(index), expected, atol=1e-9)
        np.testing.assert_allclose(mirrored.center_physical(), center, atol=1e-9)
        back = mirrored.mirrored(axis, center)
        np.testing.assert_allclose(back.index_to_physical_matrix, geometry.index_to_physical_matrix, atol=1e-12)
    points = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(
        mirror_points(points, 0, np.array([10.0, 0.0, 0.0])), [[19.0, 2.0, 3.0], [np.nan, np.nan, np.nan]]
    )


def test_covering_grid_contains_every_voxel_center():
    geometry = ImageGeometry((30, 20, 10), (1.0, 1.5, 3.0), (5.0, -2.0, 7.0), tuple(oblique_direction(3).ravel()))
    grid = covering_grid(geometry, (2.0, 2.0, 2.0))
    assert np.all(grid.contains(geometry.corners_physical(), margin_voxels=1e-6))
    np.testing.assert_allclose(grid.direction_matrix, np.eye(3))


def test_shrink_factors_never_exceed_the_grid_spacing():
    assert shrink_factors((0.1, 0.1), (1.0, 1.0)) == [10, 10]
    assert shrink_factors((0.8, 3.0), (2.0, 2.0)) == [2, 1]
    assert shrink_factors((3.0, 3.0, 3.0), (1.0, 1.0, 1.0)) == [1, 1, 1]


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_resampling_keeps_a_landmark_on_its_anatomy(case):
    """Blob at a known point -> prepared (shrunk) -> axis-aligned grid: the peak stays at the point."""
    image, point = blob_image(case, point_offset=np.array([3.3, -2.7, 1.9][: len(CASES[case]["size"])]))
    spacing = (1.5,) * image.GetDimension()
    prepared = prepare_image(image, spacing, IntensityConfig())
    grid = covering_grid(prepared.geometry, spacing)
    sample = resample_to_grid(prepared, grid)
    index, _ = refine_peaks(sample)
    error = np.linalg.norm(grid.index_to_physical(index.numpy()[0]) - point)
    # The peak of a linearly interpolated blob carries interpolation error; the exact check is below.
    assert error < 0.2 * spacing[0], f"landmark moved {error:.3f} mm"


def coordinate_images(case: str) -> tuple[list[PreparedImage], ImageGeometry]:
    """One image per physical axis whose value is that physical coordinate (mm).

    Linear interpolation reproduces a linear function exactly, so sampling these images checks the
    geometry of the whole augmentation path with no interpolation error in the way.
    """
    size, spacing = CASES[case]["size"], CASES[case]["spacing"]
    d = len(size)
    geometry = ImageGeometry(size, spacing, tuple(np.linspace(-20.0, 30.0, d)), tuple(oblique_direction(d).ravel()))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")[::-1], axis=-1)
    physical = geometry.index_to_physical(index)
    images = [
        PreparedImage(torch.as_tensor(physical[..., axis], dtype=torch.float32)[None], geometry, 0.0)
        for axis in range(d)
    ]
    return images, geometry


def value_at_index(sample: torch.Tensor, index: np.ndarray) -> float:
    """Linear interpolation of a (1, *grid) sample at one continuous (x, y[, z]) index."""
    size = np.asarray(sample.shape[1:][::-1], dtype=np.float64)
    coordinates = torch.as_tensor(index * 2.0 / (size - 1.0) - 1.0, dtype=torch.float32)
    shape = (1,) * (len(size) - 1) + (1, len(size))
    return float(F.grid_sample(sample[None], coordinates.reshape(1, *shape), align_corners=True).flatten()[0])


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_patches_sampled_together_equal_patches_sampled_one_by_one(case):
    """Batched patch sampling (coarse-to-fine inference) is the same interpolation, patch by patch."""
    images, geometry = coordinate_images(case)
    d = geometry.dimension
    centers = geometry.index_to_physical(np.random.default_rng(3).uniform(0, 20, (5, d)))
    grids = [axis_aligned_grid(c, (6, 7, 8)[:d], (0.7, 1.1, 0.9)[:d]) for c in centers]
    batch = resample_to_grids(images[0], grids)
    assert batch.shape == (5, 1, *reversed(grids[0].size))
    for patch, grid in zip(batch, grids):
        torch.testing.assert_close(patch, resample_to_grid(images[0], grid))
    with pytest.raises(ValueError, match="one size"):
        resample_to_grids(images[0], [grids[0], axis_aligned_grid(centers[0], (3,) * d, (1.0,) * d)])


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_augmentation_maps_landmarks_through_the_exact_inverse(case):
    """Random affine + two-scale elastic + mirror: the sample, read at the mapped landmark, shows its true position."""
    images, geometry = coordinate_images(case)
    d = geometry.dimension
    center = geometry.index_to_physical((np.asarray(geometry.size) - 1) / 2.0)
    points = center + np.random.default_rng(2).uniform(-6.0, 6.0, (5, d))
    config = AugmentationConfig(
        translation=5.0,
        rotation_deg=20.0,
        scale=0.15,
        scale_per_axis=0.1,
        mirror_axis=0,
        mirror_probability=0.5,
        elastic_mm=1.5,
        elastic_control_spacing_mm=20.0,
        elastic_coarse_mm=2.0,
        elastic_coarse_control_spacing_mm=40.0,
        intensity_shift=0.0,
        intensity_scale=0.0,
    )
    grid_size, grid_spacing = (40,) * d, (1.25,) * d
    mirrored = set()
    for seed in range(6):
        positions = []
        for image in images:
            generator = torch.Generator().manual_seed(seed)  # the same transform for every coordinate image
            sample, landmark_index, grid = augmented_sample(image, points, grid_size, grid_spacing, config, generator)
            positions.append([value_at_index(sample, i) for i in landmark_index.numpy()])
        mirrored.add(random_transform(config, grid, center, torch.Generator().manual_seed(seed), "cpu").mirrored)
        error = np.abs(np.array(positions).T - points).max()
        assert error < 0.02, f"seed {seed}: landmarks are {error:.4f} mm off their anatomy"
    assert mirrored == {True, False}


@pytest.mark.parametrize("coarse_mm", [0.0, 4.0])
def test_inverse_of_the_elastic_transform_is_exact(coarse_mm):
    d = 3
    grid = axis_aligned_grid(np.zeros(d), (32, 32, 32), (2.0, 2.0, 2.0))
    config = AugmentationConfig(
        elastic_mm=3.0,
        elastic_control_spacing_mm=20.0,
        elastic_coarse_mm=coarse_mm,
        elastic_coarse_control_spacing_mm=60.0,
        mirror_axis=1,
        mirror_probability=1.0,
    )
    transform = random_transform(config, grid, np.zeros(d), torch.Generator().manual_seed(3), "cpu")
    fine_only = random_transform(
        dataclasses.replace(config, elastic_coarse_mm=0.0), grid, np.zeros(d), torch.Generator().manual_seed(3), "cpu"
    )
    assert transform.displacement is not None and fine_only.displacement is not None
    added = torch.linalg.norm(transform.displacement - fine_only.displacement, dim=0)
    assert (float(added.mean()) > 1.0) == (coarse_mm > 0)  # the coarse scale adds its own displacement
    points = torch.as_tensor(np.random.default_rng(0).uniform(-20, 20, (20, d)))
    q = transform.output_positions(points, grid)
    # Forward-map q with the same interpolation the sampler uses: p = A (q + u(q)).
    from SCNLandmarksLib.data.augmentation import displacement_at

    moved = q + displacement_at(transform.displacement, grid, q)
    affine = transform.affine
    back = moved @ affine[:d, :d].T + affine[:d, d]
    assert torch.max(torch.linalg.norm(back - points, dim=1)) < 1e-3


def test_mirrored_samples_swap_left_right_landmarks():
    names = ["L_eye", "R_eye", "nose"]
    assert swap_permutation(names, (("L_eye", "R_eye"),)) == [1, 0, 2]
    image, point = blob_image("2d")
    prepared = prepare_image(image, (1.0, 1.0), IntensityConfig())
    points = np.stack([point + [-6.0, 0.0], point + [6.0, 0.0], point])
    config = AugmentationConfig(
        translation=0.0, rotation_deg=0.0, scale=0.0, scale_per_axis=0.0, mirror_axis=0, mirror_probability=1.0
    )
    _, index, grid = augmented_sample(
        prepared, points, (64, 64), (1.0, 1.0), config, torch.Generator().manual_seed(0), mirror_permutation=[1, 0, 2]
    )
    # After the mirror the channel "L_eye" holds the landmark that now lies on the left side again.
    assert index[0, 0] < index[2, 0] < index[1, 0]


def test_samples_are_reproducible_and_missing_landmarks_stay_missing():
    image, point = blob_image("2d")
    prepared = prepare_image(image, (1.0, 1.0), IntensityConfig())
    points = np.stack([point, [np.nan, np.nan]])
    config = AugmentationConfig(elastic_mm=1.0, noise_std=0.05, bias_field_log=0.2, gamma_log=0.2)
    a = augmented_sample(prepared, points, (40, 40), (1.0, 1.0), config, torch.Generator().manual_seed(5))
    b = augmented_sample(prepared, points, (40, 40), (1.0, 1.0), config, torch.Generator().manual_seed(5))
    c = augmented_sample(prepared, points, (40, 40), (1.0, 1.0), config, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0])
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not torch.equal(a[0], c[0])
    assert torch.isnan(a[1][1]).all() and torch.isfinite(a[1][0]).all()


def test_the_intensity_curve_is_a_random_monotonic_map_that_keeps_its_ends():
    values = torch.linspace(-1.0, 1.5, 501)  # above 1: the brightest percent of an image
    curved = intensity_curve(values, 0.15, torch.Generator().manual_seed(3))
    assert torch.all(torch.diff(curved) >= 0)  # brighter stays brighter
    torch.testing.assert_close(curved[[0, 400]], torch.tensor([-1.0, 1.0]))  # -1 and 1 are fixed
    assert (curved - values).abs().max() > 0.05  # the contrast did change
    again = intensity_curve(values, 0.15, torch.Generator().manual_seed(3))
    torch.testing.assert_close(curved, again)  # the generator decides it


def variation(array: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring voxels, over all axes."""
    return sum(float(array.diff(dim=dim).abs().mean()) for dim in range(array.dim()))


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_lower_resolution_and_partial_field_of_view_change_the_image_not_the_landmarks(case, monkeypatch):
    monkeypatch.setattr(augmentation, "FIELD_OF_VIEW_MARGIN_MM", 4.0)  # room for cuts on a small grid
    image, point = blob_image(case)
    geometry = ImageGeometry.of(image)
    texture = torch.rand((1, *reversed(geometry.size)), generator=torch.Generator().manual_seed(0)) + 1.0
    prepared = PreparedImage(texture, geometry, 0.0)  # no two voxels alike before a cut
    d = len(point)
    size, spacing = (24,) * d, (1.0,) * d  # within the image, around its center
    points = np.stack([point, point + 4.0])
    plain = AugmentationConfig(translation=0.0, intensity_shift=0.0, intensity_scale=0.0)
    acquired = dataclasses.replace(plain, blur_mm=3.0, field_of_view_cut=1.0)
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in reversed(size)), indexing="ij")
    cuts = 0
    for seed in range(6):
        sample, index, _ = augmented_sample(
            prepared, points, size, spacing, plain, torch.Generator().manual_seed(seed), center_lps=point
        )
        changed, changed_index, _ = augmented_sample(
            prepared, points, size, spacing, acquired, torch.Generator().manual_seed(seed), center_lps=point
        )
        torch.testing.assert_close(changed_index, index)  # the anatomy stays where it was
        # Blurred along at least one axis: the texture's voxel-to-voxel variation fades.
        assert variation(changed[0]) < 0.9 * variation(sample[0])
        # Blank voxels (the sample's minimum) lie only beyond the margin from every landmark.
        blank = changed[0] == changed[0].min()
        cuts += int(blank.sum() > 1)
        for landmark in index:
            distance = torch.stack([(axis - c).abs() for axis, c in zip(axes, landmark.flip(0))]).max(dim=0).values
            assert not (blank & (distance < 4.0)).any()
    assert cuts >= 3


def little_hand(geometry: ImageGeometry) -> tuple[np.ndarray, list[list[int]], AugmentationConfig]:
    """A palm of 3 landmarks and three 4-landmark fingers spread 10 mm apart in an image's middle,
    the chains (base, joint, joint, tip) and an augmentation that turns them by up to 25 degrees."""
    center = geometry.center_physical()
    palm = [center + [x, -12.0] for x in (-10.0, 0.0, 10.0)]
    fingers = [center + [x, y] for x in (-10.0, 0.0, 10.0) for y in (0.0, 8.0, 16.0, 24.0)]
    points = np.array(palm + fingers) - [0.0, 6.0]
    chains = [[3 + 4 * f + j for j in range(4)] for f in range(3)]
    config = AugmentationConfig(
        articulation_chains=tuple(tuple(str(k) for k in chain) for chain in chains),
        articulation_deg=((25.0, 20.0, 15.0),) * 3,
    )
    return points, chains, config


def test_articulation_takes_every_landmark_exactly_to_its_anatomy_2d():
    """Fingers turned about their joints, then the random affine, elastic and mirror transform, on an
    anisotropic, oblique, flipped image: each mapped landmark goes back through the whole transform to
    its own anatomy exactly, and the sample read there shows it."""
    images, geometry = coordinate_images("big 2d")
    points, chains, articulated = little_hand(geometry)
    names = [str(k) for k in range(len(points))]
    assert chain_indices(names, articulated.articulation_chains) == chains
    articulated = dataclasses.replace(
        articulated,
        rotation_deg=20.0,
        scale=0.1,
        mirror_axis=0,
        mirror_probability=0.5,
        elastic_mm=1.0,
        elastic_control_spacing_mm=20.0,
        intensity_shift=0.0,
        intensity_scale=0.0,
    )
    plain = dataclasses.replace(articulated, articulation_chains=(), articulation_deg=())
    grid_size, grid_spacing = (128, 128), (0.7, 0.7)
    center = geometry.center_physical()
    tips_moved = []
    for seed in range(6):
        positions = []
        for image in images:
            generator = torch.Generator().manual_seed(seed)  # the same transform for every coordinate image
            sample, index, grid = augmented_sample(
                image, points, grid_size, grid_spacing, articulated, generator, chains=chains
            )
            positions.append([value_at_index(sample, i) for i in index.numpy()])
        # The sample between its cells is a bilinear reading of a curved map.
        error = np.abs(np.array(positions).T - points).max()
        assert error < 0.05, f"seed {seed}: the sample shows the landmarks {error:.4f} mm off their anatomy"
        # Exactly: the same draws, then each landmark forward through the elastic, affine and articulation.
        generator = torch.Generator().manual_seed(seed)
        transform = random_transform(articulated, grid, center, generator, "cpu")
        articulated_draw = augmentation.random_articulation(
            articulated, chains, torch.as_tensor(points), geometry, transform.input_positions(grid, "cpu"), generator
        )
        assert articulated_draw is not None and transform.displacement is not None
        articulation = articulated_draw[0]
        q = torch.as_tensor(grid.index_to_physical(index.numpy()))
        q = q + augmentation.displacement_at(transform.displacement, grid, q)
        read = articulation.source_positions(q @ transform.affine[:2, :2].T + transform.affine[:2, 2])
        exact = float(torch.linalg.norm(read - torch.as_tensor(points), dim=1).max())
        assert exact < 1e-4, f"seed {seed}: a landmark maps {exact:.2e} mm off its anatomy"
        # The fingers did turn: the tips lie elsewhere than the same transform puts them unarticulated.
        _, unturned, _ = augmented_sample(
            images[0], points, grid_size, grid_spacing, plain, torch.Generator().manual_seed(seed)
        )
        palm_moved = float((index[:3] - unturned[:3]).abs().max())
        assert palm_moved < 0.3, f"seed {seed}: the palm moved {palm_moved:.3f} cells"
        tips_moved.append(float(torch.linalg.norm(index[[6, 10, 14]] - unturned[[6, 10, 14]], dim=1).max()))
    assert min(tips_moved) > 2.0, tips_moved  # cells of 0.7 mm: every draw swung the tips by millimetres


def quadratic_peak(sample: torch.Tensor, near: np.ndarray) -> np.ndarray:
    """The (x, y) index of a 2D sample's peak near a continuous index: the maximum of a full quadratic
    (cross term included) fitted to the log values around the brightest voxel, exact for any Gaussian,
    elliptical and tilted too."""
    x, y = np.rint(near).astype(int)
    window = sample[0, y - 3 : y + 4, x - 3 : x + 4].double().numpy()
    dy, dx = np.unravel_index(np.argmax(window), window.shape)
    cy, cx = y - 3 + dy, x - 3 + dx
    offsets = np.array([(i, j) for j in (-1, 0, 1) for i in (-1, 0, 1)], dtype=np.float64)
    values = np.log([float(sample[0, cy + j, cx + i]) for i, j in offsets.astype(int)])
    u, v = offsets.T
    coefficients = np.linalg.lstsq(np.stack([np.ones(9), u, v, u * u, u * v, v * v], axis=1), values, rcond=None)[0]
    _, b, c, d, e, f = coefficients
    return np.array([cx, cy]) + np.linalg.solve([[2 * d, e], [e, 2 * f]], [-b, -c])


def test_a_bright_dot_peaks_where_its_articulated_landmark_goes():
    """A dot at each landmark of an anisotropic, oblique, flipped image: after the articulation (and a
    rotation) each dot's intensity peak lies at its mapped landmark, to a small fraction of a cell."""
    # Input pixels finer than the sample's cells: the bilinear reading of the image pulls a dot's peak
    # towards the image's pixel centers by a fraction of a pixel (0.03 mm here, with or without a turn).
    size, spacing = (300, 220), (0.25, 0.4)
    geometry = ImageGeometry(size, spacing, (-20.0, 30.0), tuple(oblique_direction(2).ravel()))
    points, chains, config = little_hand(geometry)
    config = dataclasses.replace(config, translation=0.0, rotation_deg=10.0, intensity_shift=0.0, intensity_scale=0.0)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")[::-1], axis=-1)
    physical = geometry.index_to_physical(index)
    dots = sum(np.exp(-np.sum((physical - p) ** 2, axis=-1) / (2.0 * 1.5**2)) for p in points)
    prepared = PreparedImage(torch.as_tensor(dots + 1e-3, dtype=torch.float32)[None], geometry, 0.0)
    worst = 0.0
    for seed in range(6):
        sample, landmark_index, _ = augmented_sample(
            prepared, points, (100, 100), (0.5, 0.5), config, torch.Generator().manual_seed(seed), chains=chains
        )
        for near in landmark_index.numpy():
            worst = max(worst, float(np.linalg.norm(quadratic_peak(sample, near) - near)))
    assert worst < 0.12, f"a dot peaks {worst:.3f} cells from its landmark"


def test_an_articulation_that_would_fold_the_image_is_tempered():
    """Fingers 10 mm apart turned by up to 45 degrees at every joint would cross: every warp used
    keeps each cell's area change within the limit, and its landmarks still show their anatomy."""
    _, geometry = coordinate_images("big 2d")
    points, chains, config = little_hand(geometry)
    config = dataclasses.replace(config, articulation_deg=((45.0,) * 3,) * 3)
    grid = axis_aligned_grid(geometry.center_physical(), (96, 96), (0.7, 0.7))
    positions = augmentation.grid_positions(grid, "cpu")
    limit = augmentation.ARTICULATION_MAX_AREA_CHANGE
    tempered = 0
    for seed in range(8):
        drawn = augmentation.random_articulation(
            config, chains, torch.as_tensor(points), geometry, positions, torch.Generator().manual_seed(seed)
        )
        if drawn is None:
            continue
        articulation, warped = drawn
        change = augmentation.cell_areas(warped) / augmentation.cell_areas(positions)
        assert 1.0 / limit <= float(change.min()) and float(change.max()) <= limit
        reached = articulation.source_positions(articulation.landmarks_lps)
        torch.testing.assert_close(reached, torch.as_tensor(points), atol=1e-9, rtol=0.0)
        full = augmentation.turned_chains(torch.as_tensor(points), chains, _drawn_angles(config, seed))
        tempered += int(not torch.allclose(full, articulation.landmarks_lps))
    assert tempered >= 1  # some draws had to be halved


def _drawn_angles(config: AugmentationConfig, seed: int) -> list[torch.Tensor]:
    """The angles random_articulation draws first with this seed."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(len(limits), generator=generator, dtype=torch.float64) * 2.0 - 1.0)
        * torch.tensor(limits, dtype=torch.float64).deg2rad()
        for limits in config.articulation_deg
    ]


def test_articulation_settings_are_checked():
    values = {"dataset": "d.toml", "output_dir": "out", "grid": {"size": [32, 32], "spacing": [1.0, 1.0]}}
    chains = [["a", "b", "c"]]
    ok = config_from_dict(
        {**values, "augmentation": {"articulation_chains": chains, "articulation_deg": [[10, 5]]}}, Path("/")
    )
    assert ok.augmentation.articulation_chains == (("a", "b", "c"),)
    assert ok.augmentation.articulation_deg == ((10, 5),)
    for augmentation_values, message in (
        ({"articulation_chains": chains, "articulation_deg": [[10]]}, "one angle per joint"),
        ({"articulation_chains": chains, "articulation_deg": [[10, 60]]}, r"within 0\.\.45 degrees"),
        ({"articulation_chains": [["a"]], "articulation_deg": [[]]}, "two landmarks or more"),
    ):
        with pytest.raises(DataError, match=message):
            config_from_dict({**values, "augmentation": augmentation_values}, Path("/"), "hand.toml")
    volume = {"size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0]}
    with pytest.raises(DataError, match=r"\[augmentation\]: articulation_chains are for 2D images"):
        config_from_dict(
            {**values, "grid": volume, "augmentation": {"articulation_chains": chains, "articulation_deg": [[1, 1]]}},
            Path("/"),
        )
    with pytest.raises(DataError, match=r"landmarks the dataset does not have: \['c'\]"):
        chain_indices(["a", "b"], (("a", "b", "c"),))

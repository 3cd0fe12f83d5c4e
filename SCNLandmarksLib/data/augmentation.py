"""Physical-space augmentation (MIA 2019, Sec. 3.1): one composed transform for image and landmarks.

For an output grid voxel at physical position q (grid frame), the input is read at

    p = c + t + R S F (q + u(q) - c)

with c the image center, t a translation, R a rotation, S a scaling, F an optional mirror and u a
smooth elastic displacement. Landmarks go the other way through the exact inverse: the affine
part is inverted in closed form and the elastic part by fixed-point iteration q = A^-1 p - u(q),
which converges because u is smooth (its Jacobian is far below 1).

Articulation (2D, e.g. fingers) comes first, in the image's own frame: chains of landmarks turn
about their joints, and the image is read at W(p), a thin-plate spline whose nodes are the turned
landmarks themselves (plus fixed anchors around the image), each mapped to where it came from.
The spline interpolates exactly, so every turned landmark shows its own anatomy, with no inverse
to iterate.

Everything runs in torch on the training device, driven by an explicit torch.Generator, so a
sample is a pure function of (seed, iteration, position in batch): resumed training sees exactly
the samples uninterrupted training would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugmentationConfig
from ..errors import DataError
from ..geometry import ImageGeometry, axis_aligned_grid
from .preparation import PreparedImage, grid_positions, grid_sample_coordinates, sample_at

CURVE_KNOTS = 6  # of the random intensity curve (AugmentationConfig.intensity_curve): 4 inner knots
# A partial field of view (AugmentationConfig.field_of_view_cut) leaves this much image around every landmark.
FIELD_OF_VIEW_MARGIN_MM = 20.0
# The articulation spline's fixed anchors lie on a box this fraction of the image's extent beyond each
# side of it: near enough to hold the image as a whole in place, far enough from a fingertip near the
# border that the warp stays gentle there.
ARTICULATION_ANCHOR_MARGIN = 0.25
# A drawn articulation whose warp would shrink or stretch any cell of the sample's grid by more than
# this factor (two fingers turned into each other fold the image between them) is tried again at half
# its angles, at most ARTICULATION_RETRIES times, and otherwise left out. A thumb turned away from the
# palm stretches the skin between it and the index finger about 3-fold.
ARTICULATION_MAX_AREA_CHANGE = 4.0
ARTICULATION_RETRIES = 3
# Positions per step when the spline is evaluated (a step holds positions x nodes values).
SPLINE_CHUNK = 65536


@dataclass
class SpatialTransform:
    """p_in = affine (q + displacement(q)), q in the output grid's physical frame.

    Attributes:
        affine: (d+1, d+1) float64 homogeneous matrix, output physical -> input physical.
        displacement: optional (d, [z,] y, x) elastic displacement in mm on the output grid,
            components ordered (x, y[, z]).
        mirrored: whether the affine contains a mirror (landmark pairs must then be swapped).
    """

    affine: torch.Tensor
    displacement: torch.Tensor | None = None
    mirrored: bool = False

    def input_positions(self, grid: ImageGeometry, device) -> torch.Tensor:
        """Physical input positions read for every output voxel, shape ([z,] y, x, d)."""
        q = grid_positions(grid, device)
        if self.displacement is not None:
            q = q + torch.movedim(self.displacement, 0, -1)
        a = self.affine.to(device=device, dtype=q.dtype)
        d = grid.dimension
        return q @ a[:d, :d].T + a[:d, d]

    def output_positions(self, points_lps: torch.Tensor, grid: ImageGeometry, iterations: int = 50) -> torch.Tensor:
        """Exact inverse: input physical points (M, d) -> output-frame physical points (M, d).

        The iteration contracts slowly where the displacement stretches strongly: with a two-scale
        field, 20 iterations left a point 0.004 mm off, 50 converge (1e-5 mm)."""
        d = grid.dimension
        inverse = torch.linalg.inv(self.affine).to(points_lps)
        q_affine = points_lps @ inverse[:d, :d].T + inverse[:d, d]
        if self.displacement is None:
            return q_affine
        q = q_affine
        for _ in range(iterations):
            q = q_affine - displacement_at(self.displacement, grid, q)
        return q


def displacement_at(displacement: torch.Tensor, grid: ImageGeometry, points: torch.Tensor) -> torch.Tensor:
    """Linearly interpolated displacement (d, *grid) at physical points (M, d) -> (M, d).

    Points outside the grid take the nearest border value (the field is smooth there anyway).
    """
    d = grid.dimension
    coordinates = grid_sample_coordinates(grid, points)
    shape = (1,) * (d - 1) + (points.shape[0],)
    coordinates = coordinates.reshape(1, *shape, d).to(displacement.dtype)
    values = F.grid_sample(
        displacement.unsqueeze(0), coordinates, mode="bilinear", padding_mode="border", align_corners=True
    )
    return values.reshape(d, -1).T.to(points.dtype)


def _uniform(generator: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def rotation_matrix(angles_rad: torch.Tensor, dimension: int) -> torch.Tensor:
    """2D: one angle; 3D: rotations about x, then y, then z. Returns (d, d) float64."""
    if dimension == 2:
        c, s = torch.cos(angles_rad[0]), torch.sin(angles_rad[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    matrix = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        c, s = torch.cos(angles_rad[axis]), torch.sin(angles_rad[axis])
        i, j = [a for a in range(3) if a != axis]
        rotation = torch.eye(3, dtype=torch.float64)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        matrix = rotation @ matrix
    return matrix


def smooth_noise_field(
    grid: ImageGeometry, channels: int, std: float, control_spacing: float, generator: torch.Generator, device
) -> torch.Tensor:
    """A smooth random field (channels, *grid) from Gaussian noise on a coarse control grid.

    The control values are interpolated (bicubic in 2D, trilinear in 3D) to the grid, a B-spline-like
    deformation whose smoothness is set by `control_spacing` (mm).
    """
    d = grid.dimension
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    control = [max(2, int(math.ceil(e / control_spacing)) + 1) for e in extent]
    noise = torch.randn((1, channels, *reversed(control)), generator=generator, dtype=torch.float64) * std
    mode = "bicubic" if d == 2 else "trilinear"
    field = F.interpolate(noise.float().to(device), size=tuple(reversed(grid.size)), mode=mode, align_corners=True)
    return field[0]


def random_transform(
    config: AugmentationConfig, grid: ImageGeometry, center: np.ndarray, generator: torch.Generator, device
) -> SpatialTransform:
    """Draw one random physical transform about `center` (the grid's center) for the output grid."""
    d = grid.dimension
    translation = _uniform(generator, -config.translation, config.translation, (d,))
    angles = _uniform(generator, -1.0, 1.0, (1 if d == 2 else 3,)) * math.radians(config.rotation_deg)
    scale = 1.0 + _uniform(generator, -config.scale, config.scale)
    scale_axes = scale * (1.0 + _uniform(generator, -config.scale_per_axis, config.scale_per_axis, (d,)))
    linear = rotation_matrix(angles, d) @ torch.diag(scale_axes)
    mirrored = bool(
        config.mirror_axis is not None
        and float(torch.rand((), generator=generator, dtype=torch.float64)) < config.mirror_probability
    )
    if mirrored:
        mirror = torch.eye(d, dtype=torch.float64)
        mirror[config.mirror_axis, config.mirror_axis] = -1.0
        linear = linear @ mirror
    c = torch.as_tensor(center, dtype=torch.float64)
    affine = torch.eye(d + 1, dtype=torch.float64)
    affine[:d, :d] = linear
    affine[:d, d] = c + translation - linear @ c
    displacement = None
    for std, control_spacing in (
        (config.elastic_mm, config.elastic_control_spacing_mm),
        (config.elastic_coarse_mm, config.elastic_coarse_control_spacing_mm),
    ):
        if std > 0:
            field = smooth_noise_field(grid, d, std, control_spacing, generator, device)
            displacement = field if displacement is None else displacement + field
    return SpatialTransform(affine, displacement, mirrored)


def chain_indices(names: Sequence[str], chains: tuple[tuple[str, ...], ...]) -> list[list[int]]:
    """The articulation chains (AugmentationConfig.articulation_chains) as landmark indices."""
    unknown = sorted({name for chain in chains for name in chain} - set(names))
    if unknown:
        raise DataError(f"articulation_chains name landmarks the dataset does not have: {unknown}")
    return [[names.index(name) for name in chain] for chain in chains]


def turned_chains(points: torch.Tensor, chains: list[list[int]], angles_rad: list[torch.Tensor]) -> torch.Tensor:
    """2D landmarks (N, 2) with each chain turned about its joints: joint j (the chain's j-th landmark)
    turns the landmarks after it by angles_rad[chain][j], each joint about where the turns before it
    put it, as a finger bends. A chain with a missing landmark stays as it is."""
    turned = points.clone()
    for chain, angles in zip(chains, angles_rad):
        if not torch.isfinite(points[chain]).all():
            continue
        for joint, angle in enumerate(angles):
            pivot, after = turned[chain[joint]], chain[joint + 1 :]
            turned[after] = pivot + (turned[after] - pivot) @ rotation_matrix(angle[None], 2).T
    return turned


@dataclass
class Articulation:
    """The warp of an articulated 2D image: the image as given is read at W(p) = p + u(p), u a
    thin-plate spline through the nodes (turned landmarks and fixed anchors) that takes each node
    exactly to where it came from.

    Attributes:
        landmarks_lps: (N, 2) float64 landmarks after the turn (NaN stays NaN): where the warped
            image shows them.
        nodes: (M, 2) spline nodes, normalised: (p - center) / scale (well-conditioned in any unit).
        weights: (M, 2) kernel weights; affine: (3, 2) coefficients of (1, x, y); both in normalised units.
        center: (2,); scale: normalisation of positions and displacements.
    """

    landmarks_lps: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    affine: torch.Tensor
    center: torch.Tensor
    scale: float

    @classmethod
    def through(cls, nodes_lps: torch.Tensor, sources_lps: torch.Tensor, landmarks_lps: torch.Tensor) -> Articulation:
        """The spline with W(nodes_lps[i]) = sources_lps[i] for every node ((M, 2) float64).

        Raises:
            torch.linalg.LinAlgError: two nodes coincide.
        """
        center = nodes_lps.mean(dim=0)
        scale = float(torch.linalg.norm(nodes_lps - center, dim=1).max())
        nodes = (nodes_lps - center) / scale
        m = len(nodes)
        polynomial = torch.cat([torch.ones((m, 1), dtype=nodes.dtype, device=nodes.device), nodes], dim=1)
        system = torch.zeros((m + 3, m + 3), dtype=nodes.dtype, device=nodes.device)
        squared = torch.cdist(nodes, nodes) ** 2
        system[:m, :m] = 0.5 * squared * torch.log(squared.clamp(min=torch.finfo(squared.dtype).tiny))
        system[:m, m:] = polynomial
        system[m:, :m] = polynomial.T
        values = torch.zeros((m + 3, 2), dtype=nodes.dtype, device=nodes.device)
        values[:m] = (sources_lps - nodes_lps) / scale
        solution = torch.linalg.solve(system, values)
        return cls(landmarks_lps, nodes, solution[:m], solution[m:], center, scale)

    @classmethod
    def turning(cls, points_lps: torch.Tensor, turned_lps: torch.Tensor, geometry: ImageGeometry) -> Articulation:
        """The warp of an image (`geometry`) whose landmarks (N, 2; NaN = missing) move to `turned_lps`:
        the spline's nodes are the turned landmarks and 8 fixed anchors on a box
        ARTICULATION_ANCHOR_MARGIN of the image's extent beyond each of its sides."""
        corners = torch.as_tensor(geometry.corners_physical(), dtype=torch.float64, device=points_lps.device)
        low, high = corners.min(dim=0).values, corners.max(dim=0).values
        margin = ARTICULATION_ANCHOR_MARGIN * (high - low)
        fractions = [[a, b] for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0) if (a, b) != (0.5, 0.5)]
        anchors = (
            low - margin + torch.tensor(fractions, dtype=torch.float64, device=low.device) * (high - low + 2.0 * margin)
        )
        present = torch.isfinite(points_lps).all(dim=1)
        return cls.through(
            torch.cat([turned_lps[present], anchors]), torch.cat([points_lps[present], anchors]), turned_lps
        )

    def source_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Where the image as given is read for physical positions (..., 2) of the articulated image,
        computed in their dtype (float32 for a sample's grid: the image is read in float32 anyway)."""
        dtype = positions.dtype
        nodes, weights, affine = (t.to(dtype) for t in (self.nodes, self.weights, self.affine))
        flat = (positions.reshape(-1, 2) - self.center.to(dtype)) / self.scale
        moved = []
        for chunk in flat.split(SPLINE_CHUNK):
            squared = torch.cdist(chunk, nodes) ** 2
            kernel = 0.5 * squared * torch.log(squared.clamp(min=torch.finfo(dtype).tiny))
            moved.append(chunk + kernel @ weights + chunk @ affine[1:] + affine[0])
        return (torch.cat(moved) * self.scale + self.center.to(dtype)).reshape(positions.shape)


def cell_areas(positions: torch.Tensor) -> torch.Tensor:
    """Signed areas (y - 1, x - 1) of the cells of a 2D grid of positions (y, x, 2)."""
    along_x = positions[:-1, 1:] - positions[:-1, :-1]
    along_y = positions[1:, :-1] - positions[:-1, :-1]
    return along_x[..., 0] * along_y[..., 1] - along_x[..., 1] * along_y[..., 0]


def random_articulation(
    config: AugmentationConfig,
    chains: list[list[int]],
    points_lps: torch.Tensor,
    geometry: ImageGeometry,
    positions: torch.Tensor,
    generator: torch.Generator,
) -> tuple[Articulation, torch.Tensor] | None:
    """Draw one articulation of the landmark chains (AugmentationConfig.articulation_chains).

    Args:
        chains: the chains as landmark indices (chain_indices).
        points_lps: (N, 2) float64 landmarks (NaN = missing), physical.
        geometry: the image's; the spline's fixed anchors surround it.
        positions: (y, x, 2) physical positions the sample reads, a grid (where the warp must stay sane).
    Returns:
        The articulation and the positions through its warp (where the sample reads the image as
        given), or None when no turn within ARTICULATION_RETRIES halvings of the drawn angles keeps
        every grid cell's area change within ARTICULATION_MAX_AREA_CHANGE.
    """
    # Always the same draws, whatever is tried after: the generator's later draws stay reproducible.
    angles = [
        _uniform(generator, -1.0, 1.0, (len(limits),)) * torch.tensor(limits, dtype=torch.float64).deg2rad()
        for limits in config.articulation_deg
    ]
    points = points_lps.to(positions.device)
    for attempt in range(ARTICULATION_RETRIES + 1):
        turned = turned_chains(points, chains, [a * 0.5**attempt for a in angles])
        try:
            articulation = Articulation.turning(points, turned, geometry)
        except torch.linalg.LinAlgError:  # landmarks at one spot cannot move apart
            return None
        warped = articulation.source_positions(positions)
        # |log| of each cell's area change within log(limit); a fold (a cell turned over) gives NaN and fails.
        change = torch.log(cell_areas(warped) / cell_areas(positions)).abs()
        if bool((change <= math.log(ARTICULATION_MAX_AREA_CHANGE)).all()):
            return articulation, warped
    return None


def augment_intensities(
    sample: torch.Tensor, config: AugmentationConfig, grid: ImageGeometry, generator: torch.Generator
) -> torch.Tensor:
    """Random contrast, shift, gamma, intensity curve, bias field and noise on one normalised sample (1, *grid)."""
    scale = 1.0 + float(_uniform(generator, -config.intensity_scale, config.intensity_scale))
    shift = float(_uniform(generator, -config.intensity_shift, config.intensity_shift))
    if config.gamma_log > 0:
        gamma = math.exp(float(_uniform(generator, -config.gamma_log, config.gamma_log)))
        sample = ((sample + 1.0) / 2.0).clamp(min=0.0).pow(gamma) * 2.0 - 1.0
    if config.intensity_curve > 0:
        sample = intensity_curve(sample, config.intensity_curve, generator)
    if config.bias_field_log > 0:
        field = smooth_noise_field(grid, 1, config.bias_field_log, 100.0, generator, sample.device)
        sample = (sample + 1.0) * torch.exp(field) - 1.0
    sample = sample * scale + shift
    if config.noise_std > 0:
        noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32) * config.noise_std
        sample = sample + noise.to(sample.device)
    return sample


def blurred(
    sample: torch.Tensor, max_sigma_mm: float, spacing: tuple[float, ...], generator: torch.Generator
) -> torch.Tensor:
    """The sample (1, *grid) through a Gaussian blur whose sigma along each axis is drawn from
    U(0, max_sigma_mm) mm: another acquisition's resolution, e.g. thick slices along one axis."""
    sigmas = _uniform(generator, 0.0, max_sigma_mm, (len(spacing),))
    # Tensor dims run (z,) y, x; spacing runs x, y(, z).
    for dim, (sigma_mm, step) in enumerate(zip(sigmas.tolist(), spacing[::-1]), start=1):
        sigma = sigma_mm / step
        if sigma < 0.3:  # below a third of a voxel a blur changes nothing visible
            continue
        radius = int(math.ceil(3.0 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sample.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        moved = sample.movedim(dim, -1)
        padded = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
        sample = F.conv1d(padded, kernel.view(1, 1, -1)).reshape(moved.shape).movedim(-1, dim)
    return sample


def cut_field_of_view(
    sample: torch.Tensor, landmark_index: torch.Tensor, spacing: tuple[float, ...], generator: torch.Generator
) -> torch.Tensor:
    """The sample (1, *grid) blank (its minimum) beyond a random plane normal to a random axis, on a
    random side; the plane keeps FIELD_OF_VIEW_MARGIN_MM from every landmark (grid indices x, y[, z])."""
    d = len(spacing)
    axis = int(torch.randint(d, (), generator=generator))
    from_low = bool(torch.rand((), generator=generator) < 0.5)
    size = sample.shape[d - axis]
    present = landmark_index[torch.isfinite(landmark_index).all(dim=1), axis]
    margin = FIELD_OF_VIEW_MARGIN_MM / spacing[axis]
    if from_low:
        room = (float(present.min()) if len(present) else size - 1) - margin
    else:
        room = size - 1 - (float(present.max()) if len(present) else 0.0) - margin
    depth = int(float(torch.rand((), generator=generator)) * max(room, 0.0))
    if depth <= 0:
        return sample
    sample = sample.clone()
    region = sample.narrow(d - axis, 0 if from_low else size - depth, depth)
    region.fill_(float(sample.min()))
    return sample


def intensity_curve(sample: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """The normalised sample through a random monotonic piecewise-linear curve on [0, 1]-mapped
    intensities: CURVE_KNOTS knots evenly spaced, the inner ones moved by up to `strength`, then
    sorted; 0 and 1 stay put, and values above 1 continue the last segment."""
    inner = torch.linspace(0.0, 1.0, CURVE_KNOTS, dtype=torch.float64)[1:-1]
    moved = (inner + _uniform(generator, -strength, strength, len(inner))).clamp(0.0, 1.0).sort().values
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), moved, torch.ones(1, dtype=torch.float64)]).float()
    knots = knots.to(sample.device)
    position = ((sample + 1.0) / 2.0).clamp(min=0.0) * (CURVE_KNOTS - 1)
    segment = position.floor().clamp(max=CURVE_KNOTS - 2).long()
    low, high = knots[segment], knots[segment + 1]
    return (low + (position - segment) * (high - low)) * 2.0 - 1.0


def swap_permutation(names: list[str], pairs: tuple[tuple[str, str], ...]) -> list[int]:
    """Index permutation that swaps the named landmark pairs (for mirrored samples)."""
    permutation = list(range(len(names)))
    for a, b in pairs:
        i, j = names.index(a), names.index(b)
        permutation[i], permutation[j] = j, i
    return permutation


def augmented_sample(
    prepared: PreparedImage,
    points_lps: np.ndarray,
    grid_size: tuple[int, ...],
    grid_spacing: tuple[float, ...],
    config: AugmentationConfig,
    generator: torch.Generator,
    mirror_permutation: list[int] | None = None,
    augment: bool = True,
    center_lps: np.ndarray | None = None,
    chains: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ImageGeometry]:
    """One training sample: the image on an axis-aligned grid, randomly transformed about its center.

    Args:
        prepared: the normalised image.
        points_lps: (N, d) landmark positions (NaN = missing), physical LPS.
        grid_size, grid_spacing: the network grid (x, y[, z]).
        mirror_permutation: landmark permutation applied when the transform mirrors.
        augment: False gives the plain centered resampling (validation).
        center_lps: where the grid is centered (physical); default the image's center.
        chains: the articulation chains as landmark indices (chain_indices), when the config articulates.
    Returns:
        sample: (1, *grid) float32 input;
        landmark_index: (N, d) float64 continuous grid indices (x, y[, z]) of the landmarks, NaN if missing;
        grid: the output grid geometry.
    """
    device = prepared.array.device
    center = prepared.geometry.center_physical() if center_lps is None else np.asarray(center_lps, dtype=np.float64)
    grid = axis_aligned_grid(center, grid_size, grid_spacing)
    d = grid.dimension
    if augment:
        transform = random_transform(config, grid, center, generator, device)
    else:
        transform = SpatialTransform(torch.eye(d + 1, dtype=torch.float64))
    positions = transform.input_positions(grid, device)
    points = torch.as_tensor(points_lps, dtype=torch.float64)
    if augment and chains:
        articulated = random_articulation(config, chains, points, prepared.geometry, positions, generator)
        if articulated is not None:
            points, positions = articulated[0].landmarks_lps.cpu(), articulated[1]
    sample = sample_at(prepared, positions)
    present = torch.isfinite(points).all(dim=1)
    output = torch.full_like(points, float("nan"))
    if present.any():
        output[present] = transform.output_positions(points[present].to(device), grid).cpu()
    if transform.mirrored and mirror_permutation is not None:
        output = output[mirror_permutation]
    landmark_index = torch.as_tensor(grid.physical_to_index(output.numpy()))
    if augment:
        # Acquisition first (resolution, field of view), then contrast and noise.
        if config.blur_mm > 0:
            sample = blurred(sample, config.blur_mm, grid.spacing, generator)
        if config.field_of_view_cut > 0 and float(torch.rand((), generator=generator)) < config.field_of_view_cut:
            sample = cut_field_of_view(sample, landmark_index, grid.spacing, generator)
        sample = augment_intensities(sample, config, grid, generator)
    return sample, landmark_index, grid

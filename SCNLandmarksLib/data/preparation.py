"""Turning an image into network input: intensity normalisation, anti-aliased shrinking, resampling.

Training and inference share these functions, so a model sees images prepared the same way in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..config import IntensityConfig
from ..errors import DataError
from ..geometry import ImageGeometry


@dataclass
class PreparedImage:
    """A normalised image held as a tensor, with its physical geometry.

    Attributes:
        array: (1, [z,] y, x) float32 tensor on the working device, normalised intensities.
        geometry: geometry of `array` (after shrinking), LPS.
        background: normalised value used outside the image (its low percentile).
    """

    array: torch.Tensor
    geometry: ImageGeometry
    background: float


def normalize_intensities(values: np.ndarray, config: IntensityConfig) -> np.ndarray:
    """Map raw intensities to the network's range (about [-1, 1]); see IntensityConfig."""
    values = values.astype(np.float32, copy=False)
    if config.normalization == "window":
        low, high = config.low, config.high
    elif config.normalization == "zscore":
        mean, std = float(values.mean()), float(values.std())
        return (values - mean) / max(std, 1e-6)
    else:
        low, high = np.percentile(values, [config.low, config.high])
    scale = max(float(high) - float(low), 1e-6)
    # In place after the first step: one temporary instead of three (a 1 mm brain is 34 MB each).
    normalized = values - float(low)
    normalized *= 2.0 / scale
    normalized -= 1.0
    return normalized


def shrink_factors(spacing: tuple[float, ...], grid_spacing: tuple[float, ...]) -> list[int]:
    """Integer block-averaging factors that bring each axis near (not past) the grid spacing.

    Averaging blocks before bilinear resampling avoids aliasing when a fine image (e.g. a 0.1 mm
    X-ray) is sampled on a coarse network grid (e.g. 1 mm).
    """
    finest = min(grid_spacing)
    return [max(1, int(math.floor(finest / s + 1e-6))) for s in spacing]


def normalize_image(image: sitk.Image, intensity: IntensityConfig) -> sitk.Image:
    """The image as float32 network intensities (see IntensityConfig), geometry unchanged."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError("prepare_image needs a scalar image; convert color images to grayscale first")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    normalized = sitk.GetImageFromArray(normalize_intensities(sitk.GetArrayViewFromImage(image), intensity))
    normalized.CopyInformation(image)
    return normalized


def prepare_normalized(
    normalized: sitk.Image, grid_spacing: tuple[float, ...], device: torch.device | str = "cpu"
) -> PreparedImage:
    """Shrink (anti-aliased) a normalised image for a grid of `grid_spacing` and move it to `device`.

    Coarse-to-fine inference prepares one normalised image for two grids, so the (whole-image)
    normalisation is done once.
    """
    if normalized.GetDimension() != len(grid_spacing):
        raise DataError(f"image is {normalized.GetDimension()}D but the grid is {len(grid_spacing)}D")
    # (An image smaller than a grid cell is shrunk to one pixel along that axis, not refused.)
    factors = [min(f, n) for f, n in zip(shrink_factors(normalized.GetSpacing(), grid_spacing), normalized.GetSize())]
    if any(f > 1 for f in factors):
        normalized = sitk.BinShrink(normalized, factors)
    array = torch.from_numpy(sitk.GetArrayFromImage(normalized)).to(device=device, dtype=torch.float32)
    background = float(torch.quantile(array.flatten()[:: max(1, array.numel() // 100_000)], 0.005))
    return PreparedImage(array.unsqueeze(0), ImageGeometry.of(normalized), background)


def prepare_image(
    image: sitk.Image, grid_spacing: tuple[float, ...], intensity: IntensityConfig, device: torch.device | str = "cpu"
) -> PreparedImage:
    """Normalise, shrink (anti-aliased) and move an image to `device`.

    Args:
        image: scalar 2D or 3D SimpleITK image (any geometry).
        grid_spacing: spacing of the network grid it will be sampled on (mm per voxel).
        intensity: normalisation settings (stored in the model file).
    """
    return prepare_normalized(normalize_image(image, intensity), grid_spacing, device)


def grid_positions(grid: ImageGeometry, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """Physical positions of all grid voxels, shape ([z,] y, x, d), components (x, y[, z])."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in reversed(grid.size)]
    index_zyx = torch.meshgrid(*axes, indexing="ij")
    index_xyz = torch.stack(index_zyx[::-1], dim=-1)
    matrix = torch.as_tensor(grid.index_to_physical_matrix, device=device, dtype=dtype)
    d = grid.dimension
    return index_xyz @ matrix[:d, :d].T + matrix[:d, d]


def grid_sample_coordinates(geometry: ImageGeometry, points_lps: torch.Tensor) -> torch.Tensor:
    """Physical points (..., d) -> coordinates in [-1, 1] of `geometry`'s voxels for
    torch grid_sample(align_corners=True), components (x, y[, z])."""
    d = geometry.dimension
    to_index = torch.as_tensor(
        np.linalg.inv(geometry.index_to_physical_matrix), device=points_lps.device, dtype=points_lps.dtype
    )
    index = points_lps @ to_index[:d, :d].T + to_index[:d, d]
    size = torch.as_tensor(geometry.size, device=index.device, dtype=index.dtype)
    return index * (2.0 / torch.clamp(size - 1.0, min=1.0)) - 1.0


def sample_at(prepared: PreparedImage, points_lps: torch.Tensor) -> torch.Tensor:
    """Linearly interpolate the prepared image at physical points.

    Args:
        points_lps: (..., d) physical positions; any leading spatial shape ([z,] y, x).
    Returns:
        (1, ...) intensities; points outside the image get the image's background value.
    """
    coordinates = grid_sample_coordinates(prepared.geometry, points_lps)
    image = (prepared.array - prepared.background).unsqueeze(0)
    sampled = F.grid_sample(
        image, coordinates.unsqueeze(0).to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return sampled[0] + prepared.background


def resample_to_grid(prepared: PreparedImage, grid: ImageGeometry) -> torch.Tensor:
    """The prepared image on `grid` (no augmentation), shape (1, [z,] y, x)."""
    return sample_at(prepared, grid_positions(grid, prepared.array.device))


def resample_to_grids(prepared: PreparedImage, grids: list[ImageGeometry]) -> torch.Tensor:
    """The prepared image on several grids of one size (e.g. patches), shape (N, 1, [z,] y, x).

    One interpolation call for all grids: the positions are stacked along the first spatial axis,
    which costs one pass over the image instead of one per grid.
    """
    size = grids[0].size
    if any(g.size != size for g in grids):
        raise ValueError("resample_to_grids needs grids of one size")
    positions = torch.cat([grid_positions(g, prepared.array.device) for g in grids], dim=0)
    return sample_at(prepared, positions).reshape(len(grids), 1, *reversed(size))


__all__ = [
    "PreparedImage",
    "normalize_intensities",
    "normalize_image",
    "prepare_normalized",
    "shrink_factors",
    "prepare_image",
    "grid_positions",
    "grid_sample_coordinates",
    "sample_at",
    "resample_to_grid",
    "resample_to_grids",
]

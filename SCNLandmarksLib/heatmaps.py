"""Gaussian heatmap targets with learnable sigmas, and decoding heatmaps into sub-voxel positions."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnableSigmas(nn.Module):
    """One Gaussian sigma per landmark in mm (MIA 2019, Eq. 3), learned through log(sigma).

    The log parameterisation keeps sigmas positive and gives relative steps whatever the unit.
    """

    def __init__(self, num_landmarks: int, sigma_init: float, sigma_min: float, learnable: bool = True):
        super().__init__()
        self.sigma_min = float(sigma_min)
        self.log_sigma = nn.Parameter(torch.full((num_landmarks,), math.log(sigma_init)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return torch.clamp(self.log_sigma.exp(), min=self.sigma_min)


def gaussian_heatmaps(
    landmark_index: torch.Tensor,
    present: torch.Tensor,
    grid_size: tuple[int, ...],
    spacing: tuple[float, ...],
    sigma: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Target heatmaps gamma / ((2 pi)^(d/2) sigma^d) exp(-r^2 / (2 sigma^2)), r in mm.

    Args:
        landmark_index: (B, N, d) continuous grid indices (x, y[, z]); rows of missing landmarks are ignored.
        present: (B, N) bool.
        grid_size: (x, y[, z]); spacing: mm per grid voxel.
        sigma: (N,) mm (differentiable).
    Returns:
        (B, N, [z,] y, x) targets; zero for missing landmarks.
    """
    d = len(grid_size)
    index = torch.nan_to_num(landmark_index.to(sigma.device, torch.float32))
    norm = gamma / ((2.0 * math.pi) ** (d / 2.0) * sigma**d)
    heatmap = (norm[None, :] * present.to(sigma.device, torch.float32)).reshape(*index.shape[:2], *([1] * d))
    # The Gaussian is separable: a product of one 1D profile per axis, far cheaper than a dense r^2.
    for axis in range(d):
        coordinates = torch.arange(grid_size[axis], device=sigma.device, dtype=torch.float32)
        delta_mm = (coordinates[None, None, :] - index[..., axis : axis + 1]) * spacing[axis]
        profile = torch.exp(-(delta_mm**2) / (2.0 * sigma[None, :, None] ** 2))
        shape = [*index.shape[:2]] + [1] * d
        shape[2 + (d - 1 - axis)] = grid_size[axis]
        heatmap = heatmap * profile.reshape(shape)
    return heatmap


def peak_height(sigma: torch.Tensor, gamma: float, dimension: int) -> torch.Tensor:
    """Height of a perfect target's peak for each sigma: what a fully confident prediction reaches."""
    return gamma / ((2.0 * math.pi) ** (dimension / 2.0) * sigma**dimension)


def refine_peaks(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum of each heatmap, refined below the voxel by a 3-point parabola per axis.

    Where the three values are positive the parabola is fitted to their logarithm, which is exact
    for a Gaussian peak; elsewhere to the values themselves.

    Args:
        heatmaps: (N, [z,] y, x).
    Returns:
        index: (N, d) continuous indices (x, y[, z]) of the refined maxima;
        value: (N,) heatmap value at the integer maximum.
    """
    n = heatmaps.shape[0]
    spatial = heatmaps.shape[1:]
    d = len(spatial)
    flat = heatmaps.reshape(n, -1)
    value, argmax = flat.max(dim=1)
    # Row-major strides by hand: torch.unravel_index imports sympy on first use (a quarter second of
    # every command's start-up).
    strides = [math.prod(spatial[axis + 1 :]) for axis in range(d)]
    index_zyx = torch.stack([argmax // stride % size for stride, size in zip(strides, spatial)], dim=1)
    refined = index_zyx.to(torch.float64)
    rows = torch.arange(n, device=heatmaps.device)
    for axis in range(d):
        size = spatial[axis]
        before, after = index_zyx.clone(), index_zyx.clone()
        before[:, axis] = (index_zyx[:, axis] - 1).clamp(min=0)
        after[:, axis] = (index_zyx[:, axis] + 1).clamp(max=size - 1)
        lower = heatmaps[(rows, *before.T)].to(torch.float64)
        upper = heatmaps[(rows, *after.T)].to(torch.float64)
        center = value.to(torch.float64)
        positive = (lower > 0) & (upper > 0) & (center > 0)
        lower, upper, center = (torch.where(positive, torch.log(v.clamp(min=1e-30)), v) for v in (lower, upper, center))
        curvature = lower - 2.0 * center + upper
        inside = (index_zyx[:, axis] > 0) & (index_zyx[:, axis] < size - 1) & (curvature < 0)
        offset = torch.where(
            inside,
            0.5 * (lower - upper) / torch.where(inside, curvature, torch.ones_like(curvature)),
            torch.zeros_like(center),
        )
        refined[:, axis] += offset.clamp(-0.5, 0.5)
    return refined.flip(1), value

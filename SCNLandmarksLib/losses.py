"""The SCN loss (MIA 2019, Eq. 4): L2 between predicted and target heatmaps plus alpha * sigma^2."""

from __future__ import annotations

import torch

from .config import HeatmapConfig


def heatmap_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    spacing: tuple[float, ...],
    sigma: torch.Tensor,
    config: HeatmapConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one batch.

    The squared error is integrated over physical space (sum x voxel volume) and divided by
    sigma_init^d, so its scale does not depend on the grid resolution or the unit; it is averaged
    over the (image, landmark) pairs whose landmark is present, so missing landmarks contribute nothing.

    Args:
        prediction, target: (B, N, *grid).
        present: (B, N) bool.
        spacing: grid spacing, mm.
        sigma: (N,) learned sigmas, mm.
    Returns:
        (total loss, heatmap term) scalars.
    """
    d = len(spacing)
    voxel_volume = 1.0
    for s in spacing:
        voxel_volume *= s
    squared = (prediction.float() - target).pow(2).flatten(2).sum(dim=2) * (voxel_volume / config.sigma_init**d)
    weight = present.to(squared.dtype)
    heatmap_term = (squared * weight).sum() / weight.sum().clamp(min=1.0)
    sigma_term = config.alpha * (sigma / config.sigma_init).pow(2).mean()
    return heatmap_term + sigma_term, heatmap_term

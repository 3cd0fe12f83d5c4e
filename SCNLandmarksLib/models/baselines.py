"""Baseline heatmap-regression networks compared in Payer et al., MICCAI 2016.

* :class:`UNetHeatmapNet` - the SCN's local appearance component on its own (output = local heatmaps).
* :class:`DownsamplingNet` - ``levels`` levels of ``convs_per_level`` convolutions with average
  pooling between them, a 1x1 heatmap layer at the coarsest level, upsampled linearly to full size.
* :class:`ConvOnlyNet` - ``layers`` large-kernel convolutions at full resolution and a 1x1 heatmap layer.

All return :class:`HeatmapOutput` with ``local`` equal to ``final`` and ``spatial`` None.
"""

from __future__ import annotations

import torch
from torch import nn

from .scn import (
    HeatmapOutput,
    LocalAppearanceNet,
    avg_pool,
    conv_layer,
    crop_to,
    init_he,
    init_heatmap,
    pad_to_multiple,
    upsample_to,
)

__all__ = ["UNetHeatmapNet", "DownsamplingNet", "ConvOnlyNet"]


def _activation(negative_slope: float) -> nn.Module:
    return nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()


def _check_input(x: torch.Tensor, dimension: int) -> None:
    if x.dim() != dimension + 2:
        raise ValueError(
            f"expected a (B, C, *spatial) tensor with {dimension} spatial dims, got shape {tuple(x.shape)}"
        )


class UNetHeatmapNet(nn.Module):
    """U-Net baseline: the SCN local appearance net followed by a linear heatmap layer."""

    def __init__(
        self,
        dimension: int,
        in_channels: int,
        num_landmarks: int,
        *,
        filters: int,
        levels: int,
        dropout: float,
        negative_slope: float,
        heatmap_kernel: int,
        heatmap_init_std: float,
        pad_mode: str,
    ):
        super().__init__()
        self.dimension = dimension
        self.pad_mode = pad_mode
        self.local_net = LocalAppearanceNet(dimension, in_channels, filters, levels, dropout, negative_slope)
        self.heatmaps = conv_layer(dimension, filters, num_landmarks, heatmap_kernel)
        init_heatmap(self.heatmaps, heatmap_init_std)

    def forward(self, x: torch.Tensor) -> HeatmapOutput:
        _check_input(x, self.dimension)
        xp, crop = pad_to_multiple(x, self.local_net.size_multiple, self.pad_mode)
        h = crop_to(self.heatmaps(self.local_net(xp)), crop)
        return HeatmapOutput(final=h, local=h, spatial=None)


class DownsamplingNet(nn.Module):
    """Downsampling-Net: conv blocks with average pooling, coarse heatmaps upsampled linearly."""

    def __init__(
        self,
        dimension: int,
        in_channels: int,
        num_landmarks: int,
        *,
        filters: int,
        levels: int,
        convs_per_level: int,
        kernel_size: int,
        negative_slope: float,
        heatmap_init_std: float,
        pad_mode: str,
    ):
        super().__init__()
        self.dimension = dimension
        self.pad_mode = pad_mode
        self.size_multiple = 2 ** (levels - 1)
        self.blocks = nn.ModuleList()
        cin = in_channels
        for _ in range(levels):
            block = []
            for _ in range(convs_per_level):
                c = conv_layer(dimension, cin, filters, kernel_size)
                init_he(c, negative_slope)
                block += [c, _activation(negative_slope)]
                cin = filters
            self.blocks.append(nn.Sequential(*block))
        self.heatmaps = conv_layer(dimension, cin, num_landmarks, 1)
        init_heatmap(self.heatmaps, heatmap_init_std)

    def forward(self, x: torch.Tensor) -> HeatmapOutput:
        _check_input(x, self.dimension)
        xp, crop = pad_to_multiple(x, self.size_multiple, self.pad_mode)
        node = xp
        for i, block in enumerate(self.blocks):
            if i > 0:
                node = avg_pool(node, 2)
            node = block(node)
        h = crop_to(upsample_to(self.heatmaps(node), tuple(xp.shape[2:])), crop)
        return HeatmapOutput(final=h, local=h, spatial=None)


class ConvOnlyNet(nn.Module):
    """ConvOnly-Net: full-resolution large-kernel convolutions and a 1x1 heatmap layer."""

    def __init__(
        self,
        dimension: int,
        in_channels: int,
        num_landmarks: int,
        *,
        filters: int,
        layers: int,
        kernel_size: int,
        negative_slope: float,
        heatmap_init_std: float,
    ):
        super().__init__()
        self.dimension = dimension
        body = []
        cin = in_channels
        for _ in range(layers):
            c = conv_layer(dimension, cin, filters, kernel_size)
            init_he(c, negative_slope)
            body += [c, _activation(negative_slope)]
            cin = filters
        self.body = nn.Sequential(*body)
        self.heatmaps = conv_layer(dimension, cin, num_landmarks, 1)
        init_heatmap(self.heatmaps, heatmap_init_std)

    def forward(self, x: torch.Tensor) -> HeatmapOutput:
        _check_input(x, self.dimension)
        h = self.heatmaps(self.body(x))
        return HeatmapOutput(final=h, local=h, spatial=None)

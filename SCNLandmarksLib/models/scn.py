"""SpatialConfiguration-Net (SCN) of Payer et al., Medical Image Analysis 2019, and shared building blocks.

One implementation serves 2D and 3D: every layer is chosen by ``dimension``.

Layout (after the authors' description and their public TensorFlow networks):

* Local appearance component: a 3x3(x3) input convolution, then a U-Net-like net with ``levels``
  levels and ``filters`` filters everywhere (no doubling per level).  Contracting path per level:
  conv - dropout - conv; average pooling by 2 between levels.  Each level has one convolution on
  its skip ("parallel") path; the expanding path upsamples linearly by 2 and *adds* the result to
  the skip.  A linear "local heatmap" convolution with N outputs gives H_app; its weights start
  near zero so that the first heatmaps are ~0.
* Spatial configuration component: H_app is average-pooled by ``sc_downsample``, passed through
  ``sc_layers`` large-kernel convolutions (LeakyReLU between, tanh after the last one, the last
  one with N outputs, near-zero weights and bias ``sc_init_bias``) and upsampled linearly back: H_sc.
  H_sc starts near tanh(sc_init_bias) = 0.46 rather than 0: with both factors of H_app * H_sc at
  zero, neither branch gets a gradient (a saddle), and a 3D SCN was seen to sit there for hundreds
  of iterations; a positive start lets H_app learn at once and H_sc learn to suppress.
* Final heatmaps: H = H_app * H_sc (element-wise).

Any input size is accepted: the input is replicate- (or zero-) padded to the multiple the pooling
needs and the outputs are cropped back.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HeatmapOutput",
    "SpatialConfigurationNet",
    "LocalAppearanceNet",
    "conv_layer",
    "pad_to_multiple",
    "crop_to",
    "upsample_to",
    "init_he",
    "init_heatmap",
]


class HeatmapOutput(NamedTuple):
    """What every model's forward returns; all tensors are (B, N, *spatial) at the input's size."""

    final: torch.Tensor
    local: torch.Tensor
    spatial: torch.Tensor | None


# --------------------------------------------------------------------------- building blocks


def _check_dimension(dimension: int) -> int:
    if dimension not in (2, 3):
        raise ValueError(f"dimension must be 2 or 3, not {dimension!r}")
    return dimension


def conv_layer(dimension: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d | nn.Conv3d:
    """A stride-1 'same' convolution (zero padding, odd kernel) for 2D or 3D."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, not {kernel_size}")
    cls = nn.Conv2d if _check_dimension(dimension) == 2 else nn.Conv3d
    return cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)


def avg_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    return pool(x, kernel_size=factor, stride=factor)


def upsample_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear (bilinear / trilinear) upsampling to ``size`` (pixel-center aligned)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of ``x`` up to a multiple of ``multiple`` (split evenly, extra after).

    Returns the padded tensor and the slices (over the spatial dims) that crop it back.
    ``mode`` is ``"replicate"`` or ``"zeros"``.
    """
    spatial = tuple(x.shape[2:])
    totals = [(-s) % multiple for s in spatial]
    slices = tuple(slice(t // 2, t // 2 + s) for t, s in zip(totals, spatial))
    if not any(totals):
        return x, slices
    pads: list[int] = []
    for t in reversed(totals):  # F.pad lists the last dimension first
        pads += [t // 2, t - t // 2]
    if mode == "replicate":
        x = F.pad(x, pads, mode="replicate")
    elif mode == "zeros":
        x = F.pad(x, pads, mode="constant", value=0.0)
    else:
        raise ValueError(f"pad_mode must be 'replicate' or 'zeros', not {mode!r}")
    return x, slices


def crop_to(x: torch.Tensor, slices: tuple[slice, ...]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slices)]


def init_he(conv: nn.Conv2d | nn.Conv3d, negative_slope: float) -> None:
    """He (Kaiming) normal initialisation for a conv followed by a (leaky) ReLU; zero bias."""
    nn.init.kaiming_normal_(conv.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_heatmap(conv: nn.Conv2d | nn.Conv3d, std: float) -> None:
    """Near-zero initialisation of a heatmap output layer (truncated normal, +-2 std); zero bias."""
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# --------------------------------------------------------------------------- local appearance


class LocalAppearanceNet(nn.Module):
    """U-Net-like local appearance component; returns ``filters`` feature maps at input size.

    The input must already have spatial sizes divisible by ``2 ** (levels - 1)`` (see
    :attr:`size_multiple`); the wrapping models pad for it.

    :attr:`compute_dtype`, when set, runs the net under autocast to that dtype and returns float32
    features: inference sets bfloat16 where the hardware multiplies it natively (see
    inference.resolve_precision). Only this net, the bulk of the work, runs reduced: the heatmap layers
    after it stay float32: bfloat16 heatmaps raised the cephalogram model's median error from 5.3 to
    6.9 px, and this split keeps it at 5.3.
    """

    compute_dtype: torch.dtype | None = None

    def __init__(
        self,
        dimension: int,
        in_channels: int,
        filters: int,
        levels: int,
        dropout: float,
        negative_slope: float,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.dimension = _check_dimension(dimension)
        self.levels = levels
        self.size_multiple = 2 ** (levels - 1)

        def conv(cin: int) -> nn.Conv2d | nn.Conv3d:
            c = conv_layer(dimension, cin, filters, kernel_size)
            init_he(c, negative_slope)
            return c

        self.input_conv = conv(in_channels)
        self.contracting = nn.ModuleList(
            nn.ModuleDict({"conv0": conv(filters), "conv1": conv(filters)}) for _ in range(levels)
        )
        self.parallel = nn.ModuleList(conv(filters) for _ in range(levels))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            return self._features(x)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return self._features(x).float()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        node = act(self.input_conv(x))
        skips = []
        for level, block in enumerate(self.contracting):
            convs = cast(nn.ModuleDict, block)
            node = act(convs["conv0"](node))
            node = self.dropout(node)
            node = act(convs["conv1"](node))
            skips.append(act(self.parallel[level](node)))
            if level < self.levels - 1:
                node = avg_pool(node, 2)
        node = skips[-1]
        for level in reversed(range(self.levels - 1)):
            skip = skips[level]
            node = upsample_to(node, tuple(skip.shape[2:])) + skip
        return node


# --------------------------------------------------------------------------- SCN


class SpatialConfigurationNet(nn.Module):
    """SCN: H = H_app * H_sc.  ``forward`` returns :class:`HeatmapOutput` (final, local, spatial)."""

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
        sc_downsample: int,
        sc_layers: int,
        sc_kernel: int,
        sc_filters: int,
        sc_init_bias: float,
        pad_mode: str,
    ):
        super().__init__()
        self.dimension = _check_dimension(dimension)
        self.num_landmarks = num_landmarks
        self.sc_downsample = sc_downsample
        self.pad_mode = pad_mode

        self.local_net = LocalAppearanceNet(dimension, in_channels, filters, levels, dropout, negative_slope)
        self.local_heatmaps = conv_layer(dimension, filters, num_landmarks, heatmap_kernel)
        init_heatmap(self.local_heatmaps, heatmap_init_std)

        layers: list[nn.Module] = []
        cin = num_landmarks
        for i in range(sc_layers):
            last = i == sc_layers - 1
            c = conv_layer(dimension, cin, num_landmarks if last else sc_filters, sc_kernel)
            if last:
                init_heatmap(c, heatmap_init_std)
                if c.bias is not None:
                    nn.init.constant_(c.bias, sc_init_bias)
            else:
                init_he(c, negative_slope)
            layers.append(c)
            layers.append(nn.Tanh() if last else (nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()))
            cin = sc_filters
        self.spatial_net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> HeatmapOutput:
        if x.dim() != self.dimension + 2:
            raise ValueError(
                f"expected a (B, C, *spatial) tensor with {self.dimension} spatial dims, got shape {tuple(x.shape)}"
            )
        xp, crop = pad_to_multiple(x, self.local_net.size_multiple, self.pad_mode)
        local = crop_to(self.local_heatmaps(self.local_net(xp)), crop)
        # H_app outside the image means "no landmark": zero-pad it for the spatial configuration.
        lp, crop_sc = pad_to_multiple(local, self.sc_downsample, "zeros")
        spatial_low = self.spatial_net(avg_pool(lp, self.sc_downsample))
        spatial = crop_to(upsample_to(spatial_low, tuple(lp.shape[2:])), crop_sc)
        return HeatmapOutput(final=local * spatial, local=local, spatial=spatial)

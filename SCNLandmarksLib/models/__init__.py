"""Heatmap-regression networks: the SpatialConfiguration-Net and the baselines of Payer et al.

``build_model(architecture, dimension, in_channels, num_landmarks, params)`` builds any of
:data:`ARCHITECTURES` for 2D or 3D images.  ``params`` is a partial dict of tunables merged over
:func:`default_params`; all values are JSON-serialisable so a model can be rebuilt from its file.
Every model's ``forward(x)`` takes ``(B, C, *spatial)`` of any size and returns
:class:`HeatmapOutput` with tensors of shape ``(B, N, *spatial)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from .baselines import ConvOnlyNet, DownsamplingNet, UNetHeatmapNet
from .scn import HeatmapOutput, LocalAppearanceNet, SpatialConfigurationNet

__all__ = [
    "ARCHITECTURES",
    "HEAD_PREFIXES",
    "TRAINING_ONLY_PARAMS",
    "HeatmapOutput",
    "LocalAppearanceNet",
    "build_model",
    "default_params",
    "resolve_params",
]

ARCHITECTURES = ("scn", "unet", "downsampling", "convonly")

PAD_MODES = ("replicate", "zeros")

# Parameters that shape only training or the initial weights, not what trained weights compute:
# a fine-tuning run may change them.
TRAINING_ONLY_PARAMS = ("dropout", "heatmap_init_std", "sc_init_bias")

# Tensor name prefixes of the landmark-specific layers (heatmap heads, spatial configuration); the
# rest is the local-appearance body, which a model for other landmarks can start from.
HEAD_PREFIXES = ("local_heatmaps.", "spatial_net.", "heatmaps.")

# Defaults per architecture and dimension.  SCN follows Payer et al. 2019 (MIA); the 3D variant
# uses fewer filters, a smaller spatial-configuration kernel and less downsampling.  The baselines
# follow Payer et al. 2016 (MICCAI) in 2D and are scaled down in 3D.
_DEFAULTS: dict[str, dict[int, dict[str, Any]]] = {
    "scn": {
        2: {
            "filters": 128,
            "levels": 4,
            "dropout": 0.5,
            "negative_slope": 0.1,
            "heatmap_kernel": 3,
            "heatmap_init_std": 1e-4,
            "sc_downsample": 16,
            "sc_layers": 4,
            "sc_kernel": 11,
            "sc_filters": 128,
            "sc_init_bias": 0.5,
            "pad_mode": "replicate",
        },
        3: {
            "filters": 64,
            "levels": 4,
            "dropout": 0.5,
            "negative_slope": 0.1,
            "heatmap_kernel": 3,
            "heatmap_init_std": 1e-4,
            "sc_downsample": 4,
            "sc_layers": 4,
            "sc_kernel": 7,
            "sc_filters": 64,
            "sc_init_bias": 0.5,
            "pad_mode": "replicate",
        },
    },
    "unet": {
        2: {
            "filters": 128,
            "levels": 4,
            "dropout": 0.5,
            "negative_slope": 0.1,
            "heatmap_kernel": 3,
            "heatmap_init_std": 1e-4,
            "pad_mode": "replicate",
        },
        3: {
            "filters": 64,
            "levels": 4,
            "dropout": 0.5,
            "negative_slope": 0.1,
            "heatmap_kernel": 3,
            "heatmap_init_std": 1e-4,
            "pad_mode": "replicate",
        },
    },
    "downsampling": {
        2: {
            "filters": 128,
            "levels": 3,
            "convs_per_level": 2,
            "kernel_size": 5,
            "negative_slope": 0.0,
            "heatmap_init_std": 1e-4,
            "pad_mode": "replicate",
        },
        3: {
            "filters": 64,
            "levels": 3,
            "convs_per_level": 2,
            "kernel_size": 3,
            "negative_slope": 0.0,
            "heatmap_init_std": 1e-4,
            "pad_mode": "replicate",
        },
    },
    "convonly": {
        2: {"filters": 128, "layers": 6, "kernel_size": 11, "negative_slope": 0.0, "heatmap_init_std": 1e-4},
        3: {"filters": 32, "layers": 6, "kernel_size": 7, "negative_slope": 0.0, "heatmap_init_std": 1e-4},
    },
}


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"model parameter {name!r} must be a positive integer, not {v!r}")
    return v


def _odd_int(name: str, v: Any) -> int:
    v = _positive_int(name, v)
    if v % 2 == 0:
        raise ValueError(f"model parameter {name!r} must be an odd kernel size, not {v}")
    return v


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[str, Any], float]:
    def check(name: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok:
            v = float(v)
            ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"model parameter {name!r} must be a number in {lb}{lo}, {hi}{rb}, not {v!r}")
        return v

    return check


def _pad_mode(name: str, v: Any) -> str:
    if v not in PAD_MODES:
        raise ValueError(f"model parameter {name!r} must be one of {PAD_MODES}, not {v!r}")
    return v


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "filters": _positive_int,
    "levels": _positive_int,
    "dropout": _number(0.0, 1.0, False, True),
    "negative_slope": _number(0.0, 1.0, False, True),
    "heatmap_kernel": _odd_int,
    "heatmap_init_std": _number(0.0, 1.0, True, False),
    "sc_downsample": _positive_int,
    "sc_layers": _positive_int,
    "sc_kernel": _odd_int,
    "sc_filters": _positive_int,
    "sc_init_bias": _number(-3.0, 3.0, False, False),
    "pad_mode": _pad_mode,
    "convs_per_level": _positive_int,
    "kernel_size": _odd_int,
    "layers": _positive_int,
}


def _check_architecture(architecture: str, dimension: int) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    if isinstance(dimension, bool) or dimension not in (2, 3):
        raise ValueError(f"dimension must be 2 or 3, not {dimension!r}")


def default_params(architecture: str, dimension: int) -> dict:
    """All tunables of ``architecture`` for ``dimension`` (2 or 3) with their defaults (a fresh dict)."""
    _check_architecture(architecture, dimension)
    return copy.deepcopy(_DEFAULTS[architecture][dimension])


def resolve_params(architecture: str, dimension: int, params: dict | None = None) -> dict:
    """``params`` merged over the defaults and validated; unknown keys raise ValueError naming them."""
    merged = default_params(architecture, dimension)
    if params:
        unknown = sorted(set(params) - set(merged))
        if unknown:
            raise ValueError(
                f"unknown model parameter(s) for {architecture!r}: {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(merged))}"
            )
        merged.update(params)
    return {k: _VALIDATORS[k](k, v) for k, v in merged.items()}


def build_model(
    architecture: str, dimension: int, in_channels: int, num_landmarks: int, params: dict | None = None
) -> nn.Module:
    """Build a heatmap network; ``params`` is a partial dict merged over :func:`default_params`
    (the model file describes the network, see `bundle.StageDescription`)."""
    _check_architecture(architecture, dimension)
    in_channels = _positive_int("in_channels", in_channels)
    num_landmarks = _positive_int("num_landmarks", num_landmarks)
    p = resolve_params(architecture, dimension, params)
    if architecture == "scn":
        model: nn.Module = SpatialConfigurationNet(dimension, in_channels, num_landmarks, **p)
    elif architecture == "unet":
        model = UNetHeatmapNet(dimension, in_channels, num_landmarks, **p)
    elif architecture == "downsampling":
        model = DownsamplingNet(dimension, in_channels, num_landmarks, **p)
    else:
        model = ConvOnlyNet(dimension, in_channels, num_landmarks, **p)
    return model

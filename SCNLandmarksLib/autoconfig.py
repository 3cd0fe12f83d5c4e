"""Training configurations derived from a dataset, so that a user sets nothing.

`scn-landmarks train --dataset SPEC` and `scn-landmarks finetune` both use this module: it finds the
dataset spec (a spec file, or a folder written by the Slicer module's "Save as training pair"),
chooses the held-aside cases, and derives the grids, stages, augmentation and training length of a
new model from the images' sizes and spacings and the time budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, config_from_dict
from .data.spec import DatasetSpec, load_dataset_spec
from .errors import DataError
from .models import build_model

SPEC_NAME = "dataset.toml"  # the spec of a training folder (the Slicer module writes it there)
TRAIN_SPLIT = "train"
HELD_ASIDE_SPLIT = "validation"
MIN_CASES_TO_VALIDATE = 5
HELD_ASIDE_EVERY = 5

# Coarse grid: voxels along the longest physical side of the largest image.
COARSE_SIDE = {2: 128, 3: 48}
# A refinement stage is added when the coarse grid is this many times coarser than the images.
REFINE_WHEN_COARSER = 4.0
REFINEMENT_PATCH = {2: 32, 3: 24}
REFINEMENT_BATCH = 4
# How a refinement stage decodes (InferenceConfig): in 2D, 9 test-time views took the ISBI model's
# validation error from 1.12 to 1.07 mm and the hand recipe's 3-fold error from 1.07 to 0.94 mm, for
# 0.1-0.2 s per image. The coarse prior helped the ISBI model (1.05 mm) and the Hamedan cephalograms'
# refiner (6.73 to 6.47 px with 9 views) but held a hand point on a look-alike finger where the views
# alone had found the right one (worst hand point 6.2 to 10.2 mm), so it is not derived. In 3D the
# refinement is most of a detection's time: 7 views took the brain model's deformed copies from 0.53
# to 0.46 mm and its harder proxy from 1.32 to 1.30 mm, but its detection from 0.56 to 2.3 s (AMX), so
# 3D keeps one view (the prior made the harder proxy worse, 1.35 mm).
REFINEMENT_DECODING: dict[int, dict[str, Any]] = {2: {"refinement_views": 9}, 3: {}}
# Networks small enough to train on a CPU within minutes. 2D: 32 filters, not the cephalogram model's 64:
# on the 6 hand radiographs (3-fold, 18-20 minutes on a shared CPU) 64 filters ran half the iterations
# and gave 3.38 mm mean error on unseen hands, 32 filters 2.37 mm on the same folds.
COARSE_PARAMS = {
    2: {"filters": 32, "levels": 4, "dropout": 0.3, "sc_downsample": 8, "sc_kernel": 9, "sc_filters": 32},
    3: {"filters": 32, "levels": 4, "dropout": 0.3, "sc_downsample": 4, "sc_kernel": 5, "sc_filters": 32},
}
REFINEMENT_PARAMS = {2: {"filters": 32, "levels": 3, "dropout": 0.0}, 3: {"filters": 16, "levels": 3, "dropout": 0.0}}
# A time budget becomes iterations through the measured speed of the chosen network on this
# machine (a few real optimiser steps): a fixed figure was 3-5 times too optimistic on a shared
# 2-core CPU, and a cosine schedule cut off at a fifth of its length ends at a high learning rate.
# Sampling and augmentation, not timed there, take this share of an iteration (measured on the
# hand radiographs: 88 x 128 grid, batch 2, 1 CPU thread).
NETWORK_SHARE_OF_ITERATION = 0.7
TIMED_STEPS = 3
DEFAULT_MINUTES = 30.0
# Pictures in pixels whose longest sides differ by more than this factor are trained with
# scale_from_anatomy (see config.Config).
MIXED_SIZES_ABOVE = 1.1


def resolve_dataset(path: str | Path) -> Path:
    """The dataset spec file of `path`: the file itself, or a training folder's dataset.toml.

    Raises:
        DataError: naming the folder, when it holds no dataset spec.
    """
    path = Path(path)
    if path.is_dir():
        spec = path / SPEC_NAME
        if not spec.is_file():
            raise DataError(
                f"{path}: not a training folder (no {SPEC_NAME}); save training pairs into it first, "
                "or give a dataset spec file"
            )
        return spec
    return path


def held_aside_ids(ids: list[str]) -> list[str]:
    """The cases kept out of training to compare models: every fifth case in sorted id order
    (the same cases on every run), none below five cases."""
    if len(ids) < MIN_CASES_TO_VALIDATE:
        return []
    return [case for number, case in enumerate(sorted(ids)) if number % HELD_ASIDE_EVERY == HELD_ASIDE_EVERY - 1]


def write_split_spec(
    spec: DatasetSpec, path: Path, held_aside: list[str], landmark_names: tuple[str, ...] | None = None
) -> Path:
    """Write a copy of `spec` whose held-aside cases form the validation split and all others the
    training split; `landmark_names` reorders the landmarks (same set)."""
    entries = tuple(
        dataclasses.replace(entry, split=HELD_ASIDE_SPLIT if entry.id in held_aside else TRAIN_SPLIT)
        for entry in spec.entries
    )
    copy = dataclasses.replace(
        spec, path=Path(path), entries=entries, landmark_names=tuple(landmark_names or spec.landmark_names)
    )
    return copy.write(f"The cases of {spec.path}, with the held-aside cases as the validation split.")


def default_augmentation(dimension: int, extent: float) -> dict[str, Any]:
    """Augmentation for images whose longest physical side is `extent`: X-rays (2D) vary more in
    pose and contrast than volumes (3D), which are usually acquired in a standard orientation."""
    if dimension == 2:
        return {
            "translation": 0.05 * extent,
            "rotation_deg": 15.0,
            "scale": 0.1,
            "scale_per_axis": 0.05,
            "elastic_mm": 0.01 * extent,
            "elastic_control_spacing_mm": 0.25 * extent,
            "intensity_shift": 0.1,
            "intensity_scale": 0.2,
            "gamma_log": 0.3,
            "noise_std": 0.02,
        }
    return {
        "translation": 0.05 * extent,
        "rotation_deg": 10.0,
        "scale": 0.1,
        "scale_per_axis": 0.05,
        "elastic_mm": 0.01 * extent,
        "elastic_control_spacing_mm": 0.25 * extent,
        "intensity_shift": 0.1,
        "intensity_scale": 0.15,
        "gamma_log": 0.2,
        "noise_std": 0.02,
        "bias_field_log": 0.1,
    }


def measured_iterations_per_s(
    architecture: str,
    params: dict[str, Any],
    dimension: int,
    landmarks: int,
    grid_size: tuple[int, ...],
    batch_size: int,
    device: torch.device,
) -> float:
    """Training iterations per second of this network on `device` now: forward, backward and
    optimiser step on random inputs (best of TIMED_STEPS after a warm-up), scaled by
    NETWORK_SHARE_OF_ITERATION for the sampling around it."""
    generator = torch.Generator().manual_seed(0)
    network = build_model(architecture, dimension, 1, landmarks, params).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    inputs = torch.randn((batch_size, 1, *reversed(grid_size)), generator=generator).to(device)
    times = []
    for _ in range(TIMED_STEPS + 1):
        started = time.perf_counter()
        loss = network(inputs).final.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return NETWORK_SHARE_OF_ITERATION / min(times[1:])


def iterations_for_budget(iterations_per_s: float, minutes: float) -> int:
    """How many iterations at this speed fit in `minutes` (at least 20)."""
    return max(20, int(iterations_per_s * minutes * 60.0))


def _rounded_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def config_for_dataset(
    dataset: str | Path, output_dir: str | Path, minutes: float | None = None, gpu: bool = False
) -> Config:
    """A complete training configuration for a dataset, derived from its images.

    The coarse grid covers the largest image with COARSE_SIDE voxels along its longest side; a
    refinement stage is added when that grid is much coarser than the images; the training length
    fills the time budget. Without a training split in the spec, the held-aside cases (see
    held_aside_ids) become the validation split of a spec written to `output_dir`.
    """
    output_dir = Path(output_dir).resolve()
    spec_path = resolve_dataset(dataset).resolve()  # the config resolves relative paths against output_dir
    spec = load_dataset_spec(spec_path)
    dimension = spec.dimension
    if not any(entry.split == TRAIN_SPLIT for entry in spec.entries):
        spec_path = write_split_spec(spec, output_dir / SPEC_NAME, held_aside_ids([e.id for e in spec.entries]))
    extents, spacings = [], []
    for entry in spec.entries:
        try:
            size_read, spacing_read = entry.read_information()
        except DataError as error:
            raise DataError(f"{error} (case '{entry.id}')") from None
        size = np.asarray(size_read[:dimension], dtype=float)
        spacing = np.asarray(spacing_read[:dimension], dtype=float)
        extents.append(size * spacing)
        spacings.append(spacing)
    extent = np.max(extents, axis=0)
    units = {entry.unit for entry in spec.entries}
    # Pictures of several sizes in pixels come from several devices (or crops): their pixels need not
    # mean the same size, so training brings each image's anatomy to one size, as detection does.
    mixed_sizes = units == {"px"} and float(np.max(extents) / np.min(np.max(extents, axis=1))) > MIXED_SIZES_ABOVE
    finest = float(np.median([s.min() for s in spacings]))
    coarse_spacing = max(float(extent.max()) / COARSE_SIDE[dimension], finest)
    grid_size = [_rounded_up(e / coarse_spacing, 8) for e in extent]
    minutes = DEFAULT_MINUTES if minutes is None else minutes
    batch_size = 2 if dimension == 2 else 1
    refine = coarse_spacing >= REFINE_WHEN_COARSER * finest
    coarse_minutes = minutes * (0.7 if refine else 1.0)
    device = torch.device("cuda" if gpu else "cpu")
    landmarks = len(spec.landmark_names)
    coarse_rate = measured_iterations_per_s(
        "scn", COARSE_PARAMS[dimension], dimension, landmarks, tuple(grid_size), batch_size, device
    )
    iterations = iterations_for_budget(coarse_rate, coarse_minutes)
    sigma = 2.5 * coarse_spacing
    values: dict[str, Any] = {
        "dataset": str(spec_path),
        "output_dir": str(output_dir),
        "grid": {"size": grid_size, "spacing": [coarse_spacing] * dimension},
        "augmentation": default_augmentation(dimension, float(extent.max())),
        "heatmap": {"sigma_init": sigma, "sigma_min": 0.5 * coarse_spacing},
        "model": {"architecture": "scn", "params": COARSE_PARAMS[dimension]},
        "training": _training(iterations, batch_size, 5e-4),
        "scale_from_anatomy": mixed_sizes,
    }
    if refine:
        fine_spacing = max(finest, coarse_spacing / 4.0)
        patch = [REFINEMENT_PATCH[dimension]] * dimension
        values["refinement"] = {
            "grid": {"size": patch, "spacing": [fine_spacing] * dimension},
            "offset_mm": 2.0 * coarse_spacing,
            "heatmap": {"sigma_init": 2.5 * fine_spacing, "sigma_min": 0.5 * fine_spacing},
            "model": {"architecture": "unet", "params": REFINEMENT_PARAMS[dimension]},
            "training": _training(
                iterations_for_budget(
                    measured_iterations_per_s(
                        "unet",
                        REFINEMENT_PARAMS[dimension],
                        dimension,
                        landmarks,
                        tuple(patch),
                        REFINEMENT_BATCH,
                        device,
                    ),
                    minutes - coarse_minutes,
                ),
                REFINEMENT_BATCH,
                5e-4,
            ),
            "augmentation": {**default_augmentation(dimension, float(extent.max())), "translation": 0.0},
        }
        values["inference"] = REFINEMENT_DECODING[dimension]
    return config_from_dict(values, output_dir, where=f"configuration derived from {spec_path}")


def _training(iterations: int, batch_size: int, learning_rate: float) -> dict[str, Any]:
    return {
        "iterations": iterations,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "validate_every": max(1, iterations // 10),
        "checkpoint_every": max(1, min(200, iterations // 10)),
    }

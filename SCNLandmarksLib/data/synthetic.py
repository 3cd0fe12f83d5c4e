"""Synthetic landmark datasets with known answers, for tests, benchmarks and smoke runs.

Each image shows a small constellation of blobs of different sizes (one per landmark) joined by
faint bars, placed with a random rigid pose on a grid of any spacing, origin and direction. The
landmark positions are exact by construction, in physical LPS space.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import ImageGeometry
from ..io.landmarks import write_landmarks
from ..landmark_set import LandmarkSet
from .augmentation import rotation_matrix


def constellation(dimension: int, count: int, radius_mm: float) -> np.ndarray:
    """(count, d) template positions around the origin, mm: an irregular ring (no symmetry to confuse)."""
    angles = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False) + 0.3 * np.sin(np.arange(count) * 1.7)
    radii = radius_mm * (0.7 + 0.3 * np.cos(np.arange(count) * 2.3))
    points = np.zeros((count, dimension))
    points[:, 0] = radii * np.cos(angles)
    points[:, 1] = radii * np.sin(angles)
    if dimension == 3:
        points[:, 2] = 0.5 * radius_mm * np.sin(np.arange(count) * 1.3)
    return points


def render(
    geometry: ImageGeometry, points_lps: np.ndarray, blob_mm: np.ndarray, rng: np.random.Generator, noise: float = 0.05
) -> sitk.Image:
    """An image (float32) with a blob of radius blob_mm[k] at each point and bars between neighbours."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(geometry.size)], indexing="ij")[::-1], axis=-1)
    physical = geometry.index_to_physical(index.reshape(-1, geometry.dimension))
    values = np.zeros(len(physical))
    count = len(points_lps)
    for k in range(count):
        distance2 = np.sum((physical - points_lps[k]) ** 2, axis=1)
        values += np.exp(-distance2 / (2.0 * blob_mm[k] ** 2))
        a, b = points_lps[k], points_lps[(k + 1) % count]
        t = np.clip((physical - a) @ (b - a) / max(float((b - a) @ (b - a)), 1e-9), 0.0, 1.0)
        to_bar = np.sum((physical - (a + t[:, None] * (b - a))) ** 2, axis=1)
        values += 0.3 * np.exp(-to_bar / (2.0 * (0.4 * blob_mm.min()) ** 2))
    values += rng.normal(0.0, noise, len(values))
    image = sitk.GetImageFromArray((values * 1000.0).astype(np.float32).reshape(tuple(reversed(geometry.size))))
    return geometry.apply_to(image)


def make_dataset(
    folder: str | Path,
    dimension: int = 2,
    images: int = 12,
    landmarks: int = 4,
    size: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    direction: np.ndarray | None = None,
    validation: int = 2,
    seed: int = 0,
    max_rotation_deg: float = 20.0,
    image_suffix: str | None = None,
) -> Path:
    """Write images, .mrk.json landmark files and a dataset spec; return the spec's path.

    Args:
        folder: output folder (created).
        dimension: 2 or 3.
        size, spacing: image grid (x, y[, z]); defaults 64^2 at 1 mm / 32^3 at 1.5 mm.
        direction: (d, d) image direction (e.g. oblique or flipped); default identity.
        validation: how many images go to the validation split (the rest train).
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    size = size or ((64, 64) if dimension == 2 else (32, 32, 32))
    spacing = spacing or ((1.0, 1.0) if dimension == 2 else (1.5, 1.5, 1.5))
    direction = np.eye(dimension) if direction is None else np.asarray(direction, dtype=np.float64)
    suffix = image_suffix or (".mha" if dimension == 2 else ".nrrd")
    names = [f"L{k + 1}" for k in range(landmarks)]
    extent = (np.asarray(size) - 1) * np.asarray(spacing)
    template = constellation(dimension, landmarks, 0.28 * float(extent.min()))
    blob_mm = 0.035 * float(extent.min()) * (1.0 + 0.5 * np.arange(landmarks) / max(landmarks - 1, 1))
    lines = [f"dimension = {dimension}", "landmarks = [" + ", ".join(f'"{n}"' for n in names) + "]", ""]
    for number in range(images):
        origin = rng.uniform(-50.0, 50.0, dimension)
        geometry = ImageGeometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))
        center = geometry.index_to_physical((np.asarray(size) - 1) / 2.0)
        shift = rng.uniform(-0.08, 0.08, dimension) * extent.min()
        angles = np.radians(rng.uniform(-max_rotation_deg, max_rotation_deg, 1 if dimension == 2 else 3))
        rotation = rotation_matrix(torch.from_numpy(angles), dimension).numpy()
        points = template @ rotation.T + center + shift
        image = render(geometry, points, blob_mm, rng)
        image_id = f"case{number:03d}"
        sitk.WriteImage(image, str(folder / "images" / f"{image_id}{suffix}"))
        write_landmarks(LandmarkSet(names, points), folder / "images" / f"{image_id}.mrk.json")
        split = "validation" if number >= images - validation else "train"
        lines += [
            "[[images]]",
            f'id = "{image_id}"',
            f'image = "images/{image_id}{suffix}"',
            f'landmarks = "images/{image_id}.mrk.json"',
            f'split = "{split}"',
            "",
        ]
    spec = folder / "dataset.toml"
    spec.write_text("\n".join(lines))
    return spec

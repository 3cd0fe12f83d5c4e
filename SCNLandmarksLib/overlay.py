"""Landmark overlays written as PNG with SimpleITK only (no matplotlib, so it works inside Slicer).

2D images are shown in their stored pixel order (index x to the right, index y down), resampled to
square display pixels. 3D images are shown as three orthogonal slices side by side (axial,
coronal, sagittal) cut in physical LPS space, whatever the voxel storage order, and oriented as
radiologists expect:

  * axial:    patient right on image left, anterior up   (columns +L, rows +P)
  * coronal:  patient right on image left, superior up   (columns +L, rows -S)
  * sagittal: anterior on image left, superior up        (columns +P, rows -S)

Predicted landmarks are filled discs in the color of their status (see `confidence_color`), ground
truth landmarks are cyan rings joined to their prediction by a white line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .config import InferenceConfig
from .errors import DataError
from .geometry import ImageGeometry
from .landmark_set import LandmarkSet
from .vocabulary import STATUS_COLORS

MAGENTA = (255, 0, 255)  # prediction without a known confidence
CYAN = (0, 255, 255)  # ground truth
WHITE = (255, 255, 255)  # prediction-to-truth line
OUTLINE = (0, 0, 0)
GAP_COLOR = (48, 48, 48)

PANEL_GAP = 4  # pixels between the 3D panels
_MAX_WINDOW_SAMPLES = 2_000_000

# (column direction, row direction, normal) in LPS for the three 3D panels.
_PANEL_AXES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
}
PANEL_ORDER = ("axial", "coronal", "sagittal")


def confidence_color(confidence: float | None, inference: InferenceConfig = InferenceConfig()) -> tuple[int, int, int]:
    """RGB color of a predicted landmark: the color of the status its confidence has under the model's
    thresholds `inference` (`STATUS_COLORS`, as in the Slicer views), magenta if unknown."""
    if confidence is None or not np.isfinite(confidence):
        return MAGENTA
    return STATUS_COLORS[inference.status(confidence)]


def render_landmarks_png(
    image: sitk.Image,
    path: str | Path,
    landmarks: LandmarkSet,
    truth: LandmarkSet | None = None,
    heatmap: sitk.Image | None = None,
    max_size: int = 1024,
    center_lps: np.ndarray | None = None,
    slab_mm: float = 5.0,
    inference: InferenceConfig = InferenceConfig(),
) -> Path:
    """Draw predicted (and optionally true) landmarks on an image and write an RGB PNG.

    Args:
        image: 2D or 3D image (scalar; multi-component images are averaged to gray). Gray values are
            windowed to the 1st-99th percentile.
        path: output file, written as PNG whatever its suffix; parent folders are created.
        landmarks: predicted landmarks in physical LPS space (NaN rows are not drawn); their
            confidences pick the marker color (`confidence_color`).
        truth: optional ground truth, matched to `landmarks` by name.
        heatmap: optional scalar or multi-component heatmap (components are max-combined) in the
            same physical space as `image` (resampled onto it if its grid differs); it is scaled by
            its maximum and blended in a heat color map.
        max_size: the longest side of the PNG, in pixels (images are downscaled, never upscaled).
        center_lps: 3D only: the point the three slices pass through; default the mean of the
            present predicted landmarks (else of the truth, else the image center).
        slab_mm: 3D only: landmarks within this distance of a slice plane are drawn on it.
        inference: the model's confidence thresholds, which the marker colors follow.

    Returns:
        The path written.
    """
    d = image.GetDimension()
    if d not in (2, 3):
        raise DataError(f"cannot render a {d}D image; expected 2D or 3D")
    if landmarks.dimension != d:
        raise DataError(f"landmarks are {landmarks.dimension}D but the image is {d}D")
    if truth is not None:
        if truth.dimension != d:
            raise DataError(f"truth landmarks are {truth.dimension}D but the image is {d}D")
        truth = _matched_truth(landmarks, truth)
    if max_size < 8:
        raise ValueError(f"max_size must be at least 8 pixels, got {max_size}")

    window = _window(image)
    heat_max = None
    if heatmap is not None:
        heat_max = _finite_max(_as_scalar_array(sitk.GetArrayViewFromImage(heatmap), heatmap))
    if d == 2:
        geometry = _display_geometry_2d(ImageGeometry.of(image), max_size)
        rgb = _render_panel(image, geometry, window, heatmap, heat_max, landmarks, truth, None, inference)
    else:
        center = (
            _default_center(image, landmarks, truth)
            if center_lps is None
            else np.asarray(center_lps, dtype=np.float64).reshape(3)
        )
        panels = [
            _render_panel(image, g, window, heatmap, heat_max, landmarks, truth, slab_mm, inference)
            for g in display_geometries_3d(ImageGeometry.of(image), center, max_size)
        ]
        rgb = _side_by_side(panels)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = sitk.GetImageFromArray(rgb, isVector=True)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("PNGImageIO")  # PNG whatever the suffix
    writer.SetFileName(str(path))
    writer.Execute(out)
    return path


# --- geometry of the displayed panels -------------------------------------------------------


def _display_geometry_2d(geometry: ImageGeometry, max_size: int) -> ImageGeometry:
    """The image's own pixel grid resampled to (nearly) square pixels, longest side <= max_size."""
    size = np.asarray(geometry.size, dtype=np.float64)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    extent = size * spacing
    pitch = max(float(spacing.min()), float(extent.max()) / max_size)
    out_size = np.clip(np.round(extent / pitch), 1, max_size).astype(int)
    out_spacing = extent / out_size
    # Keep the outer pixel edges of the input and output grids together.
    first_index = -0.5 + 0.5 * out_spacing / spacing
    origin = geometry.index_to_physical(first_index)
    return ImageGeometry(
        tuple(int(s) for s in out_size),
        tuple(float(s) for s in out_spacing),
        tuple(float(o) for o in origin),
        geometry.direction,
    )


def _bounding_box(geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS) min and max of the image's voxel edges."""
    d = geometry.dimension
    edges = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in geometry.size], indexing="ij")).reshape(d, -1).T
    corners = geometry.index_to_physical(edges)
    return corners.min(axis=0), corners.max(axis=0)


def display_geometries_3d(geometry: ImageGeometry, center_lps: np.ndarray, max_size: int = 1024) -> list[ImageGeometry]:
    """The axial, coronal and sagittal display grids (each of size (w, h, 1)) through `center_lps`.

    All three share one isotropic pixel pitch (the finest image spacing, or coarser so that the
    panels side by side, with `PANEL_GAP` pixels between them, fit in max_size x max_size) and cover
    the image's physical bounding box in their in-plane directions.
    """
    lo, hi = _bounding_box(geometry)
    extent = hi - lo
    mid = (lo + hi) / 2.0
    center = np.asarray(center_lps, dtype=np.float64)
    axes = [tuple(np.asarray(a) for a in _PANEL_AXES[name]) for name in PANEL_ORDER]
    widths = [float(np.abs(c) @ extent) for c, _, _ in axes]
    heights = [float(np.abs(r) @ extent) for _, r, _ in axes]
    available = max(max_size - 2 * PANEL_GAP, 3)
    pitch = max(min(geometry.spacing), sum(widths) / available, max(heights) / max_size, 1e-6)
    while True:
        cols = [max(1, int(round(w / pitch))) for w in widths]
        rows = [max(1, int(round(h / pitch))) for h in heights]
        if sum(cols) + 2 * PANEL_GAP <= max_size and max(rows) <= max_size:
            break
        pitch *= 1.01
    out = []
    for (col_dir, row_dir, normal), n_col, n_row in zip(axes, cols, rows):
        # In-plane: centered on the bounding box; through-plane: at the chosen point.
        panel_center = mid + normal * float(normal @ (center - mid))
        origin = panel_center - col_dir * (n_col - 1) / 2.0 * pitch - row_dir * (n_row - 1) / 2.0 * pitch
        direction = np.column_stack([col_dir, row_dir, normal])
        out.append(
            ImageGeometry(
                (n_col, n_row, 1),
                (pitch, pitch, pitch),
                tuple(float(o) for o in origin),
                tuple(direction.ravel().tolist()),
            )
        )
    return out


def _default_center(image: sitk.Image, landmarks: LandmarkSet, truth: LandmarkSet | None) -> np.ndarray:
    for s in (landmarks, truth):
        if s is not None and s.present.any():
            return s.points_lps[s.present].mean(axis=0)
    lo, hi = _bounding_box(ImageGeometry.of(image))
    return (lo + hi) / 2.0


# --- pixel values -----------------------------------------------------------------------------


def _as_scalar_array(array: np.ndarray, image: sitk.Image, combine: str = "max") -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array.max(axis=-1) if combine == "max" else array.mean(axis=-1)
    return array


def _finite_max(array: np.ndarray) -> float:
    flat = np.asarray(array, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    return float(flat.max()) if flat.size else 0.0


def _window(image: sitk.Image) -> tuple[float, float]:
    """1st and 99th percentile of the image (subsampled for large volumes); min/max if degenerate."""
    array = _as_scalar_array(sitk.GetArrayViewFromImage(image), image, combine="mean").ravel()
    step = max(1, array.size // _MAX_WINDOW_SAMPLES)
    sample = np.asarray(array[::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _reference(geometry: ImageGeometry) -> sitk.Image:
    ref = sitk.Image([int(s) for s in geometry.size], sitk.sitkUInt8)
    return geometry.apply_to(ref)


def _resample(image: sitk.Image, geometry: ImageGeometry, default: float) -> np.ndarray:
    """Linear resampling onto the display grid; returns a (rows, cols) float array."""
    vector = image.GetNumberOfComponentsPerPixel() > 1
    resampled = sitk.Resample(
        image,
        _reference(geometry),
        sitk.Transform(),
        sitk.sitkLinear,
        default,
        sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled)
    if vector:
        array = array.mean(axis=-1)
    array = array.reshape(geometry.size[1], geometry.size[0])  # 3D panels have one slice
    return np.nan_to_num(array.astype(np.float64), nan=default)


def _heat_colors(h: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white map of values in [0, 1]; shape (..., 3) floats in [0, 255]."""
    return np.stack([np.clip(3.0 * h, 0, 1), np.clip(3.0 * h - 1, 0, 1), np.clip(3.0 * h - 2, 0, 1)], axis=-1) * 255.0


def _render_panel(
    image: sitk.Image,
    geometry: ImageGeometry,
    window: tuple[float, float],
    heatmap: sitk.Image | None,
    heat_max: float | None,
    landmarks: LandmarkSet,
    truth: LandmarkSet | None,
    slab_mm: float | None,
    inference: InferenceConfig,
) -> np.ndarray:
    lo, hi = window
    gray = np.clip((_resample(image, geometry, lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if heatmap is not None and heat_max is not None and heat_max > 0:
        if heatmap.GetNumberOfComponentsPerPixel() > 1:
            components = [
                sitk.VectorIndexSelectionCast(heatmap, i, sitk.sitkFloat32)
                for i in range(heatmap.GetNumberOfComponentsPerPixel())
            ]
            h = np.max([_resample(c, geometry, 0.0) for c in components], axis=0)
        else:
            h = _resample(heatmap, geometry, 0.0)
        h = np.clip(h / heat_max, 0.0, 1.0)
        alpha = (0.65 * h)[..., None]
        rgb = rgb * (1.0 - alpha) + _heat_colors(h) * alpha
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    _draw_landmarks(rgb, geometry, landmarks, truth, slab_mm, inference)
    return rgb


def _side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    x = 0
    for i, p in enumerate(panels):
        top = (height - p.shape[0]) // 2
        canvas[top : top + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1]
        if i < len(panels) - 1:
            canvas[:, x : x + PANEL_GAP] = GAP_COLOR
            x += PANEL_GAP
    return canvas


# --- markers -------------------------------------------------------------------------------------


def _matched_truth(landmarks: LandmarkSet, truth: LandmarkSet) -> LandmarkSet:
    unknown = [n for n in truth.names if n not in landmarks.names]
    if unknown:
        raise DataError(f"truth landmarks {unknown} are not among the predicted names {landmarks.names}")
    return truth.reordered(landmarks.names)


def marker_radius(shape: tuple[int, ...]) -> int:
    """Radius in pixels of the predicted-landmark discs on a panel of the given (rows, cols) shape."""
    return max(2, int(round(max(shape[:2]) / 150.0)))


def _draw_landmarks(
    rgb: np.ndarray,
    geometry: ImageGeometry,
    landmarks: LandmarkSet,
    truth: LandmarkSet | None,
    slab_mm: float | None,
    inference: InferenceConfig,
) -> None:
    r = marker_radius(rgb.shape)

    def to_pixels(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = geometry.physical_to_index(points)
        visible = np.all(np.isfinite(points), axis=1)
        if slab_mm is not None:  # third index axis is the slice normal, in units of the pitch
            visible &= np.abs(index[:, 2] * geometry.spacing[2]) <= slab_mm
        return index[:, :2], visible

    pred_xy, pred_visible = to_pixels(landmarks.points_lps)
    if truth is not None:
        true_xy, true_visible = to_pixels(truth.points_lps)
        ring = r + 3
        for i in range(len(landmarks.names)):
            offset = pred_xy[i] - true_xy[i]
            length = float(np.hypot(*offset)) if pred_visible[i] and true_visible[i] else 0.0
            if length > ring:  # from the ring's edge, so the true position itself stays visible
                _line(rgb, true_xy[i] + offset * (ring / length), pred_xy[i], WHITE)
        for i in map(int, np.flatnonzero(true_visible)):
            _ring(rgb, true_xy[i], ring, 1.2, CYAN)
    conf = landmarks.confidences
    for i in map(int, np.flatnonzero(pred_visible)):
        _disc(rgb, pred_xy[i], r + 1, OUTLINE)
        _disc(rgb, pred_xy[i], r, confidence_color(None if conf is None else float(conf[i]), inference))


def _box(rgb: np.ndarray, center: np.ndarray, radius: float):
    cx, cy = float(center[0]), float(center[1])
    x0, x1 = max(0, int(math.floor(cx - radius))), min(rgb.shape[1], int(math.ceil(cx + radius)) + 1)
    y0, y1 = max(0, int(math.floor(cy - radius))), min(rgb.shape[0], int(math.ceil(cy + radius)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    # Measure from the pixel the center falls in, so the disc is centered on that pixel.
    dist2 = (xx - round(cx)) ** 2 + (yy - round(cy)) ** 2
    return (slice(y0, y1), slice(x0, x1)), dist2


def _disc(rgb: np.ndarray, center: np.ndarray, radius: float, color) -> None:
    box = _box(rgb, center, radius + 1)
    if box is not None:
        region, dist2 = box
        rgb[region][dist2 <= radius * radius + 0.5] = color


def _ring(rgb: np.ndarray, center: np.ndarray, radius: float, width: float, color) -> None:
    box = _box(rgb, center, radius + 1)
    if box is not None:
        region, dist2 = box
        dist = np.sqrt(dist2)
        rgb[region][(dist <= radius + 0.5) & (dist > radius - width + 0.5)] = color


def _line(rgb: np.ndarray, p0: np.ndarray, p1: np.ndarray, color) -> None:
    steps = int(math.ceil(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1])))) + 1
    if steps > 4 * (rgb.shape[0] + rgb.shape[1]):  # far off-panel: clip the sampling
        steps = 4 * (rgb.shape[0] + rgb.shape[1])
    t = np.linspace(0.0, 1.0, steps)
    x = np.round(p0[0] + t * (p1[0] - p0[0])).astype(int)
    y = np.round(p0[1] + t * (p1[1] - p0[1])).astype(int)
    keep = (x >= 0) & (x < rgb.shape[1]) & (y >= 0) & (y < rgb.shape[0])
    rgb[y[keep], x[keep]] = color

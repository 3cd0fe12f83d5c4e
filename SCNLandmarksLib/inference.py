"""Prediction: model file + image -> named landmarks in physical space, confidences and heatmaps.

The image is normalised and resampled onto an axis-aligned grid of the model's spacing that covers
its whole physical extent (any size, any orientation); the network runs on it (in overlapping
tiles, max-merged, when the grid is very large); each landmark is the maximum of its final heatmap,
refined below the voxel and mapped through the grid's exact index-to-physical transform. A landmark
whose final heatmap is too weak but whose local appearance shows it in the field of view is placed
there and flagged low confidence (Predictor._seen_in_view); "missing" is for the others.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import LoadedModel, load_model
from .calibration import distance_evidence, peak_evidence
from .data.preparation import (
    PreparedImage,
    grid_positions,
    normalize_image,
    prepare_normalized,
    resample_to_grid,
    resample_to_grids,
)
from .errors import Cancelled, DataError
from .geometry import ImageGeometry, axis_aligned_grid, covering_grid, mirror_points
from .heatmaps import gaussian_heatmaps, peak_height, refine_peaks
from .io.images import as_scalar_image, read_image
from .landmark_set import LandmarkSet
from .models import HeatmapOutput, LocalAppearanceNet
from .pose import Pose, fit_pose, trial_scales
from .vocabulary import Cancel, HeatmapKind, LandmarkStatus, Precision, Progress

log = logging.getLogger(__name__)

# At most this many passes in the canonical pose after the first pass (see _detect_in_canonical_pose).
CANONICAL_PASSES = 2
BATCH_IMAGES_IN_FLIGHT = 2  # images processed at once in batch mode
CPU_REFINEMENT_CHUNK = 8  # refinement patches per forward pass on a CPU
REFINEMENT_PROGRESS = 0.9  # where the progress bar stands when the refinement starts
# How far the refinement's extra views (InferenceConfig.refinement_views) are centred from the coarse
# point, as a fraction of the patch's half-extent: on the ISBI model's validation images, views at
# 0.1-0.4 of it all helped, those at 0.25-0.35 most; the landmark stays well inside every patch.
REFINEMENT_VIEW_SHIFT = 0.28
# The canonical pass's grid grows beyond the training grid's size by blocks of this many cells, a
# multiple of every network's pooling factors (2^(levels - 1) <= 16, sc_downsample 8 or 16): the
# network then pools the same cells of the anatomy together as on the training-size grid.
GRID_GROWTH_CELLS = 16
# A landmark whose final heatmap is too weak (a pose the spatial configuration never learnt) is placed
# where its local-appearance heatmap peaks, weighted by a Gaussian around where the model's mean
# configuration, fitted to the confident points, puts it; the Gaussian's sigma is this fraction of that
# configuration's RMS radius. On the 901 annotated hands of the hand model's source, 99 % of each
# landmark's positions lie within 0.46 of the radius (the thumb tip; 0.11-0.36 for the others) of
# where the fitted mean puts it.
CONFIGURATION_SPREAD = 0.5
# Within this many of a found landmark's sigmas of its point, a local-appearance heatmap's answer is
# taken for that landmark's (look-alike anatomy: the hand model's thumb joints answer at other joints).
FOUND_SIGMAS = 2.0
# A voxel whose 3^d neighbourhood of normalised intensities spans less than this lies in a blank
# region (a cut-off field of view, padding): no anatomy to see there.
BLANK_RANGE = 0.02


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(device)


# Where the CPU's bfloat16 arithmetic and its maker are read from: developers set them to check the
# other machine kinds' behaviour on one machine (with oneDNN's ONEDNN_MAX_CPU_ISA capped to match).
BFLOAT16_HARDWARE_VARIABLE = "SCN_LANDMARKS_CPU_BFLOAT16"
CPU_VENDOR_VARIABLE = "SCN_LANDMARKS_CPU_VENDOR"
CPU_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo ("" where it cannot be read), read once: the CPU does not change while a process runs."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(name: str) -> str:
    """The first /proc/cpuinfo line's value for `name` ("" where there is none)."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_bfloat16_hardware() -> str | None:
    """How this CPU computes bfloat16, as Linux reports it: "amx" (Intel AMX matrix units),
    "avx512_bf16" (bfloat16 dot products in AVX-512: AMD Zen 4 and later, Intel Cooper Lake, and
    Intel CPUs with AMX whose virtual machine hides it) or None (emulated in float32, slower than
    float32 itself; also where it cannot be read). The variable BFLOAT16_HARDWARE_VARIABLE ("amx",
    "avx512_bf16" or "none") overrides the reading."""
    forced = os.environ.get(BFLOAT16_HARDWARE_VARIABLE)
    if forced is not None:
        if forced not in ("amx", "avx512_bf16", "none"):
            raise DataError(f"{BFLOAT16_HARDWARE_VARIABLE}={forced!r}: use amx, avx512_bf16 or none")
        return None if forced == "none" else forced
    flags = _cpuinfo_field("flags").split()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def cpu_vendor() -> str | None:
    """The CPU's maker: "intel", "amd" or None (another, or unreadable); CPU_VENDOR_VARIABLE ("intel", "amd" or
    "other") overrides the reading."""
    forced = os.environ.get(CPU_VENDOR_VARIABLE)
    if forced is not None:
        if forced not in ("intel", "amd", "other"):
            raise DataError(f"{CPU_VENDOR_VARIABLE}={forced!r}: use intel, amd or other")
        return None if forced == "other" else forced
    return CPU_VENDORS.get(_cpuinfo_field("vendor_id"))


def bfloat16_is_faster_on_this_cpu() -> bool:
    """Whether the networks run faster in bfloat16 than in float32 here, as measured per machine kind
    (each extra image in one `detect`, benchmarks/inference.py; README, "Speed"): with AMX 1.4-2x
    faster (its convolutions 4x); with AVX-512 BF16 on an AMD EPYC 1.5x faster (the brain, measured
    by the project's reviewers); with AVX-512 BF16 on an Intel Xeon without AMX 1.24-1.28x slower
    (brain, cephalogram), likely because its float32 runs on two full-width AVX-512 FMA units where
    Zen 4 splits 512-bit operations in two."""
    hardware = cpu_bfloat16_hardware()
    return hardware == "amx" or (hardware == "avx512_bf16" and cpu_vendor() == "amd")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the networks' appearance layers compute in (a Precision): 'auto' is bfloat16 on a CPU
    where it was measured faster than float32 (bfloat16_is_faster_on_this_cpu; points unchanged to a
    tenth of a cell: see the README's speed section), float32 elsewhere (GPUs included: not measured)."""
    if precision not in set(Precision):
        raise DataError(f"unknown precision {precision!r}; use one of: {', '.join(Precision)}")
    if precision == Precision.AUTO:
        return torch.bfloat16 if device.type == "cpu" and bfloat16_is_faster_on_this_cpu() else torch.float32
    return torch.bfloat16 if precision == Precision.BFLOAT16 else torch.float32


def view_directions(views: int, dimension: int) -> np.ndarray:
    """(views, dimension): the zero vector (the centred view), then views - 1 unit vectors spread
    evenly around it: on a circle in 2D, on a sphere (Fibonacci lattice) in 3D."""
    steps = np.arange(views - 1, dtype=np.float64)
    if dimension == 2:
        angles = 2.0 * np.pi * steps / max(views - 1, 1)
        around = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        heights = 1.0 - 2.0 * (steps + 0.5) / max(views - 1, 1)
        angles = np.pi * (3.0 - np.sqrt(5.0)) * steps
        ring = np.sqrt(1.0 - heights**2)
        around = np.stack([ring * np.cos(angles), ring * np.sin(angles), heights], axis=1)
    return np.concatenate([np.zeros((1, dimension)), around])


def configuration_radius(points: np.ndarray) -> float:
    """The RMS distance of a landmark configuration's points (N, d; NaN rows ignored) from their mean."""
    return float(np.sqrt(np.nanmean(np.sum((points - np.nanmean(points, axis=0)) ** 2, axis=1))))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size) with at least `overlap` shared."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return sorted({round(i * (size - tile) / (count - 1)) for i in range(count)})


@torch.inference_mode()
def run_network(network: torch.nn.Module, sample: torch.Tensor, max_voxels: int) -> HeatmapOutput:
    """Forward one (1, C, *grid) sample; grids above `max_voxels` go through overlapping tiles.

    Tiles overlap by a quarter of their size and are merged by taking the maximum, so a landmark
    seen near a tile border in one tile is seen well inside another.
    """
    spatial = sample.shape[2:]
    if math.prod(spatial) <= max_voxels:
        return network(sample)
    tile = [min(s, int(max_voxels ** (1.0 / len(spatial)))) for s in spatial]
    starts = [tile_starts(s, t, t // 4) for s, t in zip(spatial, tile)]
    merged: dict[str, torch.Tensor] = {}
    for corner in itertools.product(*starts):
        window = tuple(slice(c, c + t) for c, t in zip(corner, tile))
        output = network(sample[(slice(None), slice(None), *window)])
        for kind in HeatmapKind:
            part = getattr(output, kind)
            if part is None:
                continue
            if kind not in merged:
                merged[kind] = torch.full((*part.shape[:2], *spatial), -math.inf, device=part.device)
            target = merged[kind][(slice(None), slice(None), *window)]
            torch.maximum(target, part, out=target)
    return HeatmapOutput(merged[HeatmapKind.FINAL], merged[HeatmapKind.LOCAL], merged.get(HeatmapKind.SPATIAL))


@dataclass
class Prediction:
    """Landmarks of one image, with access to its heatmaps in the input image's geometry.

    Attributes:
        landmarks: names, LPS positions (NaN rows = missing) and confidences in [0, 1].
        status: per landmark: detected, low confidence or missing (no point: outside the field of
            view, cut off, or not seen at all; a landmark the image shows in a pose the model did
            not expect is placed by its local appearance as low confidence).
        timings: seconds per stage.
        mirrored: the landmarks were found on the image's mirror image (models with a mirror axis,
            e.g. a left-facing cephalogram for a right-facing model); positions and heatmaps are
            in the image as given.
        evidence: per evidence measure the calibration uses (see calibration.EVIDENCE), (N,) values.
        flagged: (N,) True for points expected to be worse than their landmark usually is; None
            when the model is not calibrated (then `landmarks.expected_errors` is None too, and
            `landmarks.coverage_radii`, which a calibration fitted before them does not give either).
        pose: where the image's anatomy lies relative to the model's canonical pose (see pose.py);
            None when the model has no mean configuration or too few points were found to fit one.
        canonical_pass: the points come from a second pass in the canonical pose.
    """

    landmarks: LandmarkSet
    status: list[LandmarkStatus]
    timings: dict[str, float] = field(default_factory=dict)
    _grid: ImageGeometry | None = None
    _reference: sitk.Image | None = None
    _heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    mirrored: bool = False
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    flagged: np.ndarray | None = None
    pose: Pose | None = None
    canonical_pass: bool = False

    @property
    def confidences(self) -> np.ndarray:
        """(N,) confidence of each landmark in [0, 1] (a prediction always has them)."""
        assert self.landmarks.confidences is not None
        return self.landmarks.confidences

    @property
    def heatmap_kinds(self) -> list[str]:
        """The heatmap kinds kept by predict(..., heatmaps=True) (empty otherwise)."""
        return list(self._heatmaps)

    def heatmap(
        self, kind: str = HeatmapKind.FINAL, landmark: int | None = None, scaled_per_landmark: bool = False
    ) -> sitk.Image:
        """One heatmap (or the maximum over all landmarks) resampled to the input image's geometry.

        Args:
            kind: "final" (H_app * H_sc), "local" (H_app) or "spatial" (H_sc).
            landmark: landmark index, or None for the maximum over landmarks.
            scaled_per_landmark: with `landmark` None, divide each landmark's heatmap by its own
                maximum first, so every landmark shows, however weak its peak (a brain's 32 overlapping
                heatmaps otherwise read as one blob of the strongest ones).
        Returns:
            float32 sitk.Image with the input image's size, spacing, origin and direction.
        """
        if not self._heatmaps or self._grid is None or self._reference is None:
            raise ValueError("heatmaps were not kept: call predict(..., heatmaps=True)")
        if kind not in self._heatmaps:
            raise ValueError(f"no '{kind}' heatmap for this model; available: {sorted(self._heatmaps)}")
        values = self._heatmaps[kind]
        if landmark is not None:
            array = values[landmark]
        elif scaled_per_landmark:
            peaks = values.reshape(len(values), -1).max(axis=1).reshape((-1,) + (1,) * (values.ndim - 1))
            array = (values / np.where(peaks > 0, peaks, 1.0)).max(axis=0)
        else:
            array = values.max(axis=0)
        on_grid = self._grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32)))
        return sitk.Resample(on_grid, self._reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _part(progress: Progress | None, low: float, high: float, prefix: str = "") -> Progress | None:
    """`progress` for a part of the work that runs from fraction `low` to `high` of the whole, its
    messages after `prefix`."""
    if progress is None:
        return None
    return lambda fraction, message: progress(low + (high - low) * fraction, prefix + message)


class Predictor:
    """A loaded model, ready to detect landmarks on images."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        path: Path | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        self.path = path  # the model file, when loaded from one
        self.device = device
        self.compute_dtype = compute_dtype  # what the networks' appearance layers compute in
        self.description = loaded.description
        self.coarse = loaded.coarse
        self.refinement = loaded.refinement
        for stage in (self.coarse, self.refinement):
            for module in [] if stage is None else stage.network.modules():
                if isinstance(module, LocalAppearanceNet):
                    module.compute_dtype = None if compute_dtype == torch.float32 else compute_dtype
        # The model file's decoding settings; replace (dataclasses.replace) to decode differently.
        self.inference = loaded.description.inference
        # None: not calibrated (no expected errors). `evidence_measures` are computed on every
        # detection; calibrating sets them all.
        self.calibration = loaded.description.calibration
        self.evidence_measures: tuple[str, ...] = () if self.calibration is None else self.calibration.evidence
        self.landmark_names: list[str] = list(self.description.landmark_names)
        self.dimension: int = self.description.dimension
        # The canonical pose detection brings images into; None = detect in the image's own pose only.
        self.mean_configuration = loaded.description.mean_configuration
        # A clinic's convention learned by fine-tuning, added to every detection (None: none).
        self.convention = loaded.description.convention

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "auto", precision: str = "auto") -> Predictor:
        """Load a model file (safely: tensors and JSON only) onto 'auto', 'cpu' or 'cuda', to compute
        in `precision` (see resolve_precision)."""
        device = resolve_device(device)
        compute_dtype = resolve_precision(precision, device)
        loaded = load_model(path, device)
        dimension = loaded.description.dimension
        # oneDNN's CPU convolutions run 20-35 % faster channels-last (same results to float rounding).
        # Only here, where the predictor owns the networks: training's are its own.
        layout = torch.channels_last_3d if dimension == 3 else torch.channels_last
        networks = [stage.network for stage in (loaded.coarse, loaded.refinement) if stage is not None]
        warm_up = torch.zeros(1, loaded.description.in_channels, *[16] * dimension, device=device)
        if device.type == "cpu":
            for network in networks:
                network.to(memory_format=layout)  # type: ignore[call-overload]  # stubs lack it
            warm_up = warm_up.contiguous(memory_format=layout)
        predictor = cls(loaded, device, Path(path), compute_dtype)
        if compute_dtype != torch.float32:
            # A process's first bfloat16 pass sometimes rounds differently from all later ones (the
            # brain model's first points moved by 0.01-0.02 mm in 1 process of 5): a tiny pass per
            # network spends it, so that a result does not depend on coming first.
            with torch.inference_mode():
                for network in networks:
                    network(warm_up)
        return predictor

    def predict(
        self,
        image: sitk.Image,
        heatmaps: bool = False,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        source: str = "image",
        refine: bool = True,
    ) -> Prediction:
        """Detect the model's landmarks on one image.

        Args:
            image: SimpleITK image (2D or 3D as the model; color becomes grayscale; a single-slice
                3D image is taken as 2D for a 2D model).
            heatmaps: keep the heatmaps for `Prediction.heatmap`.
            progress: called with (fraction done, message).
            cancel: polled between stages; returning True raises Cancelled.
            source: how to name the image in error messages (e.g. its file path).
            refine: run the model's refinement stage, if it has one (False = single-resolution
                result of the coarse SCN, for comparisons).
        """
        start = time.perf_counter()
        image = as_scalar_image(image, self.dimension, source)
        normalized = normalize_image(image, self.description.intensity)
        return self._detect_in_canonical_pose(
            image, normalized, time.perf_counter() - start, heatmaps, progress, cancel, refine
        )

    def predict_files(
        self,
        paths: Iterable[str | Path],
        heatmaps: bool = False,
        cancel: Cancel | None = None,
        read: Callable[[Path, int], sitk.Image] = read_image,
    ) -> Iterator[tuple[Path, Prediction | DataError]]:
        """Detect landmarks on many image files (batch mode), yielding results in input order.

        Two images are in flight at a time, each on half the torch threads: one image's reading and
        normalisation (single-threaded) overlaps the other's network pass, which keeps every core busy.
        A file that cannot be used yields its DataError instead of a prediction, so one bad file
        does not stop the batch.

        Args:
            read: reads a file as a scalar float32 image of the given dimension (read_image, or one
                that hands over images read ahead).
        """

        files = [Path(p) for p in paths]
        threads = torch.get_num_threads()
        workers = min(BATCH_IMAGES_IN_FLIGHT, len(files), threads) or 1
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scn-detect") as pool:
                in_flight = deque(pool.submit(self.predict_file, p, heatmaps, cancel, read) for p in files[:workers])
                for number, path in enumerate(files):
                    result = in_flight.popleft().result()
                    if number + workers < len(files):
                        in_flight.append(
                            pool.submit(self.predict_file, files[number + workers], heatmaps, cancel, read)
                        )
                    yield path, result
        finally:
            torch.set_num_threads(threads)

    def predict_file(
        self,
        path: Path,
        heatmaps: bool = False,
        cancel: Cancel | None = None,
        read: Callable[[Path, int], sitk.Image] = read_image,
    ) -> Prediction | DataError:
        """Detect landmarks on one image file, as batch mode does each: a file that cannot be used
        gives its DataError (naming the file) instead of a prediction, and so does an unforeseen
        failure on it (logged), as on a cluster: one image never stops a batch."""
        try:
            start = time.perf_counter()
            image = read(path, self.dimension)
            read_s = time.perf_counter() - start
            normalized = normalize_image(image, self.description.intensity)
            prediction = self._detect_in_canonical_pose(
                image, normalized, time.perf_counter() - start - read_s, heatmaps, None, cancel, True
            )
        except DataError as error:
            return error
        except Cancelled:
            raise
        except Exception as error:
            log.exception("%s: detection failed", path)
            return DataError(f"{path}: detection failed ({type(error).__name__}: {error})")
        prediction.timings["read"] = read_s
        return prediction

    def refine_points(self, image: sitk.Image, points_lps: np.ndarray, source: str = "image") -> np.ndarray:
        """Points placed by other means (a registered template's, a rough placement) refined by the
        model's refinement stage, as `predict` refines its coarse points: in the canonical pose fitted
        to them when the model has a mean configuration. Models without a refinement stage, and
        points whose refined peak is too weak, keep the points given. (N, d) LPS in and out."""
        points = np.asarray(points_lps, dtype=np.float64)
        normalized = normalize_image(as_scalar_image(image, self.dimension, source), self.description.intensity)
        fitted = self._fitted_pose(points, np.ones(len(points)))
        pose = Pose.identity(self.dimension) if fitted is None else fitted
        refined, _ = self._refine(pose.canonical_image(normalized), pose.to_canonical(points))
        return pose.to_image(refined)

    def _pose_weights(self, prediction: Prediction) -> np.ndarray:
        """The confidences of a pass's points, as weights of its pose fit; 0 for the points placed by
        their local appearance alone (_seen_in_view), whose configuration the model doubts."""
        confidences = prediction.confidences
        return np.where(confidences >= self.inference.missing_below, confidences, 0.0)

    def _fitted_pose(self, points: np.ndarray, weights: np.ndarray, mirrored: bool = False) -> Pose | None:
        """The pose of the model's mean configuration fitted to `points` (rigid, or a similarity for
        models in pixels); None without a mean configuration or with too few points."""
        if self.mean_configuration is None:
            return None
        return fit_pose(
            self.mean_configuration.array, points, weights, with_scale=self.description.in_pixels, mirrored=mirrored
        )

    def _detect_in_canonical_pose(
        self,
        image: sitk.Image,
        normalized: sitk.Image,
        prepare_s: float,
        heatmaps: bool,
        progress: Progress | None,
        cancel: Cancel | None,
        refine: bool,
    ) -> Prediction:
        """Detect in the image's own pose (models in pixels: at trial scales), fit the model's mean
        configuration to the points, and unless that pose is canonical already, detect again in the
        canonical pose (see pose.py); positions, heatmaps and expected errors in the image as given.

        The passes run the coarse network only and the poses are fitted to its points: the
        refinement runs once, on the pass whose points are returned (a refined first pass cost a
        real brain 0.4 s for points that only placed the second)."""
        refining = refine and self.refinement is not None
        passes = _part(progress, 0.0, REFINEMENT_PROGRESS if refining else 1.0)
        geometry = ImageGeometry.of(image)
        if self.mean_configuration is not None and self.description.in_pixels:
            coarse = self.description.coarse
            extent = np.ptp(geometry.corners_physical(), axis=0)
            trials = [
                Pose.scaling_about(geometry.center_physical(), s)
                for s in trial_scales(extent, np.multiply(coarse.grid_size, coarse.grid_spacing))
            ]
        else:
            trials = [Pose.identity(self.dimension)]
        # Without a mean configuration the first pass is the only one.
        first_share = 1.0 if self.mean_configuration is None else 0.5
        start = time.perf_counter()
        first, trial = None, trials[0]
        for number, candidate in enumerate(trials):
            found = self._detect(
                candidate.canonical_image(image),
                candidate.canonical_image(normalized),
                prepare_s if number == 0 else 0.0,
                heatmaps,
                _part(passes, first_share * number / len(trials), first_share * (number + 1) / len(trials)),
                cancel,
            )
            if first is None or found.confidences.mean() > first.confidences.mean():
                first, trial = found, candidate
            if first.confidences.mean() >= self.inference.low_confidence_below:
                break
        assert first is not None  # there is always a first trial
        # The frame the first pass detected in: the trial's, reflected for a mirror-image result.
        axis = self.inference.mirror_axis
        detected_in = trial.after(
            Pose.mirror(axis, trial.canonical_geometry(geometry).center_physical())
            if first.mirrored and axis is not None
            else Pose.identity(self.dimension)
        )
        first = self._in_image_frame(first, trial, image if heatmaps else None)
        first.timings["first pass"] = time.perf_counter() - start
        if self.mean_configuration is None:
            return self._completed(first, normalized, detected_in, refine, progress, cancel)
        pose = self._fitted_pose(first.landmarks.points_lps, self._pose_weights(first), first.mirrored)
        first.pose = pose
        if pose is None or detected_in.inverse().after(pose).is_canonical():
            return self._completed(first, normalized, detected_in, refine, progress, cancel)
        # The network's points lean towards its canonical pose, so a first pass underestimates a
        # large rotation (by 3-4 degrees at 30 on the brain); a pass in the fitted pose corrects most
        # of that, and one more, if the pose fitted to its points still differs, the rest.
        start = time.perf_counter()
        for number in range(CANONICAL_PASSES):
            found_in = pose
            low, high = 0.5 + 0.5 * number / CANONICAL_PASSES, 0.5 + 0.5 * (number + 1) / CANONICAL_PASSES
            found = self._detect_once(
                pose.canonical_image(image),
                pose.canonical_image(normalized),
                0.0,
                heatmaps,
                _part(passes, low, high, "canonical pose: "),
                cancel,
                canonical=True,
            )
            found = self._in_image_frame(found, pose, image if heatmaps else None)
            found.timings = {**first.timings, "canonical passes": time.perf_counter() - start}
            found.pose, found.canonical_pass, found.mirrored = pose, True, first.mirrored
            refitted = self._fitted_pose(found.landmarks.points_lps, self._pose_weights(found), first.mirrored)
            if refitted is None or pose.inverse().after(refitted).is_canonical():
                break
            pose = refitted
        return self._completed(found, normalized, found_in, refine, progress, cancel)

    def _completed(
        self,
        prediction: Prediction,
        normalized: sitk.Image,
        frame: Pose,
        refine: bool,
        progress: Progress | None,
        cancel: Cancel | None,
    ) -> Prediction:
        """The last pass's prediction (coarse points in the image as given, found in `frame`) with its
        points refined on fine patches in that frame, and their expected errors."""
        if cancel is not None and cancel():
            raise Cancelled("landmark detection cancelled")
        coarse_points = frame.to_canonical(prediction.landmarks.points_lps)
        points, view_spread = coarse_points, np.zeros(len(coarse_points))
        if refine and self.refinement is not None:
            if progress is not None:
                progress(REFINEMENT_PROGRESS, "refining landmarks on fine patches")
            start = time.perf_counter()
            points, view_spread = self._refine(frame.canonical_image(normalized), coarse_points)
            prediction.timings["refinement"] = time.perf_counter() - start
        evidence = prediction.evidence
        if self.evidence_measures:
            cell = float(np.mean(self.description.coarse.grid_spacing))
            evidence["refinement_shift"] = distance_evidence(coarse_points, [points], cell)
            evidence["view_spread"] = view_spread
        expected = radii = coverage = None
        if self.calibration is not None:
            # In the frame's unit, as the evidence; the image's unit differs by the frame's scale.
            expected = np.where(np.all(np.isfinite(points), axis=1), self.calibration.expected_errors(evidence), np.nan)
            prediction.flagged = self.calibration.flagged(expected)
            expected = expected * frame.scale
            radii = self.calibration.coverage_radii(expected)
            coverage = None if radii is None else self.calibration.coverage
        points = frame.to_image(points)
        if self.convention is not None:
            points = self.convention.applied(points, prediction.pose)
        prediction.landmarks = LandmarkSet(
            self.landmark_names, points, prediction.confidences, expected, radii, coverage
        )
        if progress is not None:
            progress(1.0, "done")
        return prediction

    @staticmethod
    def _in_image_frame(prediction: Prediction, pose: Pose, reference: sitk.Image | None) -> Prediction:
        """A pass's prediction made on an image given a pose's canonical frame, in the image as given."""
        landmarks = prediction.landmarks
        prediction.landmarks = LandmarkSet(landmarks.names, pose.to_image(landmarks.points_lps), landmarks.confidences)
        prediction._grid = None if prediction._grid is None else pose.moved(prediction._grid)
        prediction._reference = reference
        return prediction

    def _detect(
        self,
        image: sitk.Image,
        normalized: sitk.Image,
        prepare_s: float,
        heatmaps: bool,
        progress: Progress | None,
        cancel: Cancel | None,
    ) -> Prediction:
        """A coarse pass on the image as given; for a model with a mirror axis, unless that result's
        mean confidence reaches the model's `mirror_pass_below`, also on its mirror image, keeping the
        result with the higher mean confidence."""
        axis = self.inference.mirror_axis
        if axis is None:
            return self._detect_once(image, normalized, prepare_s, heatmaps, progress, cancel)
        # Each pass takes half of the progress bar, so that it never runs backwards.
        given = self._detect_once(image, normalized, prepare_s, heatmaps, _part(progress, 0.0, 0.5), cancel)
        if given.confidences.mean() >= self.inference.mirror_pass_below:
            return given
        start = time.perf_counter()
        center = ImageGeometry.of(image).center_physical()

        def mirror(source: sitk.Image) -> sitk.Image:
            return ImageGeometry.of(source).mirrored(axis, center).apply_to(sitk.Image(source))

        other = self._detect_once(
            mirror(image), mirror(normalized), 0.0, heatmaps, _part(progress, 0.5, 1.0, "mirror image: "), cancel
        )
        if other.confidences.mean() <= given.confidences.mean():
            given.timings["mirror"] = time.perf_counter() - start
            return given
        landmarks = LandmarkSet(
            self.landmark_names, mirror_points(other.landmarks.points_lps, axis, center), other.landmarks.confidences
        )
        grid = None if other._grid is None else other._grid.mirrored(axis, center)
        timings = {**given.timings, "mirror": time.perf_counter() - start}
        return Prediction(
            landmarks,
            other.status,
            timings,
            grid,
            image if heatmaps else None,
            other._heatmaps,
            mirrored=True,
            evidence=other.evidence,
        )

    def _detect_once(
        self,
        image: sitk.Image,
        normalized: sitk.Image,
        prepare_s: float,
        heatmaps: bool,
        progress: Progress | None,
        cancel: Cancel | None,
        canonical: bool = False,
    ) -> Prediction:
        """One pass of the coarse network on the image as given (refinement and expected errors are
        added by `_completed`); `canonical`: the image is in the canonical frame, and the coarse grid
        is the canonical one rather than one covering the image."""

        def step(fraction: float, message: str) -> None:
            if cancel is not None and cancel():
                raise Cancelled("landmark detection cancelled")
            if progress is not None:
                progress(fraction, message)

        step(0.0, "preparing image")
        start = time.perf_counter()
        spacing = self.description.coarse.grid_spacing
        prepared = prepare_normalized(normalized, spacing, self.device)
        grid = self._canonical_grid(prepared.geometry) if canonical else covering_grid(prepared.geometry, spacing)
        sample = resample_to_grid(prepared, grid).unsqueeze(0)
        timings = {"resample": prepare_s + time.perf_counter() - start}

        step(0.3, f"running the network on a {'x'.join(map(str, grid.size))} grid ({self.device.type})")
        start = time.perf_counter()
        output = run_network(self.coarse.network, sample, self.inference.max_grid_voxels)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        timings["network"] = time.perf_counter() - start

        step(0.9, "locating landmarks")
        start = time.perf_counter()
        index, value = refine_peaks(output.final[0].float())
        points = grid.index_to_physical(index.cpu().numpy())
        ideal = peak_height(self.coarse.sigmas, self.description.coarse.gamma, self.dimension)
        confidence = (value / ideal).clamp(0.0, 1.0).cpu().numpy()
        status = [self.inference.status(float(c)) for c in confidence]
        missing = np.array([s == LandmarkStatus.MISSING for s in status], dtype=bool)
        points[missing] = np.nan
        if missing.any() and output.spatial is not None:
            seen = self._seen_in_view(
                output.local[0].float(), sample[0, 0], prepared.geometry, grid, points, confidence
            )
            for k, point in seen.items():
                points[k], status[k] = point, LandmarkStatus.LOW_CONFIDENCE
        timings["peaks"] = time.perf_counter() - start
        evidence: dict[str, np.ndarray] = {}
        if self.evidence_measures:
            start = time.perf_counter()
            evidence = peak_evidence(output.final[0].float(), index, value, ideal, self.coarse.sigmas, spacing)
            if "shift_spread" in self.evidence_measures:
                evidence["shift_spread"] = self._shift_spread(prepared, grid, points)
            timings["evidence"] = time.perf_counter() - start
        kept: dict[str, np.ndarray] = {}
        if heatmaps:
            for kind in HeatmapKind:
                tensor = getattr(output, kind)
                if tensor is not None:
                    kept[kind] = tensor[0].float().cpu().numpy()
        step(1.0, "done")
        landmarks = LandmarkSet(self.landmark_names, points, confidence.astype(np.float64))
        return Prediction(
            landmarks,
            status,
            timings,
            grid if heatmaps else None,
            image if heatmaps else None,
            kept,
            evidence=evidence,
        )

    def _seen_in_view(
        self,
        local: torch.Tensor,
        sample: torch.Tensor,
        image_geometry: ImageGeometry,
        grid: ImageGeometry,
        points: np.ndarray,
        confidences: np.ndarray,
    ) -> dict[int, np.ndarray]:
        """Positions for the landmarks without a point (NaN rows of `points`) that the image shows:
        a landmark the spatial configuration did not expect there (a finger bent further than in
        any training image) still has its local appearance. Each is placed at the maximum of its
        local-appearance heatmap under a Gaussian around where the mean configuration, fitted to the
        points found, puts it, with its peak (FOUND_SIGMAS of its sigma) within the field of view
        (inside the image, not blank), and away from the points found (within FOUND_SIGMAS of their
        sigmas the evidence is theirs).
        It gets a position when its local appearance there reaches the model's missing threshold of
        the ideal peak height: it would have been found had the configuration agreed (H_sc <= 1).

        Args:
            local: (N, *grid) local-appearance heatmaps; sample: (*grid) the network input.
            points: (N, d) the pass's points (NaN = none); confidences: (N,).
        Returns:
            {landmark index: (d,) position} for the landmarks seen.
        """
        found = np.all(np.isfinite(points), axis=1)
        positions = grid_positions(grid, local.device, torch.float64)
        index = image_geometry.physical_to_index(positions.cpu().numpy())
        inside = np.all((index >= -0.5) & (index <= np.asarray(image_geometry.size) - 0.5), axis=-1)
        pool = torch.nn.functional.max_pool2d if self.dimension == 2 else torch.nn.functional.max_pool3d
        span = pool(sample[None], 3, 1, 1)[0] + pool(-sample[None], 3, 1, 1)[0]
        out_of_view = (~torch.as_tensor(inside, device=local.device) | (span < BLANK_RANGE)).float()
        away = torch.ones_like(out_of_view, dtype=torch.bool)
        for k in np.flatnonzero(found):
            near = torch.linalg.norm(positions - torch.as_tensor(points[k], device=local.device), dim=-1)
            away &= near >= FOUND_SIGMAS * float(self.coarse.sigmas[k])
        expected = None
        if self.mean_configuration is not None:
            mean = self.mean_configuration.array
            pose = fit_pose(mean, points, np.where(found, confidences, 0.0), with_scale=True)
            if pose is not None:
                expected_lps = pose.to_image(mean)
                expected = torch.as_tensor(expected_lps, device=local.device)
                spread = CONFIGURATION_SPREAD * configuration_radius(expected_lps)
        ideal = peak_height(self.coarse.sigmas, self.description.coarse.gamma, self.dimension)
        seen = {}
        for k in np.flatnonzero(~found):
            reach = FOUND_SIGMAS * float(self.coarse.sigmas[k])
            # Its whole peak in view: one at the edge of the view may be a landmark beyond it.
            cells = math.ceil(reach / min(grid.spacing))
            allowed = away & (pool(out_of_view[None], 2 * cells + 1, 1, cells)[0] == 0)
            score = torch.where(allowed, local[k].clamp(min=0.0), 0.0)
            if expected is not None and bool(torch.isfinite(expected[k]).all()):
                prior = torch.exp(-0.5 * ((positions - expected[k]) ** 2).sum(dim=-1) / spread**2)
                score = score * prior.to(score.dtype)
            # The prior picks the peak; the local appearance alone places it (the prior's slope
            # would pull it towards the configuration's guess).
            chosen = positions.reshape(-1, self.dimension)[int(score.flatten().argmax())]
            window = allowed & (torch.linalg.norm(positions - chosen, dim=-1) <= reach)
            peak, value = refine_peaks(torch.where(window, local[k], 0.0)[None])
            if float(value[0]) >= self.inference.missing_below * float(ideal[k]):
                seen[int(k)] = grid.index_to_physical(peak[0].cpu().numpy())
        return seen

    def _canonical_grid(self, image_geometry: ImageGeometry) -> ImageGeometry:
        """The coarse grid of a pass in the canonical pose: the training grid's size, centered on the
        mean configuration. The same anatomy is then sampled at the same positions whatever the
        image's extent; a grid covering the image shifts its cells with the image's borders, which
        moved a cephalogram's points by 2.6 px between turns of 10-20 degrees (0.9 px on this grid).

        Where that leaves out part of the image within CONFIGURATION_SPREAD of the configuration's
        RMS radius of a landmark of the mean configuration (where _seen_in_view looks for it), the
        grid grows on that side by blocks of GRID_GROWTH_CELLS, on the same cells: the hand model's
        grid, centered on its landmarks' mean (pulled towards the 13 wrist points), left out its own
        mean middle fingertip and 15 mm beyond its mean thumb.
        """
        assert self.mean_configuration is not None  # only passes in the canonical pose use it
        coarse = self.description.coarse
        mean = self.mean_configuration.array
        grid = axis_aligned_grid(np.nanmean(mean, axis=0), coarse.grid_size, coarse.grid_spacing)
        landmarks = grid.physical_to_index(mean)
        image = grid.physical_to_index(image_geometry.corners_physical())
        margin = CONFIGURATION_SPREAD * configuration_radius(mean) / np.asarray(grid.spacing)
        low = np.maximum(np.nanmin(landmarks, axis=0) - margin, image.min(axis=0))
        high = np.minimum(np.nanmax(landmarks, axis=0) + margin, image.max(axis=0)) - (np.asarray(grid.size) - 1)
        below, above = (np.ceil(np.maximum(v, 0.0) / GRID_GROWTH_CELLS) * GRID_GROWTH_CELLS for v in (-low, high))
        if not below.any() and not above.any():
            return grid
        origin = np.asarray(grid.origin) - below * np.asarray(grid.spacing)
        size = np.asarray(grid.size) + below + above
        return dataclasses.replace(grid, size=tuple(int(n) for n in size), origin=tuple(float(o) for o in origin))

    def _coarse_prior(self, grids: list[ImageGeometry], centers: np.ndarray, channels: torch.Tensor) -> torch.Tensor:
        """(patches, *patch size): on each patch (axis-aligned, all of one size and spacing), the coarse
        stage's Gaussian of its landmark's learned sigma around the landmark's coarse point (`centers`,
        (patches, d)), 1 at its peak: the training target's shape, without its height."""
        index = np.stack([grid.physical_to_index(center) for grid, center in zip(grids, centers)])
        sigmas = self.coarse.sigmas[channels].to(self.device)
        patches = torch.ones(1, len(grids), dtype=torch.bool)
        shape = gaussian_heatmaps(torch.as_tensor(index)[None], patches, grids[0].size, grids[0].spacing, sigmas, 1.0)
        return shape[0] / peak_height(sigmas, 1.0, self.dimension).reshape(-1, *[1] * self.dimension)

    def _shift_spread(self, prepared: PreparedImage, grid: ImageGeometry, points: np.ndarray) -> np.ndarray:
        """The "shift_spread" evidence: how far the points move when the coarse grid is shifted by
        half a cell along every axis, one way and the other."""
        cell = np.asarray(grid.spacing)
        others = []
        for sign in (-0.5, 0.5):
            shifted = dataclasses.replace(grid, origin=tuple(np.asarray(grid.origin) + sign * cell))
            output = run_network(
                self.coarse.network, resample_to_grid(prepared, shifted).unsqueeze(0), self.inference.max_grid_voxels
            )
            index, _ = refine_peaks(output.final[0].float())
            others.append(shifted.index_to_physical(index.cpu().numpy()))
        return distance_evidence(points, others, float(np.mean(cell)))

    @torch.inference_mode()
    def _refine(self, normalized: sitk.Image, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coarse-to-fine: each found landmark's maximum on fine patches around its coarse position (one
        centred on it, and the model's further `refinement_views`), averaged over the confident views.

        All patches go through the refinement network in one batch. A landmark whose refined peak is
        below the missing threshold in every view keeps its coarse position.

        Returns:
            The points, and the "view_spread" evidence: log(1 + RMS distance of the confident views'
            points from their mean, in refinement cells); 0 with one view.
        """
        description, refinement = self.description.refinement, self.refinement
        found = np.flatnonzero(np.all(np.isfinite(points), axis=1))
        spread = np.zeros(len(points))
        if description is None or refinement is None or len(found) == 0:
            return points, spread
        spacing, size = description.grid_spacing, description.grid_size
        prepared = prepare_normalized(normalized, spacing, self.device)
        half_extent = (np.asarray(size) - 1.0) / 2.0 * np.asarray(spacing)
        shifts = REFINEMENT_VIEW_SHIFT * half_extent * view_directions(self.inference.refinement_views, self.dimension)
        grids = [axis_aligned_grid(points[k] + shift, size, spacing) for shift in shifts for k in found]
        batch = resample_to_grids(prepared, grids)
        # On CPUs a few patches per forward pass keep the activations in cache: 8 at a time ran
        # 1.5x faster than all 32 brain patches at once. GPUs take the whole batch.
        chunk = len(grids) if self.device.type == "cuda" else CPU_REFINEMENT_CHUNK
        final = torch.cat([refinement.network(part).final for part in batch.split(chunk)])
        channels = torch.as_tensor(np.tile(found, len(shifts)))
        heatmaps = final[torch.arange(len(grids)), channels].float()
        index, value = refine_peaks(heatmaps)
        ideal = peak_height(refinement.sigmas[channels], description.gamma, self.dimension)
        confident = ((value / ideal).cpu().numpy() >= self.inference.missing_below).reshape(len(shifts), len(found))
        if self.inference.refinement_prior:
            index, _ = refine_peaks(heatmaps * self._coarse_prior(grids, points[channels.numpy()], channels))
        views = np.stack([grid.index_to_physical(i) for grid, i in zip(grids, index.cpu().numpy())])
        views = views.reshape(len(shifts), len(found), self.dimension)
        refined = points.copy()
        for m, k in enumerate(found):
            if confident[:, m].any():
                kept = views[confident[:, m], m]
                refined[k] = kept.mean(axis=0)
                spread[k] = np.sqrt(np.mean(np.sum((kept - refined[k]) ** 2, axis=1)))
        return refined, np.log1p(spread / float(np.mean(spacing)))

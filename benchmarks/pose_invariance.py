"""Pose invariance of the shipped models: the same anatomy wherever the head lies. One JSON line per case.

    python benchmarks/pose_invariance.py [--only 3d|2d] [--poses 8] [--images 082 083 ...]
        [--rotations -20 -10 10 20] [--scales 0.5 0.6 0.8 1.25 1.6 2] [--before]

3D: brain-afids-32 on the MNI template (shared data) with its header rigidly moved (seeded random
rotations up to +-30 deg about each axis and translations up to +-50 mm, plus 30 deg about each
axis alone); the points found are mapped back through the exact inverse of the move and compared
with the points found on the unmoved template ("shift"), and with the truth ("error").
2D: cephalometric-19 on validation cephalograms (shared data), rotated in plane about their center
and resampled by factors, both with SimpleITK (in memory) and then stripped of their geometry like a
PNG (spacing 1, origin 0); the points are mapped back to the original pixels. The images are
never written anywhere.

`--before` also runs each case without pose normalisation (the model's mean configuration
ignored), which is how detection worked before. Lines: {"model", "case", "mode", "shift_mean",
"shift_max", "error_mean", "detection_s", "canonical_pass", ...}; then one summary line per
model, mode and kind of case.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SCNLandmarksLib.data.augmentation import rotation_matrix
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Prediction, Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.pose import Pose

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = REPO / "Resources" / "Models"
BRAIN = SHARED / "afids" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
BRAIN_TRUTH = SHARED / "afids" / "afids_groundtruth.csv"
CEPH = SHARED / "ceph"
VALIDATION = [f"{n:03d}" for n in range(82, 101) if n != 87]  # 087 is training image 014 again

# A case: a transformed image and the map from physical points on it back to the original image.
Case = tuple[sitk.Image, Callable[[np.ndarray], np.ndarray]]


def moved_header(image: sitk.Image, degrees: np.ndarray, translation: np.ndarray) -> Case:
    rotation = rotation_matrix(torch.tensor(np.radians(degrees)), 3).numpy()
    move = Pose(rotation, 1.0, np.asarray(translation, dtype=np.float64))
    return move.moved(ImageGeometry.of(image)).apply_to(sitk.Image(image)), move.to_canonical


def as_png(image: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """The image with a PNG's geometry (spacing 1, origin 0, identity); and its former origin."""
    origin = np.asarray(image.GetOrigin())
    image.SetOrigin((0.0, 0.0))
    image.SetSpacing((1.0, 1.0))
    return image, origin


def rotated_2d(image: sitk.Image, degrees: float) -> Case:
    """The picture rotated by `degrees` in plane about its center, on a grid holding all of it."""
    center = ImageGeometry.of(image).center_physical()
    transform = sitk.Euler2DTransform(center.tolist(), math.radians(degrees))
    inverse = transform.GetInverse()
    corners = np.array([inverse.TransformPoint(c.tolist()) for c in ImageGeometry.of(image).corners_physical()])
    low, high = np.floor(corners.min(axis=0)), np.ceil(corners.max(axis=0))
    size = [int(v) + 1 for v in high - low]
    rotated = sitk.Resample(image, size, transform, sitk.sitkLinear, low.tolist(), (1.0, 1.0), (1, 0, 0, 1), 0.0)
    rotated, origin = as_png(rotated)
    return rotated, lambda p: np.array(
        [transform.TransformPoint(q.tolist()) if np.isfinite(q).all() else q for q in p + origin]
    )


def resampled_2d(image: sitk.Image, factor: float) -> Case:
    """The picture at `factor` times its resolution (anti-aliased when shrinking), pixel corners kept."""
    if factor < 1.0:
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 / factor)
    size = [max(1, round(s * factor)) for s in image.GetSize()]
    spacing = [s / factor for s in image.GetSpacing()]
    origin = [o - 0.5 * s + 0.5 * t for o, s, t in zip(image.GetOrigin(), image.GetSpacing(), spacing)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, (1, 0, 0, 1), 0.0)
    resampled, origin = as_png(resampled)
    return resampled, lambda p: origin + p / factor


def detect(predictor: Predictor, image: sitk.Image, pose: bool) -> tuple[Prediction, float]:
    saved = predictor.mean_configuration
    predictor.mean_configuration = saved if pose else None
    try:
        started = time.perf_counter()
        prediction = predictor.predict(image)
        return prediction, time.perf_counter() - started
    finally:
        predictor.mean_configuration = saved


def measure(
    predictor: Predictor, name: str, cases: dict[str, tuple[str, Case]], truth: np.ndarray, modes: list[str], unit: str
) -> list[dict]:
    """Run the unmoved image (case "original") and each moved one in every mode; one line per case."""
    lines = []
    for mode in modes:
        reference = None
        for case, (kind, (image, to_original)) in cases.items():
            prediction, seconds = detect(predictor, image, mode == "after")
            points = to_original(prediction.landmarks.points_lps)
            if reference is None:
                reference = points
            shift = np.linalg.norm(points - reference, axis=1)
            line = {
                "model": name,
                "case": case,
                "kind": kind,
                "mode": mode,
                f"shift_mean_{unit}": round(float(np.nanmean(shift)), 3),
                f"shift_max_{unit}": round(float(np.nanmax(shift)), 3),
                f"error_mean_{unit}": round(float(np.nanmean(np.linalg.norm(points - truth, axis=1))), 3),
                "detection_s": round(seconds, 3),
                "canonical_pass": prediction.canonical_pass,
                "timings": {k: round(v, 2) for k, v in prediction.timings.items()},
                "mirrored": prediction.mirrored,
                "fitted_rotation_deg": None if prediction.pose is None else round(prediction.pose.rotation_deg, 2),
                "fitted_scale": None if prediction.pose is None else round(prediction.pose.scale, 4),
            }
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


def summarize(lines: list[dict], unit: str) -> None:
    groups = defaultdict(list)
    for line in lines:
        groups[(line["model"], line["mode"], line["kind"])].append(line)
    for (model, mode, kind), members in groups.items():

        def mean(key: str, members: list[dict] = members) -> float:
            return round(float(np.mean([m[key] for m in members])), 3)

        print(
            json.dumps(
                {
                    "summary": model,
                    "mode": mode,
                    "kind": kind,
                    "cases": len(members),
                    f"shift_mean_{unit}": mean(f"shift_mean_{unit}"),
                    f"shift_worst_case_mean_{unit}": round(max(m[f"shift_mean_{unit}"] for m in members), 3),
                    f"error_mean_{unit}": mean(f"error_mean_{unit}"),
                    "detection_s": mean("detection_s"),
                    "canonical_passes": sum(m["canonical_pass"] for m in members),
                }
            ),
            flush=True,
        )


def brain(args: argparse.Namespace, modes: list[str]) -> None:
    predictor = Predictor.from_file(args.model_3d, "cpu")
    image = read_image(BRAIN, 3)
    rows = {r["abbreviation"]: r for r in csv.DictReader(open(BRAIN_TRUTH))}
    truth = np.array([[float(rows[n][k]) for k in ("x_lps", "y_lps", "z_lps")] for n in predictor.landmark_names])
    random = np.random.default_rng(args.seed)
    poses = [(np.eye(3)[axis] * 30.0, np.zeros(3)) for axis in range(3)]
    poses += [(random.uniform(-30, 30, 3), random.uniform(-50, 50, 3)) for _ in range(args.poses)]
    cases: dict[str, tuple[str, Case]] = {"original": ("original", (image, lambda p: p))}
    for degrees, translation in poses:
        cases[f"moved header {np.round(degrees, 1).tolist()} deg, {np.round(translation, 1).tolist()} mm"] = (
            "moved header",
            moved_header(image, degrees, translation),
        )
    summarize(measure(predictor, "brain-afids-32", cases, truth, modes, "mm"), "mm")


def ceph_truth(image_id: str, names: list[str]) -> np.ndarray:
    rows = [r for r in csv.DictReader(open(CEPH / "landmarks_mean.csv")) if r["image"] == f"{image_id}.png"]
    by_name = {r["landmark_name"]: (float(r["x"]), float(r["y"])) for r in rows}
    return np.array([by_name.get(n, (np.nan, np.nan)) for n in names])


def cephalograms(args: argparse.Namespace, modes: list[str]) -> None:
    predictor = Predictor.from_file(args.model_2d, "cpu")
    lines = []
    for image_id in args.images:
        image = read_image(CEPH / "images" / f"{image_id}.png", 2)
        cases: dict[str, tuple[str, Case]] = {"original": ("original", (image, lambda p: p))}
        for degrees in args.rotations:
            cases[f"{image_id} rotated {degrees:g} deg"] = ("rotated", rotated_2d(image, degrees))
        for factor in args.scales:
            cases[f"{image_id} resampled x{factor:g}"] = ("resampled", resampled_2d(image, factor))
        lines += measure(
            predictor, "cephalometric-19", cases, ceph_truth(image_id, predictor.landmark_names), modes, "px"
        )
    summarize(lines, "px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("3d", "2d"))
    parser.add_argument("--model-3d", default=MODELS / "brain-afids-32" / "model.safetensors")
    parser.add_argument("--model-2d", default=MODELS / "cephalometric-19" / "model.safetensors")
    parser.add_argument("--poses", type=int, default=8, help="random header moves of the brain (3 fixed ones too)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--images", nargs="+", default=VALIDATION)
    parser.add_argument("--rotations", nargs="+", type=float, default=[-20.0, -10.0, 10.0, 20.0])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 0.6, 0.8, 1.25, 1.6, 2.0])
    parser.add_argument("--before", action="store_true", help="also without pose normalisation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = ["before", "after"] if args.before else ["after"]
    if args.only != "2d":
        brain(args, modes)
    if args.only != "3d":
        cephalograms(args, modes)


if __name__ == "__main__":
    main()

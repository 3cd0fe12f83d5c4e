"""A hand model on the 6 shared hand radiographs with a finger turned beyond their poses, as JSON lines.

    python benchmarks/shared_data/hand_articulation.py [--model MODEL] [--hands ID...]

Each hand (a 0.25 mm copy of its image) is warped into each pose of POSES by the training's articulation
(`Articulation.turning`: a thin-plate spline through the landmarks, so the turned landmarks are exactly
where the warped image shows them) and detected. Per hand and pose: the visible landmarks reported
missing, the mean error of the visible points found (mm), and the landmarks turned out of the image that
got a point anyway; the last line sums over all. The shipped model trained on these 6 hands: the figures
measure poses, not unseen hands. For unseen hands in unusual poses, give a fold model of `hand_kfold.py`
and its held-out hands (`--hands`). MODEL: the shipped hand-xray-37 by default.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SCNLandmarksLib.config import load_config
from SCNLandmarksLib.data.augmentation import Articulation, chain_indices, turned_chains
from SCNLandmarksLib.data.preparation import PreparedImage, grid_positions, sample_at
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.vocabulary import LandmarkStatus

HAND = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "hand-xray-37"
SPACING_MM = 0.25  # of the warped copies: finer than the model's finest grid (0.55 mm)
# Degrees per joint, chains in train.toml's order (thumb, index, middle, ring, little; base first).
# Positive turns the thumb away from the palm (the shared hands are left hands, thumb on the right).
STILL = [[0.0] * 3] + [[0.0] * 4] * 4
POSES = {
    "as given": STILL,
    "thumb abducted 25": [[25.0, 0.0, 0.0]] + STILL[1:],
    "thumb adducted 25": [[-25.0, 0.0, 0.0]] + STILL[1:],
    "thumb abducted 35, bent": [[35.0, 15.0, 10.0]] + STILL[1:],
    "middle finger bent": STILL[:2] + [[0.0, 10.0, 8.0, 8.0]] + STILL[3:],
    "little finger spread": STILL[:4] + [[0.0, -15.0, -8.0, -8.0]],
}


def articulated(image: sitk.Image, points_lps: np.ndarray, chains: list[list[int]], angles_deg: list[list[float]]):
    """The image (resampled to SPACING_MM) with its chains turned, and the turned landmarks (N, 2)."""
    geometry = ImageGeometry.of(image)
    reference = sitk.Image(
        [int(round(n * s / SPACING_MM)) for n, s in zip(geometry.size, geometry.spacing)], sitk.sitkFloat32
    )
    reference.SetSpacing((SPACING_MM,) * 2)
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    fine = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fine_geometry = ImageGeometry.of(fine)
    points = torch.as_tensor(points_lps)
    turned = turned_chains(points, chains, [torch.tensor(a, dtype=torch.float64).deg2rad() for a in angles_deg])
    source = Articulation.turning(points, turned, fine_geometry).source_positions(grid_positions(fine_geometry, "cpu"))
    values = torch.as_tensor(sitk.GetArrayFromImage(fine))[None]
    warped = sitk.GetImageFromArray(sample_at(PreparedImage(values, fine_geometry, 0.0), source)[0].numpy())
    warped.CopyInformation(fine)
    return warped, turned.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HAND / "model.safetensors")
    parser.add_argument("--shared", type=Path, default=Path("../shared/data/hand"))
    parser.add_argument("--hands", nargs="+", help="these hands only (ids of landmarks.csv; default: all)")
    args = parser.parse_args()
    predictor = Predictor.from_file(args.model, "cpu", "float32")
    names = predictor.landmark_names
    chains = chain_indices(names, load_config(HAND / "train.toml").augmentation.articulation_chains)
    visible_missing, placed_outside, all_errors = 0, 0, []
    with open(args.shared / "landmarks.csv", newline="") as table:
        rows = {row[0]: np.asarray(row[1:], dtype=np.float64).reshape(len(names), 2) for row in csv.reader(table)}
    if args.hands:
        unknown = sorted(set(args.hands) - set(rows))
        if unknown:
            parser.error(f"no hand {unknown} in {args.shared / 'landmarks.csv'}")
        rows = {hand: rows[hand] for hand in args.hands}
    for hand, pixels in rows.items():
        image = read_image(args.shared / "images" / f"{hand}.mha", 2)
        points = ImageGeometry.of(image).index_to_physical(pixels)
        for pose, angles in POSES.items():
            warped, truth = articulated(image, points, chains, angles)
            prediction = predictor.predict(warped)
            visible = ImageGeometry.of(warped).contains(truth, 0.0)
            missing = [names[k] for k in np.flatnonzero(visible) if prediction.status[k] == LandmarkStatus.MISSING]
            outside = [names[k] for k in np.flatnonzero(~visible) if prediction.status[k] != LandmarkStatus.MISSING]
            errors = np.linalg.norm(prediction.landmarks.points_lps - truth, axis=1)[visible]
            errors = errors[np.isfinite(errors)]
            visible_missing += len(missing)
            placed_outside += len(outside)
            all_errors += errors.tolist()
            line = {"hand": hand, "pose": pose, "visible_missing": missing, "placed_outside": outside}
            print(
                json.dumps({**line, "mean_mm": round(float(errors.mean()), 2), "max_mm": round(float(errors.max()), 1)})
            )
    errors = np.asarray(all_errors)
    print(
        json.dumps(
            {
                "all": f"{len(rows)} hands x {len(POSES)} poses",
                "visible_missing": visible_missing,
                "placed_outside": placed_outside,
                "mean_mm": round(float(errors.mean()), 2),
                "median_mm": round(float(np.median(errors)), 2),
                "points": len(errors),
            }
        )
    )


if __name__ == "__main__":
    main()

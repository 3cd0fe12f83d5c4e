"""The points every shipped model finds on fixed images, saved to or compared with a JSON file.

A restructuring must not change any result: run this with --save before the change and with
--compare after it (same machine, same torch), e.g.

    python benchmarks/shipped_points.py --save /tmp/before.json
    python benchmarks/shipped_points.py --compare /tmp/before.json --tolerance 1e-4

The brain model runs on the bundled MNI sample with and without its refinement stage; the
cephalometric models (no sample ships with them) on a head profile cut from the same sample at cephalogram
size (cephalometric-19 as given and left-right mirrored, so both of its passes are exercised); the hand
model on hand 3167 of the shared data when `../shared/data/hand` is there (no hand image ships). Points,
confidences, statuses and expected errors are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from SCNLandmarksLib.inference import Predictor  # noqa: E402
from SCNLandmarksLib.io.images import read_image  # noqa: E402
from SCNLandmarksLib.vocabulary import Precision  # noqa: E402

MODELS = REPO / "Resources" / "Models"
SAMPLE = REPO / "Resources" / "Samples" / "MNI152NLin2009cAsym_T1w_2mm.nii.gz"
HAND = REPO.parent / "shared" / "data" / "hand" / "images" / "3167.mha"


def head_profile(volume: sitk.Image) -> sitk.Image:
    """The mid-sagittal slice of a head volume, facing right, as a 2D picture of cephalogram size
    (1840 x 1552 pixels, spacing 1): the size the cephalometric model was trained on."""
    size = volume.GetSize()
    array = sitk.GetArrayFromImage(volume)[::-1, :, size[0] // 2]  # rows: superior at the top
    picture = sitk.GetImageFromArray(np.ascontiguousarray(array[:, ::-1]))
    picture.SetSpacing((2.0, 2.0))
    reference = sitk.Image([s * 16 for s in picture.GetSize()], sitk.sitkFloat32)
    reference.SetSpacing((0.125, 0.125))
    resampled = sitk.Resample(picture, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    resampled.SetSpacing((1.0, 1.0))
    return resampled


def mirrored(picture: sitk.Image) -> sitk.Image:
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(picture)[:, ::-1]))
    flipped.CopyInformation(picture)
    return flipped


def shipped_points(precision: str) -> dict[str, dict[str, list]]:
    torch.manual_seed(0)
    volume = read_image(SAMPLE)
    profile = head_profile(volume)
    brain = Predictor.from_file(MODELS / "brain-afids-32" / "model.safetensors", "cpu", precision)
    ceph = Predictor.from_file(MODELS / "cephalometric-19" / "model.safetensors", "cpu", precision)
    isbi = Predictor.from_file(MODELS / "cephalometric-isbi-19" / "model.safetensors", "cpu", precision)
    runs = {
        "brain": (brain, volume, True),
        "brain coarse only": (brain, volume, False),
        "ceph": (ceph, profile, True),
        "ceph mirrored": (ceph, mirrored(profile), True),
        "ceph isbi": (isbi, profile, True),
    }
    if HAND.is_file():
        hand = Predictor.from_file(MODELS / "hand-xray-37" / "model.safetensors", "cpu", precision)
        runs["hand"] = (hand, read_image(HAND, 2), True)
    results = {}
    for name, (predictor, image, refine) in runs.items():
        prediction = predictor.predict(image, refine=refine)
        expected_errors = prediction.landmarks.expected_errors
        results[name] = {
            "points": np.nan_to_num(prediction.landmarks.points_lps, nan=-1e9).tolist(),
            "confidences": prediction.landmarks.confidences.tolist(),
            "expected_errors": [] if expected_errors is None else np.nan_to_num(expected_errors, nan=-1.0).tolist(),
            "status": [str(s) for s in prediction.status],
            "mirrored": prediction.mirrored,
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the points to this JSON file")
    action.add_argument("--compare", type=Path, help="compare the points with this JSON file")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference (mm or px)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=tuple(Precision),
        help="what the networks compute in (float32: any machine)",
    )
    args = parser.parse_args()
    results = shipped_points(args.precision)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.save}")
        return 0
    expected = json.loads(args.compare.read_text())
    worst = 0.0
    same = True
    for name, result in results.items():
        if name not in expected:
            print(f"{name}: not in {args.compare}")
            same = False
            continue
        before = expected[name]
        difference = float(np.max(np.abs(np.subtract(result["points"], before["points"]))))
        confidence = float(np.max(np.abs(np.subtract(result["confidences"], before["confidences"]))))
        # Files saved before expected errors were recorded hold none.
        expected_error = float(
            np.max(
                np.abs(np.subtract(result["expected_errors"], before.get("expected_errors", result["expected_errors"])))
            )
        )
        worst = max(worst, difference)
        agrees = (
            difference <= args.tolerance
            and confidence <= args.tolerance
            and expected_error <= args.tolerance
            and result["status"] == before["status"]
            and result["mirrored"] == before["mirrored"]
        )
        same &= agrees
        print(
            f"{name}: largest point difference {difference:.2e}, confidence {confidence:.2e}, "
            f"expected error {expected_error:.2e}, "
            f"statuses {'same' if result['status'] == before['status'] else 'DIFFER'}"
            f"{'' if agrees else '  <-- differs'}"
        )
    print(
        f"{'same' if same else 'DIFFERENT'} results (largest point difference {worst:.2e}, "
        f"tolerance {args.tolerance:g})"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Calibrate a model on the held-out images of k-fold models trained with its recipe, and write it.

    python benchmarks/shared_data/hand_kfold.py --out runs/hand-kfold-art
    python benchmarks/shared_data/calibrate_from_folds.py runs/hand-xray-37/model.safetensors \
        --folds runs/hand-kfold-art/fold{0,1,2} --datasets runs/data/hand-fold{0,1,2}/dataset.toml \
        --flag-above 2 3 --coverage 0.85 --out Resources/Models/hand-xray-37/model.safetensors --overwrite

A model trained on every annotated image has no held-out image of its own (the 6 hands). Each fold
model, trained the same way on fewer images, is measured on the images it never saw (the "test"
split); their errors and evidence, pooled, calibrate the model given. The expected errors are those
of a model trained on fewer images, so they lean high for the model trained on all of them.
A model that has held-out images of its own joins the pool as one more "fold": give the model file
itself, with its dataset and split (`--split test test test validation`; one split serves all).
The held-out figures in the calibration are cross-validated by image over the pooled images
(`--cv-folds`; default one fold per image).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from SCNLandmarksLib.bundle import save_description
from SCNLandmarksLib.calibration import (
    CHEAP_EVIDENCE,
    Measurements,
    calibrate,
    calibration_report,
    dataset_cases,
    default_thresholds,
    measure,
)
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.paths import refuse_existing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model to calibrate")
    parser.add_argument(
        "--folds", nargs="+", required=True, help="fold output folders (model.safetensors in each) or model files"
    )
    parser.add_argument("--datasets", nargs="+", required=True, help="each fold's dataset spec, in the same order")
    parser.add_argument("--split", nargs="+", default=["test"], help="the held-out split, one for all or one per fold")
    parser.add_argument("--evidence", nargs="+", default=list(CHEAP_EVIDENCE))
    parser.add_argument("--flag-above", type=float, nargs="+", help="error thresholds (model unit) for the AUROC")
    parser.add_argument(
        "--coverage",
        type=float,
        default=0.9,
        help="probability of the coverage radius (split conformal: n held-out images per landmark allow at most "
        "n / (n + 1))",
    )
    parser.add_argument(
        "--cv-folds",
        type=int,
        help="folds by image for the held-out figures and the radius (default: one per image); match the "
        "`scn-landmarks calibrate --folds` a model was calibrated with before",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if len(args.folds) != len(args.datasets):
        parser.error("give one dataset per fold")
    splits = args.split * len(args.folds) if len(args.split) == 1 else args.split
    if len(splits) != len(args.folds):
        parser.error("give one split for all folds or one per fold")
    if args.cv_folds is not None and args.cv_folds < 2:
        parser.error(f"--cv-folds must be at least 2, got {args.cv_folds}")
    refuse_existing([args.out], args.overwrite)

    parts = []
    for folder, dataset, split in zip(args.folds, args.datasets, splits):
        path = Path(folder)
        fold = Predictor.from_file(path if path.is_file() else path / "model.safetensors", "cpu")
        total, cases = dataset_cases(fold, dataset, split)
        parts.append(measure(fold, cases))
        print(f"{folder}: {total} held-out images ({split})", file=sys.stderr)
    pooled = Measurements(
        [i for part in parts for i in part.image_ids],
        np.concatenate([part.errors for part in parts]),
        {m: np.concatenate([part.evidence[m] for part in parts]) for m in parts[0].evidence},
    )
    if args.cv_folds is not None and args.cv_folds > len(pooled.image_ids):
        parser.error(f"--cv-folds {args.cv_folds} is more than the {len(pooled.image_ids)} held-out images")
    predictor = Predictor.from_file(args.model, "cpu")
    thresholds = default_thresholds(predictor.description.unit, args.flag_above)
    held_out = ", ".join(f"{folder} on {split}" for folder, split in zip(args.folds, splits))
    source = f"held-out images of {len(parts)} models ({held_out})"
    calibration, comparison = calibrate(
        predictor,
        pooled,
        tuple(args.evidence),
        thresholds,
        args.cv_folds or len(pooled.image_ids),
        source,
        args.coverage,
    )
    save_description(args.model, args.out, dataclasses.replace(predictor.description, calibration=calibration))
    print(json.dumps(calibration_report(args.out, calibration, comparison), indent=1))


if __name__ == "__main__":
    main()

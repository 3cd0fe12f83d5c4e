"""k-fold error of the hand-xray-37 recipe on the 6 shared hand radiographs, printed as JSON lines.

    python benchmarks/shared_data/prepare_shared_data.py
    python benchmarks/shared_data/hand_kfold.py [--folds 0 1 2] [--out runs/hand-kfold] [--threads N]

Each fold trains the shipped model's recipe, `Resources/Models/hand-xray-37/train.toml` (the
auto-configuration of `scn-landmarks train --dataset`, its edits, and its iteration counts, so that
a fold's model does not depend on what else the machine runs), on its 4 training hands
(`runs/data/hand-fold<k>/dataset.toml`), then measures the error in mm on its 2 held-out hands (the
"test" split, never seen in training, not even to pick an iteration). `--evaluate-only` measures
models already trained in the fold folders. The last line pools all folds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from SCNLandmarksLib.config import load_config
from SCNLandmarksLib.evaluation import evaluate_model
from SCNLandmarksLib.train import train

FOLDS = 3
RECIPE = Path("Resources/Models/hand-xray-37/train.toml")


def train_fold(recipe: Path, spec: Path, out: Path) -> None:
    config = dataclasses.replace(load_config(recipe), dataset=spec, output_dir=out, train_split="train")
    train(config, device="cpu", resume=(out / "checkpoint.pt").is_file())


def fold_errors(metrics_path: Path) -> tuple[list[float], int]:
    """The held-out point errors of one fold and how many points it reported missing."""
    metrics = json.loads(metrics_path.read_text())
    errors = [e for image in metrics["per_image"] for e in image["errors"].values() if e is not None]
    missed = sum(len(image["missed"]) for image in metrics["per_image"])
    return errors, missed


def summary(errors: list[float], missed: int) -> dict:
    values = np.asarray(errors)
    return {
        "points": len(errors),
        "missed": missed,
        "mean_mm": round(float(values.mean()), 3),
        "median_mm": round(float(np.median(values)), 3),
        "max_mm": round(float(values.max()), 3),
        "within_2mm": round(float(np.mean(values <= 2.0)), 3),
        "within_4mm": round(float(np.mean(values <= 4.0)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/data", type=Path)
    parser.add_argument("--out", default="runs/hand-kfold", type=Path)
    parser.add_argument("--recipe", default=RECIPE, type=Path, help="the training configuration each fold uses")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(FOLDS)))
    parser.add_argument("--evaluate-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pooled: list[float] = []
    pooled_missed = 0
    for fold in args.folds:
        spec, out = args.data / f"hand-fold{fold}" / "dataset.toml", args.out / f"fold{fold}"
        if not args.evaluate_only:
            train_fold(args.recipe, spec, out)
        metrics = evaluate_model(out / "model.safetensors", spec, "test", out / "evaluation", device="cpu")
        errors, missed = fold_errors(metrics)
        pooled += errors
        pooled_missed += missed
        print(json.dumps({"fold": fold, **summary(errors, missed)}), flush=True)
    print(json.dumps({"folds": args.folds, **summary(pooled, pooled_missed)}), flush=True)


if __name__ == "__main__":
    main()

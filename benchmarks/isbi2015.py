"""The ISBI 2015 cephalometric benchmark on its public training set, in k folds.

    python benchmarks/isbi2015.py prepare [--data ../shared/data/isbi2015] [--out runs/isbi2015] [--fold-count 5]
    python benchmarks/isbi2015.py train --fold K [--minutes 90] [--architecture scn|unet|downsampling|convonly]
    python benchmarks/isbi2015.py train --fold K --recipe Resources/Models/cephalometric-isbi-19/train.toml
    python benchmarks/isbi2015.py evaluate [--folds 0 1 2 3 4] [--architecture scn] [--model PATH | --recipe CONFIG]

`prepare` writes one dataset spec per fold with `dataset init` (the annotators' mean, pixel units):
fold k holds out every K-th image by id, starting at the k-th, as its "test" split, never trained on;
and `all/dataset.toml`, every image in the training split, for the shipped model (the recipe chosen on
the folds, trained on all 150).
`train` trains a fold as `scn-landmarks train --dataset` does (the self-configured recipe for the
time budget, `autoconfig.config_for_dataset`); `--architecture` swaps the coarse network for one of
the library's baselines (the seed's comparison of SCN with U-Net, downsampling and conv-only nets,
Payer et al. 2019, table 2); `--recipe CONFIG` trains a fixed configuration instead (a shipped model's
train.toml: every iteration, no time budget) into `foldK/<the configuration's folder name>`.
`evaluate` detects each fold's test images with its model through the product's detection path and
reports the mean radial error in mm (0.1 mm per pixel) and the success detection rates within
2 / 2.5 / 3 / 4 mm, per fold, pooled and per landmark, against the annotators' mean and against the
senior annotator (the challenge's own ground truth). `--recipe CONFIG` evaluates each fold's model
that `train --recipe CONFIG` trained; `--model PATH` evaluates one model file on the folds given (e.g.
a model trained with `train --dataset` on the 150 images, whose held-aside cases are fold 4, but which
also chose its best iteration there).

The model trained on every image has no held-out image of its own: calibrate it on a fold model's
held-out detections with `benchmarks/shared_data/calibrate_from_folds.py` (the cephalometric-isbi-19 card).

The ISBI test sets (ids 151-400) are not used here: the project's reviewers measure them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from SCNLandmarksLib.autoconfig import config_for_dataset
from SCNLandmarksLib.config import load_config
from SCNLandmarksLib.data.dataset_init import init_dataset
from SCNLandmarksLib.evaluation import Statistics, evaluate
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.landmark_set import LandmarkSet
from SCNLandmarksLib.models import ARCHITECTURES, default_params
from SCNLandmarksLib.train import train

MM_PER_PIXEL = 0.1  # the challenge's images (MANIFEST); the JPEG files carry no spacing
TRUTHS = {"mean": "landmarks_mean.csv", "senior": "landmarks_senior.csv"}
RADII_MM = (2.0, 2.5, 3.0, 4.0)
FINAL_SPEC = Path("all") / "dataset.toml"


def fold_ids(ids: list[str], folds: int, fold: int) -> list[str]:
    """The test images of `fold`: every `folds`-th image id in sorted order, from the `fold`-th."""
    return [image for number, image in enumerate(sorted(ids)) if number % folds == fold]


def write_split_spec(data: Path, spec: Path, splits: dict[str, list[str]]) -> None:
    spec.parent.mkdir(parents=True, exist_ok=True)
    init_dataset(data / "images", data / TRUTHS["mean"], spec, overwrite=True)
    with spec.open("a", encoding="utf-8") as stream:
        stream.write("\n[splits]\n" + "".join(f"{name} = {json.dumps(ids)}\n" for name, ids in splits.items()))


def prepare(data: Path, out: Path, folds: int) -> None:
    ids = [image.name for image in sorted((data / "images").glob("*.jpg"))]
    for fold in range(folds):
        spec = out / f"fold{fold}" / "dataset.toml"
        test = fold_ids(ids, folds, fold)
        write_split_spec(data, spec, {"train": [image for image in ids if image not in test], "test": test})
        print(f"fold {fold}: {len(ids) - len(test)} training, {len(test)} test images: {spec}")
    # The shipped model's spec: the recipe chosen on the folds, trained on every image.
    spec = out / FINAL_SPEC
    write_split_spec(data, spec, {"train": ids})
    print(f"all: {len(ids)} training images (the shipped model's): {spec}")


def run_dir(out: Path, fold: int, architecture: str, recipe: Path | None = None) -> Path:
    """Where fold `fold`'s model trains: named by the recipe's folder (a shipped model's name), else
    by the coarse network's architecture."""
    return out / f"fold{fold}" / (architecture if recipe is None else recipe.resolve().parent.name)


def train_fold(out: Path, fold: int, minutes: float, architecture: str, device: str, recipe: Path | None) -> None:
    spec = out / f"fold{fold}" / "dataset.toml"
    output = run_dir(out, fold, architecture, recipe)
    if recipe is not None:
        # A shipped model's configuration on the fold, as it trained: every iteration, no budget.
        config = dataclasses.replace(load_config(recipe), dataset=spec.resolve(), output_dir=output.resolve())
        budget_s: float | None = None
    else:
        config = config_for_dataset(spec, output, minutes, gpu=device == "cuda")
        budget_s = minutes * 60.0
    if architecture != "scn":
        # The seed's comparison: the same recipe with another coarse network (its default size).
        model = dataclasses.replace(config.model, architecture=architecture, params=default_params(architecture, 2))
        config = dataclasses.replace(config, model=model)
    resume = (output / "checkpoint.pt").is_file()
    result = train(config, device=device, time_budget_s=budget_s, resume=resume)
    print(result.model_path)


def read_truths(data: Path, kind: str, names: list[str]) -> dict[str, LandmarkSet]:
    """Image id -> the annotator's points in mm (pixel centres times MM_PER_PIXEL)."""
    points: dict[str, np.ndarray] = {}
    with (data / TRUTHS[kind]).open(newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            array = points.setdefault(row["image"], np.full((len(names), 2), np.nan))
            array[names.index(row["landmark_name"])] = float(row["x"]), float(row["y"])
    return {image: LandmarkSet(names, array * MM_PER_PIXEL) for image, array in points.items()}


def detect_fold(model: Path, data: Path, test: list[str], device: str) -> dict[str, LandmarkSet]:
    """Image id -> detected points in mm (the model works in pixels, as the JPEGs are read)."""
    predictor = Predictor.from_file(model, device)
    found = {}
    for image in test:
        landmarks = predictor.predict(read_image(data / "images" / image, 2), source=image).landmarks
        found[image] = LandmarkSet(landmarks.names, landmarks.points_lps * MM_PER_PIXEL)
    return found


def _row(label: str, statistics: Statistics) -> str:
    rates = " | ".join(f"{100 * statistics.sdr[r]:.1f}" for r in RADII_MM)
    return f"| {label} | {statistics.mean:.2f} | {statistics.median:.2f} | {rates} | {statistics.missed} |"


def report(
    data: Path,
    out: Path,
    folds: list[int],
    fold_count: int,
    architecture: str,
    model: Path | None,
    recipe: Path | None,
    device: str,
):
    predictions: dict[str, LandmarkSet] = {}
    per_fold = {}
    names: list[str] = []
    ids = sorted(image.name for image in (data / "images").glob("*.jpg"))
    for fold in folds:
        path = model or run_dir(out, fold, architecture, recipe) / "model.safetensors"
        found = detect_fold(path, data, fold_ids(ids, fold_count, fold), device)
        names = next(iter(found.values())).names
        per_fold[fold] = found
        predictions.update(found)
    header = "| | mean (mm) | median (mm) | " + " | ".join(f"<= {r:g} mm (%)" for r in RADII_MM) + " | missed |"
    # The folds' models are named by their folder (an architecture or a recipe's name).
    folder = run_dir(out, folds[0], architecture, recipe).name
    lines = [f"# ISBI 2015 training set, {fold_count}-fold: {folder if model is None else model}", ""]
    summary = {}
    for kind in TRUTHS:
        truths = read_truths(data, kind, names)
        lines += [f"## Against the {kind} annotation", "", header, "|---" * 8 + "|"]
        for fold, found in per_fold.items():
            result = evaluate(found, {i: truths[i] for i in found}, "mm", RADII_MM)
            lines.append(_row(f"fold {fold} ({len(found)} images)", result.overall))
        pooled = evaluate(predictions, {i: truths[i] for i in predictions}, "mm", RADII_MM)
        lines.append(_row(f"**pooled ({len(predictions)} images)**", pooled.overall))
        lines += ["", "| landmark | mean (mm) | median (mm) | " + header.split("| median (mm) | ")[1], "|---" * 8 + "|"]
        lines += [_row(name, pooled.per_landmark[name]) for name in names]
        lines.append("")
        summary[kind] = pooled.to_json()
    print("\n".join(lines))
    target = out / f"report-{folder if model is None else model.parent.name}.md"
    target.write_text("\n".join(lines), encoding="utf-8")
    target.with_suffix(".json").write_text(json.dumps(summary, indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("prepare", "train", "evaluate"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/isbi2015"))
    parser.add_argument("--out", type=Path, default=Path("runs/isbi2015"))
    parser.add_argument("--fold-count", type=int, default=5)
    parser.add_argument("--folds", type=int, nargs="*", help="evaluate: which folds (default: all)")
    parser.add_argument("--fold", type=int, help="train: the fold to train")
    parser.add_argument("--minutes", type=float, default=90.0)
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="scn")
    parser.add_argument("--model", type=Path, help="evaluate: this model file on every fold given")
    parser.add_argument(
        "--recipe",
        type=Path,
        help="train: this training configuration, every iteration; evaluate: the folds' models of it",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recipe is not None and args.architecture != "scn":
        # Both name the folds' model folders: the recipe's holds its own coarse network.
        parser.error("--recipe trains its configuration as it is; --architecture swaps the self-configured one's")
    if args.command == "prepare":
        prepare(args.data, args.out, args.fold_count)
    elif args.command == "train":
        if args.fold is None:
            parser.error("train needs --fold")
        train_fold(args.out, args.fold, args.minutes, args.architecture, args.device, args.recipe)
    else:
        if args.recipe is not None and args.model is not None:
            parser.error("evaluate takes --model (one file for every fold) or --recipe (each fold's model), not both")
        folds = args.folds if args.folds else list(range(args.fold_count))
        report(args.data, args.out, folds, args.fold_count, args.architecture, args.model, args.recipe, args.device)


if __name__ == "__main__":
    main()

"""Turn the project's shared training data (../shared/data, not redistributable here) into datasets.

    python benchmarks/shared_data/prepare_shared_data.py [--shared ../shared/data] [--out runs/data]

Writes, under --out, one folder per dataset with a dataset spec (dataset.toml) the library trains on:
  afids/  the MNI152NLin2009cAsym T1w template with its 32 AFIDs named by abbreviation (AC, PC, ...)
  ceph/   the 100 cephalograms with the mean of the two annotators (pixel units), 81 train / 19 validation
  ceph-10-images/  the same validation split, but only the first 10 training images
  ceph-fold{0,1,2}/  the 81 training images in 3 folds, each held out in turn as the "test" split; the
          others and the 19 validation images train (no "validation" split)
  hand/   the 6 hand radiographs (mm, from each image's spacing), all for training (`dataset init`, then splits)
  hand-fold{0,1,2}/  the same 6 in 3 folds: 4 train, 2 held out as the "test" split (never seen in training)
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from SCNLandmarksLib.data.dataset_init import init_dataset
from SCNLandmarksLib.io.landmarks import write_landmarks
from SCNLandmarksLib.io.paths import image_stem
from SCNLandmarksLib.landmark_set import LandmarkSet

AFIDS_IMAGE = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
SAME_RADIOGRAPH = ("014", "087")  # pixel-identical images, annotated independently (MANIFEST)
CEPH_FOLDS = 3
# Each fold holds out one image of each Digital Hand Atlas series (3xxx, 7xxx).
HAND_FOLDS = (("3167", "7081"), ("3229", "7088"), ("3231", "7232"))


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def prepare_afids(shared: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(shared / "afids_groundtruth.csv")))
    names = [r["abbreviation"] for r in rows]
    points = np.array([[float(r[k]) for k in ("x_lps", "y_lps", "z_lps")] for r in rows])
    write_landmarks(LandmarkSet(names, points), out / "template.mrk.json")
    image = (shared / AFIDS_IMAGE).resolve()
    spec = out / "dataset.toml"
    spec.write_text(
        f'dimension = 3\nlandmarks = {toml_list(names)}\n\n[[images]]\nid = "template"\n'
        f'image = "{image}"\nlandmarks = "template.mrk.json"\nsplit = "train"\n'
    )
    return spec


def prepare_ceph(
    shared: Path, out: Path, validation: int = 20, train_limit: int | None = None, test_fold: int | None = None
) -> Path:
    """Split by image number: the last `validation` images validate, except that 014 and 087 (the
    same radiograph) both train, so validation holds 19 distinct radiographs.

    `train_limit` keeps only the first that many training images (the reduced-data experiment);
    the validation images stay the same.
    `test_fold` (0 to CEPH_FOLDS - 1) holds out every CEPH_FOLDS-th training image as the "test"
    split (014 and 087 in the same fold) and trains on all the others, validation images included,
    with no validation split: held-out errors for the training images, for calibration.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(shared / "landmarks_mean.csv")))
    names = []
    for r in sorted(rows, key=lambda r: int(r["landmark_index"])):
        if r["landmark_name"] not in names:
            names.append(r["landmark_name"])
    with open(out / "landmarks.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "landmark", "x", "y"])
        for r in rows:
            writer.writerow([image_stem(r["image"]), r["landmark_name"], r["x"], r["y"]])
    images = sorted(p for p in (shared / "images").glob("*.png"))
    lines = [
        f'dimension = 2\nlandmarks = {toml_list(names)}\nlandmarks_csv = "landmarks.csv"\ncsv_coordinates = "index"\n'
    ]
    fold_of = {path.stem: number % CEPH_FOLDS for number, path in enumerate(images)}
    fold_of[SAME_RADIOGRAPH[1]] = fold_of[SAME_RADIOGRAPH[0]]
    for number, path in enumerate(images):
        split = "validation" if number >= len(images) - validation else "train"
        if path.stem in SAME_RADIOGRAPH:
            split = "train"  # its twin is a training image: never validate on it
        if split == "train" and train_limit is not None and number >= train_limit:
            continue
        if test_fold is not None:
            split = "test" if split == "train" and fold_of[path.stem] == test_fold else "train"
        lines.append(f'[[images]]\nid = "{path.stem}"\nimage = "{path.resolve()}"\nsplit = "{split}"\n')
    spec = out / "dataset.toml"
    spec.write_text("\n".join(lines))
    return spec


def prepare_hand(shared: Path, out: Path, test: tuple[str, ...] = ()) -> Path:
    """The hand radiographs as a user would import them (`dataset init` on the wide landmark table),
    with `test` held out as the "test" split and the others in the "train" split.

    No "validation" split: training then never looks at the held-out hands, not even to pick its
    best iteration, so their error is a fair estimate for hands of the same source.
    """
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "dataset.toml"
    summary = init_dataset(shared / "images", shared / "landmarks.csv", spec, overwrite=True)
    train = [case for case in sorted(summary.paired) if case not in test]
    splits = f"\n[splits]\ntrain = {toml_list(train)}\n" + (f"test = {toml_list(list(test))}\n" if test else "")
    spec.write_text(spec.read_text() + splits)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", type=Path)
    parser.add_argument("--out", default="runs/data", type=Path)
    args = parser.parse_args()
    print(prepare_afids(args.shared / "afids", args.out / "afids"))
    print(prepare_ceph(args.shared / "ceph", args.out / "ceph"))
    print(prepare_ceph(args.shared / "ceph", args.out / "ceph-10-images", train_limit=10))
    for fold in range(CEPH_FOLDS):
        print(prepare_ceph(args.shared / "ceph", args.out / f"ceph-fold{fold}", test_fold=fold))
    print(prepare_hand(args.shared / "hand", args.out / "hand"))
    for fold, test in enumerate(HAND_FOLDS):
        print(prepare_hand(args.shared / "hand", args.out / f"hand-fold{fold}", test))


if __name__ == "__main__":
    main()

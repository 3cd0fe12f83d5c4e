"""Turn the project's shared training data (../shared/data, not redistributable here) into datasets.

    python benchmarks/shared_data/prepare_shared_data.py [--shared ../shared/data] [--out runs/data]

Writes, under --out, one folder per dataset with a dataset spec (dataset.toml) the library trains on:
  afids/  the MNI152NLin2009cAsym T1w template with its 32 AFIDs named by abbreviation (AC, PC, ...)
  ceph/   the 100 cephalograms with the mean of the two annotators (pixel units), 81 train / 19 validation
  ceph-10-images/  the same validation split, but only the first 10 training images
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from SCNLandmarksLib.io.landmarks import write_landmarks
from SCNLandmarksLib.io.paths import image_stem
from SCNLandmarksLib.landmark_set import LandmarkSet

AFIDS_IMAGE = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
SAME_RADIOGRAPH = ("014", "087")  # pixel-identical images, annotated independently (MANIFEST)


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


def prepare_ceph(shared: Path, out: Path, validation: int = 20, train_limit: int | None = None) -> Path:
    """Split by image number: the last `validation` images validate, except that 014 and 087 (the
    same radiograph) both train, so validation holds 19 distinct radiographs.

    `train_limit` keeps only the first that many training images (the reduced-data experiment);
    the validation images stay the same.
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
    for number, path in enumerate(images):
        split = "validation" if number >= len(images) - validation else "train"
        if path.stem in SAME_RADIOGRAPH:
            split = "train"  # its twin is a training image: never validate on it
        if split == "train" and train_limit is not None and number >= train_limit:
            continue
        lines.append(f'[[images]]\nid = "{path.stem}"\nimage = "{path.resolve()}"\nsplit = "{split}"\n')
    spec = out / "dataset.toml"
    spec.write_text("\n".join(lines))
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", type=Path)
    parser.add_argument("--out", default="runs/data", type=Path)
    args = parser.parse_args()
    print(prepare_afids(args.shared / "afids", args.out / "afids"))
    print(prepare_ceph(args.shared / "ceph", args.out / "ceph"))
    print(prepare_ceph(args.shared / "ceph", args.out / "ceph-10-images", train_limit=10))


if __name__ == "__main__":
    main()

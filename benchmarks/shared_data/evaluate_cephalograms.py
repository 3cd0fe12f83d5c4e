"""A cephalogram model against each annotator, and on the same images mirrored (left-facing).

    python benchmarks/shared_data/evaluate_cephalograms.py MODEL [--shared ../shared/data/ceph]
        [--dataset runs/data/ceph/dataset.toml] [--split validation]

On the split's images (prepared by prepare_shared_data.py), over the points both annotators placed,
prints one JSON line of median / mean distances in px: model to the mean annotation, model to each
annotator, annotator to annotator, one annotator to the mean; then the model on every image
flipped left-right in its pixel array, header unchanged (a left-facing radiograph), scored against
the flipped mean annotation. Also counts the images kept as given and the flipped images detected
on their mirror image (the model file's mirror_axis).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.paths import image_stem

ANNOTATORS = ("mollabashi", "farhadifar")


def annotations(path: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Image id -> landmark index -> (x, y) pixel index, from a shared per-annotator CSV."""
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for row in csv.DictReader(open(path)):
        point = (float(row["x"]), float(row["y"]))
        table.setdefault(image_stem(row["image"]), {})[int(row["landmark_index"])] = point
    return table


def summary(distances: list[float]) -> dict[str, float]:
    """Median and mean over the points found; a landmark the model reported missing is counted apart."""
    values = np.asarray(distances, dtype=float)
    found = values[np.isfinite(values)]
    missed = {"missed": int(values.size - found.size)} if found.size < values.size else {}
    return {"median": round(float(np.median(found)), 2), "mean": round(float(np.mean(found)), 2), **missed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--shared", default="../shared/data/ceph", type=Path)
    parser.add_argument("--dataset", default="runs/data/ceph/dataset.toml", type=Path)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()

    predictor = Predictor.from_file(args.model, "cpu")
    spec = load_dataset_spec(args.dataset)
    entries = spec.split(args.split)
    means = spec.load_landmarks(entries)
    first, second = (annotations(args.shared / f"landmarks_annotator_{name}.csv") for name in ANNOTATORS)
    distances: dict[str, list[float]] = {
        key: []
        for key in (
            "model_to_mean",
            f"model_to_{ANNOTATORS[0]}",
            f"model_to_{ANNOTATORS[1]}",
            "annotator_to_annotator",
            "annotator_to_mean",
            "flipped_model_to_mean",
        )
    }
    kept_as_given = mirrored_images = 0
    for entry in entries:
        image = entry.read(2)
        geometry = ImageGeometry.of(image)
        key = image_stem(entry.id)  # the annotators' tables name images by file ("001.png"), as ids may
        both = [k for k in range(len(spec.landmark_names)) if k in first[key] and k in second[key]]
        a = geometry.index_to_physical(np.array([first[key][k] for k in both]))
        b = geometry.index_to_physical(np.array([second[key][k] for k in both]))
        mean = means[entry.id].points_lps[both]
        as_given = predictor.predict(image)
        kept_as_given += not as_given.mirrored
        found = as_given.landmarks.points_lps[both]
        for key, x, y in (
            ("model_to_mean", found, mean),
            (f"model_to_{ANNOTATORS[0]}", found, a),
            (f"model_to_{ANNOTATORS[1]}", found, b),
            ("annotator_to_annotator", a, b),
            ("annotator_to_mean", a, mean),
        ):
            distances[key] += np.linalg.norm(x - y, axis=1).tolist()

        pixels = np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, ::-1])
        flipped = geometry.apply_to(sitk.GetImageFromArray(pixels))
        flipped_index = geometry.physical_to_index(mean)
        flipped_index[:, 0] = geometry.size[0] - 1 - flipped_index[:, 0]
        prediction = predictor.predict(flipped)
        mirrored_images += prediction.mirrored
        distances["flipped_model_to_mean"] += np.linalg.norm(
            prediction.landmarks.points_lps[both] - geometry.index_to_physical(flipped_index), axis=1
        ).tolist()
    print(
        json.dumps(
            {
                "model": str(args.model),
                "images": len(entries),
                "points": len(distances["model_to_mean"]),
                **{key: summary(values) for key, values in distances.items()},
                "images_kept_as_given": kept_as_given,
                "flipped_images_detected_on_their_mirror": mirrored_images,
            }
        )
    )


if __name__ == "__main__":
    main()

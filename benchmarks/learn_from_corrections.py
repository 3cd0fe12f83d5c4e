"""Does fine-tuning on one clinic's corrections teach the model that clinic's convention?

    python benchmarks/learn_from_corrections.py [--source ceph|isbi2015] [--minutes 15] [--out runs/learn]

Each source has two annotators who differ systematically on some landmarks. For each annotator in
turn: `finetune` the shipped cephalometric-19 model on 10 images with that annotator's points only,
then measure the other images against that annotator (and the other one): the base, the base plus
each landmark's plain mean correction on the same 10 images (what anyone can do by hand), and the
model `finetune` chose (base, base + offset, fine-tuned or fine-tuned + offset), overall and on the
four landmarks the 10 corrections moved most. Prints JSON lines (errors in px).

- ceph: the Hamedan cephalograms (the shipped model's device); corrected: the first 10 of its
  validation images, evaluated: the other 9.
- isbi2015: the ISBI 2015 training set (another device, 0.1 mm/px); corrected: every 15th image,
  evaluated: the other 140, against the senior and the junior annotator.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.finetune import finetune
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image

ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = ROOT / "Resources" / "Models" / "cephalometric-19" / "model.safetensors"
# Per source: the annotators' landmark tables (landmarks_<name>.csv or landmarks_annotator_<name>.csv).
ANNOTATORS = {"ceph": ("farhadifar", "mollabashi"), "isbi2015": ("senior", "junior")}
TABLES = {"ceph": "landmarks_annotator_{}.csv", "isbi2015": "landmarks_{}.csv"}
VALIDATION_IMAGES = 20  # ceph: the last 20 images, as in prepare_shared_data.py ...
SAME_RADIOGRAPH = ("014", "087")  # ... without the twin of a training image
CORRECTED_CASES = 10
BIASED_LANDMARKS = 4


def images_of(source: str, shared: Path) -> tuple[list[Path], list[Path]]:
    """(corrected, evaluated) image files."""
    if source == "ceph":
        files = sorted((shared / "images").glob("*.png"))
        chosen = [f for f in files[-VALIDATION_IMAGES:] if f.stem not in SAME_RADIOGRAPH]
        return chosen[:CORRECTED_CASES], chosen[CORRECTED_CASES:]
    files = sorted((shared / "images").glob("*.jpg"))
    step = len(files) // CORRECTED_CASES
    corrected = files[::step][:CORRECTED_CASES]
    return corrected, [f for f in files if f not in corrected]


def write_spec(source: str, shared: Path, folder: Path, annotator: str, images: list[Path], names: list[str]) -> Path:
    """A dataset spec of `images` with one annotator's points (pixel index coordinates)."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = {image.stem for image in images}
    with (
        open(shared / TABLES[source].format(annotator)) as table,
        open(folder / "landmarks.csv", "w", newline="") as target,
    ):
        writer = csv.writer(target)
        writer.writerow(["image", "landmark", "x", "y"])
        for row in csv.DictReader(table):
            if row["image"].split(".")[0] in stems:
                writer.writerow([row["image"].split(".")[0], row["landmark_name"], row["x"], row["y"]])
    lines = [
        "dimension = 2",
        "landmarks = [" + ", ".join(json.dumps(n) for n in names) + "]",
        'landmarks_csv = "landmarks.csv"',
        'csv_coordinates = "index"',
        "",
    ]
    for image in images:
        lines += ["[[images]]", f'id = "{image.stem}"', f'image = "{image.resolve()}"', ""]
    spec = folder / "dataset.toml"
    spec.write_text("\n".join(lines))
    return spec


_detected: dict[tuple[Path, Path], np.ndarray] = {}  # (model, image) -> points: each is detected once


def predictions(model: Path, spec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) points, (images, landmarks, 2), px."""
    spec = load_dataset_spec(spec_path)
    truth = spec.load_landmarks(list(spec.entries))
    predictor = Predictor.from_file(model, "cpu")
    for entry in spec.entries:
        if (model, entry.image) not in _detected:
            _detected[model, entry.image] = predictor.predict(read_image(entry.image, 2)).landmarks.points_lps
    found = [_detected[model, entry.image] for entry in spec.entries]
    return np.stack(found), np.stack([truth[e.id].points_lps for e in spec.entries])


def errors(found: np.ndarray, truth: np.ndarray, names: list[str], biased: list[str]) -> dict[str, float]:
    distances = np.linalg.norm(found - truth, axis=2)
    chosen = [names.index(n) for n in biased]
    return {
        "overall": float(np.nanmean(distances)),
        "biased_landmarks": float(np.nanmean(distances[:, chosen])),
        **{n: float(np.nanmean(distances[:, names.index(n)])) for n in biased},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=tuple(ANNOTATORS), default="ceph")
    parser.add_argument("--shared", type=Path, help="the source's folder (default: ../shared/data/SOURCE)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learn-from-corrections")
    parser.add_argument("--minutes", type=float, default=15.0, help="fine-tuning budget per annotator")
    parser.add_argument("--annotators", nargs="+", help="default: both of the source's")
    args = parser.parse_args()
    shared = args.shared or ROOT.parent / "shared" / "data" / args.source
    annotators = args.annotators or list(ANNOTATORS[args.source])

    names = list(Predictor.from_file(BASE_MODEL, "cpu").description.landmark_names)
    corrected, others = images_of(args.source, shared)
    for annotator in annotators:
        other = next(a for a in ANNOTATORS[args.source] if a != annotator)
        folder = args.out / args.source / annotator
        corrections = write_spec(args.source, shared, folder / "corrections", annotator, corrected, names)
        evaluations = {
            a: write_spec(args.source, shared, folder / f"evaluation-{a}", a, others, names) for a in (annotator, other)
        }
        started = time.perf_counter()
        result = finetune(
            BASE_MODEL, corrections, folder / "finetuned", minutes=args.minutes, device="cpu", overwrite=True
        )
        seconds = time.perf_counter() - started
        found, truth = predictions(BASE_MODEL, corrections)
        offset = np.nanmean(truth - found, axis=0)  # per landmark, px
        biased = [names[k] for k in np.argsort(-np.linalg.norm(offset, axis=1))[:BIASED_LANDMARKS]]
        print(
            json.dumps(
                {
                    "annotator": annotator,
                    "finetune": result.summary(),
                    "seconds": round(seconds, 1),
                    "corrected_images": [image.stem for image in corrected],
                    "evaluation_images": len(others),
                    "biased_landmarks": biased,
                }
            ),
            flush=True,
        )
        for against, spec in evaluations.items():
            rows = {}
            for label, model in (("base", BASE_MODEL), (f"chosen: {result.outcome}", result.model_path)):
                found, truth = predictions(model, spec)
                rows[label] = errors(found, truth, names, biased)
                if label == "base":
                    rows["base + mean offset"] = errors(found + offset, truth, names, biased)
            for label, figures in rows.items():
                print(
                    json.dumps(
                        {
                            "annotator": annotator,
                            "against": against,
                            "model": label,
                            "images": len(others),
                            "mean_error_px": figures,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()

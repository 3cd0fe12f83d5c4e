"""Does fine-tuning on one clinic's corrections teach the model that clinic's convention?

    python benchmarks/learn_from_corrections.py [--shared ../shared/data/ceph] [--minutes 15] [--out runs/learn]

The two orthodontists of the cephalogram data differ systematically on some landmarks. For each
annotator in turn: `finetune` the shipped cephalometric-19 model on the first 10 of its validation
images with that annotator's points only, then measure the other validation images against each
annotator, before and after, overall and on the landmarks where the annotators differ most; and the
simplest adaptation for comparison: the base model plus each landmark's mean offset to that annotator
on the same 10 images. Prints JSON lines (errors in px).
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
ANNOTATORS = ("farhadifar", "mollabashi")
CONVENTION_LANDMARKS = ("Menton", "Anterior nasal spine", "Soft tissue pogonion", "Gnathion")
VALIDATION_IMAGES = 20  # the last 20 images, as in prepare_shared_data.py ...
SAME_RADIOGRAPH = ("014", "087")  # ... without the twin of a training image
CORRECTED_CASES = 10


def validation_ids(shared: Path) -> list[str]:
    stems = sorted(p.stem for p in (shared / "images").glob("*.png"))
    return [s for s in stems[-VALIDATION_IMAGES:] if s not in SAME_RADIOGRAPH]


def write_spec(shared: Path, folder: Path, annotator: str, ids: list[str], names: list[str]) -> Path:
    """A dataset spec of `ids` with one annotator's points (pixel index coordinates)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(shared / f"landmarks_annotator_{annotator}.csv") as source,
        open(folder / "landmarks.csv", "w", newline="") as target,
    ):
        writer = csv.writer(target)
        writer.writerow(["image", "landmark", "x", "y"])
        for row in csv.DictReader(source):
            if row["image"].split(".")[0] in ids:
                writer.writerow([row["image"].split(".")[0], row["landmark_name"], row["x"], row["y"]])
    lines = [
        "dimension = 2",
        "landmarks = [" + ", ".join(json.dumps(n) for n in names) + "]",
        'landmarks_csv = "landmarks.csv"',
        'csv_coordinates = "index"',
        "",
    ]
    for image_id in ids:
        lines += ["[[images]]", f'id = "{image_id}"', f'image = "{(shared / "images" / image_id).resolve()}.png"', ""]
    spec = folder / "dataset.toml"
    spec.write_text("\n".join(lines))
    return spec


def predictions(model: Path, spec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) points, (images, landmarks, 2), px."""
    spec = load_dataset_spec(spec_path)
    truth = spec.load_landmarks(list(spec.entries))
    predictor = Predictor.from_file(model, "cpu")
    found = [predictor.predict(read_image(e.image, 2)).landmarks.points_lps for e in spec.entries]
    return np.stack(found), np.stack([truth[e.id].points_lps for e in spec.entries])


def errors(found: np.ndarray, truth: np.ndarray, names: list[str]) -> dict[str, float]:
    distances = np.linalg.norm(found - truth, axis=2)
    chosen = [names.index(n) for n in CONVENTION_LANDMARKS]
    return {
        "overall": float(np.nanmean(distances)),
        "four_landmarks": float(np.nanmean(distances[:, chosen])),
        **{n: float(np.nanmean(distances[:, names.index(n)])) for n in CONVENTION_LANDMARKS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "ceph")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learn-from-corrections")
    parser.add_argument("--minutes", type=float, default=15.0, help="fine-tuning budget per annotator")
    parser.add_argument("--annotators", nargs="+", default=list(ANNOTATORS), choices=ANNOTATORS)
    args = parser.parse_args()

    predictor_names = list(Predictor.from_file(BASE_MODEL, "cpu").description.landmark_names)
    ids = validation_ids(args.shared)
    corrected, others = ids[:CORRECTED_CASES], ids[CORRECTED_CASES:]
    for annotator in args.annotators:
        other = next(a for a in ANNOTATORS if a != annotator)
        folder = args.out / annotator
        corrections = write_spec(args.shared, folder / "corrections", annotator, corrected, predictor_names)
        evaluations = {
            a: write_spec(args.shared, folder / f"evaluation-{a}", a, others, predictor_names)
            for a in (annotator, other)
        }
        started = time.perf_counter()
        result = finetune(BASE_MODEL, corrections, folder / "finetuned", minutes=args.minutes, device="cpu")
        seconds = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "annotator": annotator,
                    "finetune": result.summary(),
                    "seconds": round(seconds, 1),
                    "corrected_images": corrected,
                    "evaluation_images": others,
                }
            ),
            flush=True,
        )

        found, truth = predictions(BASE_MODEL, corrections)
        offset = np.nanmean(truth - found, axis=0)  # per landmark, px
        candidates = {
            "base": BASE_MODEL,
            "finetuned (kept)": result.model_path,
            "finetuned (trained)": folder / "finetuned" / "training" / "model.safetensors",
        }
        for against, spec in evaluations.items():
            rows = {}
            for label, model in candidates.items():
                found, truth = predictions(model, spec)
                rows[label] = errors(found, truth, predictor_names)
                if label == "base":
                    rows["base + mean offset"] = errors(found + offset, truth, predictor_names)
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

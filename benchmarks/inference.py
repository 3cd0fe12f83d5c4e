"""End-to-end detection timing: one JSON line per case (read, resample, network, peaks, write, total, RSS).

    python benchmarks/inference.py [--device cpu|cuda] [--repeat 3]

Cases use the shipped models: brain-afids-32 on the 1 mm MNI template from the shared data (or the
bundled 2 mm sample when the shared data is absent), and cephalometric-19 on a full-resolution
cephalogram from the shared data (skipped when absent). Times are the median of --repeat runs after
a warm-up; peak RSS is the process's maximum resident memory so far.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.io.landmarks import write_landmarks

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = REPO / "Resources" / "Models"


def cases() -> list[tuple[str, Path, Path]]:
    brain = SHARED / "afids" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    if not brain.is_file():
        brain = REPO / "Resources" / "Samples" / "MNI152NLin2009cAsym_T1w_2mm.nii.gz"
    found = [("brain-afids-32", MODELS / "brain-afids-32" / "model.safetensors", brain)]
    ceph = SHARED / "ceph" / "images" / "001.png"
    if ceph.is_file():
        found.append(("cephalometric-19", MODELS / "cephalometric-19" / "model.safetensors", ceph))
    return found


def run_once(predictor: Predictor, image_path: Path, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    image = read_image(image_path, predictor.dimension)
    read_s = time.perf_counter() - started
    prediction = predictor.predict(image)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    written = time.perf_counter()
    write_landmarks(prediction.landmarks, out / f"{image_path.name.split('.')[0]}.mrk.json", prediction.status)
    write_s = time.perf_counter() - written
    return {"read_s": read_s, **{f"{k}_s": v for k, v in prediction.timings.items()}, "write_s": write_s,
            "total_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, model, image_path in cases():
            started = time.perf_counter()
            predictor = Predictor.from_file(model, args.device)
            load_s = time.perf_counter() - started
            run_once(predictor, image_path, Path(folder))  # warm-up
            runs = [run_once(predictor, image_path, Path(folder)) for _ in range(args.repeat)]
            size = list(read_image(image_path).GetSize())
            print(json.dumps({"case": name, "image": image_path.name, "image_size": size,
                              "device": predictor.device.type, "threads": torch.get_num_threads(),
                              "model_load_s": round(load_s, 3),
                              **{k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
                              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()

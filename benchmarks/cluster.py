"""Cohort throughput on a local Dask cluster against the number of worker processes on this machine,
and what N such machines would give: one JSON line per case, then the figures as a table.

    python benchmarks/cluster.py [--images 24] [--workers 1 2] [--rounds 1] [--machines 10 50] [--device cpu]

The cohort is a BIDS dataset of --images subjects, each holding the 1 mm MNI template from the shared
data as its T1w (the bundled 2 mm sample when the shared data is absent), detected with the shipped
brain-afids-32 model, as `scn-landmarks detect DATASET --out DIR --cluster local:N` runs it.

Each case gives the run's wall time (starting the workers and loading the model included) and its
steady rate: images per hour between the first and the last image finished, when every worker has
its model. The baseline is a plain `detect` in process (`Predictor.predict_files`, two images in
flight, on the same images). The cases take turns, --rounds times, and each line gives the
machine's load average over the last minute, so that other work on a shared machine shows. A
cluster of N machines like this one, each running its best worker count, gives N times one
machine's steady rate as long as the shared file system keeps up: each image reads its T1w and
writes its landmark file, so the last lines state the read rate that needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from SCNLandmarksLib.batch import BatchRequest, batch_images, write_outputs
from SCNLandmarksLib.cluster import run_cohort
from SCNLandmarksLib.inference import Predictor

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO.parent / "shared" / "data" / "afids" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
SAMPLE = REPO / "Resources" / "Samples" / "MNI152NLin2009cAsym_T1w_2mm.nii.gz"
MODEL = REPO / "Resources" / "Models" / "brain-afids-32" / "model.safetensors"


def make_cohort(root: Path, subjects: int, image: Path) -> Path:
    """A BIDS dataset whose every subject's T1w is (a link to) `image`."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "benchmark", "BIDSVersion": "1.10.0"}')
    for number in range(1, subjects + 1):
        anat = root / f"sub-{number:03d}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{number:03d}_T1w.nii.gz").symlink_to(image)
    return root


def steady_per_hour(finished: list[float]) -> float:
    """Images per hour from the first image finished to the last."""
    return (len(finished) - 1) / (finished[-1] - finished[0]) * 3600.0


def plain_case(dataset: Path, out: Path, device: str) -> dict:
    images = batch_images([dataset])
    request = BatchRequest(out)
    started = time.perf_counter()
    predictor = Predictor.from_file(MODEL, device)
    finished = []
    for image, (_, prediction) in zip(images, predictor.predict_files([image.path for image in images])):
        write_outputs(image, prediction, request)
        finished.append(time.perf_counter())
    return {
        "case": "plain detect (one process)",
        "workers": 1,
        "wall_s": round(finished[-1] - started, 2),
        "steady_images_per_hour": round(steady_per_hour(finished)),
        "load_average": os.getloadavg()[0],
    }


def cluster_case(dataset: Path, out: Path, workers: int, device: str) -> dict:
    images = batch_images([dataset])
    finished: list[float] = []
    started = time.perf_counter()
    result = run_cohort(
        f"local:{workers}",
        MODEL,
        images,
        BatchRequest(out),
        device,
        progress=lambda outcome, done, total: finished.append(time.perf_counter()),
    )
    assert result.failed == 0, [outcome.error for outcome in result.outcomes if outcome.error]
    return {
        "case": f"--cluster local:{workers}",
        "workers": workers,
        "wall_s": round(time.perf_counter() - started, 2),
        "steady_images_per_hour": round(steady_per_hour(finished)),
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1, help="times each case runs, in turns")
    parser.add_argument("--machines", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    image = TEMPLATE if TEMPLATE.is_file() else SAMPLE
    cores = len(os.sched_getaffinity(0))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        dataset = make_cohort(Path(folder) / "bids", args.images, image)
        for round_number in range(args.rounds):
            out = Path(folder) / f"round-{round_number}"
            found = [plain_case(dataset, out / "plain", args.device)]
            found += [cluster_case(dataset, out / f"local-{n}", n, args.device) for n in args.workers]
            for result in found:
                print(json.dumps({**result, "images": args.images, "image": image.name, "cores": cores}), flush=True)
                results.setdefault(result["case"], []).append(result)
    rates = {case: statistics.median(r["steady_images_per_hour"] for r in runs) for case, runs in results.items()}
    walls = {case: statistics.median(r["wall_s"] for r in runs) for case, runs in results.items()}
    best = max((case for case in rates if case.startswith("--cluster")), key=rates.__getitem__)
    megabytes = image.stat().st_size / 1e6
    print(f"\n| case | wall for {args.images} images | steady images/hour |\n|---|---|---|", file=sys.stderr)
    for case in rates:
        print(f"| {case} | {walls[case]:.1f} s | {rates[case]:.0f} |", file=sys.stderr)
    for machines in args.machines:
        rate = machines * rates[best]
        print(
            f"{machines} machines like this one ({cores} cores, {best} each): about {rate:.0f} images/hour, "
            f"reading {rate * megabytes / 3600:.1f} MB/s of T1w ({megabytes:.1f} MB each) from the shared file system",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()

"""End-to-end detection speed, batch throughput and the peer reference: one JSON line per case.

    python benchmarks/inference.py [--device cpu|cuda] [--precision auto|float32|bfloat16] [--repeat 3]
        [--batch 9] [--no-cli] [--no-peer]

Cases use the shipped models: brain-afids-32 on the 1 mm MNI template from the shared data (or the
bundled 2 mm sample when the shared data is absent), and cephalometric-19 on full-resolution
cephalograms from the shared data (skipped when absent).

Each line holds:
- single image, in process: stage times (read, resample, network, peaks, refinement, write) and
  total, the median of --repeat runs after a warm-up; model load time; peak RSS of the process;
- batch mode on --batch images: images/s of a loop of single-image calls against
  `Predictor.predict_files`, and of one `scn-landmarks detect` process per image against one
  process for the whole folder (what a user running the CLI sees, start-up and model load included);
- the CLI side by side with `python -c "import torch"`: one image, and the cost of each extra image
  in one call (see `cli_figures`);
- the peer: the forward pass alone of the `landmarker` package's OriginalSpatialConfigurationNet
  (Payer et al.'s architecture as that package implements it) with the same landmark count and our
  model's filter count, other settings its defaults, on two grids: the input image's own grid (a
  single-resolution SCN run on the image as given) and the whole image at the finest spacing our
  model works at (its refinement spacing, or its only grid). Grids are padded to a multiple of 16,
  which the peer's 1/16 spatial-configuration pooling needs. Install it without letting it replace
  torch: `pip install --no-deps -r benchmarks/requirements-peer.txt`. Without it the peer fields
  are null.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from SCNLandmarksLib.geometry import ImageGeometry, covering_grid
from SCNLandmarksLib.inference import Predictor, cpu_bfloat16_hardware, cpu_vendor
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.io.landmarks import write_landmarks
from SCNLandmarksLib.io.paths import image_stem
from SCNLandmarksLib.vocabulary import Precision

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = REPO / "Resources" / "Models"
PEER_PADDING = 16


def cases(batch: int) -> list[tuple[str, Path, list[Path]]]:
    """(model name, model file, images); the first image is the single-image case."""
    brain = SHARED / "afids" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    if not brain.is_file():
        brain = REPO / "Resources" / "Samples" / "MNI152NLin2009cAsym_T1w_2mm.nii.gz"
    found = [("brain-afids-32", MODELS / "brain-afids-32" / "model.safetensors", [brain] * batch)]
    cephalograms = sorted((SHARED / "ceph" / "images").glob("*.png"))[:batch]
    if cephalograms:
        found.append(("cephalometric-19", MODELS / "cephalometric-19" / "model.safetensors", cephalograms))
    return found


def run_once(predictor: Predictor, image_path: Path, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    image = read_image(image_path, predictor.dimension)
    read_s = time.perf_counter() - started
    prediction = predictor.predict(image)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    written = time.perf_counter()
    write_landmarks(prediction.landmarks, out / f"{image_stem(image_path)}.mrk.json", prediction.status)
    write_s = time.perf_counter() - written
    return {
        "read_s": read_s,
        **{f"{k}_s": v for k, v in prediction.timings.items()},
        "write_s": write_s,
        "total_s": time.perf_counter() - started,
    }


def batch_figures(predictor: Predictor, paths: list[Path], out: Path) -> dict[str, float]:
    """Images/s of a loop of single-image calls against batch mode (both read, detect and write),
    and the largest distance between their positions for the same image."""
    started = time.perf_counter()
    single = {}
    for path in paths:
        prediction = predictor.predict(read_image(path, predictor.dimension))
        write_landmarks(prediction.landmarks, out / f"{image_stem(path)}.mrk.json", prediction.status)
        single[path] = prediction.landmarks.points_lps
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    shift = 0.0
    for path, prediction in predictor.predict_files(paths):
        write_landmarks(prediction.landmarks, out / f"{image_stem(path)}.mrk.json", prediction.status)
        shift = max(shift, float(np.nanmax(np.linalg.norm(prediction.landmarks.points_lps - single[path], axis=1))))
    batch_s = time.perf_counter() - started
    return {
        "loop_images_per_s": len(paths) / single_s,
        "batch_images_per_s": len(paths) / batch_s,
        "batch_speedup_in_process": single_s / batch_s,
        "batch_vs_single_max_shift": shift,
    }


def cli_figures(model: Path, paths: list[Path], out: Path, args: argparse.Namespace) -> dict[str, float]:
    """What a user of `scn-landmarks detect` sees, start-up and model load included.

    Side by side, `repeat` times each (medians): `python -c "import torch"`, one `detect` on one image,
    and one `detect` on the folder of all images (the cost of an extra image is the difference of the
    last two over the extra images). Then one `detect` process per image against one for the folder.
    """
    folder = out / "folder"
    folder.mkdir()
    for number, path in enumerate(paths):
        (folder / f"{number:03d}_{path.name}").symlink_to(path.resolve())
    command = [
        *(sys.executable, "-m", "SCNLandmarksLib.cli", "detect", str(model)),
        *("--device", args.device, "--precision", args.precision),
    ]

    def seconds(arguments: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(arguments, check=True, capture_output=True)
        return time.perf_counter() - started

    torch_s, single_s, folder_s = [], [], []
    for run in range(args.repeat):
        torch_s.append(seconds([sys.executable, "-c", "import torch"]))
        single_s.append(seconds([*command, str(min(folder.iterdir())), "--out", str(out / f"single{run}")]))
        folder_s.append(seconds([*command, str(folder), "--out", str(out / f"folder{run}")]))
    started = time.perf_counter()
    for number, image in enumerate(sorted(folder.iterdir())):
        subprocess.run(
            [*command, str(image), "--out", str(out / f"one-by-one{number}")], check=True, capture_output=True
        )
    one_by_one_s = time.perf_counter() - started
    batch_s = statistics.median(folder_s)
    return {
        "import_torch_s": statistics.median(torch_s),
        "cli_single_image_s": statistics.median(single_s),
        "cli_single_minus_import_torch_s": statistics.median(s - t for s, t in zip(single_s, torch_s)),
        "cli_per_extra_image_s": (batch_s - statistics.median(single_s)) / max(len(paths) - 1, 1),
        "cli_per_image_images_per_s": len(paths) / one_by_one_s,
        "cli_folder_images_per_s": len(paths) / batch_s,
        "batch_speedup_cli": one_by_one_s / batch_s,
    }


def peer_forward_s(
    dimension: int, size: tuple[int, ...], landmarks: int, filters: int, device: torch.device, repeat: int
) -> float | None:
    """Median seconds of the peer SCN's forward pass on a (padded) grid of `size`; None without the peer."""
    try:
        from landmarker.models.spatial_configuration_net import OriginalSpatialConfigurationNet
    except ImportError:
        return None
    network = (
        OriginalSpatialConfigurationNet(
            out_channels=landmarks, la_channels=filters, sp_channels=filters, spatial_dim=dimension
        )
        .eval()
        .to(device)
    )
    padded = [math.ceil(s / PEER_PADDING) * PEER_PADDING for s in reversed(size)]
    sample = torch.randn(1, 1, *padded, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeat + 1):  # the first run warms up
            started = time.perf_counter()
            network(sample)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def finest_spacing(predictor: Predictor) -> tuple[float, ...]:
    description = predictor.description
    return (description.refinement or description.coarse).grid_spacing


def cpu_name() -> str:
    """The CPU's model name, as Linux reports it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def measure(name: str, model: Path, paths: list[Path], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        started = time.perf_counter()
        predictor = Predictor.from_file(model, args.device, args.precision)
        load_s = time.perf_counter() - started
        run_once(predictor, paths[0], out)  # warm-up
        runs = [run_once(predictor, paths[0], out) for _ in range(args.repeat)]
        single = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        geometry = ImageGeometry.of(read_image(paths[0], predictor.dimension))
        figures = {
            "case": name,
            "image": paths[0].name,
            "image_size": list(geometry.size),
            "device": predictor.device.type,
            "threads": torch.get_num_threads(),
            "compute_dtype": str(predictor.compute_dtype).removeprefix("torch."),
            # Which kernels ran: the CPU's bfloat16 hardware and maker as the library reads them
            # (`auto` chooses by both), the ISA oneDNN may use (ONEDNN_MAX_CPU_ISA caps it) and ATen's
            # vector path.
            "cpu_bfloat16": cpu_bfloat16_hardware() if predictor.device.type == "cpu" else None,
            "cpu_vendor": cpu_vendor() if predictor.device.type == "cpu" else None,
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_name(),
            "model_load_s": load_s,
            **single,
            "peak_rss_mb": rss_mb,
            **batch_figures(predictor, paths, out),
            "batch_images": len(paths),
        }
        if not args.no_cli:
            figures.update(cli_figures(model, paths, out, args))
        if not args.no_peer:
            landmarks = len(predictor.landmark_names)
            filters = int(predictor.description.coarse.params["filters"])
            for label, grid in (
                ("image_grid", geometry.size),
                ("finest_grid", covering_grid(geometry, finest_spacing(predictor)).size),
            ):
                seconds = peer_forward_s(predictor.dimension, grid, landmarks, filters, predictor.device, args.repeat)
                figures[f"peer_{label}"] = list(grid)
                figures[f"peer_{label}_forward_s"] = seconds
                figures[f"peer_{label}_ratio"] = None if seconds is None else seconds / single["total_s"]
            figures["peer_filters"] = filters
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=tuple(Precision))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=9, help="images in the batch-mode comparisons")
    parser.add_argument("--no-cli", action="store_true", help="skip the one-process-per-image comparison")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer's forward passes")
    parser.add_argument("--case", help="measure only this case, in this process")
    args = parser.parse_args()
    for name, model, paths in cases(args.batch):
        if args.case is None:
            # One process per case, so that each case's peak memory is its own.
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", name], check=True)
        elif args.case == name:
            figures = measure(name, model, paths, args)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)


if __name__ == "__main__":
    main()

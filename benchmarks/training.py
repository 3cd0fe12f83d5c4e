"""Training throughput: augmentation samples/s and training iterations/s, printed as JSON lines.

    python benchmarks/training.py [--device cpu|cuda] [--iterations 10] [--no-mixed-precision]

Cases mirror the shipped models' coarse stages on synthetic images of the real data's sizes: a 2D
cephalogram-sized image (1340 x 1671 px) on a 1/8-resolution grid, and a 1 mm brain-sized volume
(193 x 229 x 193) on the shipped 6 mm grid and on a 3 mm grid.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk
import torch

from SCNLandmarksLib.config import AugmentationConfig, HeatmapConfig, IntensityConfig
from SCNLandmarksLib.data.augmentation import augmented_sample
from SCNLandmarksLib.data.preparation import prepare_image
from SCNLandmarksLib.heatmaps import LearnableSigmas, gaussian_heatmaps
from SCNLandmarksLib.losses import heatmap_loss
from SCNLandmarksLib.models import build_model
from SCNLandmarksLib.train import mixed_precision_applies

BRAIN_AUGMENTATION = AugmentationConfig(
    elastic_mm=4.0,
    elastic_control_spacing_mm=40.0,
    mirror_axis=0,
    mirror_probability=0.5,
    gamma_log=0.3,
    noise_std=0.03,
    bias_field_log=0.2,
)
CASES = {
    "2d-ceph": dict(
        image_size=(1340, 1671),
        image_spacing=(1.0, 1.0),
        grid_size=(176, 216),
        grid_spacing=(8.0, 8.0),
        landmarks=19,
        params=dict(filters=64, levels=4, sc_downsample=8, sc_kernel=9, sc_filters=64),
        augmentation=AugmentationConfig(
            elastic_mm=20.0, elastic_control_spacing_mm=300.0, translation=100.0, gamma_log=0.3, noise_std=0.02
        ),
    ),
    "3d-brain": dict(
        image_size=(193, 229, 193),
        image_spacing=(1.0, 1.0, 1.0),
        grid_size=(32, 40, 32),
        grid_spacing=(6.0, 6.0, 6.0),
        landmarks=32,
        params=dict(filters=32, levels=4, dropout=0.2, sc_downsample=4, sc_kernel=5, sc_filters=32),
        augmentation=BRAIN_AUGMENTATION,
    ),
    "3d-brain-3mm": dict(
        image_size=(193, 229, 193),
        image_spacing=(1.0, 1.0, 1.0),
        grid_size=(64, 80, 64),
        grid_spacing=(3.0, 3.0, 3.0),
        landmarks=32,
        params=dict(filters=32, levels=4, dropout=0.2, sc_downsample=4, sc_kernel=5, sc_filters=32),
        augmentation=BRAIN_AUGMENTATION,
    ),
}


def per_second(function, count: int, device: torch.device) -> float:
    """Calls per second of function(seed) over `count` seeds, after one warm-up call."""
    function(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(count):
        function(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def benchmark(name: str, case: dict, device: torch.device, iterations: int, mixed_precision: bool) -> dict:
    autocast = mixed_precision and mixed_precision_applies(device)
    rng = np.random.default_rng(0)
    array = rng.normal(100.0, 20.0, tuple(reversed(case["image_size"]))).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(case["image_spacing"])
    prepared = prepare_image(image, case["grid_spacing"], IntensityConfig(), device)
    d = len(case["grid_size"])
    center = np.asarray(case["image_size"]) * np.asarray(case["image_spacing"]) / 2.0
    points = center + rng.uniform(-30.0, 30.0, (case["landmarks"], d))

    def sample(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return augmented_sample(
            prepared, points, case["grid_size"], case["grid_spacing"], case["augmentation"], generator
        )

    samples_per_s = per_second(sample, iterations, device)

    network = build_model("scn", d, 1, case["landmarks"], case["params"]).to(device)
    heatmap = HeatmapConfig(sigma_init=2.0 * case["grid_spacing"][0])
    sigmas = LearnableSigmas(case["landmarks"], heatmap.sigma_init, heatmap.sigma_min).to(device)
    optimizer = torch.optim.Adam([*network.parameters(), *sigmas.parameters()], lr=1e-4)
    gamma = heatmap.resolved_gamma(d)

    def step(seed: int) -> None:
        inputs, index, _ = sample(seed)
        present = torch.isfinite(index).all(dim=1)[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            output = network(inputs[None])
        sigma = sigmas()
        targets = gaussian_heatmaps(index[None], present, case["grid_size"], case["grid_spacing"], sigma, gamma)
        loss, _ = heatmap_loss(output.final, targets, present, case["grid_spacing"], sigma, heatmap)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    iterations_per_s = per_second(step, iterations, device)
    return {
        "case": name,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "bfloat16_autocast": autocast,
        "grid": list(case["grid_size"]),
        "landmarks": case["landmarks"],
        "augmentation_samples_per_s": round(samples_per_s, 2),
        "training_iterations_per_s": round(iterations_per_s, 3),
        "batch_size": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument(
        "--no-mixed-precision",
        action="store_true",
        help="float32 throughout (the default autocasts where training does)",
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    for name in args.cases:
        print(
            json.dumps(
                benchmark(name, CASES[name], torch.device(args.device), args.iterations, not args.no_mixed_precision)
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

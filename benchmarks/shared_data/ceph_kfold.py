"""Train the cephalometric-19 recipe on k-fold splits: held-out errors for its 81 training images.

    python benchmarks/shared_data/prepare_shared_data.py
    python benchmarks/shared_data/ceph_kfold.py --fold 0 [--threads 1] [--out runs/ceph-kfold]

Fold k trains on runs/data/ceph-fold<k> (its "test" images never seen): the two steps of the shipped
model, `train.toml` (coarse SCN on an 8 px grid, without the refiner, which the shipped model does
not keep) and `finetune_6px.toml` (6 px grid), each for a fixed number of iterations, since there is
no validation split to pick one: 3000, then the 1000 after which the shipped model was picked.
With the validation images detected by the shipped model, the folds' test images give 100 held-out
cephalograms to calibrate the shipped model on (`calibrate_from_folds.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from SCNLandmarksLib.config import load_config
from SCNLandmarksLib.train import train

RECIPE = Path("Resources/Models/cephalometric-19")
FINE_TUNING_ITERATIONS = 1000  # the shipped model is iteration 1000 of finetune_6px.toml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--data", default="runs/data", type=Path)
    parser.add_argument("--out", default="runs/ceph-kfold", type=Path)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fold (finished steps stay)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.data / f"ceph-fold{args.fold}" / "dataset.toml"
    coarse_dir = args.out / f"fold{args.fold}-8px"
    fine_dir = args.out / f"fold{args.fold}"

    coarse = load_config(RECIPE / "train.toml")
    coarse = dataclasses.replace(coarse, dataset=spec, output_dir=coarse_dir, refinement=None)
    train(coarse, resume=args.resume and (coarse_dir / "checkpoint.pt").exists(), device="cpu")

    fine = load_config(RECIPE / "finetune_6px.toml")
    fine = dataclasses.replace(
        fine,
        dataset=spec,
        output_dir=fine_dir,
        initial_model=coarse_dir / "model.safetensors",
        training=dataclasses.replace(fine.training, iterations=FINE_TUNING_ITERATIONS),
    )
    train(fine, resume=args.resume and (fine_dir / "checkpoint.pt").exists(), device="cpu")
    print(fine_dir / "model.safetensors")


if __name__ == "__main__":
    main()

"""Training: samples -> SCN -> loss, with validation, best-model selection, checkpoints and exact resume.

Determinism: every sample is drawn from a generator seeded by (seed, iteration, rank, slot) and
dropout from a seed per iteration, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have. Under `torchrun` (WORLD_SIZE > 1) the network is wrapped in
DistributedDataParallel; rank 0 validates and writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .bundle import LoadedModel, save_model
from .config import Config, config_to_dict, save_config
from .data.augmentation import augmented_sample, swap_permutation
from .data.preparation import PreparedImage, prepare_image
from .data.spec import DatasetSpec, ImageEntry, load_dataset_spec
from .errors import Cancelled, DataError, TrainingError
from .heatmaps import LearnableSigmas, gaussian_heatmaps
from .inference import Predictor, resolve_device
from .io.atomic import atomic_output
from .io.images import read_image, spacing_unit
from .landmark_set import LandmarkSet
from .losses import heatmap_loss
from .models import build_model, default_params

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "model.safetensors"
LAST_MODEL = "last.safetensors"


@dataclass
class TrainingImage:
    id: str
    path: Path
    image: Any                   # the scalar sitk.Image (kept for validation through the predictor)
    prepared: PreparedImage
    landmarks: LandmarkSet


@dataclass
class TrainingResult:
    iterations: int
    best_validation_error: float | None
    model_path: Path
    history: list[dict[str, float]]


class _Trainable(nn.Module):
    """Network and sigmas in one module, so DistributedDataParallel averages both."""

    def __init__(self, network: nn.Module, sigmas: LearnableSigmas):
        super().__init__()
        self.network = network
        self.sigmas = sigmas

    def forward(self, x: torch.Tensor):
        return self.network(x), self.sigmas()


def load_split(spec: DatasetSpec, entries: list[ImageEntry], config: Config, device) -> list[TrainingImage]:
    """Read, normalise and shrink the images of one split, with their landmarks (LPS)."""
    images = {e.id: read_image(e.image, spec.dimension) for e in entries}
    from .geometry import ImageGeometry
    landmarks = spec.load_landmarks(entries, {k: ImageGeometry.of(v) for k, v in images.items()})
    items = []
    for entry in entries:
        if not landmarks[entry.id].present.any():
            raise DataError(f"{entry.landmarks or spec.landmarks_csv}: image '{entry.id}' has no landmarks at all")
        prepared = prepare_image(images[entry.id], config.grid.spacing, config.intensity, device)
        items.append(TrainingImage(entry.id, entry.image, images[entry.id], prepared, landmarks[entry.id]))
    return items


def _learning_rate_factor(config: Config) -> Callable[[int], float]:
    training = config.training
    if training.schedule == "cosine":
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, training.iterations) / training.iterations))
    if training.schedule == "step":
        return lambda it: 0.1 ** (it // training.step_every)
    return lambda it: 1.0


def _optimizer(trainable: _Trainable, config: Config) -> torch.optim.Optimizer:
    training = config.training
    groups = [{"params": list(trainable.network.parameters()), "lr": training.learning_rate,
               "weight_decay": training.weight_decay},
              {"params": list(trainable.sigmas.parameters()), "lr": training.sigma_learning_rate, "weight_decay": 0.0}]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=training.momentum, nesterov=True)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam(groups)


def model_metadata(config: Config, spec: DatasetSpec, params: dict, sigmas: torch.Tensor, unit: str,
                   iteration: int, validation: dict | None) -> dict[str, Any]:
    """Everything a model file needs to be used and traced back to its training."""
    sigma_list = [float(s) for s in sigmas.detach().cpu()]
    return {
        "architecture": config.model.architecture,
        "dimension": config.dimension,
        "in_channels": 1,
        "landmark_names": list(spec.landmark_names),
        "params": params,
        "grid_spacing": list(config.grid.spacing),
        "training_grid_size": list(config.grid.size),
        "unit": unit,
        "intensity": dataclasses.asdict(config.intensity),
        "sigmas": sigma_list,
        "gamma": config.heatmap.resolved_gamma(config.dimension),
        "inference": dataclasses.asdict(config.inference),
        "provenance": {"dataset": str(spec.path), "iterations": iteration, "library_version": __version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "config": config_to_dict(config)},
        "validation": validation or {},
    }


def validate_model(predictor: Predictor, items: list[TrainingImage], cap: float) -> dict[str, float]:
    """Point error of the predictor on validation images (the real inference path).

    Returns the mean and median error over detected landmarks, the count of missed ones, and a
    selection score where a missed landmark counts as an error of `cap`.
    """
    errors, scores, missed = [], [], 0
    for item in items:
        prediction = predictor.predict(item.image)
        truth = item.landmarks
        for i in np.flatnonzero(truth.present):
            point = prediction.landmarks.points_lps[i]
            if np.all(np.isfinite(point)):
                error = float(np.linalg.norm(point - truth.points_lps[i]))
                errors.append(error)
                scores.append(min(error, cap))
            else:
                missed += 1
                scores.append(cap)
    return {"mean_error": float(np.mean(errors)) if errors else float("nan"),
            "median_error": float(np.median(errors)) if errors else float("nan"),
            "missed": float(missed), "score": float(np.mean(scores))}


def train(config: Config, resume: bool = False, device: str = "auto",
          progress: Callable[[dict[str, Any]], None] | None = None,
          cancel: Callable[[], bool] | None = None) -> TrainingResult:
    """Train a model as `config` says, writing checkpoint.pt, model.safetensors (best), last.safetensors.

    Args:
        resume: continue from `output_dir/checkpoint.pt` (exactly where it stopped).
        device: 'auto', 'cpu' or 'cuda' (under torchrun: each rank uses its LOCAL_RANK GPU).
        progress: called every iteration with a dict (iteration, iterations, loss, mean_sigma, eta_s, ...).
        cancel: polled every iteration; True saves a checkpoint and raises Cancelled.
    Raises:
        TrainingError: the loss or gradients became non-finite (last good checkpoint kept).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    if distributed and target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    main_process = rank == 0
    if distributed and main_process:
        log.info("distributed training on %d processes (%s)", world_size, dist.get_backend())

    spec = load_dataset_spec(config.dataset)
    if spec.dimension != config.dimension:
        raise DataError(f"{spec.path}: dataset is {spec.dimension}D but the config's grid is {config.dimension}D")
    training_items = load_split(spec, spec.split(config.train_split), config, target)
    validation_entries = [e for e in spec.entries if e.split == config.validation_split]
    validation_items = load_split(spec, validation_entries, config, target) if validation_entries else []
    unit = spacing_unit(training_items[0].path)
    names = list(spec.landmark_names)
    permutation = swap_permutation(names, config.augmentation.flip_pairs) if config.augmentation.flip_pairs else None

    params = {**default_params(config.model.architecture, config.dimension), **config.model.params}
    torch.manual_seed(config.training.seed)
    network = build_model(config.model.architecture, config.dimension, 1, len(names), params)
    sigmas = LearnableSigmas(len(names), config.heatmap.sigma_init, config.heatmap.sigma_min,
                             config.heatmap.learnable_sigma)
    trainable = _Trainable(network, sigmas).to(target)
    optimizer = _optimizer(trainable, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config))

    output_dir = config.output_dir
    checkpoint_path = output_dir / CHECKPOINT
    start_iteration, best_score, history = 0, math.inf, []
    best_validation: dict[str, float] | None = None
    if resume:
        if not checkpoint_path.is_file():
            raise DataError(f"{checkpoint_path}: no checkpoint to resume from")
        state = torch.load(checkpoint_path, map_location=target, weights_only=True)
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_iteration = int(state["iteration"])
        best_score = float(state["best_score"])
        best_validation = state.get("best_validation") or None
        history = list(state.get("history", []))
        log.info("resuming %s at iteration %d", output_dir, start_iteration)
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.toml")

    model = (nn.parallel.DistributedDataParallel(trainable, device_ids=[target.index] if target.type == "cuda" else None)
             if distributed else trainable)
    gamma = config.heatmap.resolved_gamma(config.dimension)
    autocast = target.type == "cuda" and config.training.mixed_precision

    def save_checkpoint(iteration: int) -> None:
        if not main_process:
            return
        with atomic_output(checkpoint_path) as temporary:
            torch.save({"iteration": iteration, "trainable": trainable.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "best_score": best_score, "best_validation": best_validation or {},
                        "history": history}, temporary)

    def export(path: Path, iteration: int, validation: dict | None) -> None:
        save_model(path, trainable.network, trainable.sigmas(),
                   model_metadata(config, spec, params, trainable.sigmas(), unit, iteration, validation))

    def run_validation(iteration: int) -> dict[str, float] | None:
        nonlocal best_score, best_validation
        if not validation_items:
            return None
        trainable.eval()
        metadata = model_metadata(config, spec, params, trainable.sigmas(), unit, iteration, None)
        predictor = Predictor(LoadedModel(trainable.network, trainable.sigmas().detach(), metadata), target)
        result = validate_model(predictor, validation_items, cap=10.0 * config.heatmap.sigma_init)
        trainable.train()
        if result["score"] < best_score:
            best_score, best_validation = result["score"], {**result, "iteration": iteration}
            export(output_dir / BEST_MODEL, iteration, best_validation)
        return result

    started, started_iteration = time.perf_counter(), start_iteration
    batch = config.training.batch_size
    trainable.train()
    iteration = start_iteration
    while iteration < config.training.iterations:
        samples, indices, presents = [], [], []
        for slot in range(batch):
            generator = torch.Generator().manual_seed(
                ((config.training.seed * 1_000_003 + iteration) * 64 + rank) * 1024 + slot)
            item = training_items[int(torch.randint(len(training_items), (), generator=generator))]
            sample, index, _ = augmented_sample(item.prepared, item.landmarks.points_lps, config.grid.size,
                                                config.grid.spacing, config.augmentation, generator, permutation)
            samples.append(sample)
            indices.append(index)
            presents.append(torch.isfinite(index).all(dim=1))
        inputs = torch.stack(samples).to(target)
        index = torch.stack(indices)
        present = torch.stack(presents).to(target)
        torch.manual_seed(config.training.seed * 7919 + iteration * 31 + rank)

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            output, sigma = model(inputs)
        targets = gaussian_heatmaps(index, present, config.grid.size, config.grid.spacing, sigma, gamma)
        loss, heatmap_term = heatmap_loss(output.final, targets, present, config.grid.spacing, sigma, config.heatmap)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at iteration {iteration + 1}; training stopped. The last good "
                f"checkpoint ({checkpoint_path}) is kept: lower training.learning_rate and resume with --resume.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = nn.utils.clip_grad_norm_(trainable.parameters(), config.training.gradient_clip)
        if not torch.isfinite(gradient_norm):
            raise TrainingError(
                f"non-finite gradients at iteration {iteration + 1}; training stopped. The last good checkpoint "
                f"({checkpoint_path}) is kept: lower training.learning_rate and resume with --resume.")
        optimizer.step()
        scheduler.step()
        iteration += 1

        elapsed = time.perf_counter() - started
        info: dict[str, Any] = {
            "iteration": iteration, "iterations": config.training.iterations, "loss": loss.item(),
            "heatmap_loss": heatmap_term.item(), "mean_sigma": sigma.mean().item(),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "eta_s": elapsed / (iteration - started_iteration) * (config.training.iterations - iteration)}
        last = iteration == config.training.iterations
        if main_process and (iteration % config.training.validate_every == 0 or last):
            validation = run_validation(iteration)
            if validation is not None:
                info["validation"] = validation
                history.append({"iteration": iteration, **validation})
        if iteration % config.training.checkpoint_every == 0 or last:
            save_checkpoint(iteration)
            if main_process and not validation_items:
                # Without validation there is no best model: keep the newest one usable at all times.
                export(output_dir / BEST_MODEL, iteration, None)
        if progress is not None and main_process:
            progress(info)
        if cancel is not None and cancel():
            save_checkpoint(iteration)
            raise Cancelled(f"training cancelled at iteration {iteration}; resume with --resume")

    if main_process:
        export(output_dir / LAST_MODEL, iteration, history[-1] if history else None)
    if distributed:
        dist.barrier()
    return TrainingResult(iteration, best_validation["mean_error"] if best_validation else None,
                          output_dir / BEST_MODEL, history)

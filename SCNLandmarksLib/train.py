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
from .bundle import LoadedModel, Stage, load_model, save_model
from .config import (AugmentationConfig, Config, GridConfig, HeatmapConfig, ModelConfig, TrainingConfig,
                     config_to_dict, save_config)
from .data.augmentation import augmented_sample, swap_permutation
from .data.preparation import PreparedImage, prepare_image
from .data.spec import DatasetSpec, ImageEntry, load_dataset_spec
from .errors import Cancelled, DataError, ModelFileError, TrainingError
from .geometry import ImageGeometry
from .heatmaps import LearnableSigmas, gaussian_heatmaps
from .inference import Predictor, resolve_device
from .io.atomic import atomic_output
from .io.images import read_image, spacing_unit
from .landmark_set import LandmarkSet
from .losses import heatmap_loss
from .models import TRAINING_ONLY_PARAMS, build_model, default_params

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
REFINEMENT_CHECKPOINT = "checkpoint_refinement.pt"
BEST_MODEL = "model.safetensors"
LAST_MODEL = "last.safetensors"


@dataclass
class TrainingImage:
    id: str
    path: Path
    image: Any                   # the scalar sitk.Image (kept for validation through the predictor)
    landmarks: LandmarkSet
    prepared: PreparedImage | None = None   # normalised for the stage being trained


@dataclass
class TrainingResult:
    iterations: int
    best_validation_error: float | None
    model_path: Path
    history: list[dict[str, float]]
    best_score: float = math.inf     # validation selection score of the exported best model


@dataclass(frozen=True)
class StageSettings:
    """What one training stage needs: the coarse SCN on whole images, or the refiner on patches."""

    name: str                      # "coarse" | "refinement"
    grid: GridConfig
    heatmap: HeatmapConfig
    model: ModelConfig
    training: TrainingConfig
    augmentation: AugmentationConfig
    patch_offset_mm: float | None  # None: grids centred on the image; else on a landmark +- this
    checkpoint: str


def stage_settings(config: Config) -> list[StageSettings]:
    stages = [StageSettings("coarse", config.grid, config.heatmap, config.model, config.training,
                            config.augmentation, None, CHECKPOINT)]
    r = config.refinement
    if r is not None:
        stages.append(StageSettings("refinement", r.grid, r.heatmap, r.model, r.training, r.augmentation,
                                    r.offset_mm, REFINEMENT_CHECKPOINT))
    return stages


class _Trainable(nn.Module):
    """Network and sigmas in one module, so DistributedDataParallel averages both."""

    def __init__(self, network: nn.Module, sigmas: LearnableSigmas):
        super().__init__()
        self.network = network
        self.sigmas = sigmas

    def forward(self, x: torch.Tensor):
        return self.network(x), self.sigmas()

    def stage(self) -> Stage:
        return Stage(self.network, self.sigmas().detach())


def load_split(spec: DatasetSpec, entries: list[ImageEntry]) -> list[TrainingImage]:
    """Read the images of one split with their landmarks (LPS)."""
    images = {e.id: read_image(e.image, spec.dimension) for e in entries}
    landmarks = spec.load_landmarks(entries, {k: ImageGeometry.of(v) for k, v in images.items()})
    items = []
    for entry in entries:
        if not landmarks[entry.id].present.any():
            raise DataError(f"{entry.landmarks or spec.landmarks_csv}: image '{entry.id}' has no landmarks at all")
        items.append(TrainingImage(entry.id, entry.image, images[entry.id], landmarks[entry.id]))
    return items


def _learning_rate_factor(training: TrainingConfig) -> Callable[[int], float]:
    if training.schedule == "cosine":
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, training.iterations) / training.iterations))
    if training.schedule == "step":
        return lambda it: 0.1 ** (it // training.step_every)
    return lambda it: 1.0


def _optimizer(trainable: _Trainable, training: TrainingConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(trainable.network.parameters()), "lr": training.learning_rate,
               "weight_decay": training.weight_decay},
              {"params": list(trainable.sigmas.parameters()), "lr": training.sigma_learning_rate, "weight_decay": 0.0}]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=training.momentum, nesterov=True)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam(groups)


def _new_trainable(stage: StageSettings, dimension: int, count: int) -> tuple[_Trainable, dict]:
    params = {**default_params(stage.model.architecture, dimension), **stage.model.params}
    torch.manual_seed(stage.training.seed)
    network = build_model(stage.model.architecture, dimension, 1, count, params)
    sigmas = LearnableSigmas(count, stage.heatmap.sigma_init, stage.heatmap.sigma_min, stage.heatmap.learnable_sigma)
    return _Trainable(network, sigmas), params


def _start_from(trainable: _Trainable, params: dict, config: Config, names: list[str]) -> None:
    """Copy a model file's coarse network and sigmas into a new trainable (fine-tuning).

    Raises:
        ModelFileError: the file is unreadable or was not made for this configuration.
    """
    path = config.initial_model
    loaded = load_model(path, "cpu")
    metadata = loaded.metadata

    def design(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in TRAINING_ONLY_PARAMS}

    mismatches = [what for what, ours, theirs in (
        ("landmark names", names, list(metadata["landmark_names"])),
        ("architecture", config.model.architecture, metadata["architecture"]),
        ("network parameters", design(params), design(metadata["params"]))) if ours != theirs]
    if mismatches:
        raise ModelFileError(f"{path}: cannot start training from this model: its {', '.join(mismatches)} "
                             "differ from the configuration's")
    trainable.network.load_state_dict(loaded.network.state_dict())
    with torch.no_grad():
        trainable.sigmas.log_sigma.copy_(loaded.sigmas.to(trainable.sigmas.log_sigma).log())
    log.info("starting from %s", path)


def model_metadata(config: Config, spec: DatasetSpec, params: dict, sigmas: torch.Tensor, unit: str,
                   iteration: int, validation: dict | None, refinement: tuple[dict, torch.Tensor] | None = None,
                   ) -> dict[str, Any]:
    """Everything a model file needs to be used and traced back to its training.

    Args:
        refinement: (params, sigmas) of the trained refinement stage, if any.
    """
    metadata = {
        "architecture": config.model.architecture,
        "dimension": config.dimension,
        "in_channels": 1,
        "landmark_names": list(spec.landmark_names),
        "params": params,
        "grid_spacing": list(config.grid.spacing),
        "training_grid_size": list(config.grid.size),
        "unit": unit,
        "intensity": dataclasses.asdict(config.intensity),
        "sigmas": [float(s) for s in sigmas.detach().cpu()],
        "gamma": config.heatmap.resolved_gamma(config.dimension),
        "inference": dataclasses.asdict(config.inference),
        "provenance": {"dataset": str(spec.path), "iterations": iteration, "library_version": __version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "config": config_to_dict(config)},
        "validation": validation or {},
    }
    if refinement is not None:
        r = config.refinement
        metadata["refinement"] = {"architecture": r.model.architecture, "params": refinement[0],
                                  "patch_size": list(r.grid.size), "grid_spacing": list(r.grid.spacing),
                                  "sigmas": [float(s) for s in refinement[1].detach().cpu()],
                                  "gamma": r.heatmap.resolved_gamma(config.dimension)}
    return metadata


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


def _sample_batch(stage: StageSettings, items: list[TrainingImage], iteration: int, rank: int,
                  permutation: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch, a pure function of (seed, iteration, rank): (inputs, landmark grid indices, present)."""
    samples, indices = [], []
    for slot in range(stage.training.batch_size):
        generator = torch.Generator().manual_seed(
            ((stage.training.seed * 1_000_003 + iteration) * 64 + rank) * 1024 + slot)
        item = items[int(torch.randint(len(items), (), generator=generator))]
        points = item.landmarks.points_lps
        center = None
        if stage.patch_offset_mm is not None:
            present = np.flatnonzero(item.landmarks.present)
            chosen = points[present[int(torch.randint(len(present), (), generator=generator))]]
            offset = (torch.rand(len(chosen), generator=generator, dtype=torch.float64) * 2.0 - 1.0).numpy()
            center = chosen + offset * stage.patch_offset_mm
        sample, index, _ = augmented_sample(item.prepared, points, stage.grid.size, stage.grid.spacing,
                                            stage.augmentation, generator, permutation, center_lps=center)
        samples.append(sample)
        indices.append(index)
    index = torch.stack(indices)
    return torch.stack(samples), index, torch.isfinite(index).all(dim=2)


def train(config: Config, resume: bool = False, device: str = "auto",
          progress: Callable[[dict[str, Any]], None] | None = None,
          cancel: Callable[[], bool] | None = None) -> TrainingResult:
    """Train a model as `config` says: the coarse SCN, then the optional refinement stage.

    Writes config.toml, checkpoint.pt (checkpoint_refinement.pt), model.safetensors (best on
    validation, or newest without a validation split) and last.safetensors.

    Args:
        resume: continue from the checkpoints in `output_dir` (exactly where training stopped).
        device: 'auto', 'cpu' or 'cuda' (under torchrun: each rank uses its LOCAL_RANK GPU).
        progress: called every iteration with a dict (stage, iteration, iterations, loss, mean_sigma, eta_s, ...).
        cancel: polled every iteration; True saves a checkpoint and raises Cancelled.
    Raises:
        TrainingError: the loss or gradients became non-finite (last good checkpoint kept).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    target = resolve_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    if distributed and target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    main_process = rank == 0
    if distributed and main_process:
        log.info("distributed training on %d processes (%s)", dist.get_world_size(), dist.get_backend())

    spec = load_dataset_spec(config.dataset)
    if spec.dimension != config.dimension:
        raise DataError(f"{spec.path}: dataset is {spec.dimension}D but the config's grid is {config.dimension}D")
    training_items = load_split(spec, spec.split(config.train_split))
    validation_entries = [e for e in spec.entries if e.split == config.validation_split]
    validation_items = load_split(spec, validation_entries) if validation_entries else []
    unit = spacing_unit(training_items[0].path)
    names = list(spec.landmark_names)
    output_dir = config.output_dir
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.toml")

    trained: dict[str, tuple[_Trainable, dict]] = {}

    def current_model(iteration: int, validation: dict | None) -> tuple[dict[str, Any], Stage | None]:
        """Metadata and refinement stage of the model as trained so far."""
        coarse, coarse_params = trained["coarse"]
        refinement = trained.get("refinement")
        metadata = model_metadata(config, spec, coarse_params, coarse.sigmas(), unit, iteration, validation,
                                  None if refinement is None else (refinement[1], refinement[0].sigmas()))
        return metadata, None if refinement is None else refinement[0].stage()

    def export(path: Path, iteration: int, validation: dict | None) -> None:
        metadata, refinement = current_model(iteration, validation)
        coarse = trained["coarse"][0]
        save_model(path, coarse.network, coarse.sigmas(), metadata, refinement)

    def validate(iteration: int) -> dict[str, float] | None:
        if not validation_items:
            return None
        metadata, refinement = current_model(iteration, None)
        coarse = trained["coarse"][0]
        for module, _ in trained.values():
            module.eval()
        predictor = Predictor(LoadedModel(coarse.network, coarse.sigmas().detach(), metadata, refinement), target)
        scores = validate_model(predictor, validation_items, cap=10.0 * config.heatmap.sigma_init)
        for module, _ in trained.values():
            module.train()
        return scores

    result = None
    for stage in stage_settings(config):
        for item in training_items:
            item.prepared = prepare_image(item.image, stage.grid.spacing, config.intensity, target)
        trainable, params = _new_trainable(stage, config.dimension, len(names))
        if stage.name == "coarse" and config.initial_model is not None:
            _start_from(trainable, params, config, names)  # a resumed checkpoint then overrides it
        trained[stage.name] = (trainable.to(target), params)
        pairs = stage.augmentation.flip_pairs
        permutation = swap_permutation(names, pairs) if pairs else None
        # A refinement that never beats the coarse model's best validation score is not shipped.
        result = _run_stage(stage, trainable, training_items, permutation, config.dimension, target, rank,
                            distributed, output_dir, resume, progress, cancel, validate, export,
                            validating=bool(validation_items),
                            initial_best=result.best_score if result is not None else math.inf)
        trainable.eval()
    if main_process:
        export(output_dir / LAST_MODEL, result.iterations, result.history[-1] if result.history else None)
    if distributed:
        dist.barrier()
    return result


def _run_stage(stage: StageSettings, trainable: _Trainable, items: list[TrainingImage],
               permutation: list[int] | None, dimension: int, target: torch.device, rank: int, distributed: bool,
               output_dir: Path, resume: bool, progress, cancel,
               validate: Callable[[int], dict | None], export: Callable[[Path, int, dict | None], None],
               validating: bool, initial_best: float = math.inf) -> TrainingResult:
    """The optimisation loop of one stage, with validation, best-model export, checkpoints and resume.

    Args:
        validating: whether `validate` measures anything (else the newest model is exported at each checkpoint).
        initial_best: the validation score to beat before exporting a best model.
    """
    main_process = rank == 0
    training = stage.training
    optimizer = _optimizer(trainable, training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(training))
    checkpoint_path = output_dir / stage.checkpoint
    start_iteration, best_score, history = 0, initial_best, []
    best_validation: dict[str, float] | None = None
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=target, weights_only=True)
        trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_iteration = int(state["iteration"])
        best_score = float(state["best_score"])
        best_validation = state.get("best_validation") or None
        history = list(state.get("history", []))
        log.info("resuming the %s stage of %s at iteration %d", stage.name, output_dir, start_iteration)
    elif resume and stage.name == "coarse":
        raise DataError(f"{checkpoint_path}: no checkpoint to resume from")

    device_ids = [target.index] if target.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(trainable, device_ids=device_ids) if distributed else trainable
    gamma = stage.heatmap.resolved_gamma(dimension)
    autocast = target.type == "cuda" and training.mixed_precision

    def save_checkpoint(iteration: int) -> None:
        if not main_process:
            return
        with atomic_output(checkpoint_path) as temporary:
            torch.save({"iteration": iteration, "trainable": trainable.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "best_score": best_score, "best_validation": best_validation or {},
                        "history": history}, temporary)

    def stopped(reason: str, iteration: int) -> TrainingError:
        return TrainingError(
            f"{reason} at iteration {iteration + 1} of the {stage.name} stage; training stopped. The last good "
            f"checkpoint ({checkpoint_path}) is kept: lower training.learning_rate and resume with --resume.")

    started, started_iteration = time.perf_counter(), start_iteration
    trainable.train()
    iteration = start_iteration
    while iteration < training.iterations:
        inputs, index, present = _sample_batch(stage, items, iteration, rank, permutation)
        inputs, present = inputs.to(target), present.to(target)
        torch.manual_seed(training.seed * 7919 + iteration * 31 + rank)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            output, sigma = model(inputs)
        targets = gaussian_heatmaps(index, present, stage.grid.size, stage.grid.spacing, sigma, gamma)
        loss, heatmap_term = heatmap_loss(output.final, targets, present, stage.grid.spacing, sigma, stage.heatmap)
        if not torch.isfinite(loss):
            raise stopped(f"the loss became {loss.item()}", iteration)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = nn.utils.clip_grad_norm_(trainable.parameters(), training.gradient_clip)
        if not torch.isfinite(gradient_norm):
            raise stopped("non-finite gradients", iteration)
        optimizer.step()
        scheduler.step()
        iteration += 1

        elapsed = time.perf_counter() - started
        info: dict[str, Any] = {
            "stage": stage.name, "iteration": iteration, "iterations": training.iterations, "loss": loss.item(),
            "heatmap_loss": heatmap_term.item(), "mean_sigma": sigma.mean().item(),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "eta_s": elapsed / (iteration - started_iteration) * (training.iterations - iteration)}
        last = iteration == training.iterations
        if main_process and (iteration % training.validate_every == 0 or last):
            validation = validate(iteration)
            if validation is not None:
                info["validation"] = validation
                history.append({"iteration": iteration, **validation})
                if validation["score"] < best_score:
                    best_score, best_validation = validation["score"], {**validation, "iteration": iteration}
                    export(output_dir / BEST_MODEL, iteration, best_validation)
        if iteration % training.checkpoint_every == 0 or last:
            save_checkpoint(iteration)
            if main_process and not validating:
                # Without validation there is no best model: keep the newest one usable at all times.
                export(output_dir / BEST_MODEL, iteration, None)
        if progress is not None and main_process:
            progress(info)
        if cancel is not None and cancel():
            save_checkpoint(iteration)
            raise Cancelled(f"training cancelled at iteration {iteration} of the {stage.name} stage; "
                            "resume with --resume")
    return TrainingResult(iteration, best_validation["mean_error"] if best_validation else None,
                          output_dir / BEST_MODEL, history, best_score)

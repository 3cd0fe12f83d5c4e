"""Training: samples -> SCN -> loss, with validation, best-model selection, checkpoints and exact resume.

Determinism: every sample is drawn from a generator seeded by (seed, iteration, rank, slot) and
dropout from a seed per iteration, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have. Under `torchrun` (WORLD_SIZE > 1) the network is wrapped in
DistributedDataParallel; rank 0 validates and writes files.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .bundle import LoadedModel, ModelDescription, Stage, StageDescription, load_model, read_description, save_model
from .config import (
    AugmentationConfig,
    Config,
    GridConfig,
    HeatmapConfig,
    ModelConfig,
    TrainingConfig,
    config_to_dict,
    save_config,
)
from .data.augmentation import augmented_sample, chain_indices, swap_permutation
from .data.preparation import PreparedImage, prepare_image
from .data.spec import DatasetSpec, ImageEntry, load_dataset_spec
from .errors import Cancelled, DataError, ModelFileError, TrainingError
from .geometry import ImageGeometry
from .heatmaps import LearnableSigmas, gaussian_heatmaps
from .inference import Predictor, cpu_bfloat16_hardware, resolve_device
from .io.atomic import atomic_output
from .landmark_set import LandmarkSet
from .losses import heatmap_loss
from .models import HEAD_PREFIXES, TRAINING_ONLY_PARAMS, build_model, default_params
from .pose import MeanConfiguration, Pose, anatomical_scales, mean_configuration
from .vocabulary import Cancel

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
REFINEMENT_CHECKPOINT = "checkpoint_refinement.pt"
BEST_MODEL = "model.safetensors"
LAST_MODEL = "last.safetensors"


@dataclass
class TrainingImage:
    id: str
    path: Path
    image: Any  # the scalar sitk.Image (kept for validation through the predictor)
    landmarks: LandmarkSet
    prepared: PreparedImage | None = None  # normalised for the stage being trained


@dataclass
class TrainingResult:
    iterations: int
    best_validation_error: float | None
    model_path: Path
    history: list[dict[str, float]]
    best_score: float = math.inf  # validation selection score of the exported best model


@dataclass(frozen=True)
class StageSettings:
    """What one training stage needs: the coarse SCN on whole images, or the refiner on patches."""

    name: str  # "coarse" | "refinement"
    grid: GridConfig
    heatmap: HeatmapConfig
    model: ModelConfig
    training: TrainingConfig
    augmentation: AugmentationConfig
    patch_offset_mm: float | None  # None: grids centered on the image; else on a landmark +- this
    checkpoint: str

    @property
    def work(self) -> float:
        """The stage's cost in grid voxels processed: how a time budget is shared between stages
        (a refinement iteration on small patches costs a fraction of a whole-image one)."""
        return float(self.training.iterations * self.training.batch_size * math.prod(self.grid.size))


def mixed_precision_applies(device: torch.device) -> bool:
    """Whether `mixed_precision` training autocasts to bfloat16 on `device`: on CUDA, and on CPUs with
    AMX (3D steps 2x, 2D 1.3x faster there; not measured with AVX-512 BF16 alone, and other CPUs
    would emulate it)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bfloat16_hardware() == "amx")


def stage_settings(config: Config) -> list[StageSettings]:
    stages = [
        StageSettings(
            "coarse", config.grid, config.heatmap, config.model, config.training, config.augmentation, None, CHECKPOINT
        )
    ]
    r = config.refinement
    if r is not None:
        stages.append(
            StageSettings(
                "refinement", r.grid, r.heatmap, r.model, r.training, r.augmentation, r.offset_mm, REFINEMENT_CHECKPOINT
            )
        )
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
    images = {e.id: e.read(spec.dimension) for e in entries}
    landmarks = spec.load_landmarks(entries, {k: ImageGeometry.of(v) for k, v in images.items()})
    items = []
    for entry in entries:
        if not landmarks[entry.id].present.any():
            raise DataError(f"{entry.landmarks or spec.landmarks_csv}: image '{entry.id}' has no landmarks at all")
        items.append(TrainingImage(entry.id, entry.image, images[entry.id], landmarks[entry.id]))
    return items


def _in_canonical_size(item: TrainingImage, scale: float) -> TrainingImage:
    """The training image with its anatomy at the canonical size: a new header (pixel size 1 / scale),
    the same pixels; the landmarks scaled alike, so each stays on its pixel."""
    pose = Pose.scaling_about(np.zeros(item.landmarks.dimension), scale)
    landmarks = replace(item.landmarks, points_lps=pose.to_canonical(item.landmarks.points_lps))
    return replace(item, image=pose.canonical_image(item.image), landmarks=landmarks)


def _learning_rate_factor(training: TrainingConfig, budget_spent: Callable[[], float]) -> Callable[[int], float]:
    """The learning-rate factor at an iteration. Under a time budget the schedule runs by the larger
    of the iterations done and the share of the budget spent, so that it ends annealed when the
    budget, not the iteration count, ends the stage (the iteration count is an estimate from a speed
    measured in a moment; a cosine schedule cut at a fifth of its length ends at a high rate)."""

    def reached(iteration: int) -> float:
        return max(float(iteration), budget_spent() * training.iterations)

    if training.schedule == "cosine":
        length = max(training.iterations, 1)  # a kept stage (0 iterations) never steps
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(reached(it), length) / length))
    if training.schedule == "step":
        return lambda it: 0.1 ** (int(reached(it)) // training.step_every)
    return lambda it: 1.0


def _optimizer(trainable: _Trainable, training: TrainingConfig) -> torch.optim.Optimizer:
    groups = [
        {
            "params": list(trainable.network.parameters()),
            "lr": training.learning_rate,
            "weight_decay": training.weight_decay,
        },
        {"params": list(trainable.sigmas.parameters()), "lr": training.sigma_learning_rate, "weight_decay": 0.0},
    ]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=training.momentum, nesterov=True)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam(groups)


def capped_point_errors(points: np.ndarray, truth: np.ndarray, cap: float) -> np.ndarray:
    """(N,) distances to the true points, at most `cap` (also for a missed landmark); NaN where the
    case has no true point. The one rule by which model selection scores a missed landmark."""
    distances = np.linalg.norm(points - truth, axis=1)
    present = np.all(np.isfinite(truth), axis=1)
    return np.where(present, np.minimum(np.nan_to_num(distances, nan=cap), cap), np.nan)


def validate_model(predictor: Predictor, items: list[TrainingImage], cap: float) -> dict[str, float]:
    """Point error of the predictor on validation images (the real inference path).

    Returns the mean and median error over detected landmarks, the count of missed ones, and a
    selection score where a missed landmark counts as an error of `cap`.
    """
    errors, scores, missed = [], [], 0
    for item in items:
        points, truth = predictor.predict(item.image).landmarks.points_lps, item.landmarks.points_lps
        found = np.all(np.isfinite(points), axis=1) & item.landmarks.present
        errors.extend(np.linalg.norm(points[found] - truth[found], axis=1))
        missed += int(np.count_nonzero(item.landmarks.present & ~found))
        scores.extend(capped_point_errors(points, truth, cap)[item.landmarks.present])
    return {
        "mean_error": float(np.mean(errors)) if errors else float("nan"),
        "median_error": float(np.median(errors)) if errors else float("nan"),
        "missed": float(missed),
        "score": float(np.mean(scores)),
    }


def _sample_batch(
    stage: StageSettings, items: list[TrainingImage], iteration: int, rank: int, permutation: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch, a pure function of (seed, iteration, rank): (inputs, landmark grid indices, present)."""
    samples, indices = [], []
    for slot in range(stage.training.batch_size):
        generator = torch.Generator().manual_seed(
            ((stage.training.seed * 1_000_003 + iteration) * 64 + rank) * 1024 + slot
        )
        item = items[int(torch.randint(len(items), (), generator=generator))]
        points = item.landmarks.points_lps
        center = None
        if stage.patch_offset_mm is not None:
            present = np.flatnonzero(item.landmarks.present)
            chosen = points[present[int(torch.randint(len(present), (), generator=generator))]]
            offset = (torch.rand(len(chosen), generator=generator, dtype=torch.float64) * 2.0 - 1.0).numpy()
            center = chosen + offset * stage.patch_offset_mm
        assert item.prepared is not None  # prepared for each stage before it trains
        sample, index, _ = augmented_sample(
            item.prepared,
            points,
            stage.grid.size,
            stage.grid.spacing,
            stage.augmentation,
            generator,
            permutation,
            center_lps=center,
            chains=chain_indices(item.landmarks.names, stage.augmentation.articulation_chains),
        )
        samples.append(sample)
        indices.append(index)
    index = torch.stack(indices)
    return torch.stack(samples), index, torch.isfinite(index).all(dim=2)


@dataclass(frozen=True)
class RunContext:
    """Where this process trains: its rank among the DDP processes, its device and the output folder.

    Rank 0 (the only one without torchrun) validates and writes files.
    """

    rank: int
    distributed: bool
    device: torch.device
    output_dir: Path
    joined_process_group: bool = False  # start() joined it, so finish() leaves it

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str, output_dir: Path) -> RunContext:
        """This process's context; under torchrun (WORLD_SIZE > 1) joins the process group first."""
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        rank = int(os.environ.get("RANK", "0"))
        target = resolve_device(device)
        joined = distributed and not dist.is_initialized()
        if joined:
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        if distributed and target.type == "cuda":
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(target)
        if distributed and rank == 0:
            log.info("distributed training on %d processes (%s)", dist.get_world_size(), dist.get_backend())
        return cls(rank, distributed, target, output_dir, joined)

    def finish(self) -> None:
        """Wait for every process, then leave the process group start() joined: left to the
        interpreter's exit, gloo's threads were now and then torn down mid-flight (an abort)."""
        if self.distributed:
            dist.barrier()
        if self.joined_process_group:
            dist.destroy_process_group()


class StageTrainer:
    """The training of one stage: its network and sigmas, optimiser, learning-rate schedule,
    checkpoint and best validation score.

    Args:
        initial_model: a model file whose network and sigmas of this stage start it (fine-tuning).
        initial_best: the validation score to beat before exporting a best model (a refinement that
            never beats the coarse model's best score is not shipped).
    Raises:
        ModelFileError: `initial_model` is unreadable or was not made for this stage.
    """

    def __init__(
        self,
        settings: StageSettings,
        context: RunContext,
        dimension: int,
        names: list[str],
        initial_model: Path | None = None,
        initial_best: float = math.inf,
    ):
        self.settings = settings
        self.context = context
        self.dimension = dimension
        self.params = {**default_params(settings.model.architecture, dimension), **settings.model.params}
        torch.manual_seed(settings.training.seed)
        network = build_model(settings.model.architecture, dimension, 1, len(names), self.params)
        heatmap = settings.heatmap
        sigmas = LearnableSigmas(len(names), heatmap.sigma_init, heatmap.sigma_min, heatmap.learnable_sigma)
        self.trainable = _Trainable(network, sigmas)
        self.checkpoint_path = context.output_dir / settings.checkpoint
        self.best_score = initial_best
        self.best_validation: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self.iteration = 0
        if initial_model is not None:
            self._start_from(initial_model, names)
        self.trainable.to(context.device)
        self.optimizer = _optimizer(self.trainable, settings.training)
        # (start, deadline) of the stage's time budget, set when it trains under one.
        self.time_window: tuple[float, float] | None = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _learning_rate_factor(settings.training, self.budget_spent)
        )

    def budget_spent(self) -> float:
        """The share of the stage's time budget spent: 0 without a budget, at most 1."""
        if self.time_window is None:
            return 0.0
        start, deadline = self.time_window
        return min(1.0, (time.monotonic() - start) / max(deadline - start, 1e-9))

    def _start_from(self, path: Path, names: list[str]) -> None:
        """Copy a model file's network and sigmas of this stage (coarse or refinement) into it (fine-tuning).

        When the file's landmark names differ from `names`, only the landmark-independent weights
        (the local-appearance body) are copied and the heads start anew; the sigmas of landmarks
        present in both are kept.

        Raises:
            ModelFileError: the file is unreadable or was not made for this stage.
        """
        loaded = load_model(path, "cpu")
        description = loaded.description
        name = self.settings.name
        theirs = description.stages.get(name)
        if theirs is None:
            raise ModelFileError(f"{path}: cannot start the {name} stage from this model: it has no {name} stage")

        def design(values: dict) -> dict:
            return {k: v for k, v in values.items() if k not in TRAINING_ONLY_PARAMS}

        mismatches = [
            what
            for what, ours, base in (
                ("architecture", self.settings.model.architecture, theirs.architecture),
                ("network parameters", design(self.params), design(theirs.params)),
            )
            if ours != base
        ]
        if mismatches:
            raise ModelFileError(
                f"{path}: cannot start training from this model: its {name} stage's "
                f"{', '.join(mismatches)} differ from the configuration's"
            )
        source = loaded.coarse if name == "coarse" else loaded.refinement
        assert source is not None  # the file describes this stage (checked above)
        base_names = list(description.landmark_names)
        if base_names == names:
            self.trainable.network.load_state_dict(source.network.state_dict())
            sigmas = source.sigmas.clone()
            log.info("starting the %s stage from %s", name, path)
        else:
            body = {k: v for k, v in source.network.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
            self.trainable.network.load_state_dict(body, strict=False)
            sigmas = self.trainable.sigmas().detach().cpu()
            for i, landmark in enumerate(names):
                if landmark in base_names:
                    sigmas[i] = source.sigmas[base_names.index(landmark)]
            log.info(
                "starting the %s stage from the local-appearance weights of %s (other landmarks: new heads)", name, path
            )
        with torch.no_grad():
            self.trainable.sigmas.log_sigma.copy_(sigmas.to(self.trainable.sigmas.log_sigma).log())

    def resume(self) -> None:
        """Continue from this stage's checkpoint, exactly where it stopped (a refinement stage that never
        started has none: it starts afresh)."""
        if self.checkpoint_path.is_file():
            state = torch.load(self.checkpoint_path, map_location=self.context.device, weights_only=True)
            self.trainable.load_state_dict(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            # The configuration's learning rates, not the checkpoint's: resuming with a lower one is
            # how a run whose loss diverged goes on (see `_stopped`).
            training = self.settings.training
            self.scheduler.base_lrs = [training.learning_rate, training.sigma_learning_rate]
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["initial_lr"], group["lr"] = base, base * factor
            self.iteration = int(state["iteration"])
            self.best_score = float(state["best_score"])
            self.best_validation = state.get("best_validation") or None
            self.history = list(state.get("history", []))
            log.info(
                "resuming the %s stage of %s at iteration %d",
                self.settings.name,
                self.context.output_dir,
                self.iteration,
            )
        elif self.settings.name == "coarse":
            raise DataError(f"{self.checkpoint_path}: no checkpoint to resume from")

    def stage(self) -> Stage:
        """The network and its current sigmas, as a model file holds them."""
        return self.trainable.stage()

    def description(self) -> StageDescription:
        settings = self.settings
        return StageDescription(
            settings.model.architecture,
            self.params,
            tuple(settings.grid.size),
            tuple(settings.grid.spacing),
            tuple(float(s) for s in self.trainable.sigmas().detach().cpu()),
            settings.heatmap.resolved_gamma(self.dimension),
        )

    def require_finite_weights(self) -> None:
        """Refuse to keep weights a diverged step made non-finite (the loss that shows it comes later).

        Raises:
            TrainingError: naming the stage and iteration; the files on disk stay the last good ones.
        """
        if not all(torch.isfinite(p).all() for p in self.trainable.parameters()):
            raise self._stopped("the weights became non-finite")

    def save_checkpoint(self) -> None:
        if not self.context.main_process:
            return
        self.require_finite_weights()
        with atomic_output(self.checkpoint_path) as temporary:
            torch.save(
                {
                    "iteration": self.iteration,
                    "trainable": self.trainable.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "best_score": self.best_score,
                    "best_validation": self.best_validation or {},
                    "history": self.history,
                },
                temporary,
            )

    def _stopped(self, reason: str) -> TrainingError:
        remedy = (
            f"The last good checkpoint ({self.checkpoint_path}) is kept: lower training.learning_rate and resume "
            "with --resume."
            if self.checkpoint_path.is_file()
            else "No checkpoint was written before it: lower training.learning_rate and train again."
        )
        return TrainingError(
            f"{reason} at iteration {self.iteration + 1} of the {self.settings.name} stage; training stopped. {remedy}"
        )

    def steps(self, items: list[TrainingImage], permutation: list[int] | None) -> Iterator[dict[str, Any]]:
        """Optimise to the configured number of iterations, yielding each iteration's figures."""
        context, settings, training = self.context, self.settings, self.settings.training
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = (
            nn.parallel.DistributedDataParallel(self.trainable, device_ids=device_ids)
            if context.distributed
            else self.trainable
        )
        gamma = settings.heatmap.resolved_gamma(self.dimension)
        autocast = training.mixed_precision and mixed_precision_applies(context.device)
        started, started_iteration = time.perf_counter(), self.iteration
        self.trainable.train()
        while self.iteration < training.iterations:
            inputs, index, present = _sample_batch(settings, items, self.iteration, context.rank, permutation)
            inputs, present = inputs.to(context.device), present.to(context.device)
            torch.manual_seed(training.seed * 7919 + self.iteration * 31 + context.rank)
            with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=autocast):
                output, sigma = model(inputs)
            targets = gaussian_heatmaps(index, present, settings.grid.size, settings.grid.spacing, sigma, gamma)
            loss, heatmap_term = heatmap_loss(
                output.final, targets, present, settings.grid.spacing, sigma, settings.heatmap
            )
            if not torch.isfinite(loss):
                raise self._stopped(f"the loss became {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gradient_norm = nn.utils.clip_grad_norm_(self.trainable.parameters(), training.gradient_clip)
            if not torch.isfinite(gradient_norm):
                raise self._stopped("non-finite gradients")
            self.optimizer.step()
            self.scheduler.step()
            self.iteration += 1
            elapsed = time.perf_counter() - started
            yield {
                "stage": settings.name,
                "iteration": self.iteration,
                "iterations": training.iterations,
                "loss": loss.item(),
                "heatmap_loss": heatmap_term.item(),
                "mean_sigma": sigma.mean().item(),
                "learning_rate": self.optimizer.param_groups[0]["lr"],
                "eta_s": elapsed / (self.iteration - started_iteration) * (training.iterations - self.iteration),
            }

    def record(self, validation: dict[str, float]) -> bool:
        """Add a validation to the history; True when it is the best so far."""
        self.history.append({"iteration": self.iteration, **validation})
        if validation["score"] < self.best_score:
            self.best_score, self.best_validation = validation["score"], {**validation, "iteration": self.iteration}
            return True
        return False

    def result(self) -> TrainingResult:
        return TrainingResult(
            self.iteration,
            self.best_validation["mean_error"] if self.best_validation else None,
            self.context.output_dir / BEST_MODEL,
            self.history,
            self.best_score,
        )


class TrainingRun:
    """A training run: configuration, dataset, validation images and the stages trained so far,
    which it validates and writes as model files."""

    def __init__(
        self,
        config: Config,
        spec: DatasetSpec,
        context: RunContext,
        unit: str,
        validation_items: list[TrainingImage],
        mean: MeanConfiguration,
    ):
        self.config = config
        self.mean = mean  # the canonical pose detection brings images into
        self.spec = spec
        self.context = context
        self.unit = unit
        self.validation_items = validation_items
        self.stages: dict[str, StageTrainer] = {}

    def description(self, iteration: int, validation: dict | None) -> ModelDescription:
        """Everything a model file of the stages trained so far needs to be used and traced back."""
        config = self.config
        refinement = self.stages.get("refinement")
        return ModelDescription(
            dimension=config.dimension,
            landmark_names=tuple(self.spec.landmark_names),
            unit=self.unit,
            intensity=config.intensity,
            inference=config.inference,
            coarse=self.stages["coarse"].description(),
            refinement=None if refinement is None else refinement.description(),
            in_channels=1,
            provenance={
                "dataset": str(self.spec.path),
                "iterations": iteration,
                "library_version": __version__,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "config": config_to_dict(config),
            },
            validation=validation or {},
            mean_configuration=self.mean,
        )

    def _loaded(self, iteration: int, validation: dict | None) -> LoadedModel:
        refinement = self.stages.get("refinement")
        return LoadedModel(
            self.description(iteration, validation),
            self.stages["coarse"].stage(),
            None if refinement is None else refinement.stage(),
        )

    def export(self, path: Path, iteration: int, validation: dict | None) -> None:
        for stage in self.stages.values():
            stage.require_finite_weights()
        loaded = self._loaded(iteration, validation)
        save_model(path, loaded.description, loaded.coarse, loaded.refinement)

    def validate(self, iteration: int) -> dict[str, float] | None:
        """Scores of the model trained so far on the validation images (None without any)."""
        if not self.validation_items:
            return None
        loaded = self._loaded(iteration, None)
        for stage in self.stages.values():
            stage.trainable.eval()
        predictor = Predictor(loaded, self.context.device)
        scores = validate_model(predictor, self.validation_items, cap=10.0 * self.config.heatmap.sigma_init)
        for stage in self.stages.values():
            stage.trainable.train()
        return scores

    def train_stage(
        self,
        stage: StageTrainer,
        items: list[TrainingImage],
        permutation: list[int] | None,
        progress: Callable[[dict[str, Any]], None] | None,
        cancel: Cancel | None,
        deadline: float | None = None,
    ) -> TrainingResult:
        """Run one stage to its end, validating, exporting the best model and checkpointing on the way.

        Args:
            deadline: time.monotonic() at which the stage ends early, as if its last iteration were
                reached (validated, best model exported, checkpointed; --resume continues it).
        """
        training = stage.settings.training
        if deadline is not None:
            stage.time_window = (time.monotonic(), deadline)
        if training.iterations == 0 and stage.iteration == 0:
            # The initial model's stage, kept as it is (config.Config): scored once, as a stage's end is.
            kept: dict[str, Any] = {}
            self._score_and_keep(stage, kept, last=True)
            score = kept["validation"]["mean_error"] if "validation" in kept else None
            log.info(
                "the %s stage is the initial model's, kept as it is%s",
                stage.settings.name,
                "" if score is None else f" (validation mean error {score:.4g})",
            )
        for info in stage.steps(items, permutation):
            out_of_time = deadline is not None and time.monotonic() >= deadline
            self._score_and_keep(stage, info, last=stage.iteration == training.iterations or out_of_time)
            if progress is not None and self.context.main_process:
                progress(info)
            if cancel is not None and cancel():
                stage.save_checkpoint()
                raise Cancelled(
                    f"training cancelled at iteration {stage.iteration} of the {stage.settings.name} stage; "
                    "resume with --resume"
                )
            if out_of_time:
                log.info(
                    "time budget spent: the %s stage ends at iteration %d of %d",
                    stage.settings.name,
                    stage.iteration,
                    training.iterations,
                )
                break
        return stage.result()

    def _score_and_keep(self, stage: StageTrainer, info: dict[str, Any], last: bool) -> None:
        """Validate, export the best model and checkpoint when this iteration is due for it."""
        training, iteration, main_process = stage.settings.training, stage.iteration, self.context.main_process
        best_model = self.context.output_dir / BEST_MODEL
        if main_process and (iteration % training.validate_every == 0 or last):
            validation = self.validate(iteration)
            if validation is not None:
                info["validation"] = validation
                if stage.record(validation):
                    self.export(best_model, iteration, stage.best_validation)
        if iteration % training.checkpoint_every == 0 or last:
            stage.save_checkpoint()
            if main_process and not self.validation_items:
                # Without validation there is no best model: keep the newest one usable at all times.
                self.export(best_model, iteration, None)


def _has_refinement(path: Path) -> bool:
    return read_description(path).refinement is not None


def train(
    config: Config,
    resume: bool = False,
    device: str = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: Cancel | None = None,
    time_budget_s: float | None = None,
) -> TrainingResult:
    """Train a model as `config` says: the coarse SCN, then the optional refinement stage.

    Writes config.toml, checkpoint.pt (checkpoint_refinement.pt), model.safetensors (best on
    validation, or newest without a validation split) and last.safetensors.

    Args:
        resume: continue from the checkpoints in `output_dir` (exactly where training stopped).
        device: 'auto', 'cpu' or 'cuda' (under torchrun: each rank uses its LOCAL_RANK GPU).
        progress: called every iteration with a dict (stage, iteration, iterations, loss, mean_sigma, eta_s, ...).
        cancel: polled every iteration; True saves a checkpoint and raises Cancelled.
        time_budget_s: wall-clock budget of the whole call (reading the images too); the stages share what
            is left in proportion to their work (StageSettings.work), each ending cleanly (validated, best
            model kept, checkpointed) when its share is spent.
    Raises:
        TrainingError: the loss or gradients became non-finite (last good checkpoint kept).
    """
    # The budget is the whole call's: reading the images (minutes for a large dataset) spends it too.
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    context = RunContext.start(device, config.output_dir)
    spec = load_dataset_spec(config.dataset)
    if spec.dimension != config.dimension:
        raise DataError(f"{spec.path}: dataset is {spec.dimension}D but the config's grid is {config.dimension}D")
    training_entries = spec.split(config.train_split)
    training_items = load_split(spec, training_entries)
    validation_entries = [e for e in spec.entries if e.split == config.validation_split]
    validation_items = load_split(spec, validation_entries) if validation_entries else []
    names = list(spec.landmark_names)
    if context.main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, config.output_dir / "config.toml")
    mean = mean_configuration(
        [item.landmarks for item in training_items],
        f"mean of the annotated landmarks of the {len(training_items)} training images",
    )
    base_mean = None
    if config.initial_model is not None:
        # Fine-tuning keeps the base's canonical pose: the network was trained in it.
        base = read_description(config.initial_model)
        if base.mean_configuration is not None and base.landmark_names == tuple(names):
            mean = base_mean = base.mean_configuration
    unit = training_entries[0].unit
    if config.scale_from_anatomy:
        if unit != "px":
            raise DataError(
                f"{spec.path}: scale_from_anatomy is for images in pixels; these are in {unit}, "
                "whose spacing already gives the anatomy's size"
            )
        source = (
            f"generalised Procrustes mean of the {len(training_items)} training images' landmarks, "
            "at the median image's anatomical size"
        )
        mean, scales = anatomical_scales([item.landmarks for item in training_items], source, base_mean)
        training_items = [_in_canonical_size(item, scale) for item, scale in zip(training_items, scales)]
        log.info(
            "scale from anatomy: the %d training images' anatomy spans %.2f-%.2f x the canonical size",
            len(scales),
            float(scales.min()),
            float(scales.max()),
        )
    run = TrainingRun(config, spec, context, unit, validation_items, mean)

    result = None
    stages = stage_settings(config)
    for number, settings in enumerate(stages):
        stage_deadline = None
        if deadline is not None:
            now = time.monotonic()
            share = settings.work / sum(s.work for s in stages[number:])
            stage_deadline = now + max(deadline - now, 0.0) * share
        for item in training_items:
            item.prepared = prepare_image(item.image, settings.grid.spacing, config.intensity, context.device)
        starts_from_file = config.initial_model is not None and (
            settings.name == "coarse" or _has_refinement(config.initial_model)
        )
        initial_model = config.initial_model if starts_from_file else None
        stage = StageTrainer(
            settings,
            context,
            config.dimension,
            names,
            initial_model,
            initial_best=result.best_score if result is not None else math.inf,
        )
        if resume:
            stage.resume()  # the checkpoint overrides the initial model
        run.stages[settings.name] = stage
        pairs = settings.augmentation.mirror_pairs
        permutation = swap_permutation(names, pairs) if pairs else None
        result = run.train_stage(stage, training_items, permutation, progress, cancel, stage_deadline)
        stage.trainable.eval()
    assert result is not None  # there is always a coarse stage
    if context.main_process:
        run.export(config.output_dir / LAST_MODEL, result.iterations, result.history[-1] if result.history else None)
        if not validation_items:
            # The newest model has every stage. A resumed run whose refinement had already finished
            # exported its coarse stage alone on the way, and the refinement stage had no step to
            # export it again.
            run.export(config.output_dir / BEST_MODEL, result.iterations, None)
    context.finish()
    return result

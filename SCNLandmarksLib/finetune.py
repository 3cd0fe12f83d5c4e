"""Fine-tuning a model on corrected cases, with nothing to configure.

`finetune(base, dataset, out)` derives the training configuration from the base model file (its
grid, networks, augmentation and landmark names; a lower learning rate; the refinement stage too
when the base has one), trains from the base's weights, and compares the new model with the base on
held-aside cases: `out/model.safetensors` is the new model only when it is better there, else a copy
of the base. `out/MODEL_CARD.md` says what was done and measured; `out/training/` holds the run.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .autoconfig import (
    HELD_ASIDE_SPLIT,
    SPEC_NAME,
    default_augmentation,
    held_aside_ids,
    resolve_dataset,
    write_split_spec,
)
from .bundle import ModelDescription, load_model, read_description, save_model
from .config import Config, config_from_dict, current_augmentation_names
from .data.spec import load_dataset_spec
from .errors import Cancelled, DataError
from .inference import Predictor, resolve_device
from .io.atomic import atomic_output, write_text_atomically
from .io.images import spacing_unit
from .io.paths import refuse_existing
from .train import BEST_MODEL, load_split, train, validate_model
from .vocabulary import Cancel

MODEL = "model.safetensors"
CARD = "MODEL_CARD.md"
TRAINING_FOLDER = "training"
LEARNING_RATE_FACTOR = 0.2  # of the base's own learning rate: adapt, do not forget
ITERATIONS_FACTOR = 0.2  # of the base's own iterations, within these bounds
MIN_ITERATIONS, MAX_ITERATIONS = 100, 2000
VALIDATIONS = 10  # validations (held-aside errors) per stage


@dataclass(frozen=True)
class Comparison:
    """Errors on the held-aside cases (the model's unit): mean, median, landmarks missed, and the
    selection score where a missed landmark counts as a large error."""

    mean_error: float
    median_error: float
    missed: int
    score: float

    @classmethod
    def of(cls, scores: dict[str, float]) -> Comparison:
        return cls(scores["mean_error"], scores["median_error"], int(scores["missed"]), scores["score"])


@dataclass(frozen=True)
class FinetuneResult:
    """What `finetune` did.

    Attributes:
        model_path: out/model.safetensors, the model to use.
        card_path: out/MODEL_CARD.md.
        outcome: "improved" (the new model), "kept base" (the new one was not better on the held-aside
            cases), "not validated" (fewer than 5 cases: the new model, unchecked) or "new landmarks"
            (the base finds other landmarks, so it cannot be compared: the new model).
        base: the base's errors on the held-aside cases (None when not compared).
        new: the new model's errors there (None when not validated).
        iterations: the iterations each stage ran.
        landmark_names: the new model's landmarks.
        cancelled: training was cancelled; the best model up to then was compared and kept.
    """

    model_path: Path
    card_path: Path
    outcome: str
    training_cases: list[str]
    held_aside: list[str]
    base: Comparison | None
    new: Comparison | None
    unit: str
    iterations: dict[str, int]
    landmark_names: tuple[str, ...]
    cancelled: bool = False

    def summary(self) -> dict[str, Any]:
        """One JSON-ready line: the outcome and both models' held-aside errors side by side."""
        return {
            "model": str(self.model_path),
            "outcome": self.outcome,
            "unit": self.unit,
            "training_cases": len(self.training_cases),
            "held_aside": len(self.held_aside),
            "base_mean_error": None if self.base is None else self.base.mean_error,
            "new_mean_error": None if self.new is None else self.new.mean_error,
            "iterations": self.iterations,
            "cancelled": self.cancelled,
        }


def finetune_config(
    base_path: Path,
    base: ModelDescription,
    dataset: Path,
    output_dir: Path,
    landmark_names: tuple[str, ...],
    iterations: int | None = None,
) -> Config:
    """The training configuration of a fine-tuning run, derived from the base model file.

    Grid, networks, intensity and decoding settings come from the model's description; heatmap,
    augmentation and optimiser settings from the configuration stored in its provenance (defaults
    by dimension for a file without one); the learning rate is LEARNING_RATE_FACTOR of the base's.
    """
    stored = base.provenance.get("config") or {}
    extent = max(s * g for s, g in zip(base.coarse.grid_size, base.coarse.grid_spacing))
    same_names = tuple(base.landmark_names) == tuple(landmark_names)

    def augmentation(values: dict[str, Any] | None) -> dict[str, Any]:
        values = current_augmentation_names(values or default_augmentation(base.dimension, extent))
        if not same_names:  # the base's left/right pairs name landmarks this dataset may not have
            values.pop("mirror_pairs", None)
        return values

    def training(values: dict[str, Any] | None) -> dict[str, Any]:
        values = dict(values or {})
        base_rate = float(values.get("learning_rate", 1e-4))
        count = iterations or min(
            MAX_ITERATIONS, max(MIN_ITERATIONS, int(ITERATIONS_FACTOR * int(values.get("iterations", 1000))))
        )
        every = max(1, count // VALIDATIONS)
        return {
            **values,
            "iterations": count,
            "learning_rate": LEARNING_RATE_FACTOR * base_rate,
            "schedule": "cosine",
            "validate_every": every,
            "checkpoint_every": every,
        }

    def stage(description, values: dict[str, Any]) -> dict[str, Any]:
        heatmap = dict(values.get("heatmap") or {"sigma_init": sum(description.sigmas) / len(description.sigmas)})
        return {
            "grid": {"size": list(description.grid_size), "spacing": list(description.grid_spacing)},
            "heatmap": {**heatmap, "gamma": description.gamma},
            "model": {"architecture": description.architecture, "params": dict(description.params)},
            "training": training(values.get("training")),
            "augmentation": augmentation(values.get("augmentation")),
        }

    values: dict[str, Any] = {
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "initial_model": str(base_path),
        "intensity": dataclasses.asdict(base.intensity),
        "inference": dataclasses.asdict(base.inference),
        **stage(base.coarse, stored),
    }
    if base.refinement is not None:
        stored_refinement = stored.get("refinement") or {}
        values["refinement"] = {
            **stage(base.refinement, stored_refinement),
            "offset_mm": stored_refinement.get("offset_mm", 2.0 * max(base.coarse.grid_spacing)),
        }
    return config_from_dict(values, output_dir, where=f"fine-tuning configuration derived from {base_path}")


def _check_dataset(base_path: Path, base: ModelDescription, spec_path: Path) -> tuple[str, ...]:
    """The landmark order to train: the base's when the dataset has the same landmarks (any order).

    Raises:
        DataError: the dataset's dimension or unit differ from the base's.
    """
    spec = load_dataset_spec(spec_path)
    if spec.dimension != base.dimension:
        raise DataError(
            f"{spec_path}: the cases are {spec.dimension}D, the base model {base_path} is {base.dimension}D"
        )
    unit = spacing_unit(spec.entries[0].image)
    if unit != base.unit and not (base.in_pixels and unit == "px"):
        raise DataError(
            f"{spec.entries[0].image}: image positions are in {unit}, the base model {base_path} works in {base.unit}"
        )
    if set(spec.landmark_names) == set(base.landmark_names):
        return tuple(base.landmark_names)
    return tuple(spec.landmark_names)


def finetune(
    base_path: str | Path,
    dataset: str | Path,
    out: str | Path,
    minutes: float | None = None,
    iterations: int | None = None,
    device: str = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: Cancel | None = None,
    overwrite: bool = False,
) -> FinetuneResult:
    """Fine-tune `base_path` on the cases of `dataset` (a spec file or a training folder).

    Args:
        out: output folder: model.safetensors, MODEL_CARD.md, and training/ (the run itself).
        minutes: wall-clock budget of the training; it then ends with the best model so far.
        iterations: training iterations per stage (default: derived from the base's).
        progress: as for train.train.
        cancel: polled every iteration; True ends training as the time budget does (the best model so
            far is compared with the base and kept; Cancelled only when there is none yet).
        overwrite: replace a model and card already in `out` (refused otherwise, before any work).

    Raises:
        ModelFileError: the base is not a readable model file.
        DataError: the dataset is empty, inconsistent, or made for other images than the base's.
    """
    started = time.monotonic()
    base_path, out = Path(base_path).resolve(), Path(out).resolve()
    refuse_existing([out / MODEL, out / CARD], overwrite)
    base = read_description(base_path)
    source_spec = load_dataset_spec(resolve_dataset(dataset))
    names = _check_dataset(base_path, base, source_spec.path)
    ids = [entry.id for entry in source_spec.entries]
    held_aside = held_aside_ids(ids)
    training_cases = [case for case in ids if case not in held_aside]
    run_dir = out / TRAINING_FOLDER
    spec_path = write_split_spec(source_spec, run_dir / SPEC_NAME, held_aside, names)
    config = finetune_config(base_path, base, spec_path, run_dir, names, iterations)
    reached: dict[str, int] = {}

    def track(info: dict[str, Any]) -> None:
        reached[info["stage"]] = info["iteration"]
        if progress is not None:
            progress(info)

    budget = None if minutes is None else max(0.0, minutes * 60.0 - (time.monotonic() - started))
    new_path = run_dir / BEST_MODEL
    new_path.unlink(missing_ok=True)  # an earlier run's best model must not pass for this run's
    stopped_early = False
    try:
        train(config, device=device, progress=track, cancel=cancel, time_budget_s=budget)
    except Cancelled:
        # Cancel ends training like the time budget does: the best model so far is compared and kept.
        if not new_path.is_file():
            raise
        stopped_early = True

    base_scores = new_scores = None
    same_names = names == tuple(base.landmark_names)
    if held_aside:
        spec = load_dataset_spec(spec_path)
        items = load_split(spec, spec.split(HELD_ASIDE_SPLIT))
        target = resolve_device(device)
        cap = 10.0 * config.heatmap.sigma_init
        new_scores = Comparison.of(validate_model(Predictor.from_file(new_path, target), items, cap))
        if same_names:
            base_scores = Comparison.of(validate_model(Predictor.from_file(base_path, target), items, cap))
    if not held_aside:
        outcome = "not validated"
    elif base_scores is None:
        outcome = "new landmarks"
    else:
        assert new_scores is not None  # measured whenever cases were held aside
        outcome = "improved" if new_scores.score < base_scores.score else "kept base"
    result = FinetuneResult(
        out / MODEL,
        out / CARD,
        outcome,
        training_cases,
        held_aside,
        base_scores,
        new_scores,
        base.unit,
        reached,
        names,
        stopped_early,
    )
    if outcome == "kept base":
        with atomic_output(result.model_path) as temporary:
            shutil.copyfile(base_path, temporary)
    else:
        loaded = load_model(new_path)
        description = dataclasses.replace(
            loaded.description,
            provenance={
                **loaded.description.provenance,
                "base_model": str(base_path),
                "training_cases": training_cases,
                "held_aside": held_aside,
                "outcome": outcome,
            },
        )
        save_model(result.model_path, description, loaded.coarse, loaded.refinement)
    write_text_atomically(result.card_path, model_card(result, base_path, base, source_spec.path, config, minutes))
    return result


def _errors(comparison: Comparison | None, unit: str) -> str:
    if comparison is None:
        return "-"
    return (
        f"{comparison.mean_error:.2f} {unit} mean, {comparison.median_error:.2f} {unit} median, "
        f"{comparison.missed} missed"
    )


def model_card(
    result: FinetuneResult,
    base_path: Path,
    base: ModelDescription,
    dataset: Path,
    config: Config,
    minutes: float | None,
) -> str:
    """MODEL_CARD.md of a fine-tuned model: base, cases, settings, held-aside figures, outcome."""
    verdicts = {
        "improved": (
            "The new model is better than the base on the held-aside cases: model.safetensors is the new model."
        ),
        "kept base": (
            "The new model is **not** better than the base on the held-aside cases: model.safetensors is "
            f"the base model, unchanged; the new one is kept for inspection in {TRAINING_FOLDER}/{BEST_MODEL}."
        ),
        "not validated": (
            "**Not validated**: fewer than 5 cases, so all trained and none was held aside. "
            "model.safetensors is the new model; check it on new cases before relying on it."
        ),
        "new landmarks": (
            "The base model finds other landmarks, so it cannot be compared on these cases: "
            "model.safetensors is the new model."
        ),
    }
    landmarks = (
        "the base's"
        if result.landmark_names == tuple(base.landmark_names)
        else "**new landmarks**: the base's local-appearance weights were reused and new landmark heads "
        f"trained from scratch ({', '.join(result.landmark_names)})"
    )
    stages = [("coarse", config.training)] + (
        [("refinement", config.refinement.training)] if config.refinement is not None else []
    )
    settings = "; ".join(
        f"{name}: {result.iterations.get(name, 0)} of {training.iterations} iterations, learning "
        f"rate {training.learning_rate:g} ({training.schedule})"
        for name, training in stages
    )
    lines = [
        f"# Fine-tuned from {base_path.name}",
        "",
        verdicts[result.outcome],
        "",
        f"- Base model: `{base_path}` ({base.dimension}D, {len(base.landmark_names)} landmarks, "
        f"{'with' if base.refinement else 'without'} a refinement stage)",
        f"- Landmarks: {landmarks}",
        f"- Dataset: `{dataset}`",
        f"- Cases used for training ({len(result.training_cases)}): {', '.join(result.training_cases)}",
        f"- Held-aside cases ({len(result.held_aside)}, every fifth by case id): "
        f"{', '.join(result.held_aside) or 'none'}",
        f"- Settings (derived from the base model): {settings}; time budget "
        f"{'none' if minutes is None else f'{minutes:g} min'}"
        f"{'; cancelled by the user, the best model up to then kept' if result.cancelled else ''}; "
        "the full configuration is "
        f"`{TRAINING_FOLDER}/config.toml` (`scn-landmarks train {TRAINING_FOLDER}/config.toml` reruns it)",
        "",
        "## Held-aside cases",
        "",
        "| model | error |",
        "|---|---|",
        f"| base | {_errors(result.base, result.unit)} |",
        f"| new | {_errors(result.new, result.unit)} |",
        "",
        "The held-aside cases also chose the best iteration of the new model, so its figure is slightly optimistic.",
        "",
    ]
    return "\n".join(lines)

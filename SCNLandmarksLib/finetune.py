"""Fine-tuning a model on corrected cases, with nothing to configure.

`finetune(base, dataset, out)` derives the training configuration from the base model file (its
grid, networks, augmentation and landmark names; a lower learning rate; the refinement stage too
when the base has one) and trains from the base's weights. It then chooses among four candidates:
the base, the base with the cases' convention offset (see convention.py), the fine-tuned model, and
the fine-tuned model with an offset. The offset is judged leave-one-out on every corrected case,
the fine-tuned models on the held-aside cases; a candidate replaces the base only when it is better
beyond noise (`convention.better_beyond_noise`). `out/model.safetensors` is the chosen model,
`out/MODEL_CARD.md` says what was done and measured; `out/training/` holds the run.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .autoconfig import (
    HELD_ASIDE_SPLIT,
    SPEC_NAME,
    TRAIN_SPLIT,
    default_augmentation,
    held_aside_ids,
    resolve_dataset,
    write_split_spec,
)
from .bundle import ModelDescription, load_model, read_description, save_model
from .config import Config, config_from_dict, current_augmentation_names
from .convention import (
    MIN_RELATIVE_GAIN,
    MIN_STANDARD_ERRORS,
    ConventionOffset,
    better_beyond_noise,
    canonical_residuals,
    fit_offsets,
    leave_one_out_offsets,
)
from .data.spec import load_dataset_spec
from .errors import Cancelled, DataError
from .inference import Prediction, Predictor, resolve_device
from .io.atomic import atomic_output, write_text_atomically
from .io.paths import refuse_existing
from .train import BEST_MODEL, TrainingImage, capped_point_errors, load_split, train
from .vocabulary import Cancel

MODEL = "model.safetensors"
CARD = "MODEL_CARD.md"
TRAINING_FOLDER = "training"
LEARNING_RATE_FACTOR = 0.2  # of the base's own learning rate: adapt, do not forget
ITERATIONS_FACTOR = 0.2  # of the base's own iterations, within these bounds
MIN_ITERATIONS, MAX_ITERATIONS = 100, 2000
UNKNOWN_BASE_ITERATIONS = 1000
VALIDATIONS = 10  # validations (held-aside errors) per stage


# The candidates a fine-tuning chooses among (see the module docstring).
BASE, BASE_OFFSET, FINE_TUNED, FINE_TUNED_OFFSET = "base", "base + offset", "fine-tuned", "fine-tuned + offset"
# Outcomes besides the chosen candidate: nothing to compare with.
NOT_VALIDATED, NEW_LANDMARKS = "not validated", "new landmarks"
KEPT_BASE = "kept base"  # the outcome when the base wins: model.safetensors is the base, unchanged


@dataclass(frozen=True)
class Comparison:
    """One candidate's mean point error (the model's unit; a missed landmark counts as the cap) on
    the cases it was judged on."""

    mean_error: float
    cases: int


@dataclass(frozen=True)
class Decision:
    """Which candidate won, and every candidate's errors.

    Attributes:
        chosen: one of BASE, BASE_OFFSET, FINE_TUNED, FINE_TUNED_OFFSET.
        leave_one_out: the base with and without an offset over all corrected cases, each case's
            offset learned from the others.
        held_aside: every candidate on the held-aside cases (empty when none were held aside).
        offset: the chosen candidate's offset, learned from all corrected cases (None without one).
    """

    chosen: str
    leave_one_out: dict[str, Comparison]
    held_aside: dict[str, Comparison]
    offset: np.ndarray | None


@dataclass(frozen=True)
class FinetuneResult:
    """What `finetune` did.

    Attributes:
        model_path: out/model.safetensors, the model to use.
        card_path: out/MODEL_CARD.md.
        outcome: the chosen candidate (KEPT_BASE when the base won: model.safetensors is the base,
            unchanged), NOT_VALIDATED (fewer than 5 cases: the fine-tuned model, unchecked) or
            NEW_LANDMARKS (the base finds other landmarks, so it cannot be compared: the new model).
        decision: the candidates' errors (None when nothing was compared).
        iterations: the iterations each stage ran.
        landmark_names: the new model's landmarks.
        cancelled: training was cancelled; the best model up to then was compared and kept.
    """

    model_path: Path
    card_path: Path
    outcome: str
    training_cases: list[str]
    held_aside: list[str]
    decision: Decision | None
    unit: str
    iterations: dict[str, int]
    landmark_names: tuple[str, ...]
    cancelled: bool = False

    def verdict(self) -> str:
        """One sentence: which candidate won, by how much, on which cases."""
        if self.outcome == NOT_VALIDATED:
            return f"not validated: fewer than 5 cases, all used for training: the fine-tuned model ({self.model_path})"
        if self.outcome == NEW_LANDMARKS or self.decision is None:
            return f"new landmarks: the base cannot be compared on them: the new model ({self.model_path})"
        decision, unit = self.decision, self.unit
        chosen = decision.chosen
        table = decision.held_aside if chosen in (FINE_TUNED, FINE_TUNED_OFFSET) else decision.leave_one_out
        where = (
            f"on the {table[BASE].cases} held-aside cases"
            if table is decision.held_aside
            else f"leave-one-out over the {table[BASE].cases} corrected cases"
        )
        others = ", ".join(
            f"{name} {comparison.mean_error:.2f}" for name, comparison in table.items() if name not in (BASE, chosen)
        )
        figures = f"{table[chosen].mean_error:.2f} {unit} against the base's {table[BASE].mean_error:.2f} {unit}"
        kept = "keeping the base model" if chosen == BASE else f"chosen: {chosen}"
        return f"{kept} ({figures} {where}{'; ' + others if others else ''}): {self.model_path}"

    def summary(self) -> dict[str, Any]:
        """One JSON-ready line: the outcome, every candidate's errors and the verdict."""
        decision = self.decision

        def errors(table: dict[str, Comparison]) -> dict[str, float]:
            return {name: comparison.mean_error for name, comparison in table.items()}

        held = {} if decision is None else decision.held_aside
        return {
            "model": str(self.model_path),
            "outcome": self.outcome,
            "unit": self.unit,
            "training_cases": len(self.training_cases),
            "held_aside": len(self.held_aside),
            "base_mean_error": held[BASE].mean_error if BASE in held else None,
            "new_mean_error": held[FINE_TUNED].mean_error if FINE_TUNED in held else None,
            "held_aside_errors": errors(held),
            "leave_one_out_errors": {} if decision is None else errors(decision.leave_one_out),
            "corrected_cases": len(self.training_cases) + len(self.held_aside),
            "verdict": self.verdict(),
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
        if not same_names:  # the base's left/right pairs and chains name landmarks this dataset may not have
            for key in ("mirror_pairs", "articulation_chains", "articulation_deg"):
                values.pop(key, None)
        return values

    def training(values: dict[str, Any] | None) -> dict[str, Any]:
        values = dict(values or {})
        base_rate = float(values.get("learning_rate", 1e-4))
        # A base without a stored configuration, or whose stage was kept from an earlier model file
        # (iterations = 0, config.Config), does not say how long the stage trained.
        own = int(values.get("iterations") or UNKNOWN_BASE_ITERATIONS)
        count = iterations or min(MAX_ITERATIONS, max(MIN_ITERATIONS, int(ITERATIONS_FACTOR * own)))
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
        # A base in pixels was trained at its own anatomical size; cases from another device (or
        # zoom) come to that size, as detection's canonical pass brings them.
        "scale_from_anatomy": base.in_pixels,
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
    unit = spec.entries[0].unit
    if unit != base.unit and not (base.in_pixels and unit == "px"):
        raise DataError(
            f"{spec.entries[0].image}: image positions are in {unit}, the base model {base_path} works in {base.unit}"
            + ("; state the pictures' spacing in the spec (spacing = [x, y], mm per pixel)" if unit == "px" else "")
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
        DataError: the dataset is empty, inconsistent, or made for other images than the base's; the
            base lies in `out`.
    """
    started = time.monotonic()
    base_path, out = Path(base_path).resolve(), Path(out).resolve()
    if base_path.is_relative_to(out):
        # The run writes (and first clears) files in `out`: the base would be lost, or compared with itself.
        raise DataError(f"{base_path}: the base model lies in the output folder {out}; choose another --out")
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

    same_names = names == tuple(base.landmark_names)
    decision = None
    if held_aside and same_names:
        spec = load_dataset_spec(spec_path)
        cases = load_split(spec, spec.split(TRAIN_SPLIT)) + load_split(spec, spec.split(HELD_ASIDE_SPLIT))
        target = resolve_device(device)
        decision = decide(
            Predictor.from_file(base_path, target),
            Predictor.from_file(new_path, target),
            cases,
            len(held_aside),
            10.0 * config.heatmap.sigma_init,
        )
    if not held_aside:
        outcome = NOT_VALIDATED
    elif decision is None:
        outcome = NEW_LANDMARKS
    else:
        outcome = KEPT_BASE if decision.chosen == BASE else decision.chosen
    result = FinetuneResult(
        out / MODEL,
        out / CARD,
        outcome,
        training_cases,
        held_aside,
        decision,
        base.unit,
        reached,
        names,
        stopped_early,
    )
    if outcome == KEPT_BASE:
        with atomic_output(result.model_path) as temporary:
            shutil.copyfile(base_path, temporary)
    else:
        chosen = load_model(base_path if outcome == BASE_OFFSET else new_path)
        offset = None if decision is None else decision.offset
        if offset is not None and outcome == BASE_OFFSET and base.convention is not None:
            offset = offset + base.convention.offsets  # learned on top of the base's own offset
        description = dataclasses.replace(
            chosen.description,
            convention=None if offset is None else ConventionOffset(offset, len(ids)),
            provenance={
                **chosen.description.provenance,
                "base_model": str(base_path),
                "training_cases": training_cases,
                "held_aside": held_aside,
                "outcome": outcome,
            },
        )
        save_model(result.model_path, description, chosen.coarse, chosen.refinement)
    write_text_atomically(result.card_path, model_card(result, base_path, base, source_spec.path, config, minutes))
    return result


def decide(base: Predictor, new: Predictor, cases: list[TrainingImage], held_aside: int, cap: float) -> Decision:
    """Choose among the base, the base with an offset, the fine-tuned model and the fine-tuned model
    with an offset (see the module docstring).

    Args:
        cases: every corrected case, the `held_aside` last ones never trained on.
        cap: the error a missed landmark counts as (errors are capped there too).
    """
    truths = [case.landmarks.points_lps for case in cases]
    trained = len(cases) - held_aside

    def detected(predictor: Predictor) -> tuple[np.ndarray, np.ndarray, list[Prediction]]:
        """The predictor's errors (C, N), canonical residuals (C, N, d) and detections."""
        found = [predictor.predict(case.image) for case in cases]
        points = [f.landmarks.points_lps for f in found]
        errors = np.stack([capped_point_errors(p, t, cap) for p, t in zip(points, truths)])
        residuals = np.stack([canonical_residuals(p, t, f.pose) for p, t, f in zip(points, truths, found)])
        return errors, residuals, found

    def with_offsets(found: list[Prediction], offsets: np.ndarray, rows: range) -> np.ndarray:
        """Errors (len(rows), N) of the detections moved by each row's offsets: an offset needs no
        second detection, only the pose the first one found."""
        return np.stack(
            [
                capped_point_errors(
                    ConventionOffset(offsets[row], len(cases)).applied(
                        found[row].landmarks.points_lps, found[row].pose
                    ),
                    truths[row],
                    cap,
                )
                for row in rows
            ]
        )

    base_errors, base_residuals, base_found = detected(base)
    everyone = range(len(cases))
    offset_errors = with_offsets(base_found, leave_one_out_offsets(base_residuals), everyone)
    leave_one_out = {
        BASE: Comparison(float(np.nanmean(base_errors)), len(cases)),
        BASE_OFFSET: Comparison(float(np.nanmean(offset_errors)), len(cases)),
    }
    reference = BASE_OFFSET if better_beyond_noise(offset_errors.ravel(), base_errors.ravel()) else BASE
    new_errors, new_residuals, new_found = detected(new)
    held = range(trained, len(cases))
    # The fine-tuned model's own offset is learned where it trained, as the model itself.
    new_offset = fit_offsets(new_residuals[:trained])
    candidates = {
        BASE: base_errors[trained:],
        BASE_OFFSET: offset_errors[trained:],
        FINE_TUNED: new_errors[trained:],
        FINE_TUNED_OFFSET: with_offsets(new_found, np.broadcast_to(new_offset, new_residuals.shape), held),
    }
    tuned = (
        FINE_TUNED_OFFSET
        if better_beyond_noise(candidates[FINE_TUNED_OFFSET].ravel(), candidates[FINE_TUNED].ravel())
        else FINE_TUNED
    )
    chosen = tuned if better_beyond_noise(candidates[tuned].ravel(), candidates[reference].ravel()) else reference
    offsets = {BASE_OFFSET: fit_offsets(base_residuals), FINE_TUNED_OFFSET: fit_offsets(new_residuals)}
    return Decision(
        chosen,
        leave_one_out,
        {name: Comparison(float(np.nanmean(errors)), held_aside) for name, errors in candidates.items()},
        offsets.get(chosen),
    )


def model_card(
    result: FinetuneResult,
    base_path: Path,
    base: ModelDescription,
    dataset: Path,
    config: Config,
    minutes: float | None,
) -> str:
    """MODEL_CARD.md of a fine-tuned model: base, cases, settings, every candidate's errors, outcome."""
    verdicts = {
        KEPT_BASE: (
            "No candidate is better than the base beyond noise: model.safetensors is the base model, unchanged; "
            f"the fine-tuned network is kept for inspection in {TRAINING_FOLDER}/{BEST_MODEL}."
        ),
        BASE_OFFSET: (
            "The base model with this clinic's convention offset won: model.safetensors is the base's network, "
            "and each detected point is moved by its landmark's offset (learned in the model's canonical frame, "
            "so it follows the head's pose)."
        ),
        FINE_TUNED: "The fine-tuned model won: model.safetensors is the new network.",
        FINE_TUNED_OFFSET: (
            "The fine-tuned model with a convention offset won: model.safetensors is the new network, and each "
            "detected point is moved by its landmark's offset."
        ),
        NOT_VALIDATED: (
            "**Not validated**: fewer than 5 cases, so all trained and none was held aside. "
            "model.safetensors is the new model; check it on new cases before relying on it."
        ),
        NEW_LANDMARKS: (
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
    ]
    decision = result.decision
    if decision is not None:
        unit = result.unit
        lines += [
            "## The candidates",
            "",
            f"Mean point error in {unit} (a missed landmark counts as {10:g} heatmap sigmas). Chosen: "
            f"**{decision.chosen}**. A candidate replaces the base only when it is better beyond noise: by "
            f"{100 * MIN_RELATIVE_GAIN:g} % of the error and {MIN_STANDARD_ERRORS:g} standard errors of the "
            "paired per-point difference.",
            "",
            f"| candidate | leave-one-out, {len(result.training_cases) + len(result.held_aside)} cases | "
            f"held aside, {len(result.held_aside)} cases |",
            "|---|---|---|",
        ]
        for name, comparison in decision.held_aside.items():
            loo = decision.leave_one_out.get(name)
            lines.append(
                f"| {name} | {'-' if loo is None else f'{loo.mean_error:.2f}'} | {comparison.mean_error:.2f} |"
            )
        lines += [
            "",
            "Leave-one-out: each case's offset learned from the other cases. The fine-tuned candidates never "
            "trained on the held-aside cases, but those cases chose their best iteration, so their figures are "
            "slightly optimistic.",
            "",
        ]
    return "\n".join(lines)

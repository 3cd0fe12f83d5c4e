"""Training configuration: frozen dataclasses <-> TOML, validated on load.

Every hyperparameter is a field here; variants are TOML files. Each training run writes its resolved
configuration (all defaults filled in) as `config.toml` in its output folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .io.toml import read_toml, write_toml
from .vocabulary import LandmarkStatus


@dataclass(frozen=True)
class GridConfig:
    """The network's input grid for training samples (axis-aligned in physical space).

    Attributes:
        size: grid voxels per axis (x, y[, z]).
        spacing: mm (or px for images without spacing) per grid voxel, per axis.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]


# Articulation turns beyond this would fold a finger onto its neighbour.
MAX_ARTICULATION_DEG = 45.0


@dataclass(frozen=True)
class AugmentationConfig:
    """Random physical transform and intensity changes applied to each training sample (MIA 2019, Sec. 3)."""

    translation: float = 20.0  # uniform +- per axis, mm
    rotation_deg: float = 15.0  # uniform +- (2D: in plane; 3D: about each axis)
    scale: float = 0.15  # uniform +- relative isotropic scaling
    scale_per_axis: float = 0.05  # uniform +- extra relative scaling per axis
    mirror_axis: int | None = None  # physical axis to mirror (0 = x, left/right), None = never
    mirror_probability: float = 0.0
    mirror_pairs: tuple[tuple[str, str], ...] = ()  # landmark names swapped by the mirror (e.g. left/right)
    elastic_mm: float = 0.0  # std of the smooth random displacement, mm
    elastic_control_spacing_mm: float = 50.0
    # A second, coarser displacement added to the first (multi-scale, as subjects differ: the head's
    # overall shape beyond an affine transform as well as local anatomy): std mm, control spacing mm.
    elastic_coarse_mm: float = 0.0
    elastic_coarse_control_spacing_mm: float = 100.0
    intensity_shift: float = 0.1  # +- added to normalised intensities
    intensity_scale: float = 0.15  # +- relative contrast change
    gamma_log: float = 0.0  # gamma = exp(U(-g, g)) on [0, 1]-mapped intensities
    # A random monotonic intensity curve on [0, 1]-mapped intensities: its inner knots move by up to
    # this much (another scanner's or sequence's contrast); 0 = off.
    intensity_curve: float = 0.0
    noise_std: float = 0.0  # Gaussian noise in normalised units
    bias_field_log: float = 0.0  # std of a smooth multiplicative log-field (MR bias), 0 = off
    # A lower resolution (thicker slices, a softer scanner): Gaussian blur, its sigma drawn per axis
    # from U(0, blur_mm) mm; 0 = off.
    blur_mm: float = 0.0
    # A partial field of view, with this probability: beyond a random plane normal to a random axis
    # the image is blank, the plane never closer to a landmark than FIELD_OF_VIEW_MARGIN_MM; 0 = off.
    field_of_view_cut: float = 0.0
    # Articulation (2D): each chain of landmark names (a finger: its base, then each joint, then its
    # tip) turns about each of its joints by an angle drawn from U(-a, a), a from `articulation_deg`
    # (one tuple per chain, one angle per joint: the chain's length - 1; degrees), and the image
    # follows through a smooth warp that takes each landmark exactly to its turned position. Empty = off.
    articulation_chains: tuple[tuple[str, ...], ...] = ()
    articulation_deg: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class IntensityConfig:
    """How raw image values become network inputs; stored in every model file.

    `percentile` maps [p_low, p_high] of each image to [-1, 1]; `zscore` uses mean/std;
    `window` maps the fixed [low, high] (e.g. CT Hounsfield units) to [-1, 1].
    """

    normalization: str = "percentile"
    low: float = 1.0
    high: float = 99.0


@dataclass(frozen=True)
class HeatmapConfig:
    """Gaussian targets gamma / ((2 pi)^(d/2) sigma^d) exp(-r^2 / (2 sigma^2)), r and sigma in mm.

    Attributes:
        sigma_init: initial sigma per landmark, mm.
        learnable_sigma: learn one sigma per landmark (loss term alpha * (sigma / sigma_init)^2).
        gamma: target scale; None = (2 pi)^(d/2) sigma_init^d, which makes the initial peak 1.
        alpha: weight of the sigma regulariser.
        sigma_min: lower bound for learned sigmas, mm.
    """

    sigma_init: float = 4.0
    learnable_sigma: bool = True
    gamma: float | None = None
    alpha: float = 1.0
    sigma_min: float = 0.5

    def resolved_gamma(self, dimension: int) -> float:
        if self.gamma is not None:
            return self.gamma
        return (2.0 * math.pi) ** (dimension / 2.0) * self.sigma_init**dimension


@dataclass(frozen=True)
class ModelConfig:
    """Architecture name (see models.ARCHITECTURES) and its parameters (merged over its defaults)."""

    architecture: str = "scn"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and bookkeeping.

    The paper trains with SGD + Nesterov momentum 0.99 on a summed loss; our loss is a mean, so
    Adam(W) at 1e-4 is the robust default and `sgd` is offered for the paper's setting. Weight
    decay defaults to 0: added to Adam's normalised gradient it outweighs the small early heatmap
    gradients and drives a 3D net to the all-zero heatmap (seen on the brain model).
    """

    iterations: int = 20000
    batch_size: int = 1
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov)
    learning_rate: float = 1e-4
    sigma_learning_rate: float = 1e-3  # on log(sigma); faster sigmas grow before the net learns anything
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | step | constant
    step_every: int = 10000  # for schedule = step: lr *= 0.1 every this many iterations
    validate_every: int = 1000
    checkpoint_every: int = 200
    seed: int = 0
    # bfloat16 autocast on CUDA and on CPUs with AMX (train.mixed_precision_applies)
    mixed_precision: bool = True
    gradient_clip: float = 100.0


@dataclass(frozen=True)
class InferenceConfig:
    """Decoding settings stored in the model file."""

    missing_below: float = 0.1  # confidence under which a landmark is reported missing
    low_confidence_below: float = 0.5
    max_grid_voxels: int = 48_000_000  # larger grids are processed in overlapping tiles
    # Physical axis along which images may arrive mirrored (0 = x: left- or right-facing X-rays,
    # left or right hands): detection also runs on the mirror image and keeps the more confident
    # result. None = never. Not for models with left/right landmark pairs: on a near-symmetric image
    # the mirror pass could win and swap the sides.
    mirror_axis: int | None = None
    # The mirror pass runs only when the first pass's mean confidence is below this (1.0: always). A
    # model whose confidence separates the two facings (measured on its data) can skip it for
    # images that face its way.
    mirror_pass_below: float = 1.0
    # Patches per landmark in the refinement stage (test-time augmentation): one centred on the coarse
    # point and the others on a ring (2D) or sphere (3D) around it; the refined points of the views
    # whose peak is confident are averaged. Each view sees the landmark at another place in the patch,
    # so their errors partly cancel: 9 views took the ISBI model from 1.12 to 1.07 mm (its card).
    refinement_views: int = 1
    # Weigh each refinement heatmap by the coarse stage's Gaussian around the coarse point (its learned
    # sigma): the spatial configuration's answer at the fine resolution, so that a patch's look-alike
    # structure away from where the whole configuration puts the landmark does not win (the ISBI
    # model's Articulare and A point jumped 2-3 mm so: 1.07 to 1.05 mm, its card). It also keeps a
    # gross coarse error that the views would correct (a hand's look-alike finger), so it is opt-in.
    refinement_prior: bool = False

    def status(self, confidence: float) -> LandmarkStatus:
        """The status of a landmark found with this confidence."""
        if confidence < self.missing_below:
            return LandmarkStatus.MISSING
        return LandmarkStatus.LOW_CONFIDENCE if confidence < self.low_confidence_below else LandmarkStatus.DETECTED


@dataclass(frozen=True)
class RefinementConfig:
    """Optional second stage (coarse-to-fine): a local network on small fine-grid patches.

    After the coarse SCN has found each landmark, a patch of `grid` (fine spacing) centered on the
    coarse point goes through this network and the landmark's heatmap maximum there replaces the
    coarse position. It trains on patches centered within `offset_mm` of the true landmark (the
    coarse stage's error range), with its own heatmap, model, training and augmentation settings.
    """

    grid: GridConfig
    offset_mm: float = 10.0
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(architecture="unet"))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass(frozen=True)
class Config:
    """Everything a training run needs. Paths are relative to the TOML file.

    `initial_model`, when set, is a model file whose coarse network and sigmas start the coarse
    stage, and its refinement network the refinement stage when it has one (fine-tuning, e.g. a
    shipped model on your own images); it must have this config's architecture and parameters,
    except the training-only ones (dropout, initialisation). With other landmark names only its
    local-appearance body is reused and the landmark heads start anew. With `[training] iterations
    = 0` its coarse stage is kept as it is, so that a refinement stage can be added to a trained model.

    `scale_from_anatomy` (images in pixels only) trains on every image brought to one anatomical size
    (`pose.anatomical_scales`; the initial model's canonical size when it has one), as detection's
    pass in the canonical pose sees images: pixels of different devices then mean the same.
    """

    dataset: Path
    output_dir: Path
    grid: GridConfig
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    refinement: RefinementConfig | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    initial_model: Path | None = None
    scale_from_anatomy: bool = False

    @property
    def dimension(self) -> int:
        return len(self.grid.size)


_SECTIONS = {
    "grid": GridConfig,
    "augmentation": AugmentationConfig,
    "intensity": IntensityConfig,
    "heatmap": HeatmapConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "inference": InferenceConfig,
}


# Augmentation setting names of earlier versions (in configuration files, and in the configuration
# stored in model files' provenance), read under their current names.
RENAMED_AUGMENTATION_SETTINGS = {
    "flip_axis": "mirror_axis",
    "flip_pairs": "mirror_pairs",
    "flip_probability": "mirror_probability",
}


def current_augmentation_names(values: dict[str, Any]) -> dict[str, Any]:
    """Augmentation settings with the names of earlier versions replaced by the current ones."""
    return {RENAMED_AUGMENTATION_SETTINGS.get(key, key): value for key, value in values.items()}


def _build(cls, values: dict[str, Any], where: str):
    if cls is AugmentationConfig:
        values = current_augmentation_names(values)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise DataError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise DataError(f"{where}: {error}") from None


def _refinement(values: dict[str, Any], where: str) -> RefinementConfig:
    if "grid" not in values:
        raise DataError(f"{where}: missing required section [refinement.grid] (patch size and spacing)")
    nested: dict[str, Any] = {
        name: _build(_SECTIONS[name], values.pop(name), f"{where[:-1]}.{name}]")
        for name in ("grid", "heatmap", "model", "training", "augmentation")
        if name in values
    }
    if "model" not in nested:
        nested["model"] = ModelConfig(architecture="unet")
    return _build(RefinementConfig, {**values, **nested}, where)


def _check_training(training: TrainingConfig, where: str) -> None:
    """Types and ranges of a [training] section, checked before any data is read."""
    for name in ("iterations", "batch_size", "step_every", "validate_every", "checkpoint_every", "seed"):
        value = getattr(training, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{where}: {name} = {value!r} must be a whole number")
    for name in ("learning_rate", "sigma_learning_rate", "momentum", "weight_decay", "gradient_clip"):
        value = getattr(training, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(f"{where}: {name} = {value!r} must be a number")
    if min(training.step_every, training.validate_every, training.checkpoint_every) < 1:
        raise DataError(f"{where}: step_every, validate_every and checkpoint_every must be >= 1")
    if min(training.learning_rate, training.sigma_learning_rate, training.weight_decay) < 0:
        raise DataError(f"{where}: learning rates and weight_decay must be >= 0")


def config_from_dict(values: dict[str, Any], base_dir: Path, where: str = "config") -> Config:
    """Build and validate a Config; relative paths are resolved against `base_dir`."""
    values = dict(values)
    for key in ("dataset", "output_dir"):
        if key not in values:
            raise DataError(f"{where}: missing required setting '{key}'")
    if "grid" not in values:
        raise DataError(f"{where}: missing required section [grid] (size and spacing)")
    sections = {name: _build(cls, values.pop(name, {}), f"{where} [{name}]") for name, cls in _SECTIONS.items()}
    if "refinement" in values:
        sections["refinement"] = _refinement(dict(values.pop("refinement")), f"{where} [refinement]")
    top: dict[str, Any] = {
        k: values.pop(k) for k in ("train_split", "validation_split", "scale_from_anatomy") if k in values
    }
    dataset = (base_dir / values.pop("dataset")).resolve()
    output_dir = (base_dir / values.pop("output_dir")).resolve()
    if "initial_model" in values:
        top["initial_model"] = (base_dir / values.pop("initial_model")).resolve()
    if values:
        raise DataError(f"{where}: unknown setting(s) {sorted(values)}")
    config = Config(dataset=dataset, output_dir=output_dir, **sections, **top)
    validate(config, where)
    return config


def validate(config: Config, where: str = "config") -> None:
    """Raise DataError for settings that cannot work."""
    grid = config.grid
    if len(grid.size) not in (2, 3) or len(grid.spacing) != len(grid.size):
        raise DataError(
            f"{where} [grid]: size and spacing need 2 or 3 matching entries, "
            f"got size {grid.size}, spacing {grid.spacing}"
        )
    if min(grid.size) < 4 or min(grid.spacing) <= 0:
        raise DataError(f"{where} [grid]: size must be >= 4 and spacing > 0")
    choices = {
        "training.optimizer": (config.training.optimizer, ("adam", "adamw", "sgd")),
        "training.schedule": (config.training.schedule, ("cosine", "step", "constant")),
        "intensity.normalization": (config.intensity.normalization, ("percentile", "zscore", "window")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise DataError(f"{where}: {key} = {value!r}; choose one of {allowed}")
    _check_training(config.training, f"{where} [training]")
    if config.refinement is not None:
        _check_training(config.refinement.training, f"{where} [refinement.training]")
    if config.training.batch_size < 1 or config.training.iterations < 0:
        raise DataError(
            f"{where} [training]: batch_size must be >= 1 and iterations >= 1 (0 keeps an initial_model's coarse stage)"
        )
    if config.training.iterations == 0 and (config.initial_model is None or config.refinement is None):
        raise DataError(
            f"{where} [training]: iterations = 0 keeps an initial_model's coarse stage as it is, to add a "
            "[refinement] stage behind it; this configuration lacks "
            + ("an initial_model" if config.initial_model is None else "a [refinement] section")
        )
    if config.heatmap.sigma_init <= 0 or config.heatmap.sigma_min <= 0:
        raise DataError(f"{where} [heatmap]: sigma_init and sigma_min must be > 0")
    refinement = config.refinement
    if refinement is not None:
        if refinement.training.iterations < 1 or refinement.training.batch_size < 1:
            raise DataError(f"{where} [refinement.training]: iterations and batch_size must be >= 1")
        if len(refinement.grid.size) != config.dimension or len(refinement.grid.spacing) != config.dimension:
            raise DataError(f"{where} [refinement.grid]: size and spacing need {config.dimension} entries")
        if refinement.model.architecture == "scn":
            raise DataError(
                f"{where} [refinement.model]: the refinement works on small patches: use 'unet', "
                "'downsampling' or 'convonly'"
            )
    for section, name, axis in (
        ("augmentation", "mirror_axis", config.augmentation.mirror_axis),
        ("inference", "mirror_axis", config.inference.mirror_axis),
    ):
        if axis is not None and not 0 <= axis < config.dimension:
            raise DataError(f"{where} [{section}]: {name} {axis} outside 0..{config.dimension - 1}")
    if not 0.0 <= config.inference.mirror_pass_below <= 1.0:
        raise DataError(
            f"{where} [inference]: mirror_pass_below {config.inference.mirror_pass_below} "
            "outside 0..1 (it is a mean confidence)"
        )
    if not isinstance(config.inference.refinement_views, int) or config.inference.refinement_views < 1:
        raise DataError(
            f"{where} [inference]: refinement_views {config.inference.refinement_views!r} must be a whole number "
            ">= 1 (1: the patch centred on the coarse point only)"
        )
    augmentations = {"augmentation": config.augmentation}
    if refinement is not None:
        augmentations["refinement.augmentation"] = refinement.augmentation
    for section, augmentation in augmentations.items():
        _validate_articulation(augmentation, config.dimension, f"{where} [{section}]")
    if config.inference.mirror_axis is not None and config.augmentation.mirror_pairs:
        raise DataError(
            f"{where} [inference]: mirror_axis cannot be used with left/right landmark pairs "
            "([augmentation] mirror_pairs): the mirror pass could swap the sides"
        )


def _validate_articulation(augmentation: AugmentationConfig, dimension: int, where: str) -> None:
    chains, angles = augmentation.articulation_chains, augmentation.articulation_deg
    if not chains and not angles:
        return
    if dimension != 2:
        raise DataError(f"{where}: articulation_chains are for 2D images (the chains turn in the image plane)")
    if any(len(chain) < 2 for chain in chains):
        raise DataError(f"{where}: every articulation chain needs two landmarks or more (a joint and what it turns)")
    if len(angles) != len(chains) or any(len(a) != len(c) - 1 for c, a in zip(chains, angles)):
        raise DataError(
            f"{where}: articulation_deg needs one angle per joint of each chain (its length - 1): "
            f"chains of {[len(c) for c in chains]} landmarks, angles {[len(a) for a in angles]}"
        )
    if any(not 0.0 <= a <= MAX_ARTICULATION_DEG for row in angles for a in row):
        raise DataError(f"{where}: articulation_deg must lie within 0..{MAX_ARTICULATION_DEG:g} degrees")


def load_config(path: str | Path) -> Config:
    """Read a training configuration TOML file (errors name the file)."""
    path = Path(path)
    return config_from_dict(read_toml(path, "configuration file"), path.parent, where=str(path))


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain dict (TOML/JSON-ready; None values dropped, paths as strings)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None
            }
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def save_config(config: Config, path: str | Path) -> None:
    write_toml(path, config_to_dict(config))

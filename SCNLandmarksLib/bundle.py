"""The model file: one self-describing safetensors file (weights + JSON metadata).

Loading reads tensors only (safetensors never unpickles), parses the metadata once into a typed
`ModelDescription` and rebuilds the networks from it, so a model file is all a user or the Slicer
module needs.

Format versions: 3 is 2 with a clinic's convention offset (see convention.py); it is written only
for models that have one, so that older software refuses them rather than detecting without the
offset. 2 describes each network as a stage ("coarse", optional "refinement"); 1 kept the coarse
stage's fields at the top level and called the refinement's grid size "patch_size". All are read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .calibration import Calibration
from .config import InferenceConfig, IntensityConfig
from .convention import ConventionOffset
from .errors import DataError, ModelFileError
from .io.atomic import atomic_output
from .models import build_model
from .pose import MeanConfiguration

FORMAT = "scn-landmarks-model"
FORMAT_VERSION = 3
VERSION_WITHOUT_CONVENTION = 2
METADATA_KEY = "scn_landmarks"
# Tensor name prefixes of the two stages: the coarse network, and the optional refinement network.
PREFIXES = {"coarse": "network.", "refinement": "refiner."}
SIGMA_TENSORS = {"coarse": "heatmap.sigmas", "refinement": "refiner_heatmap.sigmas"}
_MODEL_KEYS = ("dimension", "in_channels", "landmark_names", "unit", "intensity", "inference", "coarse")
_STAGE_KEYS = ("architecture", "params", "grid_size", "grid_spacing", "sigmas", "gamma")
# Version 1: the coarse stage's fields at the top level, the refinement's grid size as "patch_size".
_V1_MODEL_KEYS = (
    "architecture",
    "dimension",
    "in_channels",
    "landmark_names",
    "params",
    "grid_spacing",
    "training_grid_size",
    "unit",
    "intensity",
    "sigmas",
    "gamma",
    "inference",
)
_V1_REFINEMENT_KEYS = ("architecture", "params", "patch_size", "grid_spacing", "sigmas", "gamma")


@dataclass(frozen=True)
class StageDescription:
    """One network of a model: the coarse SCN, run on the whole image, or the refinement network,
    run on a patch centered on each coarse point.

    Attributes:
        architecture: see models.ARCHITECTURES.
        params: the architecture's parameters (all of them, defaults included).
        grid_size: voxels per axis of the coarse stage's training grid, or of the refinement patch.
        grid_spacing: mm (px for images without spacing) per grid voxel.
        sigmas: learned heatmap sigma per landmark, mm (the weights hold the same values as a tensor).
        gamma: heatmap scale; with a sigma it gives the peak height of a confident landmark.
    """

    architecture: str
    params: dict[str, Any]
    grid_size: tuple[int, ...]
    grid_spacing: tuple[float, ...]
    sigmas: tuple[float, ...]
    gamma: float

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "params": self.params,
            "grid_size": list(self.grid_size),
            "grid_spacing": list(self.grid_spacing),
            "sigmas": list(self.sigmas),
            "gamma": self.gamma,
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StageDescription:
        return cls(
            str(values["architecture"]),
            dict(values["params"]),
            tuple(int(s) for s in values["grid_size"]),
            tuple(float(s) for s in values["grid_spacing"]),
            tuple(float(s) for s in values["sigmas"]),
            float(values["gamma"]),
        )


@dataclass(frozen=True)
class ModelDescription:
    """Everything a model file says about its model, parsed and checked when the file is read.

    Attributes:
        dimension: 2 or 3.
        landmark_names: in model (channel) order.
        unit: unit of the training images' spacing: "mm", or "px" for images without spacing.
        intensity: how raw image values become network inputs.
        inference: decoding settings (confidence thresholds, mirror axis, tiling).
        coarse: the SCN on the whole image.
        refinement: the optional coarse-to-fine stage.
        in_channels: network input channels.
        provenance: where the model came from (dataset, iterations, date, configuration).
        validation: the validation scores of the saved model ({} without a validation split).
        calibration: how to turn the network's evidence into an expected error per landmark (None:
            not calibrated; models trained before calibrations existed load so).
        mean_configuration: where the landmarks lie on average in the training images, the canonical
            pose that detection brings images into (None: detection in the image's own pose only;
            models trained before pose normalisation existed load so).
        convention: a clinic's per-landmark offset added after detection (None: none learned).
    """

    dimension: int
    landmark_names: tuple[str, ...]
    unit: str
    intensity: IntensityConfig
    inference: InferenceConfig
    coarse: StageDescription
    refinement: StageDescription | None = None
    in_channels: int = 1
    provenance: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    mean_configuration: MeanConfiguration | None = None
    convention: ConventionOffset | None = None

    @property
    def in_pixels(self) -> bool:
        """True when positions are in pixels (the training images had no physical spacing)."""
        return self.unit.lower() in ("px", "pixel", "pixels")

    def check_image_unit(self, unit: str, source: str, remedy: str) -> None:
        """Refuse an image in pixels (a picture without a stated spacing) for a model in mm: its pixels
        would be taken for millimetres, and the points found at a wrong scale.

        Args:
            unit: the image's unit ('mm' or 'px'; see io.images.spacing_unit).
            source: how to name the image in the message.
            remedy: how the user states the picture's spacing there (an option, a spec key).

        Raises:
            DataError: naming `source`, the units and `remedy`.
        """
        if unit == "px" and not self.in_pixels:
            raise DataError(
                f"{source}: a picture without spacing (positions in pixels), but the model works in "
                f"{self.unit}; {remedy}"
            )

    @property
    def stages(self) -> dict[str, StageDescription]:
        """The stages by name ("coarse", then "refinement" if present)."""
        return {"coarse": self.coarse, **({} if self.refinement is None else {"refinement": self.refinement})}

    def to_json(self) -> dict[str, Any]:
        """The metadata written to a model file (the current format version)."""
        return {
            "format": FORMAT,
            "format_version": VERSION_WITHOUT_CONVENTION if self.convention is None else FORMAT_VERSION,
            "dimension": self.dimension,
            "in_channels": self.in_channels,
            "landmark_names": list(self.landmark_names),
            "unit": self.unit,
            "intensity": dataclasses.asdict(self.intensity),
            "inference": dataclasses.asdict(self.inference),
            **{name: stage.to_json() for name, stage in self.stages.items()},
            "provenance": self.provenance,
            "validation": self.validation,
            **({} if self.calibration is None else {"calibration": self.calibration.to_json()}),
            **({} if self.mean_configuration is None else {"mean_configuration": self.mean_configuration.to_json()}),
            **({} if self.convention is None else {"convention": self.convention.to_json()}),
        }

    @classmethod
    def from_json(cls, header: dict[str, Any], source: str) -> ModelDescription:
        """Parse model file metadata of any supported version.

        Raises:
            ModelFileError: naming `source`, when a field is missing, malformed or impossible.
        """
        if header.get("format") != FORMAT:
            raise ModelFileError(f"{source}: unknown model format {header.get('format')!r}")
        version = header.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: model format version {version} is newer than this software reads "
                f"({FORMAT_VERSION}); update SCNLandmarks"
            )
        values = _from_version_1(header, source) if version <= 1 else header
        _require(values, _MODEL_KEYS, source, "")
        names = values["landmark_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ModelFileError(f"{source}: landmark_names {names!r} is not a list of landmark names")
        _require(values["coarse"], _STAGE_KEYS, source, "coarse.")
        if values.get("refinement") is not None:
            _require(values["refinement"], _STAGE_KEYS, source, "refinement.")
        try:
            description = cls(
                dimension=int(values["dimension"]),
                landmark_names=tuple(str(n) for n in values["landmark_names"]),
                unit=str(values["unit"]),
                intensity=IntensityConfig(**values["intensity"]),
                inference=InferenceConfig(**values["inference"]),
                coarse=StageDescription.from_json(values["coarse"]),
                refinement=(
                    None if values.get("refinement") is None else StageDescription.from_json(values["refinement"])
                ),
                in_channels=int(values["in_channels"]),
                provenance=dict(values.get("provenance") or {}),
                validation=dict(values.get("validation") or {}),
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise ModelFileError(f"{source}: malformed model metadata ({error})") from None
        if values.get("calibration") is not None:
            description = dataclasses.replace(
                description,
                calibration=Calibration.from_json(values["calibration"], description.landmark_names, source),
            )
        if values.get("mean_configuration") is not None:
            description = dataclasses.replace(
                description,
                mean_configuration=MeanConfiguration.from_json(
                    values["mean_configuration"], description.landmark_names, description.dimension, source
                ),
            )
        if values.get("convention") is not None:
            description = dataclasses.replace(
                description,
                convention=ConventionOffset.from_json(
                    values["convention"], len(description.landmark_names), description.dimension, source
                ),
            )
        axis = description.inference.mirror_axis
        if axis is not None and (not isinstance(axis, int) or not 0 <= axis < description.dimension):
            raise ModelFileError(
                f"{source}: inference.mirror_axis {axis!r} is not an axis of {description.dimension}D images"
            )
        views = description.inference.refinement_views
        if not isinstance(views, int) or views < 1:
            raise ModelFileError(f"{source}: inference.refinement_views {views!r} is not a whole number >= 1")
        if not description.inference.max_grid_voxels >= 1:
            raise ModelFileError(
                f"{source}: inference.max_grid_voxels {description.inference.max_grid_voxels!r} is not >= 1"
            )
        for name, stage in description.stages.items():
            if len(stage.grid_size) != description.dimension or len(stage.grid_spacing) != description.dimension:
                raise ModelFileError(
                    f"{source}: {name}.grid_size and grid_spacing need {description.dimension} entries"
                )
            if min(stage.grid_spacing) <= 0 or min(stage.grid_size) < 1:
                raise ModelFileError(f"{source}: {name}.grid_spacing {list(stage.grid_spacing)} is not > 0")
        return description


def _require(values: Any, keys: tuple[str, ...], source: str, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ModelFileError(f"{source}: malformed model metadata ({prefix.rstrip('.') or 'top level'} is not a table)")
    missing = [prefix + k for k in keys if k not in values]
    if missing:
        raise ModelFileError(f"{source}: model metadata lacks {missing}")


def _from_version_1(header: dict[str, Any], source: str) -> dict[str, Any]:
    """Version 1 metadata in the version 2 layout."""
    _require(header, _V1_MODEL_KEYS, source, "")
    values = {k: v for k, v in header.items() if k not in _V1_REFINEMENT_KEYS and k != "training_grid_size"}
    values["coarse"] = {
        "architecture": header["architecture"],
        "params": header["params"],
        "grid_size": header["training_grid_size"],
        "grid_spacing": header["grid_spacing"],
        "sigmas": header["sigmas"],
        "gamma": header["gamma"],
    }
    refinement = header.get("refinement")
    if refinement is not None:
        _require(refinement, _V1_REFINEMENT_KEYS, source, "refinement.")
        values["refinement"] = {
            **{k: v for k, v in refinement.items() if k != "patch_size"},
            "grid_size": refinement["patch_size"],
        }
    return values


@dataclass
class Stage:
    """One stage's network with its learned sigmas."""

    network: torch.nn.Module
    sigmas: torch.Tensor  # (N,) learned Gaussian sigmas, mm


@dataclass
class LoadedModel:
    description: ModelDescription
    coarse: Stage
    refinement: Stage | None = None  # described by description.refinement


def _stage_tensors(name: str, stage: Stage) -> dict[str, torch.Tensor]:
    tensors = {
        f"{PREFIXES[name]}{k}": v.detach().to("cpu", torch.float32).contiguous()
        for k, v in stage.network.state_dict().items()
    }
    tensors[SIGMA_TENSORS[name]] = stage.sigmas.detach().to("cpu", torch.float32).contiguous()
    return tensors


def save_model(path: str | Path, description: ModelDescription, coarse: Stage, refinement: Stage | None = None) -> Path:
    """Write weights + metadata atomically (a crash never leaves a half-written model file).

    Args:
        refinement: the optional fine stage; `description.refinement` must then describe it.
    """
    if (refinement is None) != (description.refinement is None):
        raise ValueError("the refinement stage and its description must be given together")
    path = Path(path)
    tensors = _stage_tensors("coarse", coarse)
    if refinement is not None:
        tensors.update(_stage_tensors("refinement", refinement))
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(description.to_json())})
    return path


def save_description(source: str | Path, target: str | Path, description: ModelDescription) -> Path:
    """Write a copy of a model file with new metadata and its tensors byte for byte (e.g. a calibration
    added); atomic, so `target` may be `source`."""
    source = Path(source)
    read_description(source)  # names the file if it is not a model
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{source}: weights cannot be read (truncated?): {error}") from None
    with atomic_output(Path(target)) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(description.to_json())})
    return Path(target)


def read_description(path: str | Path) -> ModelDescription:
    """The description of a model file, checked; raises ModelFileError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable model file (truncated or not safetensors: {error})") from None
    if raw is None:
        raise ModelFileError(
            f"{path}: a safetensors file, but not an SCNLandmarks model (no '{METADATA_KEY}' metadata)"
        )
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the model metadata is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the model metadata is not a JSON object")
    return ModelDescription.from_json(header, str(path))


def _build_stage(
    path: Path,
    name: str,
    stage: StageDescription,
    description: ModelDescription,
    tensors: dict[str, torch.Tensor],
    device: torch.device | str,
) -> Stage:
    """Rebuild one stage's network from its description and load its tensors strictly."""
    count = len(description.landmark_names)
    try:
        network = build_model(stage.architecture, description.dimension, description.in_channels, count, stage.params)
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFileError(f"{path}: cannot build the {name} network it describes ({error})") from None
    sigmas = tensors.get(SIGMA_TENSORS[name])
    if sigmas is None or sigmas.shape != (count,):
        raise ModelFileError(f"{path}: {name} sigma tensor missing or of the wrong size")
    prefix = PREFIXES[name]
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: {name} weights do not match the described network: {error}") from None
    return Stage(network.eval().to(device), sigmas.to(device))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network(s) from a model file and load the weights (names and shapes checked)."""
    path = Path(path)
    description = read_description(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: weights cannot be read (truncated?): {error}") from None
    stages = {
        name: _build_stage(path, name, stage, description, tensors, device)
        for name, stage in description.stages.items()
    }
    unexpected = [
        k for k in tensors if not any(k.startswith(PREFIXES[name]) or k == SIGMA_TENSORS[name] for name in stages)
    ]
    if unexpected:
        raise ModelFileError(f"{path}: unexpected tensors {unexpected[:5]}")
    return LoadedModel(description, stages["coarse"], stages.get("refinement"))

"""The model file: one self-describing safetensors file (weights + JSON metadata).

Loading reads tensors only (safetensors never unpickles), checks the metadata and rebuilds the
network from it, so a model file is all a user or the Slicer module needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .io.atomic import atomic_output
from .models import build_model

FORMAT = "scn-landmarks-model"
FORMAT_VERSION = 1
METADATA_KEY = "scn_landmarks"
REQUIRED_KEYS = ("architecture", "dimension", "in_channels", "landmark_names", "params", "grid_spacing",
                 "unit", "intensity", "sigmas", "gamma", "inference")
REFINEMENT_KEYS = ("architecture", "params", "patch_size", "grid_spacing", "sigmas", "gamma")
# Tensor name prefixes of the two stages: the coarse network, and the optional refinement network.
PREFIXES = {"coarse": "network.", "refinement": "refiner."}
SIGMA_TENSORS = {"coarse": "heatmap.sigmas", "refinement": "refiner_heatmap.sigmas"}


@dataclass
class Stage:
    network: torch.nn.Module
    sigmas: torch.Tensor          # (N,) learned Gaussian sigmas, mm


@dataclass
class LoadedModel:
    network: torch.nn.Module
    sigmas: torch.Tensor          # (N,) learned Gaussian sigmas, mm
    metadata: dict[str, Any]
    refinement: Stage | None = None   # described by metadata["refinement"]


def _stage_tensors(stage: str, network: torch.nn.Module, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {f"{PREFIXES[stage]}{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in network.state_dict().items()}
    tensors[SIGMA_TENSORS[stage]] = sigmas.detach().to("cpu", torch.float32).contiguous()
    return tensors


def save_model(path: str | Path, network: torch.nn.Module, sigmas: torch.Tensor, metadata: dict[str, Any],
               refinement: Stage | None = None) -> Path:
    """Write weights + metadata atomically (a crash never leaves a half-written model file).

    Args:
        refinement: the optional fine stage; metadata["refinement"] must then describe it.
    """
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if refinement is not None:
        missing += [f"refinement.{k}" for k in REFINEMENT_KEYS if k not in metadata.get("refinement", {})]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    path = Path(path)
    tensors = _stage_tensors("coarse", network, sigmas)
    if refinement is not None:
        tensors.update(_stage_tensors("refinement", refinement.network, refinement.sigmas))
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(header)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file, checked; raises ModelFileError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable model file (truncated or not safetensors: {error})") from None
    if raw is None:
        raise ModelFileError(f"{path}: a safetensors file, but not an SCNLandmarks model (no '{METADATA_KEY}' metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the model metadata is not valid JSON") from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unknown model format {metadata.get('format')!r}")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {metadata.get('format_version')} is newer than this "
                             f"software reads ({FORMAT_VERSION}); update SCNLandmarks")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ModelFileError(f"{path}: model metadata lacks {missing}")
    axis = metadata["inference"].get("mirror_axis")
    if axis is not None and (not isinstance(axis, int) or not 0 <= axis < metadata["dimension"]):
        raise ModelFileError(f"{path}: inference.mirror_axis {axis!r} is not an axis of "
                             f"{metadata['dimension']}D images")
    return metadata


def _build_stage(path: Path, stage: str, description: dict[str, Any], metadata: dict[str, Any],
                 tensors: dict[str, torch.Tensor], device) -> Stage:
    """Rebuild one stage's network from its description and load its tensors strictly."""
    count = len(metadata["landmark_names"])
    try:
        network = build_model(description["architecture"], metadata["dimension"], metadata["in_channels"], count,
                              description["params"])
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFileError(f"{path}: cannot build the {stage} network it describes ({error})") from None
    sigmas = tensors.get(SIGMA_TENSORS[stage])
    if sigmas is None or sigmas.shape != (count,):
        raise ModelFileError(f"{path}: {stage} sigma tensor missing or of the wrong size")
    prefix = PREFIXES[stage]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: {stage} weights do not match the described network: {error}") from None
    return Stage(network.eval().to(device), sigmas.to(device))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network(s) from a model file and load the weights (names and shapes checked)."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: weights cannot be read (truncated?): {error}") from None
    coarse = _build_stage(path, "coarse", metadata, metadata, tensors, device)
    refinement = None
    if "refinement" in metadata:
        missing = [k for k in REFINEMENT_KEYS if k not in metadata["refinement"]]
        if missing:
            raise ModelFileError(f"{path}: refinement metadata lacks {missing}")
        refinement = _build_stage(path, "refinement", metadata["refinement"], metadata, tensors, device)
    unexpected = [k for k in tensors if not any(k.startswith(p) for p in PREFIXES.values())
                  and k not in SIGMA_TENSORS.values()]
    if unexpected:
        raise ModelFileError(f"{path}: unexpected tensors {unexpected[:5]}")
    return LoadedModel(coarse.network, coarse.sigmas, metadata, refinement)

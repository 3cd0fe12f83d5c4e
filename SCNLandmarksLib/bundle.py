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
SIGMA_TENSOR = "heatmap.sigmas"


@dataclass
class LoadedModel:
    network: torch.nn.Module
    sigmas: torch.Tensor          # (N,) learned Gaussian sigmas, mm
    metadata: dict[str, Any]


def save_model(path: str | Path, network: torch.nn.Module, sigmas: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write weights + metadata atomically (a crash never leaves a half-written model file)."""
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"network.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    tensors[SIGMA_TENSOR] = sigmas.detach().to("cpu", torch.float32).contiguous()
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
    return metadata


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network from a model file and load its weights (strictly, names and shapes checked)."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        network = build_model(metadata["architecture"], metadata["dimension"], metadata["in_channels"],
                              len(metadata["landmark_names"]), metadata["params"])
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFileError(f"{path}: cannot build the network it describes ({error})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: weights cannot be read (truncated?): {error}") from None
    sigmas = tensors.pop(SIGMA_TENSOR, None)
    if sigmas is None or sigmas.shape != (len(metadata["landmark_names"]),):
        raise ModelFileError(f"{path}: sigma tensor missing or of the wrong size")
    state = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not match the described network: {error}") from None
    network.eval().to(device)
    return LoadedModel(network, sigmas.to(device), metadata)

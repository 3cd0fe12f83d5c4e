"""What the module needs in Slicer's Python (torch, safetensors) and what to do when it is missing.

Nothing here installs anything: the widget asks the user first (or lets the PyTorch extension's
PyTorchUtils ask), following the recommendation returned by `dependencyStatus`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

# Installed with pip after the user agrees (torch itself comes from the PyTorch extension when present).
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4"}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class DependencyStatus:
    """Whether detection can run, and if not, how to get there.

    Attributes:
        torchAvailable: torch can be imported.
        pytorchUtilsAvailable: the PyTorch extension's PyTorchUtils module is installed; it installs
            a torch build matching the GPU driver (and asks the user itself).
        missingPipPackages: other packages to pip-install (after asking), as requirement strings.
        message: for the user; empty when everything is there.
    """

    torchAvailable: bool
    pytorchUtilsAvailable: bool
    missingPipPackages: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.torchAvailable and not self.missingPipPackages


def dependencyStatus() -> DependencyStatus:
    """Check (without importing torch) what landmark detection still needs."""
    torchAvailable = _importable("torch")
    pytorchUtils = _importable("PyTorchUtils")
    missing = [requirement for module, requirement in PIP_REQUIREMENTS.items() if not _importable(module)]
    parts = []
    if not torchAvailable:
        if pytorchUtils:
            parts.append("PyTorch is not installed yet; the PyTorch extension can install a build that "
                         "matches this computer (GPU or CPU).")
        else:
            parts.append("PyTorch is not installed. Install the 'PyTorch' extension (recommended), or let "
                         "this module install 'torch' with pip.")
    if missing:
        parts.append(f"Also needed: {', '.join(missing)} (installed with pip).")
    return DependencyStatus(torchAvailable, pytorchUtils, missing, " ".join(parts))


@dataclass(frozen=True)
class DeviceChoice:
    """One entry of the device selector: key for the library ("auto", "cuda", "cpu") and a label."""

    key: str
    label: str
    available: bool


def deviceChoices() -> list[DeviceChoice]:
    """Auto / GPU / CPU, labelled with what was found (imports torch only if it is installed)."""
    if not _importable("torch"):
        return [DeviceChoice("auto", "Auto (PyTorch not installed yet)", True),
                DeviceChoice("cuda", "GPU (unknown until PyTorch is installed)", False),
                DeviceChoice("cpu", "CPU", True)]
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        count = torch.cuda.device_count()
        gpu = f"GPU: {name}" + (f" (+{count - 1} more)" if count > 1 else "")
        return [DeviceChoice("auto", f"Auto ({gpu})", True), DeviceChoice("cuda", gpu, True),
                DeviceChoice("cpu", "CPU", True)]
    return [DeviceChoice("auto", "Auto (CPU: no CUDA GPU found)", True),
            DeviceChoice("cuda", "GPU (no CUDA GPU found)", False),
            DeviceChoice("cpu", "CPU", True)]


def describeDevice(device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA ...)' for a torch.device."""
    text = str(device)
    if getattr(device, "type", "") == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return text

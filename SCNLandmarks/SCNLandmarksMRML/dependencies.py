"""What the module needs in Slicer's Python (torch, safetensors) and what to do when it is missing.

Nothing here installs anything or imports torch to find out about it: the widget shows
`installationPlan` to the user, and only after they agree installs torch through the PyTorch
extension's PyTorchUtils (which picks a build for the GPU driver) and the rest with pip. torch is
never installed with plain pip: a plain ``pip install torch`` gets a build that may not match the
GPU driver, and the PyTorch extension is a dependency of this extension anyway.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The library's torch range (pyproject.toml's dependency; a test keeps the two equal).
TORCH_REQUIREMENT = ">=2.2,<2.14"
# Installed with pip after the user agrees (torch comes from the PyTorch extension).
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4"}
# Approximate downloads, for the consent prompt (the exact size depends on platform and build).
DOWNLOAD_SIZES = {
    "torch (CPU build)": "about 200 MB",
    "torch (CUDA build)": "about 2.5 GB with its NVIDIA libraries",
    "light-the-torch": "under 1 MB (PyTorchUtils uses it to choose the build)",
    "safetensors": "about 0.5 MB",
}
UNKNOWN_VERSION = "unknown"
PACKAGES_SHOWN = ("torch", "numpy", "SimpleITK", "safetensors", "light-the-torch")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installedVersion(distribution: str) -> str | None:
    """The installed version of a distribution (read from its metadata, nothing imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """(2, 13, 0) for "2.13.0+cpu", "2.13.0rc1", "2.13"; the numeric release part only."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _padded(version: tuple[int, ...], length: int) -> tuple[int, ...]:
    return version + (0,) * (length - len(version))


def satisfies(version: str, requirement: str) -> bool:
    """True when `version` meets a requirement of comma-separated ``>=``, ``>``, ``<``, ``<=``,
    ``==`` clauses on release numbers (e.g. ">=2.2,<2.14"); local labels like "+cpu" are ignored."""
    found = _release(version)
    if not found:
        return False
    for clause in filter(None, (part.strip() for part in requirement.split(","))):
        match = re.fullmatch(r"(>=|<=|==|>|<)\s*(\d+(?:\.\d+)*)", clause)
        if match is None:
            raise ValueError(f"unsupported version requirement clause '{clause}'")
        operator, bound = match.group(1), _release(match.group(2))
        length = max(len(found), len(bound))
        a, b = _padded(found, length), _padded(bound, length)
        if not {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[operator]:
            return False
    return True


@dataclass(frozen=True)
class DependencyStatus:
    """Whether detection can run, and if not, how to get there.

    Attributes:
        torchAvailable: torch is installed in a version the library supports.
        pytorchUtilsAvailable: the PyTorch extension's PyTorchUtils module is installed; it installs
            a torch build matching the GPU driver.
        missingPipPackages: other packages to pip-install (after asking), as requirement strings.
        message: for the user; empty when everything is there.
        torchVersion: the installed torch version ("" when none).
        torchUnsupported: a torch is installed, but outside `TORCH_REQUIREMENT`.
        restartNeeded: the torch imported in this session differs from the installed one (it was
            replaced after being imported): only a restart of Slicer uses the new one.
    """

    torchAvailable: bool
    pytorchUtilsAvailable: bool
    missingPipPackages: list[str] = field(default_factory=list)
    message: str = ""
    torchVersion: str = ""
    torchUnsupported: bool = False
    restartNeeded: bool = False

    @property
    def ready(self) -> bool:
        return self.torchAvailable and not self.missingPipPackages and not self.restartNeeded


def dependencyStatus(
    torchVersion: str | None = None,
    importedTorchVersion: str | None = None,
    pytorchUtils: bool | None = None,
    missing: list[str] | None = None,
) -> DependencyStatus:
    """Check (without importing torch) what landmark detection still needs.

    The arguments are what this computer has; each defaults to what is found here (they are
    parameters so that every situation can be checked): the installed torch version ("": no
    torch), the version of the torch already imported in this session ("": not imported), whether
    PyTorchUtils is there, and the missing pip requirements.
    """
    if torchVersion is None:
        # An importable torch without package metadata (e.g. a source build) is taken as it is.
        torchVersion = (installedVersion("torch") or UNKNOWN_VERSION) if _importable("torch") else ""
    if importedTorchVersion is None and "torch" in sys.modules:
        importedTorchVersion = getattr(sys.modules["torch"], "__version__", None)
    if pytorchUtils is None:
        pytorchUtils = _importable("PyTorchUtils")
    if missing is None:
        missing = [requirement for module, requirement in PIP_REQUIREMENTS.items() if not _importable(module)]
    unsupported = torchVersion not in ("", UNKNOWN_VERSION) and not satisfies(torchVersion, TORCH_REQUIREMENT)
    restart = (
        bool(importedTorchVersion)
        and torchVersion not in ("", UNKNOWN_VERSION)
        and _release(importedTorchVersion) != _release(torchVersion)
    )
    parts = []
    if restart:
        parts.append(
            f"PyTorch {torchVersion} was installed, but this session still runs PyTorch "
            f"{importedTorchVersion}: restart Slicer to use it."
        )
    elif not torchVersion or unsupported:
        found = (
            "is not installed"
            if not torchVersion
            else f"{torchVersion} is installed, but this module needs torch{TORCH_REQUIREMENT}"
        )
        if pytorchUtils:
            parts.append(
                f"PyTorch {found}. The PyTorch extension can install a build that matches this computer (GPU or CPU)."
            )
        else:
            parts.append(
                f"PyTorch {found}, and the 'PyTorch' extension, which installs it, is missing. "
                "Install 'PyTorch' from the Extensions Manager, restart Slicer, and detect again."
            )
    if missing:
        parts.append(f"Also needed: {', '.join(missing)} (installed with pip).")
    return DependencyStatus(
        bool(torchVersion) and not unsupported,
        pytorchUtils,
        list(missing),
        " ".join(parts),
        torchVersion,
        unsupported,
        restart,
    )


@dataclass(frozen=True)
class PlannedPackage:
    """One package the module would install: what, how, and roughly how big."""

    name: str
    requirement: str
    installer: str  # "PyTorchUtils" or "pip"
    size: str


def installationPlan(
    status: DependencyStatus, nvidiaGpu: bool | None = None, forceTorch: bool = False
) -> list[PlannedPackage]:
    """What would be installed to make `status` ready (empty when nothing can or need be).

    torch is planned only through PyTorchUtils (never plain pip); `forceTorch` replaces a
    working torch too (e.g. a CPU-only build on a computer with an NVIDIA GPU).
    """
    if nvidiaGpu is None:
        nvidiaGpu = nvidiaGpuPresent()
    plan = []
    if (forceTorch or not status.torchAvailable) and status.pytorchUtilsAvailable and not status.restartNeeded:
        build = "torch (CUDA build)" if nvidiaGpu else "torch (CPU build)"
        plan.append(PlannedPackage("torch", f"torch{TORCH_REQUIREMENT}", "PyTorchUtils", DOWNLOAD_SIZES[build]))
        if installedVersion("light-the-torch") is None:
            plan.append(
                PlannedPackage("light-the-torch", "light-the-torch", "PyTorchUtils", DOWNLOAD_SIZES["light-the-torch"])
            )
    for requirement in status.missingPipPackages:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
        plan.append(PlannedPackage(name, requirement, "pip", DOWNLOAD_SIZES.get(name, "size unknown")))
    return plan


def consentMessage(plan: list[PlannedPackage], replacesTorch: bool = False) -> str:
    """The one question asked before anything is installed: every package, how and how big."""
    lines = ["SCN Landmarks needs these Python packages in Slicer's Python:", ""]
    for package in plan:
        via = "the PyTorch extension" if package.installer == "PyTorchUtils" else "pip"
        lines.append(f"  - {package.requirement}: {package.size}, installed by {via}")
    lines += [
        "",
        "They are downloaded from the Python package index; this can take several minutes, and the "
        "progress is shown in the module's installation log.",
    ]
    if replacesTorch:
        lines.append("The PyTorch installed now is removed first; restart Slicer afterwards.")
    lines += ["", "Install them now?"]
    return "\n".join(lines)


def nvidiaGpuPresent() -> bool:
    """True when this computer has an NVIDIA GPU with its driver (found without torch)."""
    if Path("/proc/driver/nvidia/version").is_file():
        return True
    if shutil.which("nvidia-smi"):
        return True
    system = os.environ.get("SystemRoot")
    return bool(system) and (Path(system) / "System32" / "nvidia-smi.exe").is_file()


@dataclass(frozen=True)
class DeviceFacts:
    """What the device list is made of (gathered by `deviceFacts`).

    Attributes:
        torchVersion: installed torch version, "" when none.
        cudaBuild: the CUDA version torch was built for ("" for a CPU-only build).
        gpuNames: names of the CUDA devices torch can use.
        nvidiaGpu: an NVIDIA GPU and driver are present on this computer.
    """

    torchVersion: str
    cudaBuild: str
    gpuNames: tuple[str, ...]
    nvidiaGpu: bool


def deviceFacts() -> DeviceFacts:
    """The facts of this computer; imports torch only if it is installed in a supported version."""
    status = dependencyStatus()
    if not status.torchAvailable:
        return DeviceFacts(status.torchVersion, "", (), nvidiaGpuPresent())
    import torch

    names = (
        tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else ()
    )
    return DeviceFacts(str(torch.__version__), torch.version.cuda or "", names, nvidiaGpuPresent())


@dataclass(frozen=True)
class DeviceChoice:
    """One entry of the device selector: key for the library ("auto", "cuda", "cpu") and a label."""

    key: str
    label: str
    available: bool
    tooltip: str = ""


CUDA_BUILD_ADVICE = (
    "Reinstall PyTorch with GPU support: Advanced > 'Reinstall PyTorch', or the PyTorch Utils "
    "module (computation backend 'automatic' or a 'cu...' one), then restart Slicer."
)


def deviceChoices(facts: DeviceFacts | None = None) -> list[DeviceChoice]:
    """Auto / GPU / CPU, each saying what this computer really offers (and why a GPU is not used)."""
    facts = facts if facts is not None else deviceFacts()
    cpu = DeviceChoice("cpu", "CPU", True)
    if not facts.torchVersion:
        return [
            DeviceChoice("auto", "Auto (PyTorch not installed yet)", True),
            DeviceChoice("cuda", "GPU (unknown until PyTorch is installed)", False),
            cpu,
        ]
    if facts.gpuNames:
        gpu = f"GPU: {facts.gpuNames[0]}" + (f" (+{len(facts.gpuNames) - 1} more)" if len(facts.gpuNames) > 1 else "")
        return [DeviceChoice("auto", f"Auto ({gpu})", True), DeviceChoice("cuda", gpu, True), cpu]
    if facts.nvidiaGpu and not facts.cudaBuild:
        why = (
            f"This PyTorch ({facts.torchVersion}) is a CPU-only build, but this computer has an NVIDIA GPU. "
            + CUDA_BUILD_ADVICE
        )
        return [
            DeviceChoice("auto", "Auto (CPU: PyTorch is a CPU-only build)", True, why),
            DeviceChoice("cuda", "GPU (PyTorch is a CPU-only build: reinstall it with CUDA)", False, why),
            cpu,
        ]
    if facts.nvidiaGpu:
        why = (
            f"PyTorch {facts.torchVersion} (CUDA {facts.cudaBuild}) finds no usable GPU: the NVIDIA driver may be "
            "older than this CUDA build needs. Update the driver, or reinstall PyTorch (Advanced)."
        )
        return [
            DeviceChoice("auto", "Auto (CPU: the GPU is not usable)", True, why),
            DeviceChoice("cuda", "GPU (not usable with this PyTorch)", False, why),
            cpu,
        ]
    return [
        DeviceChoice("auto", "Auto (CPU: no CUDA GPU found)", True),
        DeviceChoice("cuda", "GPU (no CUDA GPU found)", False),
        cpu,
    ]


def describeDevice(device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA ...)' for a torch.device."""
    text = str(device)
    if getattr(device, "type", "") == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return text


def missingModuleMessage(error: ImportError) -> str:
    """What to tell the user when the library cannot be imported: which package is missing."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name == "torch":
        return "PyTorch is needed to read model files; it will be installed (after asking) when you detect."
    if name:
        return (
            f"The Python package '{name}' is needed to read model files; it will be installed (after asking) "
            "when you detect."
        )
    return f"The library cannot be imported ({error})."


def selfTestSkipReason(status: DependencyStatus | None = None) -> str:
    """Why the self-test cannot run here ("" when it can): it never installs packages itself."""
    status = status if status is not None else dependencyStatus()
    if status.ready:
        return ""
    return (
        "Skipped: the SCN Landmarks self-test runs a real detection, which needs "
        + status.message.rstrip(".")
        + ". Tests never install packages; install them (open the module and click Detect) and run the "
        "test again."
    )


def environmentReport(facts: DeviceFacts | None = None) -> list[tuple[str, str]]:
    """(label, value) lines for the Advanced section: Slicer's Python, package versions, devices."""
    facts = facts if facts is not None else deviceFacts()
    lines = [("Python", f"{sys.version.split()[0]} ({sys.executable})")]
    for name in PACKAGES_SHOWN:
        lines.append((name, installedVersion(name) or "not installed"))
    lines.append(("torch requirement", f"torch{TORCH_REQUIREMENT}"))
    if facts.torchVersion:
        lines.append(("torch build", f"CUDA {facts.cudaBuild}" if facts.cudaBuild else "CPU only"))
    lines.append(("CUDA devices", ", ".join(facts.gpuNames) if facts.gpuNames else "none usable"))
    lines.append(("NVIDIA GPU on this computer", "yes" if facts.nvidiaGpu else "not found"))
    for choice in deviceChoices(facts):
        if choice.tooltip:
            lines.append(("note", choice.tooltip))
            break
    return lines

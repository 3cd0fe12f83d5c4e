"""What the module needs in Slicer's Python (torch, safetensors) and what to do when it is missing.

Nothing here imports torch in the calling process to find out about it: importing torch takes
seconds (the application would freeze) and asking it about GPUs creates a CUDA context. The
installed version comes from package metadata; what torch really offers (build, GPUs) or why it
cannot load (a broken install: ``OSError: [WinError 126] ... c10.dll``) is found by `TorchProbe` in
a child process. `loadTorch` is the one guarded import for code that needs torch itself.

The widget shows `installationPlan` to the user, and only after they agree `install` runs: torch
through the PyTorch extension's PyTorchUtils (which picks a build for the GPU driver), the rest with
pip, one installation at a time. torch is never installed with plain pip: a plain ``pip install
torch`` gets a build that may not match the GPU driver, and the PyTorch extension is a dependency
of this extension anyway. A torch already loaded in this process is never uninstalled under it:
`requestTorchReinstall` leaves a note that the next start acts on before anything imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from SCNLandmarksLib.errors import SCNLandmarksError

logger = logging.getLogger(__name__)

# The oldest torch the library runs on (pyproject.toml's lower bound; a test keeps them equal). There
# is no upper bound: Slicer's Python is shared with other extensions, and replacing a newer torch
# they rely on would break them; a torch above the tested range gets a warning instead.
TORCH_REQUIREMENT = ">=2.2"
# The torch releases this version was tested with (pyproject.toml's upper bound).
TORCH_TESTED = "<2.14"
# PyTorchUtils always installs torchvision with torch; without a bound pip may pick a torchvision
# built for another torch and replace the torch just chosen. 0.17 is the release of torch 2.2.
TORCHVISION_REQUIREMENT = ">=0.17"
# Installed with pip after the user agrees (torch comes from the PyTorch extension).
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4"}
# Approximate downloads, for the consent prompt (the exact size depends on platform and build).
DOWNLOAD_SIZES = {
    "torch (CPU build)": "about 200 MB",
    "torch (CUDA build)": "about 2.5 GB with its NVIDIA libraries",
    "torchvision": "about 10 MB (PyTorchUtils installs it with torch)",
    "light-the-torch": "under 1 MB (PyTorchUtils uses it to choose the build)",
    "safetensors": "about 0.5 MB",
}
UNKNOWN_VERSION = "unknown"
PACKAGES_SHOWN = ("torch", "torchvision", "numpy", "SimpleITK", "safetensors", "light-the-torch")


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
        torchUnsupported: a torch is installed, but older than `TORCH_REQUIREMENT`.
        restartNeeded: the torch imported in this session differs from the installed one (it was
            replaced after being imported): only a restart of Slicer uses the new one.
        torchLoadError: torch is installed but importing it failed (e.g. a missing DLL): why.
        warning: for the user, without stopping anything (a torch newer than the tested range).
    """

    torchAvailable: bool
    pytorchUtilsAvailable: bool
    missingPipPackages: list[str] = field(default_factory=list)
    message: str = ""
    torchVersion: str = ""
    torchUnsupported: bool = False
    restartNeeded: bool = False
    torchLoadError: str = ""
    warning: str = ""

    @property
    def ready(self) -> bool:
        return self.torchAvailable and not self.missingPipPackages and not self.restartNeeded


def dependencyStatus(
    torchVersion: str | None = None,
    importedTorchVersion: str | None = None,
    pytorchUtils: bool | None = None,
    missing: list[str] | None = None,
    torchLoadError: str | None = None,
) -> DependencyStatus:
    """Check (without importing torch) what landmark detection still needs.

    The arguments are what this computer has; each defaults to what is found here (they are
    parameters so that every situation can be checked): the installed torch version ("": no
    torch), the version of the torch already imported in this session ("": not imported), whether
    PyTorchUtils is there, the missing pip requirements, and why torch failed to load when it was
    tried in this session ("": it did not fail; see `loadTorch` and `TorchProbe`).
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
    if torchLoadError is None:
        torchLoadError = _torchLoadError if torchVersion else ""
    unsupported = torchVersion not in ("", UNKNOWN_VERSION) and not satisfies(torchVersion, TORCH_REQUIREMENT)
    untested = (
        torchVersion not in ("", UNKNOWN_VERSION) and not unsupported and not satisfies(torchVersion, TORCH_TESTED)
    )
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
    elif torchLoadError:
        parts.append(
            torchLoadProblem(torchLoadError)
            + (
                " Reinstall it: Advanced > 'Reinstall PyTorch...'."
                if pytorchUtils
                else " Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, and reinstall it."
            )
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
    warning = (
        f"PyTorch {torchVersion} is newer than the releases this module was tested with (torch{TORCH_TESTED}); "
        "it is used as it is (other extensions may need it)."
        if untested
        else ""
    )
    return DependencyStatus(
        bool(torchVersion) and not unsupported and not torchLoadError,
        pytorchUtils,
        list(missing),
        " ".join(parts),
        torchVersion,
        unsupported,
        restart,
        torchLoadError,
        warning,
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
        plan.append(
            PlannedPackage(
                "torchvision", f"torchvision{TORCHVISION_REQUIREMENT}", "PyTorchUtils", DOWNLOAD_SIZES["torchvision"]
            )
        )
        if installedVersion("light-the-torch") is None:
            plan.append(
                PlannedPackage("light-the-torch", "light-the-torch", "PyTorchUtils", DOWNLOAD_SIZES["light-the-torch"])
            )
    for requirement in status.missingPipPackages:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
        plan.append(PlannedPackage(name, requirement, "pip", DOWNLOAD_SIZES.get(name, "size unknown")))
    return plan


def consentMessage(plan: list[PlannedPackage], replacesTorch: bool = False, torchLoaded: bool = False) -> str:
    """The one question asked before anything is installed: every package, how and how big.

    `torchLoaded`: the torch to replace is loaded in this session, so it is replaced at the next
    start (see `requestTorchReinstall`).
    """
    lines = ["SCN Landmarks needs these Python packages in Slicer's Python:", ""]
    for package in plan:
        via = "the PyTorch extension" if package.installer == "PyTorchUtils" else "pip"
        lines.append(f"  - {package.requirement}: {package.size}, installed by {via}")
    lines += [
        "",
        "They are downloaded from the Python package index; this can take several minutes, and the "
        "progress is shown in the module's installation log.",
    ]
    if replacesTorch and torchLoaded:
        lines.append(
            "PyTorch is in use in this session: it is replaced when Slicer starts next, before anything "
            "loads it. You are asked to restart Slicer."
        )
    elif replacesTorch:
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
    """What the device list is made of (see `installedFacts` and `TorchProbe`).

    Attributes:
        torchVersion: installed torch version, "" when none.
        cudaBuild: the CUDA version torch was built for ("" for a CPU-only build, or not known yet).
        gpuNames: names of the CUDA devices torch can use; None while not known (torch was not
            asked yet: the probe runs in the background).
        nvidiaGpu: an NVIDIA GPU and driver are present on this computer.
        loadError: torch is installed but cannot be loaded: why ("" when it loads or was not tried).
    """

    torchVersion: str
    cudaBuild: str
    gpuNames: tuple[str, ...] | None
    nvidiaGpu: bool
    loadError: str = ""


# ------------------------------------------------------------------------------------------------
# loading torch


class TorchUnavailable(SCNLandmarksError):
    """torch cannot be imported: it is not installed, or it is installed but fails to load."""


# Why importing torch failed in this session ("" when it did not); read by `dependencyStatus`.
_torchLoadError = ""


def torchLoadProblem(error) -> str:
    """The message for a torch that is installed but cannot be loaded."""
    return f"PyTorch is installed but cannot be loaded: {error}"


def recordTorchLoadError(error: str) -> None:
    """Remember why torch failed to load (found by `TorchProbe` or `loadTorch`; "" forgets it)."""
    global _torchLoadError
    _torchLoadError = error


def loadTorch():
    """Import torch and return it: the one guarded import for code that needs torch itself.

    Raises:
        TorchUnavailable: torch is not installed, or is installed but fails to load (a missing DLL
            raises OSError, a damaged install anything); the failure is remembered for
            `dependencyStatus`, so that the panel offers to reinstall it.
    """
    try:
        import torch
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "torch":
            raise TorchUnavailable(missingModuleMessage(error)) from error
        recordTorchLoadError(str(error) or type(error).__name__)
        raise TorchUnavailable(torchLoadProblem(_torchLoadError)) from error
    recordTorchLoadError("")
    return torch


def torchLoaded() -> bool:
    """True when any part of torch is loaded in this process (its libraries then stay in use)."""
    return any(name == "torch" or name.startswith("torch.") for name in sys.modules)


def installedFacts() -> DeviceFacts:
    """What is known without asking torch: its installed version, the NVIDIA GPU, a load failure
    seen in this session. The GPUs are unknown until `TorchProbe` has asked."""
    status = dependencyStatus()
    return DeviceFacts(status.torchVersion, "", None, nvidiaGpuPresent(), status.torchLoadError)


# The probe's child: imports torch and prints what it offers, or why it cannot load, as one JSON line.
_PROBE_CODE = """
import json
try:
    import torch
except Exception as error:  # a missing DLL is an OSError; a damaged install may raise anything
    print(json.dumps({"error": str(error) or type(error).__name__}))
else:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    print(json.dumps({"version": str(torch.__version__), "cuda": torch.version.cuda or "", "gpus": gpus}))
"""
PROBE_TIMEOUT_S = 120.0


class TorchProbe:
    """Asks torch, in a child process, what it offers (build, GPUs) or why it cannot be loaded.

    In the application's own process the import would freeze the GUI for seconds and the GPU
    query would create a CUDA context before the user detects anything; a child process costs
    neither, and a torch that crashes or hangs on import cannot take the application with it. The
    caller polls it from a timer::

        probe = TorchProbe(python)
        probe.start()
        ... facts = probe.poll()  # None while it runs

    Args:
        python: the Python to run (in Slicer: PythonSlicer, whose environment is Slicer's).
    """

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self._process: subprocess.Popen | None = None
        self._facts: DeviceFacts | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._facts is None

    def start(self) -> None:
        """Start the child (returns at once); when torch is not installed the facts are known at once."""
        installed = installedFacts()
        if not installed.torchVersion:
            self._facts = installed
            return
        self._facts = None
        self._started = installed
        try:
            self._process = subprocess.Popen(
                [self.python, "-c", _PROBE_CODE],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        except OSError as error:
            logger.warning("Cannot ask PyTorch about this computer's devices: %s", error)
            self._facts = installed

    def poll(self, wait: float = 0.0) -> DeviceFacts | None:
        """None while the child runs, then the facts (a load failure is also recorded for
        `dependencyStatus`)."""
        if self._facts is not None or self._process is None:
            return self._facts
        try:
            stdout, stderr = self._process.communicate(timeout=wait if wait > 0 else 0.001)
        except subprocess.TimeoutExpired:
            return None
        installed = self._started
        answer = None
        for line in reversed(stdout.splitlines()):
            try:
                answer = json.loads(line)
                break
            except ValueError:
                continue
        if not isinstance(answer, dict):
            # It died without answering (a crash in a native library): that is a load failure too.
            lines = [line for line in stderr.splitlines() if line.strip()]
            answer = {"error": lines[-1] if lines else f"the import ended with exit status {self._process.returncode}"}
        if "error" in answer:
            recordTorchLoadError(str(answer["error"]))
            self._facts = DeviceFacts(installed.torchVersion, "", (), installed.nvidiaGpu, str(answer["error"]))
        else:
            recordTorchLoadError("")
            self._facts = DeviceFacts(
                str(answer.get("version", installed.torchVersion)),
                str(answer.get("cuda", "")),
                tuple(str(name) for name in answer.get("gpus", ())),
                installed.nvidiaGpu,
            )
        return self._facts

    def wait(self, timeout: float = PROBE_TIMEOUT_S) -> DeviceFacts:
        """Block until the facts are known (scripts and tests)."""
        facts = self.poll(timeout)
        if facts is None:
            self._process.kill()
            self._process.communicate()
            facts = self._facts = self._started
        return facts


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
    """Auto / GPU / CPU, each saying what this computer really offers (and why a GPU is not used).

    `facts` default to `installedFacts` (nothing imported): the GPUs are then "being checked".
    """
    facts = facts if facts is not None else installedFacts()
    cpu = DeviceChoice("cpu", "CPU", True)
    if facts.loadError:
        why = torchLoadProblem(facts.loadError) + " Reinstall it: Advanced > 'Reinstall PyTorch...'."
        return [
            DeviceChoice("auto", "Auto (PyTorch cannot be loaded)", True, why),
            DeviceChoice("cuda", "GPU (PyTorch cannot be loaded)", False, why),
            DeviceChoice("cpu", "CPU", True, why),
        ]
    if facts.torchVersion and facts.gpuNames is None:
        return [
            DeviceChoice("auto", "Auto (GPU if usable)", True),
            DeviceChoice("cuda", "GPU (being checked)", False),
            cpu,
        ]
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
    facts = facts if facts is not None else installedFacts()
    lines = [("Python", f"{sys.version.split()[0]} ({sys.executable})")]
    for name in PACKAGES_SHOWN:
        lines.append((name, installedVersion(name) or "not installed"))
    lines.append(("torch requirement", f"torch{TORCH_REQUIREMENT} (tested: torch{TORCH_TESTED})"))
    if facts.loadError:
        lines.append(("torch", torchLoadProblem(facts.loadError)))
    elif facts.gpuNames is None:
        lines.append(("CUDA devices", "being checked"))
    else:
        if facts.torchVersion:
            lines.append(("torch build", f"CUDA {facts.cudaBuild}" if facts.cudaBuild else "CPU only"))
        lines.append(("CUDA devices", ", ".join(facts.gpuNames) if facts.gpuNames else "none usable"))
    lines.append(("NVIDIA GPU on this computer", "yes" if facts.nvidiaGpu else "not found"))
    for choice in deviceChoices(facts):
        if choice.tooltip:
            lines.append(("note", choice.tooltip))
            break
    return lines


# ------------------------------------------------------------------------------------------------
# installing


class InstallationRunning(SCNLandmarksError):
    """An installation was started while another one runs (pip inside pip would break both)."""


_installLock = threading.Lock()


def installationRunning() -> bool:
    """True while `install` (or anything inside `installing`) runs."""
    return _installLock.locked()


@contextmanager
def installing() -> Iterator[None]:
    """One installation at a time. pip and PyTorchUtils process GUI events while they run, so a
    second click could otherwise start a second pip inside the first.

    Raises:
        InstallationRunning: another installation runs.
    """
    if not _installLock.acquire(blocking=False):
        raise InstallationRunning("Python packages are being installed: wait for that installation to finish.")
    try:
        yield
    finally:
        _installLock.release()


class LogLines(logging.Handler):
    """Collects log lines from any thread; the GUI thread takes them (`take`) and shows them,
    because a Qt widget must only be touched from its own thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.put(self.format(record))

    @contextmanager
    def printed(self) -> Iterator[None]:
        """Within the block, what is printed is collected too, and still printed: pip's output reaches
        Slicer's console through ``print`` (Slicer's ``logProcessOutput``), not through logging."""
        tee = _PrintedLines(sys.stdout, self._lines.put)
        try:
            with redirect_stdout(tee):
                yield
        finally:
            tee.flushLine()

    def take(self) -> list[str]:
        """The lines logged since the last call, oldest first."""
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines


class _PrintedLines:
    """A standard output that passes text on to `stream` and each complete line to `line`."""

    def __init__(self, stream, line: Callable[[str], None]):
        self._stream = stream
        self._line = line
        self._partial = ""

    def write(self, text: str) -> int:
        *complete, self._partial = (self._partial + text).split("\n")
        for each in complete:
            self._line(each)
        return self._stream.write(text)

    def flushLine(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def __getattr__(self, name):  # flush, encoding, isatty...: the stream's
        return getattr(self._stream, name)


def install(
    plan: list[PlannedPackage],
    torchUtils=None,
    pipInstall: Callable[[list[str]], object] | None = None,
    replaceTorch: bool = False,
) -> bool:
    """Install `plan` (after the user agreed): torch and torchvision through PyTorchUtils, the rest
    with pip; one installation at a time (`installing`).

    Args:
        plan: from `installationPlan`.
        torchUtils: a ``PyTorchUtils.PyTorchUtilsLogic`` (needed when the plan holds torch).
        pipInstall: installs a list of requirements (in Slicer: the util module's ``pip_install``).
        replaceTorch: uninstall the installed torch first; never while torch is loaded in this
            process (use `requestTorchReinstall` then).

    Returns:
        False when PyTorchUtils installed nothing.

    Raises:
        InstallationRunning: another installation runs.
        RuntimeError: replacing a torch that is loaded in this process.
        Whatever pip and PyTorchUtils raise.
    """
    with installing():
        if any(package.name == "torch" for package in plan):
            if replaceTorch:
                if torchLoaded():
                    raise RuntimeError("PyTorch is loaded in this session: it can only be replaced at the next start")
                torchUtils.uninstallTorch()
            installed = torchUtils.installTorch(
                askConfirmation=False,
                torchVersionRequirement=TORCH_REQUIREMENT,
                torchvisionVersionRequirement=TORCHVISION_REQUIREMENT,
            )
            if installed is None:
                return False
            recordTorchLoadError("")
        requirements = [package.requirement for package in plan if package.installer == "pip"]
        if requirements:
            pipInstall(requirements)
    return True


# The note, in Slicer's user settings folder, that PyTorch is to be replaced at the next start.
REINSTALL_NOTE = "SCNLandmarks-reinstall-torch.json"


def requestTorchReinstall(settingsFolder, plan: list[PlannedPackage]) -> Path:
    """Leave a note that the next start of Slicer replaces PyTorch (the user agreed to `plan`).

    A torch loaded in this process cannot be uninstalled under it (Windows keeps its DLLs locked,
    and elsewhere the session would run on deleted files); the next start does it before anything
    imports torch (`pendingTorchReinstall`).
    """
    path = Path(settingsFolder) / REINSTALL_NOTE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"plan": [dataclasses.asdict(package) for package in plan]}), encoding="utf-8")
    return path


def pendingTorchReinstall(settingsFolder) -> list[PlannedPackage] | None:
    """The plan of a reinstall asked for before the last restart, or None (an unreadable note is
    dropped: nothing is installed without a readable agreement)."""
    path = Path(settingsFolder) / REINSTALL_NOTE
    if not path.is_file():
        return None
    try:
        return [PlannedPackage(**item) for item in json.loads(path.read_text(encoding="utf-8"))["plan"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring the PyTorch reinstall note %s: %s", path, error)
        clearTorchReinstall(settingsFolder)
        return None


def clearTorchReinstall(settingsFolder) -> None:
    (Path(settingsFolder) / REINSTALL_NOTE).unlink(missing_ok=True)

"""Training from a folder of corrected cases in a separate process, into the user's models (Qt-free,
so that the Slicer widget and the web app share it).

`inspectTrainingFolder` says what a training folder holds (cases, landmark names) or why it cannot be
used; `checkBase` what a base model does with it. `TrainingJob` runs ``scn-landmarks finetune`` (from
a base model) or ``scn-landmarks train --dataset`` (a new landmark set) as a child process of
`python -m SCNLandmarksLib.cli` (PythonSlicer in Slicer), so the caller stays responsive, and reads
its JSON progress lines. The caller polls it (a timer)::

    job = TrainingJob(inspectTrainingFolder("corrections/"), base="model.safetensors", name="My model",
                      minutes=TIME_BUDGETS["quick"])
    job.start()
    while (outcome := job.poll()) is None:
        show(job.progress)           # iteration, loss, ETA, held-aside error
    outcome.entry                     # the new model in the user catalogue (None: nothing added)

`cancel` asks the child to stop at its next iteration (through a stop file, which works on every
platform): a fine-tuning then still compares the best model so far with the base and keeps the better
one; a new landmark set keeps its best model so far. A fine-tuned model is added to the user's models
only when it was validated on held-aside cases and is better than its base. The child writes into a
hidden staging folder of the user models folder; only a finished model becomes a catalogue entry (one
rename), so a killed process or a full disk never leaves a damaged entry: the staging folder is then
removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from SCNLandmarksLib.errors import DataError, SCNLandmarksError

from . import catalogue, dependencies

# Time budgets offered for a training run, in minutes.
TIME_BUDGETS = {"quick": 5.0, "longer": 30.0}
STOP_FILE = "stop-requested"
LOG_FILE = "training.log"
# The command's exit status when it was interrupted or cancelled (as by Ctrl-C).
INTERRUPTED_STATUS = 130
LOG_LINES_SHOWN = 5


def caseCount(count: int) -> str:
    """ "1 case", "12 cases": how every message counts training cases."""
    return f"{count} case{'' if count == 1 else 's'}"


def heldAsideFigures(result: dict) -> str:
    """The candidates' cross-validated errors from a fine-tuning's result line, as one sentence."""
    unit = result.get("unit", "")

    def listed(errors: dict) -> str:
        return ", ".join(f"{name} {error:.2f}" for name, error in errors.items())

    parts = []
    if result.get("leave_one_out_errors"):
        parts.append(
            f"leave-one-out over {result.get('corrected_cases')} cases: {listed(result['leave_one_out_errors'])}"
        )
    if result.get("held_aside_errors"):
        parts.append(f"on the {result.get('held_aside')} held-aside cases: {listed(result['held_aside_errors'])}")
    return f"Mean error ({unit}) {'; '.join(parts)}" if parts else "No errors measured"


class TrainingFailed(SCNLandmarksError):
    """The training process failed, was killed, or its result could not be added to the user's models."""


@dataclass(frozen=True)
class TrainingData:
    """A training folder as training will read it.

    Attributes:
        folder: the folder (or the spec file given).
        spec: its dataset spec file.
        dimension: 2 or 3.
        landmarkNames: the cases' landmarks, in the spec's order.
        cases: the case ids.
        unit: the images' position unit ("mm", or "px" for pictures without spacing).
    """

    folder: Path
    spec: Path
    dimension: int
    landmarkNames: tuple[str, ...]
    cases: tuple[str, ...]
    unit: str

    @property
    def summary(self) -> str:
        """One line for the panel: how many cases and which landmarks."""
        names = ", ".join(self.landmarkNames)
        return f"{caseCount(len(self.cases))} ({self.dimension}D), {len(self.landmarkNames)} landmarks: {names}"


def inspectTrainingFolder(folder) -> TrainingData:
    """What a training folder (written by "Save as training pair", or any dataset spec) holds.

    Raises:
        DataError: naming the folder or case: no dataset spec, no cases, a missing file, or a case
            whose landmark file has other landmark names than the folder's.
        dependencies.TorchUnavailable: torch (which the dataset reader's module needs) is missing
            or cannot be loaded.
    """
    dependencies.loadTorch()
    from SCNLandmarksLib.autoconfig import resolve_dataset
    from SCNLandmarksLib.data.spec import load_dataset_spec
    from SCNLandmarksLib.io.landmarks import read_landmarks

    folder = Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        raise DataError(f"{folder}: the training folder is empty; save training pairs into it first")
    spec = load_dataset_spec(resolve_dataset(folder))
    names = spec.landmark_names
    for entry in spec.entries:
        if entry.landmarks is None:
            continue  # a row of the spec's table: named by the table's columns
        labels = read_landmarks(entry.landmarks).names
        foreign = [label for label in labels if label not in names]
        if foreign:
            raise DataError(
                f"{entry.landmarks} (case '{entry.id}'): the landmarks {foreign} are not among the "
                f"folder's ({', '.join(names)}); a case of another landmark set was saved here. Move "
                "it to a folder of its own."
            )
    return TrainingData(
        folder,
        spec.path,
        spec.dimension,
        tuple(names),
        tuple(e.id for e in spec.entries),
        spec.entries[0].unit,
    )


def checkBase(basePath, data: TrainingData) -> str:
    """What training from `basePath` on `data` will do, in one line for the panel.

    Raises:
        ModelFileError: `basePath` is not a model file (naming it).
        DataError: the base works on other images (dimension, unit) than the cases.
        dependencies.TorchUnavailable: torch (which the model file reader needs) is missing or
            cannot be loaded.
    """
    dependencies.loadTorch()
    from SCNLandmarksLib.bundle import read_description

    base = read_description(basePath)
    if base.dimension != data.dimension:
        raise DataError(
            f"{basePath}: the base model is {base.dimension}D, the cases in {data.folder} are {data.dimension}D"
        )
    if base.unit != data.unit and not (base.in_pixels and data.unit == "px"):
        raise DataError(f"{basePath}: the base model works in {base.unit}, the cases in {data.folder} in {data.unit}")
    name = catalogue.modelName(basePath)
    if set(base.landmark_names) == set(data.landmarkNames):
        return f"Fine-tunes {name} on its own {len(base.landmark_names)} landmarks."
    common = len(set(base.landmark_names) & set(data.landmarkNames))
    return (
        f"The cases have other landmarks than {name} ({common} of {len(data.landmarkNames)} in "
        "common): new landmark heads are trained, starting from the base's local-appearance weights."
    )


@dataclass(frozen=True)
class TrainingProgress:
    """The latest figures of a running training.

    Attributes:
        stage: "coarse" or "refinement".
        iteration, iterations: done and planned in this stage.
        loss: training loss.
        etaSeconds: estimated time left in this stage.
        heldAsideError: mean error on the held-aside (validation) cases at the last measurement, in
            `unit`; None before the first or without held-aside cases.
        unit: "mm" or "px".
    """

    stage: str
    iteration: int
    iterations: int
    loss: float
    etaSeconds: float
    heldAsideError: float | None
    unit: str

    @property
    def fraction(self) -> float:
        return self.iteration / max(self.iterations, 1)

    @property
    def text(self) -> str:
        """One line for the panel."""
        minutes, seconds = divmod(int(self.etaSeconds), 60)
        line = (
            f"{self.stage} stage: iteration {self.iteration} of {self.iterations}, loss {self.loss:.4f}, "
            f"about {minutes}:{seconds:02d} left"
        )
        if self.heldAsideError is not None:
            line += f"; held-aside error {self.heldAsideError:.2f} {self.unit}"
        return line


@dataclass(frozen=True)
class TrainingOutcome:
    """How a training ended.

    Attributes:
        entry: the new model in the user's models, or None when nothing was added (the base stayed
            better on the held-aside cases, or too few cases to hold some aside).
        message: what happened, for the user.
        cancelled: the user cancelled; the best model up to then was kept (see `entry`).
        result: the command's result line (outcome, held-aside errors of base and new model).
    """

    entry: catalogue.ModelEntry | None
    message: str
    cancelled: bool
    result: dict


def libraryPath() -> Path:
    """The folder holding SCNLandmarksLib, which the child process must import."""
    import SCNLandmarksLib

    return Path(SCNLandmarksLib.__file__).resolve().parents[1]


class TrainingJob:
    """One training run in a child process, its output registered in the user's models.

    Args:
        data: the training folder (`inspectTrainingFolder`).
        base: model file to fine-tune; None trains a new landmark set from scratch.
        name: the new model's name in the model list.
        minutes: wall-clock budget (training then ends with the best model so far).
        device: "auto", "cpu" or "cuda".
        python: the Python to run the library with (in Slicer: PythonSlicer); default this one.
        userFolder: the user models folder; default `catalogue.userModelsFolder()`.
        iterations: fine-tuning iterations per stage (default: derived from the base).
    """

    def __init__(
        self,
        data: TrainingData,
        base=None,
        name: str = "",
        minutes: float = TIME_BUDGETS["quick"],
        device: str = "auto",
        python: str | None = None,
        userFolder=None,
        iterations: int | None = None,
    ):
        self.data = data
        self.base = Path(base) if base else None
        self.name = name or (
            f"{self.base.parent.name or self.base.stem} + {data.folder.name}" if self.base else data.folder.name
        )
        self.minutes = minutes
        self.device = device
        self.python = python or sys.executable
        self.userFolder = userFolder
        self.iterations = iterations
        self.staging: Path | None = None
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._progress: TrainingProgress | None = None
        self._result: dict | None = None
        self._cancelled = False
        self._outcome: TrainingOutcome | None = None
        self._done = False

    # ------------------------------------------------------------------------------------------

    @property
    def baseName(self) -> str:
        """The base model as messages name it (its catalogue entry's name, else its file's)."""
        return catalogue.modelName(self.base, self.userFolder) if self.base else ""

    @property
    def running(self) -> bool:
        """True from `start` until `poll` has returned the outcome or raised the failure."""
        return self._process is not None and not self._done

    @property
    def progress(self) -> TrainingProgress | None:
        """The latest progress (None before the first iteration)."""
        with self._lock:
            return self._progress

    @property
    def cancelRequested(self) -> bool:
        return self._cancelled

    def command(self) -> list[str]:
        """The child's command line (the staging folder must exist)."""
        common = [
            "--out",
            str(self.staging),
            "--minutes",
            f"{self.minutes:g}",
            "--device",
            self.device,
            "--progress-json",
            "--stop-file",
            str(self.staging / STOP_FILE),
        ]
        if self.base is None:
            return [self.python, "-m", "SCNLandmarksLib.cli", "train", "--dataset", str(self.data.spec), *common]
        iterations = ["--iterations", str(self.iterations)] if self.iterations else []
        return [
            self.python,
            "-m",
            "SCNLandmarksLib.cli",
            "finetune",
            str(self.base),
            str(self.data.spec),
            *common,
            *iterations,
        ]

    def start(self) -> None:
        """Start the child process (returns at once).

        Raises:
            TrainingFailed: already started, or the process cannot be started (e.g. no such
                Python); the staging folder is then removed.
            DataError: the user models folder cannot be written.
        """
        if self._process is not None:
            raise TrainingFailed("This training was started already; start a new one.")
        try:
            self.staging = catalogue.stagingFolder(self.userFolder)
        except OSError as error:
            raise DataError(f"cannot write in the user models folder ({error})") from None
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(libraryPath())] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
        )
        environment["PYTHONUNBUFFERED"] = "1"
        # No console window on Windows; the stop file, not a console signal, cancels.
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            with open(self.staging / LOG_FILE, "wb") as log:
                self._process = subprocess.Popen(
                    self.command(),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    env=environment,
                    creationflags=flags,
                )
        except OSError as error:
            self._discardStaging()
            raise TrainingFailed(
                f"Cannot start the training process {self.python} ({error}); nothing was added."
            ) from None
        self._reader = threading.Thread(target=self._read, name="SCNLandmarks training output", daemon=True)
        self._reader.start()

    def cancel(self) -> None:
        """Ask the child to stop at its next iteration; it then keeps the best model so far."""
        if self.running and not self._cancelled:
            self._cancelled = True
            (self.staging / STOP_FILE).touch()

    def poll(self, wait: float = 0.0) -> TrainingOutcome | None:
        """None while the child runs (or before `start`); then its outcome, the new model registered.

        Raises:
            TrainingFailed: the command failed or was killed (its message says why), or the model
                could not be registered; the staging folder is removed and the catalogue unchanged.
        """
        if self._process is None or self._done:
            return self._outcome
        try:
            self._process.wait(timeout=wait if wait > 0 else 0.001)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join()
        self._done = True
        try:
            self._outcome = self._finish(self._process.returncode)
        except BaseException:
            self._discardStaging()
            raise
        return self._outcome

    def wait(self, interval: float = 0.2) -> TrainingOutcome:
        """Poll until the training ends (scripts and tests); its outcome, or its TrainingFailed raised."""
        while self.running:
            self.poll(interval)
        return self._outcome

    def kill(self) -> None:
        """End the child at once (no model is kept); for closing the application while it runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    # ------------------------------------------------------------------------------------------

    def _read(self) -> None:
        """The child's stdout: JSON progress lines, then the result line."""
        for raw in self._process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            if not isinstance(event, dict):
                continue
            if event.get("event") == "progress":
                validation = event.get("validation") or {}
                previous = self._progress
                held = validation.get("mean_error", previous.heldAsideError if previous else None)
                with self._lock:
                    self._progress = TrainingProgress(
                        str(event.get("stage", "")),
                        int(event.get("iteration", 0)),
                        int(event.get("iterations", 0)),
                        float(event.get("loss", float("nan"))),
                        float(event.get("eta_s", 0.0)),
                        None if held is None else float(held),
                        self.data.unit,
                    )
            elif event.get("event") == "result":
                self._result = event
        self._process.stdout.close()

    def _logTail(self) -> str:
        try:
            lines = (self.staging / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in lines[-LOG_LINES_SHOWN:] if line.strip())

    def _failure(self, status: int) -> TrainingFailed:
        tail = self._logTail()
        errors = [line[len("error: ") :] for line in tail.splitlines() if line.startswith("error: ")]
        if errors:
            return TrainingFailed(errors[-1])
        if "No space left on device" in tail or "There is not enough space on the disk" in tail:
            return TrainingFailed(
                f"The disk holding {self.staging.parent} is full: training stopped and nothing was "
                "added to your models. Free some space and start again."
            )
        if status < 0:
            return TrainingFailed(
                f"The training process was killed (signal {-status}): nothing was added to your models."
            )
        return TrainingFailed(
            f"Training failed (exit status {status}); nothing was added to your models."
            + (f" Last lines of its log:\n{tail}" if tail else "")
        )

    def _finish(self, status: int) -> TrainingOutcome:
        model = self.staging / catalogue.USER_MODEL_FILE
        cancelledWithModel = self._cancelled and status == INTERRUPTED_STATUS and model.is_file()
        if status != 0 and not cancelledWithModel:
            if self._cancelled and status == INTERRUPTED_STATUS:
                self._discardStaging()
                return TrainingOutcome(
                    None, "Training cancelled before a first model was kept: nothing was added.", True, {}
                )
            raise self._failure(status)
        result = self._result or {}
        # A cancel that came after the last iteration changed nothing.
        cancelled = self._cancelled and (status != 0 or bool(result.get("cancelled")))
        unpublished = self._unpublished(result)
        if unpublished:
            self._discardStaging()
            return TrainingOutcome(None, unpublished, cancelled, result)
        (self.staging / STOP_FILE).unlink(missing_ok=True)
        try:
            description = self._description(result, cancelled, model)
            entry = catalogue.publishStagedModel(self.staging, self.name, description)
        except OSError as error:
            raise TrainingFailed(
                f"Cannot add the new model to {self.staging.parent} ({error}); nothing was added."
            ) from None
        return TrainingOutcome(entry, f"'{entry.name}' was added to your models: {description}", cancelled, result)

    def _unpublished(self, result: dict) -> str:
        """Why a fine-tuning's model joins no model list ("" when it does): only a model validated on
        held-aside cases and better than its base is published (or one for landmarks the base lacks)."""
        if self.base is None:
            return ""
        from SCNLandmarksLib.finetune import KEPT_BASE, NOT_VALIDATED

        outcome = result.get("outcome")
        if outcome == KEPT_BASE:
            return (
                f"No candidate is better than {self.baseName}: nothing was added; keep using the base model. "
                f"{heldAsideFigures(result)}."
            )
        if outcome == NOT_VALIDATED:
            return (
                f"Not validated: {caseCount(len(self.data.cases))} are too few to hold some aside and compare the "
                f"new model with {self.baseName} (5 or more are needed), so nothing was added; keep using the "
                "base model, and save more training pairs."
            )
        return ""

    def _description(self, result: dict, cancelled: bool, model: Path) -> str:
        from SCNLandmarksLib.bundle import read_description

        unit = self.data.unit
        stopped = " Stopped early (cancelled): the best model up to then." if cancelled else ""
        if self.base is None:
            # From the model file: a cancelled run prints no result line.
            error = read_description(model).validation.get("mean_error")
            measured = (
                f"{error:.2f} {unit} mean error on the held-aside cases"
                if error is not None
                else "not validated (no held-aside cases)"
            )
            return (
                f"New landmark set trained on {caseCount(len(self.data.cases))} of {self.data.folder}; "
                f"{measured}.{stopped}"
            )
        from SCNLandmarksLib.finetune import NEW_LANDMARKS

        outcome = result.get("outcome", "")
        if outcome == NEW_LANDMARKS:
            measured = "new landmarks, not comparable with the base"
        else:
            measured = f"{outcome} chosen. {heldAsideFigures(result)}"
        return (
            f"Fine-tuned from {self.baseName} on {caseCount(len(self.data.cases))} of {self.data.folder}; "
            f"{measured}.{stopped}"
        )

    def _discardStaging(self) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

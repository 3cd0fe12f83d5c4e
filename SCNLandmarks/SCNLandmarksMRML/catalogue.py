"""The model catalogue (`Resources/Models/models.json`): the models that ship with the extension,
and the user's own models (trained with the module or the web app) kept in a per-user folder.

Nothing is ever downloaded: a model is either a file shipped beside the catalogue or a local file
the user picks ("Load model file..."). The catalogue is a JSON list of models (or
``{"models": [...]}``); each entry names its model file relative to the catalogue::

    {"models": [{"name": "Brain AFIDs (32 landmarks)", "id": "brain-afids-32",
                 "file": "brain-afids-32/model.safetensors", "card": "brain-afids-32/MODEL_CARD.md",
                 "dimension": 3, "description": "...", "sample": "../Samples/brain.nii.gz"}]}

Optional keys: ``card`` (model card), ``sample`` (an image to try the model on: README demo,
module self-test and Slicer's Sample Data module), ``sample_license`` (the sample's license file),
``sample_landmarks`` (its true landmarks), ``tolerance_mm`` (the largest median error the self-test
accepts on the sample) and ``short_names`` (landmark name -> established abbreviation, shown on the
views on request; a model whose names are already short has none). An entry whose model file is absent (e.g. a
build that left it out) is listed by `catalogueModels` but not by `availableModels`.

The catalogue is looked for in the module's Resources (installed extension), then in the source tree.

The user's own models (`userModels`, `registerUserModel`, `publishStagedModel`, `removeUserModel`)
live outside it, in `userModelsFolder()`; `allModels` and `availableModels` list both, shipped first.
Shipped models are never replaced or removed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from SCNLandmarksLib.errors import DataError

logger = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]
CATALOGUE_LOCATIONS = (
    MODULE_DIR / "Resources" / "Models" / "models.json",  # installed extension
    MODULE_DIR.parent / "Resources" / "Models" / "models.json",  # source tree
)


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue model.

    Attributes:
        name: shown in the model selector.
        path: the model file (shipped beside the catalogue; may be absent from a given build).
        dimension: 2 or 3 when the catalogue says, else None.
        description: free text.
        sample: an image to try the model on (demo, self-test), or None.
        sampleLandmarks: its true landmarks (.mrk.json, .fcsv, .csv), or None.
        toleranceMm: the largest median error the self-test accepts on the sample, or None.
        card: the model card (Markdown: data, training, accuracy, limits), or None.
        id: short identifier (the catalogue's "id", else the model folder's name).
        sampleLicense: the sample's license file, or None.
        shortNames: landmark name -> abbreviation (e.g. "Sella" -> "S"), or None.
        userModel: a model of the user's own catalogue (trained or added here; it can be removed),
            not a shipped one.
    """

    name: str
    path: Path
    dimension: int | None = None
    description: str = ""
    sample: Path | None = None
    sampleLandmarks: Path | None = None
    toleranceMm: float | None = None
    card: Path | None = None
    id: str = ""
    sampleLicense: Path | None = None
    shortNames: dict[str, str] | None = None
    userModel: bool = False

    @property
    def available(self) -> bool:
        """True when the model file is there."""
        return self.path.is_file()

    @property
    def hasSample(self) -> bool:
        """True when the catalogue names a sample image and it is there."""
        return self.sample is not None and self.sample.is_file()

    @property
    def unavailableReason(self) -> str:
        """Why the model cannot be used ("" when it can), for tooltips and error messages."""
        if self.available:
            return ""
        return (
            f"The model file {self.path} is not in this installation (models are never downloaded). "
            "Use 'Load model file...' to pick a model file on this computer."
        )


def _entryFromItem(item, folder: Path, source: Path, userModel: bool = False) -> ModelEntry | None:
    """One catalogue entry from its JSON object (paths relative to `folder`); None, with a warning
    naming `source`, when it lacks a name or model file."""
    if not isinstance(item, dict):
        return None
    fileName = item.get("file") or item.get("path")
    name = str(item.get("name") or item.get("title") or fileName or "")
    if not name or not fileName or not isinstance(fileName, str):
        logger.warning("%s: skipping a catalogue entry without name/file: %s", source, item)
        return None

    def local(value) -> Path | None:
        if not value or not isinstance(value, str):
            return None
        return (Path(value) if Path(value).is_absolute() else folder / value).resolve()

    dimension = item.get("dimension")
    shortNames = item.get("short_names")
    if not (
        isinstance(shortNames, dict)
        and all(isinstance(k, str) and isinstance(v, str) and v for k, v in shortNames.items())
    ):
        if shortNames is not None:
            logger.warning("%s: ignoring the short_names of '%s' (not a map of names to abbreviations)", source, name)
        shortNames = None
    tolerance = item.get("tolerance_mm")
    modelPath = local(fileName)
    return ModelEntry(
        name=name,
        path=modelPath,
        dimension=int(dimension) if dimension in (2, 3) else None,
        description=str(item.get("description", "")),
        sample=local(item.get("sample")),
        sampleLandmarks=local(item.get("sample_landmarks")),
        toleranceMm=float(tolerance) if isinstance(tolerance, (int, float)) else None,
        card=local(item.get("card")),
        id=str(item.get("id") or modelPath.parent.name),
        sampleLicense=local(item.get("sample_license")),
        shortNames=shortNames,
        userModel=userModel,
    )


def _readJson(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: cannot read the %s (%s)", path, what, error)
        return None


def readCatalogue(path) -> list[ModelEntry]:
    """The entries of one catalogue file; unreadable entries are skipped with a warning."""
    path = Path(path)
    data = _readJson(path, "model catalogue")
    items = data.get("models", []) if isinstance(data, dict) else data
    entries = (_entryFromItem(item, path.parent, path) for item in (items if isinstance(items, list) else []))
    return [entry for entry in entries if entry is not None]


def catalogueModels(locations=CATALOGUE_LOCATIONS) -> list[ModelEntry]:
    """Every entry of the first catalogue file found (installed first, then source tree), present or not.

    These are the shipped models only; `allModels` adds the user's own.
    """
    for location in locations:
        if Path(location).is_file():
            return readCatalogue(Path(location))
    return []


def allModels(locations=CATALOGUE_LOCATIONS, userFolder=None) -> list[ModelEntry]:
    """The shipped catalogue's entries, then the user's own models (`userModels`)."""
    return catalogueModels(locations) + userModels(userFolder)


def availableModels(locations=CATALOGUE_LOCATIONS, userFolder=None) -> list[ModelEntry]:
    """The shipped and user models whose model file is there (the ones that can be offered)."""
    return [entry for entry in allModels(locations, userFolder) if entry.available]


def sampleModel(locations=CATALOGUE_LOCATIONS) -> ModelEntry | None:
    """The first catalogue entry with a sample image (the README demo's and self-test's model), or None.

    The entry is returned even when its model file is absent, so callers can say what is missing.
    """
    return next((entry for entry in catalogueModels(locations) if entry.sample is not None), None)


def entryForModel(modelPath, locations=CATALOGUE_LOCATIONS, userFolder=None) -> ModelEntry | None:
    """The shipped or user catalogue entry of a model file, or None for a file the user loaded."""
    if not modelPath:
        return None
    try:
        wanted = Path(modelPath).resolve()
    except OSError:
        return None
    return next((entry for entry in allModels(locations, userFolder) if entry.path.resolve() == wanted), None)


def modelName(modelPath, userFolder=None) -> str:
    """How messages name a model: its catalogue entry's name (every catalogue model's file is
    model.safetensors), else its file name."""
    entry = entryForModel(modelPath, userFolder=userFolder)
    return entry.name if entry is not None else Path(modelPath).name


# ------------------------------------------------------------------------------------------------
# the user's own models
#
# Models trained (or added) by the user live in a folder of their own, outside the extension's
# install folder, one sub-folder per model: model.safetensors, MODEL_CARD.md and entry.json (a
# catalogue entry, paths relative to the sub-folder). A model is first assembled in a hidden
# staging folder (".incoming-...", ignored by the listing), and becomes an entry by one rename of
# that folder: a training that is killed or fails, or a full disk, never leaves a half-written
# entry. Removing renames the sub-folder to a hidden name before deleting it, for the same reason.
# Hidden folders that a closed Slicer or a killed process left behind are removed a day later.

USER_MODELS_ENVIRONMENT = "SCN_LANDMARKS_USER_MODELS"
USER_ENTRY_FILE = "entry.json"
USER_MODEL_FILE = "model.safetensors"
USER_CARD_FILE = "MODEL_CARD.md"
STAGING_PREFIX = ".incoming-"
REMOVING_PREFIX = ".removing-"
# A staging or removal folder untouched this long belongs to no running process (a training writes
# its log every few seconds): it is what a closed Slicer or a killed process left, and is removed.
ABANDONED_AFTER_S = 24 * 3600


def userModelsFolder() -> Path:
    """Where the user's own models are kept: $SCN_LANDMARKS_USER_MODELS when set, else the platform's
    per-user data folder (Windows %LOCALAPPDATA%\\SCNLandmarks\\Models, macOS ~/Library/Application
    Support/SCNLandmarks/Models, elsewhere $XDG_DATA_HOME or ~/.local/share, then SCNLandmarks/models).

    Raises:
        DataError: the folder is inside the module's own (install) folder.
    """
    override = os.environ.get(USER_MODELS_ENVIRONMENT)
    if override:
        folder = Path(override).expanduser()
    elif sys.platform == "win32":
        folder = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "SCNLandmarks" / "Models"
    elif sys.platform == "darwin":
        folder = Path.home() / "Library" / "Application Support" / "SCNLandmarks" / "Models"
    else:
        folder = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "SCNLandmarks" / "models"
    folder = folder.resolve()
    if folder.is_relative_to(MODULE_DIR):
        raise DataError(
            f"{folder}: the user models folder cannot be inside the module's own folder {MODULE_DIR} "
            f"(an update would lose them); set {USER_MODELS_ENVIRONMENT} to another folder"
        )
    return folder


def userModels(folder=None) -> list[ModelEntry]:
    """The user's own models, oldest first; entries whose model file is gone are skipped with a warning."""
    try:
        root = Path(folder) if folder is not None else userModelsFolder()
    except DataError as error:
        logger.warning("%s", error)
        return []
    found = []
    for entryFile in sorted(root.glob(f"[!.]*/{USER_ENTRY_FILE}")):
        item = _readJson(entryFile, "user model entry")
        entry = _entryFromItem(item, entryFile.parent, entryFile, userModel=True)
        if entry is None:
            continue
        if not entry.available:
            logger.warning("%s: the model file %s is missing; not listed", entryFile, entry.path)
            continue
        found.append((str(item.get("created", "")), entry))
    return [entry for _, entry in sorted(found, key=lambda pair: pair[0])]


def stagingFolder(folder=None) -> Path:
    """A new hidden folder in the user models folder, where a model is made (e.g. a training run's
    output) before `publishStagedModel` turns it into an entry; nothing lists it until then."""
    root = Path(folder) if folder is not None else userModelsFolder()
    root.mkdir(parents=True, exist_ok=True)
    _removeAbandoned(root)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def _removeAbandoned(root: Path) -> None:
    """Remove the hidden staging and removal folders nothing has written to for ABANDONED_AFTER_S."""
    for hidden in root.glob(".*"):
        if not hidden.name.startswith((STAGING_PREFIX, REMOVING_PREFIX)) or not hidden.is_dir():
            continue
        try:
            newest = max(path.stat().st_mtime for path in [hidden, *hidden.rglob("*")])
        except OSError:  # changing under our feet: in use
            continue
        if time.time() - newest > ABANDONED_AFTER_S:
            shutil.rmtree(hidden, ignore_errors=True)


def registerUserModel(modelFile, name: str, description: str = "", card=None, folder=None) -> ModelEntry:
    """Add a copy of a model file (and of its card, if any) to the user's models.

    Raises:
        ModelFileError: `modelFile` is not a model file.
        DataError: the folder cannot be written (e.g. the disk is full); nothing was added.
    """
    from SCNLandmarksLib.bundle import read_description

    read_description(modelFile)  # refuse anything that is not a model before copying it
    staging = stagingFolder(folder)
    try:
        shutil.copyfile(modelFile, staging / USER_MODEL_FILE)
        if card is not None and Path(card).is_file():
            shutil.copyfile(card, staging / USER_CARD_FILE)
        return publishStagedModel(staging, name, description)
    except OSError as error:
        raise DataError(f"{staging.parent}: cannot add the model '{name}' ({error}); nothing was added") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publishStagedModel(staging, name: str, description: str = "") -> ModelEntry:
    """Make a staging folder holding model.safetensors (and optionally MODEL_CARD.md) an entry of the
    user's models, in one rename. A card is written from the model's metadata when there is none.

    Raises:
        ModelFileError: the folder's model.safetensors is not a model file.
        OSError: the folder cannot be written; the catalogue is unchanged.
    """
    from SCNLandmarksLib.bundle import read_description
    from SCNLandmarksLib.io.atomic import safe_filename, write_text_atomically

    staging = Path(staging)
    root = staging.parent
    model = read_description(staging / USER_MODEL_FILE)
    if not (staging / USER_CARD_FILE).is_file():
        write_text_atomically(staging / USER_CARD_FILE, _generatedCard(name, model))
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    item = {
        "name": name,
        "file": USER_MODEL_FILE,
        "card": USER_CARD_FILE,
        "dimension": model.dimension,
        "description": description or f"{len(model.landmark_names)} landmarks, added {created[:10]}",
        "landmarks": list(model.landmark_names),
        "created": created,
    }
    taken = {entry.id for entry in catalogueModels()}
    stem = safe_filename(name, "model").lower()[:60]
    for number in range(1, 1000):
        modelId = stem if number == 1 else f"{stem}-{number}"
        if modelId in taken or (root / modelId).exists():
            continue
        write_text_atomically(staging / USER_ENTRY_FILE, json.dumps({**item, "id": modelId}, indent=1))
        try:
            os.rename(staging, root / modelId)
        except OSError:
            if (root / modelId).exists():  # taken meanwhile by another process: try the next id
                continue
            raise
        return _entryFromItem({**item, "id": modelId}, root / modelId, root / modelId / USER_ENTRY_FILE, userModel=True)
    raise DataError(f"{root}: no free folder name for the model '{name}'")


def removeUserModel(entry: ModelEntry, folder=None) -> None:
    """Remove one of the user's own models (shipped models are never removed).

    Raises:
        DataError: `entry` is not a model of the user's models folder, or it cannot be removed.
    """
    root = (Path(folder) if folder is not None else userModelsFolder()).resolve()
    modelFolder = entry.path.parent.resolve()
    if not entry.userModel or modelFolder.parent != root:
        raise DataError(
            f"'{entry.name}' ({entry.path}) is not one of your models in {root}: only those can be "
            "removed (shipped models never are)"
        )
    removing = root / f"{REMOVING_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(modelFolder, removing)
    except OSError as error:
        raise DataError(f"{modelFolder}: cannot remove the model '{entry.name}' ({error})") from None
    shutil.rmtree(removing, ignore_errors=True)


def _generatedCard(name: str, model) -> str:
    """A model card from a model file's own metadata (for models trained without one)."""
    provenance, validation = model.provenance, model.validation or {}
    lines = [
        f"# {name}",
        "",
        f"- {model.dimension}D, {len(model.landmark_names)} landmarks: {', '.join(model.landmark_names)}",
        (
            f"- Trained on: `{provenance.get('dataset', 'unknown')}`, {provenance.get('iterations', '?')} "
            f"iterations, {provenance.get('date', 'date unknown')}"
        ),
        f"- Refinement stage: {'yes' if model.refinement is not None else 'no'}",
    ]
    if "mean_error" in validation:
        lines.append(f"- Validation: {validation['mean_error']:.2f} {model.unit} mean error")
    else:
        lines.append("- **Not validated** (no validation cases): check it on new cases before relying on it.")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SampleDataSource:
    """A catalogue sample as Slicer's Sample Data module registers it (a local file: nothing is fetched).

    Attributes:
        sampleName: the button's name in the Sample Data module.
        uri: ``file://`` URI of the bundled image.
        fileName: the file name Slicer loads it under.
        nodeName: the volume node's name.
        licenseFile: the sample's license (shown in the log when it is loaded), or None.
        modelName: the catalogue model it is the sample of.
        checksum: ``SHA256:<hex digest>`` of the image: Sample Data copies the file into its cache
            once and, without a checksum, never again, even after an update of the extension.
    """

    sampleName: str
    uri: str
    fileName: str
    nodeName: str
    licenseFile: Path | None
    modelName: str
    checksum: str


def sampleDataSources(locations=CATALOGUE_LOCATIONS) -> list[SampleDataSource]:
    """The bundled samples of the catalogue whose image is there, for the Sample Data module."""
    sources = []
    for entry in catalogueModels(locations):
        if not entry.hasSample:
            continue
        stem = entry.sample.name.split(".")[0]
        sources.append(
            SampleDataSource(
                f"SCNLandmarks {stem}",
                entry.sample.as_uri(),
                entry.sample.name,
                stem,
                entry.sampleLicense if entry.sampleLicense and entry.sampleLicense.is_file() else None,
                entry.name,
                "SHA256:" + hashlib.sha256(entry.sample.read_bytes()).hexdigest(),
            )
        )
    return sources

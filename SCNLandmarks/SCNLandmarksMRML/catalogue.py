"""The model catalogue (`Resources/Models/models.json`): the models that ship with the extension.

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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]
CATALOGUE_LOCATIONS = (
    MODULE_DIR / "Resources" / "Models" / "models.json",       # installed extension
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
        return (f"The model file {self.path} is not in this installation (models are never downloaded). "
                "Use 'Load model file...' to pick a model file on this computer.")


def readCatalogue(path) -> list[ModelEntry]:
    """The entries of one catalogue file; unreadable entries are skipped with a warning."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: cannot read the model catalogue (%s)", path, error)
        return []
    items = data.get("models", []) if isinstance(data, dict) else data
    entries = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        fileName = item.get("file") or item.get("path")
        name = str(item.get("name") or item.get("title") or fileName or "")
        if not name or not fileName or not isinstance(fileName, str):
            logger.warning("%s: skipping a catalogue entry without name/file: %s", path, item)
            continue

        def local(value) -> Path | None:
            if not value or not isinstance(value, str):
                return None
            return (Path(value) if Path(value).is_absolute() else path.parent / value).resolve()

        dimension = item.get("dimension")
        shortNames = item.get("short_names")
        if not (isinstance(shortNames, dict) and all(isinstance(k, str) and isinstance(v, str) and v
                                                      for k, v in shortNames.items())):
            if shortNames is not None:
                logger.warning("%s: ignoring the short_names of '%s' (not a map of names to abbreviations)",
                               path, name)
            shortNames = None
        tolerance = item.get("tolerance_mm")
        modelPath = local(fileName)
        entries.append(ModelEntry(
            name=name, path=modelPath,
            dimension=int(dimension) if dimension in (2, 3) else None,
            description=str(item.get("description", "")),
            sample=local(item.get("sample")), sampleLandmarks=local(item.get("sample_landmarks")),
            toleranceMm=float(tolerance) if isinstance(tolerance, (int, float)) else None,
            card=local(item.get("card")),
            id=str(item.get("id") or modelPath.parent.name),
            sampleLicense=local(item.get("sample_license")), shortNames=shortNames))
    return entries


def catalogueModels(locations=CATALOGUE_LOCATIONS) -> list[ModelEntry]:
    """Every entry of the first catalogue file found (installed first, then source tree), present or not."""
    for location in locations:
        if Path(location).is_file():
            return readCatalogue(Path(location))
    return []


def availableModels(locations=CATALOGUE_LOCATIONS) -> list[ModelEntry]:
    """The catalogue models whose model file is there (the ones that can be offered)."""
    return [entry for entry in catalogueModels(locations) if entry.available]


def sampleModel(locations=CATALOGUE_LOCATIONS) -> ModelEntry | None:
    """The first catalogue entry with a sample image (the README demo's and self-test's model), or None.

    The entry is returned even when its model file is absent, so callers can say what is missing.
    """
    return next((entry for entry in catalogueModels(locations) if entry.sample is not None), None)


def entryForModel(modelPath, locations=CATALOGUE_LOCATIONS) -> ModelEntry | None:
    """The catalogue entry of a model file, or None for a file the user loaded."""
    if not modelPath:
        return None
    try:
        wanted = Path(modelPath).resolve()
    except OSError:
        return None
    return next((entry for entry in catalogueModels(locations) if entry.path.resolve() == wanted), None)


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
    """

    sampleName: str
    uri: str
    fileName: str
    nodeName: str
    licenseFile: Path | None
    modelName: str


def sampleDataSources(locations=CATALOGUE_LOCATIONS) -> list[SampleDataSource]:
    """The bundled samples of the catalogue whose image is there, for the Sample Data module."""
    sources = []
    for entry in catalogueModels(locations):
        if not entry.hasSample:
            continue
        stem = entry.sample.name.split(".")[0]
        sources.append(SampleDataSource(f"SCNLandmarks {stem}", entry.sample.as_uri(), entry.sample.name, stem,
                                        entry.sampleLicense if entry.sampleLicense and entry.sampleLicense.is_file()
                                        else None, entry.name))
    return sources

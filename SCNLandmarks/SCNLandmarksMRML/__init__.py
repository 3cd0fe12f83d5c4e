"""MRML side of the SCNLandmarks Slicer module: landmark detection on volume nodes, markups for
review and correction, heatmap overlays, exports and offscreen pictures.

Imports `slicer` (MRML), `vtk`, numpy, SimpleITK and `SCNLandmarksLib`, never Qt, so it runs both in
the Slicer application and on slicer-core without a GUI (where the tests run it). It lives in a
subpackage because Slicer loads every ``.py`` file of a module folder as a module.

The names below are imported on first use (PEP 562), so that ``SCNLandmarksMRML.compatibility``
can be imported, and say what is wrong, in a Slicer whose Python is too old for the rest.
"""

import importlib

_EXPORTS = {
    "catalogue": (
        "ModelEntry",
        "allModels",
        "availableModels",
        "catalogueModels",
        "entryForModel",
        "sampleModel",
        "userModels",
    ),
    "dependencies": ("DependencyStatus", "DeviceChoice", "dependencyStatus", "deviceChoices"),
    "headless": ("HeadlessScene", "createHeadlessScene", "loadMarkupsFile", "loadVolumeFile"),
    "logic": ("DetectionResult", "SCNLandmarksLogic"),
    "markups": ("LandmarkRow",),
    "rendering": ("RenderedSlice", "renderOverlayPng"),
    "runner": ("DetectionRunner",),
    "training": ("TrainingJob", "inspectTrainingFolder"),
    "volumes": ("VolumeImage", "checkScalarVolume", "imageFromVolumeNode"),
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_OWNER)


def __getattr__(name):
    if name in _OWNER:
        return getattr(importlib.import_module("." + _OWNER[name], __name__), name)
    try:
        return importlib.import_module("." + name, __name__)  # a submodule, e.g. SCNLandmarksMRML.markups
    except ModuleNotFoundError as error:
        if error.name != __name__ + "." + name:
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_OWNER))

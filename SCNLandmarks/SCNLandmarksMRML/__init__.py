"""MRML side of the SCNLandmarks Slicer module: landmark detection on volume nodes, markups for
review and correction, heatmap overlays, exports and offscreen pictures.

Imports `slicer` (MRML), `vtk`, numpy, SimpleITK and `SCNLandmarksLib`, never Qt, so it runs both in
the Slicer application and on slicer-core without a GUI (where the tests run it). It lives in a
subpackage because Slicer loads every ``.py`` file of a module folder as a module.
"""

from .catalogue import ModelEntry, availableModels, catalogueModels, entryForModel, sampleModel
from .dependencies import DependencyStatus, DeviceChoice, dependencyStatus, deviceChoices
from .headless import HeadlessScene, createHeadlessScene, loadMarkupsFile, loadVolumeFile
from .logic import DetectionResult, SCNLandmarksLogic
from .markups import LandmarkRow
from .rendering import RenderedSlice, renderOverlayPng
from .volumes import VolumeImage, checkScalarVolume, imageFromVolumeNode

__all__ = [
    "DependencyStatus", "DetectionResult", "DeviceChoice", "HeadlessScene", "LandmarkRow", "ModelEntry",
    "RenderedSlice", "SCNLandmarksLogic", "VolumeImage",
    "availableModels", "catalogueModels", "checkScalarVolume", "createHeadlessScene", "dependencyStatus",
    "deviceChoices", "entryForModel", "imageFromVolumeNode", "loadMarkupsFile", "loadVolumeFile",
    "renderOverlayPng", "sampleModel",
]

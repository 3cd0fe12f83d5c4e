"""A working MRML scene without the Slicer application (slicer-core), and file loading through
Slicer's own storage nodes.

In the application, modules register their logics with `slicer.mrmlScene` at startup; here the few
that the landmark workflow needs are attached by hand: application logic (selection and interaction
nodes), color logic (default color tables), markups logic (markups node and storage classes),
sequences logic, and one slice logic per slice view (slice and slice composite nodes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import slicer

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.io.paths import image_stem

from .volumes import volumeNodeFromImage

logger = logging.getLogger(__name__)

# Raster formats the ITK build of slicer-core cannot read (Slicer itself reads them through ITK).
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class HeadlessScene:
    """A scene and the logics that keep it working; keep this object alive while using the scene."""

    scene: object
    logics: list = field(default_factory=list)
    sliceLogics: dict = field(default_factory=dict)

    @property
    def applicationLogic(self):
        """The vtkMRMLApplicationLogic (what `slicer.app.applicationLogic()` is in the application)."""
        return self.logics[0]


def createHeadlessScene(sliceViews: tuple[str, ...] = ("Red", "Yellow", "Green")) -> HeadlessScene:
    """A new MRML scene with the logics the landmark module uses, and slice views (no rendering).

    Args:
        sliceViews: layout names of the slice views to create (each gets a slice node and a slice
            composite node, as in the application).
    """
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    markupsLogic = slicer.vtkSlicerMarkupsLogic()
    markupsLogic.SetMRMLApplicationLogic(applicationLogic)
    markupsLogic.SetMRMLScene(scene)
    applicationLogic.SetModuleLogic("Markups", markupsLogic)  # used by the markups displayable managers
    sequencesLogic = slicer.vtkSlicerSequencesLogic()
    sequencesLogic.SetMRMLScene(scene)
    headless = HeadlessScene(scene, [applicationLogic, colorLogic, markupsLogic, sequencesLogic])
    orientations = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
    for name in sliceViews:
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.SetMRMLScene(scene)
        sliceNode = sliceLogic.AddSliceNode(name)
        sliceNode.SetOrientation(orientations.get(name, "Axial"))
        sliceNode.SetDimensions(256, 256, 1)
        headless.sliceLogics[name] = sliceLogic
    return headless


def _readWithStorageNode(scene, path: Path, nodeClass: str, name: str):
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetSingleFile(True)
    storageNode.SetCenterImage(False)
    volumeNode = scene.CreateNodeByClass(nodeClass)
    volumeNode.SetName(name)
    scene.AddNode(storageNode)
    scene.AddNode(volumeNode)
    volumeNode.SetAndObserveStorageNodeID(storageNode.GetID())
    if storageNode.ReadData(volumeNode) and volumeNode.GetImageData() is not None:
        volumeNode.CreateDefaultDisplayNodes()
        return volumeNode
    scene.RemoveNode(volumeNode)
    scene.RemoveNode(storageNode)
    return None


def _imageDimension(path: Path) -> int:
    """The image dimension in the file's header (0 when ITK cannot read the header)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0
    return reader.GetDimension()


def loadVolumeFile(scene, path, name: str | None = None):
    """Load an image file into a volume node, as Slicer's "Add data" does.

    NRRD, NIfTI, MetaImage... go through vtkMRMLVolumeArchetypeStorageNode (scalar, else vector
    volume). PNG/JPEG/BMP/TIFF: the application reads them the same way, but the ITK inside
    slicer-core has no readers for them, so there they are read with SimpleITK (the same ITK image
    IO) and turned into a volume node by Slicer's rule (IJKToRAS = diag(-1, -1, 1) x ITK geometry),
    with a storage node pointing at the file. The test suite checks that this rule gives the same
    node as the storage node does for the same pixels in NRRD.

    Returns:
        The volume node (scalar, or vector for color images).

    Raises:
        DataError: the file is missing or cannot be read; nothing is left in the scene.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = name or image_stem(path)
    if _imageDimension(path) == 4:
        # Checked before reading: some slicer-core versions read a 4D NRRD as one vector volume.
        raise DataError(f"{path}: a 4D image; Slicer loads it as a sequence (one volume per frame), not as one volume")
    volumeNode = _readWithStorageNode(scene, path, "vtkMRMLScalarVolumeNode", name)
    if volumeNode is None:
        volumeNode = _readWithStorageNode(scene, path, "vtkMRMLVectorVolumeNode", name)
    if volumeNode is not None:
        return volumeNode
    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise DataError(f"{path}: Slicer cannot read this file as a volume")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read image ({str(error).strip().splitlines()[-1]})") from None
    volumeNode = volumeNodeFromImage(scene, image, name)
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetSingleFile(True)
    scene.AddNode(storageNode)
    volumeNode.SetAndObserveStorageNodeID(storageNode.GetID())
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def loadMarkupsFile(scene, path, name: str | None = None):
    """Load a .mrk.json (or .fcsv) point list with Slicer's markups storage nodes.

    Raises:
        DataError: the file is missing or unreadable; nothing is left in the scene.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lower = path.name.lower()
    storageNode = (
        slicer.vtkMRMLMarkupsFiducialStorageNode()
        if lower.endswith(".fcsv")
        else slicer.vtkMRMLMarkupsJsonStorageNode()
    )
    storageNode.SetFileName(str(path))
    markupsNode = slicer.vtkMRMLMarkupsFiducialNode()
    markupsNode.SetName(name or image_stem(path))
    scene.AddNode(storageNode)
    scene.AddNode(markupsNode)
    markupsNode.SetAndObserveStorageNodeID(storageNode.GetID())
    if not storageNode.ReadData(markupsNode):
        scene.RemoveNode(markupsNode)
        scene.RemoveNode(storageNode)
        raise DataError(f"{path}: Slicer cannot read this markups file")
    markupsNode.CreateDefaultDisplayNodes()
    return markupsNode

"""Annotating a new landmark set: each click places the next named landmark (no Qt).

An annotation is a point list holding one control point per landmark name, in order, none placed
yet. Slicer's place mode puts a click on the point list's "placement start" control point when that
point has no position, so keeping the start index on the next unplaced landmark (`updatePlacement`,
called whenever a point is placed) makes each click place the next named landmark, its label
already shown. A landmark that is not visible can be skipped: it is marked "missing" (Slicer's
position status, written to .mrk.json as ``"positionStatus": "missing"``), which training reads as a
missing landmark, never as a position. "Save as training pair" then saves the case like a corrected
detection (2D and 3D alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import slicer
import vtk

from SCNLandmarksLib.errors import DataError

from .markups import VOLUME_REFERENCE_ROLE

ANNOTATION_ATTRIBUTE = "SCNLandmarks.Annotation"
TEXT_SUFFIXES = (".txt", ".text", "")


def parseLandmarkNames(text: str) -> list[str]:
    """Landmark names typed by the user: one a line, or separated by commas.

    Raises:
        DataError: no names, or a name given twice.
    """
    names = [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]
    if not names:
        raise DataError("No landmark names: type them one a line (or separated by commas).")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"Landmark name(s) {twice} given more than once.")
    return names


def readLandmarkNames(path) -> list[str]:
    """The landmark names of a file: a landmark file's labels in its order (.mrk.json, .json, .fcsv,
    .csv), or a text file of names, one a line.

    Raises:
        DataError: naming the file, when it cannot be read or holds no names.
    """
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        from SCNLandmarksLib.data.dataset_init import read_names_file

        return read_names_file(path)
    from SCNLandmarksLib.io.landmarks import read_landmarks

    names = list(read_landmarks(path).names)
    if not names:
        raise DataError(f"{path}: no landmarks in this file")
    return names


def isAnnotationNode(node) -> bool:
    """True for point lists made by `createAnnotationNode`."""
    return node is not None and node.GetAttribute(ANNOTATION_ATTRIBUTE) is not None


def createAnnotationNode(scene, names: list[str], volumeNode=None, name: str | None = None):
    """A point list with one unplaced control point per landmark name, ready for place mode.

    Args:
        volumeNode: the image being annotated: the point list follows its transform and is named after it.
    """
    if not names:
        raise DataError("No landmark names to annotate.")
    if name is None:
        base = f"{volumeNode.GetName()} annotation" if volumeNode is not None else "annotation"
        name = scene.GenerateUniqueName(base)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    wasModifying = node.StartModify()
    try:
        for landmark in names:
            index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), landmark)
            node.UnsetNthControlPointPosition(index)
        # Clicks then place the named points only: one more click adds no unnamed extra point.
        node.SetFixedNumberOfControlPoints(True)
        node.SetAttribute(ANNOTATION_ATTRIBUTE, "1")
        if volumeNode is not None:
            node.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volumeNode.GetID())  # the image it is saved with
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        node.GetDisplayNode().SetPointLabelsVisibility(True)
    finally:
        node.EndModify(wasModifying)
    updatePlacement(node)
    return node


def _status(node, index: int) -> int:
    return node.GetNthControlPointPositionStatus(index)


def nextToPlace(node) -> int | None:
    """The first landmark with neither a position nor a skip, in order; None when all are done."""
    for index in range(node.GetNumberOfControlPoints()):
        if _status(node, index) in (
            slicer.vtkMRMLMarkupsNode.PositionUndefined,
            slicer.vtkMRMLMarkupsNode.PositionPreview,
        ):
            return index
    return None


def updatePlacement(node) -> int | None:
    """Point Slicer's place mode at the next landmark to place; returns it (None: all done, and a
    further click would add an unnamed point, so the caller leaves place mode)."""
    index = nextToPlace(node)
    node.SetControlPointPlacementStartIndex(node.GetNumberOfControlPoints() if index is None else index)
    return index


class PlaceMode:
    """Slicer's place mode for annotations: persistent while one lasts (a click per landmark), and the
    user's own place-mode persistence given back as soon as place mode ends (every landmark placed,
    Esc, another mouse mode): left on, it would make the user's next toolbar placement persistent.

    Args:
        markupsLogic: the Markups module logic (vtkSlicerMarkupsLogic).
        interactionNode: the application's vtkMRMLInteractionNode.
    """

    def __init__(self, markupsLogic, interactionNode):
        self.markupsLogic = markupsLogic
        self.interactionNode = interactionNode
        self._userPersistence: int | None = None
        self._tag: int | None = None

    def start(self, node) -> None:
        """Place `node`'s landmarks from now on, one click each."""
        if self._tag is None:  # a second start keeps the persistence the user had before the first
            self._userPersistence = self.interactionNode.GetPlaceModePersistence()
        self.markupsLogic.SetActiveList(node)
        self.markupsLogic.StartPlaceMode(True)
        if self._tag is None:
            self._tag = self.interactionNode.AddObserver(
                slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent, self._onModeChanged
            )

    def _onModeChanged(self, caller, event) -> None:
        if self.interactionNode.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.Place:
            return
        self.interactionNode.RemoveObserver(self._tag)
        self._tag = None
        self.interactionNode.SetPlaceModePersistence(self._userPersistence)


def placeNext(node, positionRas) -> int:
    """Place the next landmark at `positionRas` (the node's coordinates), as a click in place mode does.

    Raises:
        DataError: every landmark is placed or skipped already.
    """
    index = nextToPlace(node)
    if index is None:
        raise DataError(f"Every landmark of '{node.GetName()}' is placed or skipped.")
    node.SetNthControlPointPosition(index, *[float(v) for v in positionRas])
    updatePlacement(node)
    return index


def skipNext(node) -> int | None:
    """Mark the next landmark missing (not visible on this image); returns it (None: nothing left)."""
    index = nextToPlace(node)
    if index is not None:
        node.SetNthControlPointPositionMissing(index)
        updatePlacement(node)
    return index


def placeAgain(node, index: int) -> None:
    """Make a placed or skipped landmark the next one to place (its position is cleared)."""
    node.UnsetNthControlPointPosition(index)
    node.SetControlPointPlacementStartIndex(index)


@dataclass(frozen=True)
class AnnotationStatus:
    """How far an annotation is: counts, and the next landmark to place (None when done)."""

    placed: int
    skipped: int
    total: int
    nextName: str | None

    @property
    def text(self) -> str:
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        if self.nextName is None:
            return f"All {self.total} landmarks done ({self.placed} placed{skipped}): save the training pair."
        return f"Next: {self.nextName} ({self.placed + self.skipped + 1} of {self.total}{skipped})."


def annotationStatus(node) -> AnnotationStatus:
    count = node.GetNumberOfControlPoints()
    statuses = [_status(node, index) for index in range(count)]
    index = nextToPlace(node)
    return AnnotationStatus(
        statuses.count(slicer.vtkMRMLMarkupsNode.PositionDefined),
        statuses.count(slicer.vtkMRMLMarkupsNode.PositionMissing),
        count,
        None if index is None else node.GetNthControlPointLabel(index),
    )


def checkComplete(node) -> None:
    """Raises DataError naming the landmarks neither placed nor skipped (before saving a case)."""
    waiting = [
        node.GetNthControlPointLabel(i)
        for i in range(node.GetNumberOfControlPoints())
        if _status(node, i) in (slicer.vtkMRMLMarkupsNode.PositionUndefined, slicer.vtkMRMLMarkupsNode.PositionPreview)
    ]
    if waiting:
        raise DataError(
            f"'{node.GetName()}': {len(waiting)} landmark(s) not placed yet ({', '.join(waiting)}): "
            "place them, or skip those not visible on this image."
        )

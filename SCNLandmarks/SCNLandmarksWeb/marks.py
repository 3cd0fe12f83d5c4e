"""What the slice views show around the landmarks: names where they can be read, the selected point
marked, a halo round each point the user moved (blue) and each low-confidence one (orange).

Slicer labels every point of a point list in every slice view, projections off the slice included:
a brain's 32 names pile up in the side views, and a cephalogram's 19 long names overlap. So the
landmarks are drawn unlabelled (faded where off the slice), and each view names only the points
near its slice (within `NEAR_SLICES` slices), with the model's abbreviations where it has them, and
the selected point with its full name, in amber on an amber cross in every view, so that it is
found at once.

Each kind of mark is a point list of its own (a point list has one glyph, one label rule and two
colors, all taken by the landmarks), locked, so that it never takes the mouse: the landmark under
it is the one dragged. A view's names are a point list shown in that view only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import vtk

from SCNLandmarksLib.vocabulary import STATUS_COLORS, LandmarkStatus
from SCNLandmarksMRML import markups
from SCNLandmarksMRML.overlays import worldFromLocal
from SCNLandmarksMRML.volumes import ijkToRasArray, matrixToArray

# A point within this many slices of a view's slice is named there (the slice itself and its neighbours').
NEAR_SLICES = 1.0
SELECTED_COLOR = (1.0, 0.8, 0.0)  # amber: no status and no gray level is drawn in it


@dataclass(frozen=True)
class Look:
    """How a kind of mark is drawn: glyph (Vertex2D: none, the name alone), size relative to the
    landmarks' glyphs, opacity, names or not, and also where the point is off the slice or not."""

    color: tuple[float, ...]
    glyph: str = "Vertex2D"
    scale: float = 1.0
    opacity: float = 1.0
    named: bool = True
    projected: bool = True


# Halos are translucent disks: the point shows through. A cross on the selected one: a halo stays its
# own color inside it.
def _halo(status: LandmarkStatus) -> Look:
    return Look(tuple(c / 255.0 for c in STATUS_COLORS[status]), "Circle2D", 2.2, 0.45, False, False)


# A translucent disk round a point of a status to review (low confidence) or reviewed (moved).
LOOKS = {
    "moved": _halo(LandmarkStatus.MOVED),
    "low confidence": _halo(LandmarkStatus.LOW_CONFIDENCE),
    "selected": Look(SELECTED_COLOR, "Cross2D", 5.0, named=False),
    "selected name": Look(SELECTED_COLOR),
}  # other roles: a view's names
NAMES = Look(markups.NORMAL_COLOR)

Mark = tuple[str, tuple[float, ...]]  # (label, RAS position in the landmarks' frame)


def sliceSpacingAlong(volumeNode, normal: np.ndarray) -> float:
    """The distance between two slices of the volume's voxel grid across a plane of this unit normal (RAS):
    the spacing of the voxel axis the normal runs closest to, for an oblique grid too."""
    toIjk = np.linalg.inv(ijkToRasArray(volumeNode)[:3, :3])
    return 1.0 / float(np.abs(toIjk @ normal).max())


class ViewMarks:
    """The marks of one detection's points in the page's slice views (see the module's docstring).

    Args:
        scene: the MRML scene.
        sliceNodes: the slice views' nodes at the time of asking (a layout may add views).
        namesChanged: called with {view name: the landmark names it shows} whenever that changes.
    """

    def __init__(self, scene, sliceNodes: Callable[[], Sequence], namesChanged: Callable[[dict[str, list[str]]], None]):
        self.scene = scene
        self.sliceNodes = sliceNodes
        self.namesChanged = namesChanged
        self.landmarks = None
        self.rows: list[markups.LandmarkRow] = []
        self.selected: int | None = None
        self.shortNames: dict[str, str] = {}
        self.names: dict[str, list[str]] = {}
        self._lists: dict[str, object] = {}  # role -> its point list
        self._shown: dict[str, list[Mark]] = {}
        self._observed: set[str] = set()

    def setLandmarks(self, landmarks, shortNames: dict[str, str] | None = None) -> None:
        """Mark the points of this point list from now on (None: none); the previous marks go.

        Args:
            shortNames: landmark name -> the abbreviation the views name it with (the model's).
        """
        for node in self._lists.values():
            markups.removeNode(self.scene, node)
        self._lists.clear()
        self._shown.clear()
        self.landmarks, self.rows, self.selected = landmarks, [], None
        self.shortNames = dict(shortNames or {})
        self.update()

    def setRows(self, rows: list[markups.LandmarkRow]) -> None:
        """The landmarks' rows changed (a point moved, reset, undone)."""
        self.rows = rows
        self.update()

    def select(self, selected: int | None) -> None:
        """Mark and name this landmark (model order; None: none)."""
        self.selected = selected
        self.update()

    def update(self) -> None:
        """Bring every mark up to date with the rows, the selection and where the slices are."""
        if self.landmarks is None:
            self._publish({})
            return
        placed = [row for row in self.rows if row.positionRas is not None and row.index >= 0]
        chosen = self.rows[self.selected] if self.selected is not None and self.selected < len(self.rows) else None
        chosen = chosen if any(row is chosen for row in placed) else None
        chosenAt = [tuple(chosen.positionRas)] if chosen else []
        # (Names carry the module's mark of a low-confidence point: `markups.viewLabel`.)
        wanted: dict[str, list[Mark]] = {
            "moved": [("", tuple(row.positionRas)) for row in placed if row.status == LandmarkStatus.MOVED],
            "low confidence": [
                ("", tuple(row.positionRas)) for row in placed if row.status == LandmarkStatus.LOW_CONFIDENCE
            ],
            "selected": [("", position) for position in chosenAt],
            "selected name": [(markups.viewLabel(chosen.name, chosen.status), position) for position in chosenAt],
        }
        names = {}
        for sliceNode in self.sliceNodes():
            self._observe(sliceNode)
            near = [row for row in self._nearSlice(placed, sliceNode) if row is not chosen]
            view = sliceNode.GetSingletonTag()
            wanted[view] = [
                (markups.viewLabel(self.shortNames.get(row.name, row.name), row.status), tuple(row.positionRas))
                for row in near
            ]
            names[view] = [row.name for row in near] + ([chosen.name] if chosen else [])
        for role, marks in wanted.items():
            if self._shown.get(role, []) != marks:
                self._draw(role, marks)
        self._publish(names)

    def _publish(self, names: dict[str, list[str]]) -> None:
        if names != self.names:
            self.names = names
            self.namesChanged(names)

    def _observe(self, sliceNode) -> None:
        # A slice moved (scrolled, centred on a point): the names near it change.
        if sliceNode.GetID() not in self._observed:
            self._observed.add(sliceNode.GetID())
            sliceNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: self.update())

    def _nearSlice(self, rows: list[markups.LandmarkRow], sliceNode) -> list[markups.LandmarkRow]:
        """The rows whose points lie within `NEAR_SLICES` slices of the view's slice."""
        sliceToRas = matrixToArray(sliceNode.GetSliceToRAS())
        normal = sliceToRas[:3, 2] / np.linalg.norm(sliceToRas[:3, 2])
        volume = self.landmarks.GetNodeReference(markups.VOLUME_REFERENCE_ROLE)
        limit = NEAR_SLICES * (sliceSpacingAlong(volume, normal) if volume is not None else 1.0)
        return [
            row
            for row in rows
            if abs(float(normal @ (worldFromLocal(self.landmarks, row.positionRas) - sliceToRas[:3, 3]))) <= limit
        ]

    def _draw(self, role: str, marks: list[Mark]) -> None:
        node = self._lists.get(role) or self._newList(role)
        wasModifying = node.StartModify()
        try:
            node.RemoveAllControlPoints()
            for label, position in marks:
                node.AddControlPoint(vtk.vtkVector3d(*position), label)
        finally:
            node.EndModify(wasModifying)
        self._shown[role] = marks

    def _newList(self, role: str):
        look = LOOKS.get(role, NAMES)
        landmarks = self.landmarks.GetDisplayNode()
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", self.scene.GenerateUniqueName(role))
        self._lists[role] = node
        node.SetLocked(True)
        node.SetAndObserveTransformNodeID(self.landmarks.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetColor(*look.color)
        display.SetSelectedColor(*look.color)
        display.SetGlyphTypeFromString(look.glyph)
        display.SetGlyphScale(look.scale * landmarks.GetGlyphScale())
        display.SetGlyphSize(look.scale * landmarks.GetGlyphSize())
        display.SetUseGlyphScale(landmarks.GetUseGlyphScale())
        display.SetOpacity(look.opacity)
        display.SetPointLabelsVisibility(look.named)
        display.SetPropertiesLabelVisibility(False)
        display.SetSliceProjection(look.projected)
        display.SetSliceProjectionUseFiducialColor(True)
        display.SetSliceProjectionOpacity(1.0)
        if role not in LOOKS:
            display.SetViewNodeIDs([next(s.GetID() for s in self.sliceNodes() if s.GetSingletonTag() == role)])
        return node

"""Predicted landmarks as a markups point list: one movable control point per landmark.

Each control point is labelled with the landmark name. What the model said is kept in the node
itself, so it survives scene saving:

* node attribute ``SCNLandmarks.Prediction`` (JSON): per control point ID the landmark name, the
  predicted RAS position (null when missing), the confidence, the predicted status and, for a
  calibrated model, the expected error, whether it is above the landmark's usual error and the
  coverage radius (with the probability it is for); the model's unit;
* a static measurement ``confidence`` with one value per control point (written to .mrk.json as
  ``controlPointValues``, which the library reads back);
* the control point description: the current status and confidence, for people.

The current status is derived, never stored as truth: a point whose position differs from its
prediction (or that was placed where the model found none) is "moved by user". A low-confidence
point's label on the views ends in `LOW_CONFIDENCE_MARK` until it is moved. The points' "selected"
flags are the user's (the Markups module's checkboxes): this module never sets them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import slicer
import vtk

from SCNLandmarksLib.vocabulary import STATUS_COLORS, LandmarkStatus

logger = logging.getLogger(__name__)

PREDICTION_ATTRIBUTE = "SCNLandmarks.Prediction"
VOLUME_REFERENCE_ROLE = "SCNLandmarksInputVolume"
HEATMAP_REFERENCE_ROLE = "SCNLandmarksHeatmap"
CONFIDENCE_MEASUREMENT = "confidence"

# A control point further than this from its prediction (mm, in the node's frame) has been moved.
MOVED_TOLERANCE_MM = 1e-3

# The points' color, RGB in [0, 1]: a markups point has no color of its own (only its node's, one for
# selected points and one for the others), so low confidence shows in the label instead.
NORMAL_COLOR = tuple(c / 255.0 for c in STATUS_COLORS[LandmarkStatus.DETECTED])
LOW_CONFIDENCE_MARK = " (?)"


@dataclass(frozen=True)
class LandmarkRow:
    """One landmark as the results table shows it.

    Attributes:
        name: landmark name (the control point label at detection time).
        index: control point index in the markups node, or -1 if the user deleted the point.
        confidence: model confidence in [0, 1] (NaN if unknown).
        status: detected, low confidence, missing or moved by user.
        positionRas: current (N=3,) RAS position in the node's frame, or None without a position.
        predictedRas: predicted (3,) RAS position, or None when the model found none.
        expectedError: the calibrated model's expected error of the prediction (the model's unit),
            NaN when unknown (an uncalibrated model, a missing point).
        flagged: the model's flag: the expected error is above this landmark's usual error (see
            `reviewFirst`).
        coverageRadius: the distance from the prediction within which the true point lies with the
            probability `predictionCoverage` gives (model unit); NaN when unknown.
    """

    name: str
    index: int
    confidence: float
    status: LandmarkStatus
    positionRas: np.ndarray | None
    predictedRas: np.ndarray | None
    expectedError: float = math.nan
    flagged: bool = False
    coverageRadius: float = math.nan

    @property
    def reviewFirst(self) -> bool:
        """The one rule for the orange flag and the review order (`review`): the model flagged the point
        (above its landmark's usual error) and the user has not moved it since."""
        return self.flagged and self.status != LandmarkStatus.MOVED


def describe(status: LandmarkStatus, confidence: float) -> str:
    """The control point description: status and confidence."""
    if confidence is None or not math.isfinite(confidence):
        return str(status)
    return f"{status}; confidence {confidence:.2f}"


def _finite(value) -> float:
    value = float(value) if value is not None else math.nan
    return value if math.isfinite(value) else math.nan


def readPredictionInfo(markupsNode) -> dict | None:
    """The prediction record stored on a markups node by `createLandmarksNode`, or None."""
    text = markupsNode.GetAttribute(PREDICTION_ATTRIBUTE) if markupsNode is not None else None
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        logger.warning("%s: unreadable %s attribute", markupsNode.GetName(), PREDICTION_ATTRIBUTE)
        return None


def _writePredictionInfo(markupsNode, info: dict) -> None:
    markupsNode.SetAttribute(PREDICTION_ATTRIBUTE, json.dumps(info))


def predictionUnit(markupsNode) -> str:
    """The unit of the detection's model ("mm", "px"; "" when not recorded)."""
    info = readPredictionInfo(markupsNode)
    return str(info.get("unit", "")) if info else ""


def predictionCoverage(markupsNode) -> float | None:
    """The probability the detection's coverage radii are for (e.g. 0.9); None without radii."""
    info = readPredictionInfo(markupsNode)
    coverage = info.get("coverage") if info else None
    return None if coverage is None else float(coverage)


def isLandmarksNode(node) -> bool:
    """True for markups nodes made by this module (they carry a prediction record)."""
    return node is not None and node.IsA("vtkMRMLMarkupsFiducialNode") and readPredictionInfo(node) is not None


def createLandmarksNode(
    scene,
    name: str,
    landmarkNames: list[str],
    pointsRas: np.ndarray,
    confidences: np.ndarray,
    statuses: list[LandmarkStatus],
    volumeNode=None,
    modelPath: str = "",
    markupsNode=None,
    expectedErrors: np.ndarray | None = None,
    flagged: np.ndarray | None = None,
    unit: str = "",
    coverageRadii: np.ndarray | None = None,
    coverage: float | None = None,
):
    """Make (or refill) a markups point list holding predicted landmarks.

    Args:
        scene: the MRML scene.
        name: node name for a new node.
        landmarkNames: N landmark names (control point labels).
        pointsRas: (N, 3) RAS positions in the volume's frame; NaN rows = missing (the control point
            is kept, with an undefined position, so the user can place it).
        confidences: (N,) values in [0, 1].
        statuses: N predicted statuses (detected, low confidence or missing).
        volumeNode: the input volume; the node follows its parent transform and references it.
        modelPath: recorded in the prediction record.
        markupsNode: an existing node to refill instead of creating one.
        expectedErrors, flagged: (N,) from a calibrated model (None otherwise).
        coverageRadii, coverage: (N,) radii holding the true point with probability `coverage`, from
            a calibration that has them (None otherwise).
        unit: the model's unit ("mm" or "px"), shown with expected errors.

    Returns:
        The vtkMRMLMarkupsFiducialNode.
    """
    pointsRas = np.asarray(pointsRas, dtype=np.float64).reshape(-1, 3)
    created = markupsNode is None
    if created:
        markupsNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    try:
        _fillLandmarksNode(
            markupsNode,
            landmarkNames,
            pointsRas,
            confidences,
            statuses,
            volumeNode,
            modelPath,
            expectedErrors,
            flagged,
            unit,
            coverageRadii,
            coverage,
        )
    except Exception:
        if created:
            removeNode(scene, markupsNode)
        raise
    return markupsNode


def removeNode(scene, node) -> None:
    """Remove a displayable node with its display and storage nodes."""
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            scene.RemoveNode(display)
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


def _fillLandmarksNode(
    markupsNode,
    landmarkNames,
    pointsRas,
    confidences,
    statuses,
    volumeNode,
    modelPath,
    expectedErrors,
    flagged,
    unit,
    coverageRadii,
    coverage,
) -> None:
    if markupsNode.GetDisplayNode() is None:
        markupsNode.CreateDefaultDisplayNodes()
    wasModifying = markupsNode.StartModify()
    try:
        markupsNode.RemoveAllControlPoints()
        # Only our own measurement: Slicer documents RemoveAllMeasurements as not to be called (the
        # markups logic owns the others, e.g. a point list's length).
        for index in reversed(range(markupsNode.GetNumberOfMeasurements())):
            if markupsNode.GetNthMeasurement(index).GetName() == CONFIDENCE_MEASUREMENT:
                markupsNode.RemoveNthMeasurement(index)
        markupsNode.SetLocked(False)
        records = []
        count = len(landmarkNames)
        expectedErrors = np.full(count, np.nan) if expectedErrors is None else expectedErrors
        flagged = np.zeros(count, dtype=bool) if flagged is None else flagged
        coverageRadii = np.full(count, np.nan) if coverageRadii is None else coverageRadii
        for landmarkName, ras, confidence, status, expected, isFlagged, radius in zip(
            landmarkNames, pointsRas, confidences, statuses, expectedErrors, flagged, coverageRadii
        ):
            present = bool(np.all(np.isfinite(ras)))
            index = markupsNode.AddControlPoint(vtk.vtkVector3d(*(ras if present else (0.0, 0.0, 0.0))), landmarkName)
            if not present:
                markupsNode.UnsetNthControlPointPosition(index)
            markupsNode.SetNthControlPointLocked(index, False)
            records.append(
                {
                    "id": markupsNode.GetNthControlPointID(index),
                    "name": landmarkName,
                    "predictedRas": [float(v) for v in ras] if present else None,
                    "confidence": None if math.isnan(_finite(confidence)) else _finite(confidence),
                    "status": status,
                    "expectedError": None if math.isnan(_finite(expected)) else _finite(expected),
                    "flagged": bool(isFlagged),
                    "coverageRadius": None if math.isnan(_finite(radius)) else _finite(radius),
                }
            )
        values = vtk.vtkDoubleArray()
        values.SetName(CONFIDENCE_MEASUREMENT)
        for confidence in confidences:
            values.InsertNextValue(_finite(confidence))
        measurement = slicer.vtkMRMLStaticMeasurement()
        measurement.SetName(CONFIDENCE_MEASUREMENT)
        measurement.SetUnits("")
        measurement.SetPrintFormat("%4.2f")
        measurement.SetControlPointValues(values)
        markupsNode.AddMeasurement(measurement)
        info = {"model": str(modelPath), "unit": unit, "points": records}
        if coverage is not None:
            info["coverage"] = float(coverage)
        _writePredictionInfo(markupsNode, info)
        if volumeNode is not None:
            markupsNode.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volumeNode.GetID())
            markupsNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        # New points are selected (Slicer's default); the user's unselected ones keep Slicer's color.
        display = markupsNode.GetDisplayNode()
        display.SetSelectedColor(*NORMAL_COLOR)
        display.SetPointLabelsVisibility(True)
        updatePointStatuses(markupsNode)
    finally:
        markupsNode.EndModify(wasModifying)


def currentStatus(markupsNode, record: dict) -> tuple[LandmarkStatus, int, np.ndarray | None]:
    """(status, control point index or -1, current RAS position or None) of one recorded landmark."""
    index = markupsNode.GetNthControlPointIndexByID(record["id"])
    if index < 0:
        return LandmarkStatus.MISSING, -1, None
    defined = markupsNode.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined
    position = np.array(markupsNode.GetNthControlPointPositionVector(index)) if defined else None
    predicted = record["predictedRas"]
    if position is not None:
        if predicted is None or np.linalg.norm(position - np.asarray(predicted)) > MOVED_TOLERANCE_MM:
            return LandmarkStatus.MOVED, index, position
        return LandmarkStatus(record["status"]), index, position
    return LandmarkStatus.MISSING, index, None


def landmarkRows(markupsNode) -> list[LandmarkRow]:
    """The landmarks of a node made by `createLandmarksNode`, in model order, with current status."""
    info = readPredictionInfo(markupsNode)
    if info is None:
        return []
    rows = []
    for record in info["points"]:
        status, index, position = currentStatus(markupsNode, record)
        predicted = record["predictedRas"]
        rows.append(
            LandmarkRow(
                record["name"],
                index,
                _finite(record["confidence"]),
                status,
                position,
                None if predicted is None else np.asarray(predicted, dtype=np.float64),
                _finite(record.get("expectedError")),
                bool(record.get("flagged", False)),
                _finite(record.get("coverageRadius")),
            )
        )
    return rows


def viewLabel(label: str, status: LandmarkStatus) -> str:
    """`label` as the views show a point of this status: marked while of low confidence."""
    label = label.removesuffix(LOW_CONFIDENCE_MARK)
    return label + LOW_CONFIDENCE_MARK if status == LandmarkStatus.LOW_CONFIDENCE else label


def _setLabel(markupsNode, index: int, label: str) -> None:
    if markupsNode.GetNthControlPointLabel(index) != label:
        markupsNode.SetNthControlPointLabel(index, label)


def updatePointStatuses(markupsNode) -> list[LandmarkRow]:
    """Refresh the description and label mark of every control point from its current status."""
    rows = landmarkRows(markupsNode)
    wasModifying = markupsNode.StartModify()
    try:
        for row in rows:
            if row.index < 0:
                continue
            description = describe(row.status, row.confidence)
            if markupsNode.GetNthControlPointDescription(row.index) != description:
                markupsNode.SetNthControlPointDescription(row.index, description)
            _setLabel(markupsNode, row.index, viewLabel(markupsNode.GetNthControlPointLabel(row.index), row.status))
    finally:
        markupsNode.EndModify(wasModifying)
    return rows


def resetPoint(markupsNode, landmark: int | str) -> LandmarkRow:
    """Put one landmark back where the model predicted it (or unplace it if the model found none).

    Args:
        markupsNode: node made by `createLandmarksNode`.
        landmark: landmark index (model order) or name.

    Returns:
        The landmark's row after the reset.
    """
    info = readPredictionInfo(markupsNode)
    if info is None:
        raise ValueError(f"'{markupsNode.GetName()}' holds no predicted landmarks")
    records = info["points"]
    if isinstance(landmark, str):
        matches = [i for i, r in enumerate(records) if r["name"] == landmark]
        if not matches:
            raise ValueError(f"no landmark named '{landmark}' in '{markupsNode.GetName()}'")
        landmark = matches[0]
    record = records[landmark]
    index = markupsNode.GetNthControlPointIndexByID(record["id"])
    if index < 0:
        # The user deleted the control point: bring it back with the same ID.
        index = markupsNode.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), record["name"])
        record["id"] = markupsNode.GetNthControlPointID(index)
        _writePredictionInfo(markupsNode, info)
    if record["predictedRas"] is None:
        markupsNode.UnsetNthControlPointPosition(index)
    else:
        markupsNode.SetNthControlPointPosition(index, *record["predictedRas"])
    return updatePointStatuses(markupsNode)[landmark]


class StatusObserver:
    """Keeps control point descriptions and label marks current while the user edits points."""

    def __init__(self):
        self._tags: dict[str, tuple[object, list[int]]] = {}
        self._updating = False

    def observe(self, markupsNode) -> None:
        nodeId = markupsNode.GetID()
        if nodeId in self._tags:
            return
        events = (
            slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionMissingEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        tags = [markupsNode.AddObserver(event, self._onPointModified) for event in events]
        self._tags[nodeId] = (markupsNode, tags)

    def unobserve(self, markupsNode=None) -> None:
        ids = list(self._tags) if markupsNode is None else [markupsNode.GetID()]
        for nodeId in ids:
            node, tags = self._tags.pop(nodeId, (None, []))
            for tag in tags:
                node.RemoveObserver(tag)

    def _onPointModified(self, caller, event) -> None:
        if self._updating:
            return
        self._updating = True
        try:
            updatePointStatuses(caller)
        finally:
            self._updating = False


def setPointLabels(markupsNode, shortNames: dict[str, str] | None = None, marked: bool = True) -> None:
    """Label each landmark's control point with its short name from `shortNames` (landmark name ->
    short name; names without one keep their full name), or with its full name when None.

    The full names stay the landmarks' names (prediction record, table, exports). With `marked`, a
    low-confidence point keeps its mark (`viewLabel`); files get the names alone.
    """
    info = readPredictionInfo(markupsNode)
    if info is None:
        return
    wasModifying = markupsNode.StartModify()
    try:
        for record in info["points"]:
            status, index, _position = currentStatus(markupsNode, record)
            label = (shortNames or {}).get(record["name"], record["name"])
            if index >= 0:
                _setLabel(markupsNode, index, viewLabel(label, status) if marked else label)
    finally:
        markupsNode.EndModify(wasModifying)


@contextmanager
def fullNameLabels(markupsNode) -> Iterator[None]:
    """Within the block the control points carry the full landmark names (for writers that save
    labels); afterwards the labels shown before come back."""
    shown = [markupsNode.GetNthControlPointLabel(i) for i in range(markupsNode.GetNumberOfControlPoints())]
    setPointLabels(markupsNode, None, marked=False)
    try:
        yield
    finally:
        wasModifying = markupsNode.StartModify()
        try:
            for index, label in enumerate(shown[: markupsNode.GetNumberOfControlPoints()]):
                _setLabel(markupsNode, index, label)
        finally:
            markupsNode.EndModify(wasModifying)

"""The review of one detection, once for every front-end: the Slicer widget and the web app bind to a
`ReviewSession` (as the widget binds its table to `panel`), and hold none of its state themselves.

A session owns the detection under review (its point list and rows: expected error, the flag),
the review order, moving, resetting and undoing points, whether the corrections were exported,
exporting them, saving the case as a training pair, and the training job that learns from the
saved cases. It reads no Qt and runs on slicer-core, where it is tested.

One rule decides the orange flag and the review order: a point is flagged when its expected error
is above its landmark's usual error and the user has not moved it (`LandmarkRow.reviewFirst`); the
order walks the flagged points first, then the others, each largest expected error first (a model
without calibration: landmark order). Moved and missing points need no review.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import slicer

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.vocabulary import LandmarkStatus

from . import markups, training

logger = logging.getLogger(__name__)

NOT_TO_REVIEW = (LandmarkStatus.MISSING, LandmarkStatus.MOVED)


def review_order(
    expected_errors: Sequence[float] | np.ndarray | None,
    statuses: Sequence[str] | None = None,
    flagged: Sequence[bool] | np.ndarray | None = None,
) -> list[int]:
    """Indices of the points to review: flagged ones first, then the others, each largest expected
    error first (NaN: unknown, last; ties in landmark order).

    Args:
        expected_errors: (N,) expected error per point; None for a model without calibration: then
            landmark order.
        statuses: optional status per point; missing and moved points are left out.
        flagged: (N,) the model's flags (above the landmark's usual error); None: none flagged.
    """
    if expected_errors is None:
        return [i for i, s in enumerate(statuses or []) if s not in NOT_TO_REVIEW]
    errors = np.asarray(expected_errors, dtype=np.float64)
    flags = np.zeros(len(errors), dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
    keep = [i for i in range(len(errors)) if statuses is None or statuses[i] not in NOT_TO_REVIEW]
    return sorted(
        keep,
        key=lambda i: (not flags[i], not np.isfinite(errors[i]), -errors[i] if np.isfinite(errors[i]) else 0.0, i),
    )


def next_to_review(
    expected_errors: Sequence[float] | np.ndarray | None,
    statuses: Sequence[str] | None,
    current: int | None,
    flagged: Sequence[bool] | np.ndarray | None = None,
) -> int | None:
    """The point to review after `current` (None: the first one); None when there is none left.

    The walk follows the order of all points (the model's errors and flags do not change under
    corrections), so a `current` the reviewer has just moved, and which therefore needs no review
    any more, still marks where the walk is: the next point is the one after it, not the first again.
    """
    order = review_order(expected_errors, statuses, flagged)
    if not order:
        return None
    if current is None:
        return order[0]
    count = len(statuses) if statuses is not None else len(expected_errors)  # (one of them is given here)
    walk = review_order(expected_errors, [LandmarkStatus.DETECTED] * count, flagged)  # every point, in order
    if current not in walk:
        return order[0]
    return next((i for i in walk[walk.index(current) + 1 :] if i in order), None)


# What a session tells its front-end (`ReviewSession.listen`): a point is being dragged (refresh at
# a readable rate), or the points changed and settled (a move dropped, reset, undone; a detection
# shown or cleared).
MOVING, CHANGED = "moving", "changed"

_EDIT_EVENTS = (
    slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
    slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
    slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent,
    slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
)

Position = np.ndarray | None  # a landmark's RAS position in its node's frame; None: not placed


class ReviewSession:
    """Review one detection at a time: rows, review order, corrections with undo, export, training.

    Args:
        logic: the `SCNLandmarksLogic` whose scene holds the detections.

    Corrections made anywhere (a drag in a view, a script, the Markups module) are seen through the
    point list's events: a drag becomes one undo step when it is dropped, any other change at once.
    """

    def __init__(self, logic):
        self.logic = logic
        self.markupsNode = None
        self.unsaved = False  # corrections not exported (nor kept in a training folder) yet
        self.trainingJob: training.TrainingJob | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._observers: list[int] = []
        self._undo: list[dict[int, Position]] = []
        self._settled: list[Position] = []
        self._interacting = False
        self._restoring = False

    # ------------------------------------------------------------------------------------------
    # the detection under review

    def listen(self, callback: Callable[[str], None]) -> None:
        """Call `callback(MOVING or CHANGED)` when the points change (on the thread that changed them)."""
        self._listeners.append(callback)

    def _notify(self, what: str) -> None:
        for callback in self._listeners:
            callback(what)

    def setDetection(self, markupsNode) -> None:
        """Review this point list from now on (a detection's; an annotation's, which has no rows to
        review but is exported and saved the same way; None: nothing): no undo steps, nothing unsaved.
        The previous one stays in the scene (see `clear`)."""
        if markupsNode is self.markupsNode:
            return
        self._unobserve()
        self.markupsNode = markupsNode
        self._undo.clear()
        self.unsaved = False
        self._interacting = False
        if self.markupsNode is not None:
            self.logic.observeCorrections(self.markupsNode)
            node = self.markupsNode
            self._observers = [node.AddObserver(event, self._onEdited) for event in _EDIT_EVENTS]
            self._observers += [
                node.AddObserver(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent, self._onGrabbed),
                node.AddObserver(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onDropped),
            ]
        self._settled = self._positions()
        self._notify(CHANGED)

    def clear(self) -> None:
        """Forget the detection under review and take it (its points and heatmap) out of the scene."""
        node = self.markupsNode
        self.setDetection(None)
        if node is None:
            return
        self.logic.forgetDetection(node)  # (its heatmap too)
        if self.logic.scene.IsNodePresent(node):
            markups.removeNode(self.logic.scene, node)

    def _unobserve(self) -> None:
        for tag in self._observers:
            self.markupsNode.RemoveObserver(tag)
        self._observers = []

    @property
    def volumeNode(self):
        """The detection's volume (None without a detection)."""
        node = self.markupsNode
        return node.GetNodeReference(markups.VOLUME_REFERENCE_ROLE) if node is not None else None

    @property
    def unit(self) -> str:
        """The unit of positions and expected errors: the model's ("mm", or "px" for pictures)."""
        return markups.predictionUnit(self.markupsNode) if self.markupsNode is not None else ""

    @property
    def coverage(self) -> float | None:
        """The probability the points' coverage radii are for (e.g. 0.9); None without radii."""
        return markups.predictionCoverage(self.markupsNode) if self.markupsNode is not None else None

    def rows(self) -> list[markups.LandmarkRow]:
        """Each landmark's row in model order (status, expected error, the flag: `LandmarkRow.reviewFirst`)."""
        return markups.updatePointStatuses(self.markupsNode) if self.markupsNode is not None else []

    @property
    def calibrated(self) -> bool:
        """True when the detection's model gave expected errors."""
        return any(np.isfinite(row.expectedError) for row in self.rows())

    def nextToReview(self, current: int | None = None) -> int | None:
        """The landmark to review after `current` (None: the first); None when none is left."""
        rows = self.rows()
        if not rows:
            return None
        errors = [row.expectedError for row in rows] if self.calibrated else None
        return next_to_review(errors, [row.status for row in rows], current, [row.flagged for row in rows])

    def movedPositions(self) -> dict[int, np.ndarray]:
        """{landmark index: RAS position} of the points the user moved or placed."""
        return {
            index: row.positionRas
            for index, row in enumerate(self.rows())
            if row.status == LandmarkStatus.MOVED and row.positionRas is not None
        }

    # ------------------------------------------------------------------------------------------
    # corrections

    def movePoints(self, positionsRas: dict[int, Sequence[float]]) -> None:
        """Put landmarks (model order) at RAS positions in their node's frame, as one undo step."""
        self._requireDetection()
        self._restoring = True
        try:
            for index, position in positionsRas.items():
                self._place(int(index), np.asarray(position, dtype=np.float64))
        finally:
            self._restoring = False
        self._settle()

    def resetPoint(self, index: int) -> None:
        """Put a landmark back where the model found it (one undo step)."""
        self.resetPoints([index])

    def resetPoints(self, indices: Sequence[int] | None = None) -> None:
        """Put landmarks (default: all) back where the model found them, as one undo step."""
        self._requireDetection()
        self._restoring = True
        try:
            for index in range(len(markups.landmarkRows(self.markupsNode))) if indices is None else indices:
                markups.resetPoint(self.markupsNode, int(index))
        finally:
            self._restoring = False
        self._settle()

    @property
    def canUndo(self) -> bool:
        return bool(self._undo)

    def undo(self) -> int | None:
        """Take back the last correction (a move, a reset, a reset of all); the landmark it moved
        (the first, for several), or None when there was nothing to undo."""
        if self.markupsNode is None or not self._undo:
            return None
        step = self._undo.pop()
        self._restoring = True
        try:
            for index, position in step.items():
                self._place(index, position)
        finally:
            self._restoring = False
        self._settled = self._positions()
        self.unsaved = True
        self._notify(CHANGED)
        return min(step)

    def _place(self, index: int, position: Position) -> None:
        row = markups.landmarkRows(self.markupsNode)[index]
        if row.index < 0:  # the user deleted the control point: bring it back first
            row = markups.resetPoint(self.markupsNode, index)
        if position is None:
            self.markupsNode.UnsetNthControlPointPosition(row.index)
        else:
            self.markupsNode.SetNthControlPointPosition(row.index, *position)

    def _positions(self) -> list[Position]:
        # (Read only: refreshing the rows here would fire the very events that call this.)
        rows = markups.landmarkRows(self.markupsNode) if self.markupsNode is not None else []
        return [None if row.positionRas is None else np.array(row.positionRas) for row in rows]

    def _settle(self) -> None:
        """Make the changes since the last settled state one undo step."""
        now = self._positions()
        changed = {
            index: before
            for index, (before, after) in enumerate(zip(self._settled, now))
            if (before is None) != (after is None) or (before is not None and not np.array_equal(before, after))
        }
        self._settled = now
        if changed:
            self._undo.append(changed)
            self.unsaved = True
            self._notify(CHANGED)

    def _onGrabbed(self, caller, event) -> None:
        self._interacting = True

    def _onDropped(self, caller, event) -> None:
        self._interacting = False
        self._settle()

    def _onEdited(self, caller, event) -> None:
        if self._restoring:
            return
        if self._interacting:
            self._notify(MOVING)
        else:
            self._settle()

    def _requireDetection(self) -> None:
        if self.markupsNode is None:
            raise DataError("No detection to review: detect landmarks first.")

    # ------------------------------------------------------------------------------------------
    # export and training pairs

    def markSaved(self) -> None:
        """The corrections are kept elsewhere now (exported, or saved where they stay)."""
        self.unsaved = False

    def export(self, path, overwrite: bool = True) -> Path:
        """Write the corrected points as `scn-landmarks detect` writes them (see
        `SCNLandmarksLogic.exportLandmarks`); the corrections then count as saved.

        Raises:
            DataError: no detection, an unknown suffix, an existing file with `overwrite` False, or
                a file that cannot be written.
        """
        self._requireDetection()
        written = self.logic.exportLandmarks(self.markupsNode, path, overwrite=overwrite)
        self.markSaved()
        return written

    def trainingPairPaths(self, folder, caseId: str | None = None, volumeNode=None) -> tuple[Path, Path]:
        """The (image, landmarks) files `saveTrainingPair` would write."""
        volumeNode = volumeNode or self.volumeNode
        picture = self.logic.savedAsPicture(volumeNode, self.markupsNode)
        return self.logic.trainingPairPaths(volumeNode, folder, caseId, picture)

    def saveTrainingPair(
        self,
        folder,
        caseId: str | None = None,
        split: str | None = None,
        overwrite: bool = True,
        keeps: bool = True,
        volumeNode=None,
    ) -> tuple[Path, Path]:
        """Add the image and its corrected points to a training folder (see
        `SCNLandmarksLogic.saveTrainingPair`).

        Args:
            keeps: the folder outlives this session, so the corrections count as saved.
            volumeNode: the image, for a point list that names none (default the one it names).
        """
        self._requireDetection()
        paths = self.logic.saveTrainingPair(
            volumeNode or self.volumeNode, self.markupsNode, folder, caseId, split, overwrite
        )
        if keeps:
            self.markSaved()
        return paths

    # ------------------------------------------------------------------------------------------
    # learning from the saved cases (in a child process; see `training`)

    @property
    def trainingRunning(self) -> bool:
        return self.trainingJob is not None and self.trainingJob.running

    def startTraining(
        self,
        data: training.TrainingData | str | Path,
        base=None,
        name: str = "",
        minutes: float = training.TIME_BUDGETS["quick"],
        device: str = "auto",
        python: str | None = None,
    ) -> training.TrainingJob:
        """Check the cases and the base (naming what is wrong before any training) and start training.

        Args:
            data: the training folder, or what `training.inspectTrainingFolder` said of it.
            base: model file to fine-tune; None trains a new landmark set.

        Raises:
            DataError, ModelFileError, training.TrainingFailed: as `inspectTrainingFolder`,
                `checkBase` and `TrainingJob.start`; a training already running.
        """
        if self.trainingRunning:
            raise training.TrainingFailed("A training is running already: wait for it or cancel it.")
        if not isinstance(data, training.TrainingData):
            data = training.inspectTrainingFolder(data)
        if base is not None:
            training.checkBase(base, data)
        job = training.TrainingJob(data, base, name, minutes=minutes, device=device, python=python)
        job.start()
        self.trainingJob = job
        return job

    def pollTraining(self, wait: float = 0.0) -> training.TrainingOutcome | None:
        """None while the training runs; then its outcome (see `TrainingJob.poll`)."""
        return self.trainingJob.poll(wait) if self.trainingJob is not None else None

    def cancelTraining(self) -> None:
        """Stop at the next iteration; the best model so far is still judged (see `TrainingJob.cancel`)."""
        if self.trainingJob is not None:
            self.trainingJob.cancel()

    def endTraining(self) -> None:
        """End a running training at once (the application or session closes): nothing is added."""
        job = self.trainingJob
        if job is None or not job.running:
            return
        job.kill()
        try:
            job.wait()
        except training.TrainingFailed as error:  # "killed: nothing was added"
            logger.info("%s", error)

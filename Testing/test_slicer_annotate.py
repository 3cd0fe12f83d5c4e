"""On real MRML (slicer-core): annotate mode for a new landmark set (named points placed in order, a
skipped one saved as missing, 2D and 3D, "Save as training pair"), and review first (the table shows
expected errors and marks points above their landmark's usual error; "Next to review" walks the
points from the largest expected error down)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SCNLandmarks"))

from SCNLandmarksLib.errors import DataError  # noqa: E402
from SCNLandmarksLib.io.landmarks import read_landmarks  # noqa: E402
from SCNLandmarksLib.vocabulary import LandmarkStatus  # noqa: E402
from SCNLandmarksMRML import (  # noqa: E402
    SCNLandmarksLogic,
    annotate,  # noqa: E402
    loadVolumeFile,
    panel,
)
from SCNLandmarksMRML.catalogue import sampleModel  # noqa: E402
from SCNLandmarksMRML.markups import createLandmarksNode, predictionUnit  # noqa: E402
from SCNLandmarksMRML.review import ReviewSession  # noqa: E402
from SCNLandmarksMRML.training import inspectTrainingFolder  # noqa: E402


def _volume(scene, tmp_path: Path, dimension: int):
    rng = np.random.default_rng(dimension)
    shape = (40, 50) if dimension == 2 else (20, 30, 40)
    image = sitk.GetImageFromArray((rng.random(shape) * 100).astype(np.float32))
    image.SetSpacing((0.5, 0.8) if dimension == 2 else (1.0, 1.2, 2.0))
    path = tmp_path / ("picture.nrrd" if dimension == 2 else "scan.nrrd")
    sitk.WriteImage(image, str(path))
    return loadVolumeFile(scene, path)


def _statuses(node) -> list[int]:
    return [node.GetNthControlPointPositionStatus(i) for i in range(node.GetNumberOfControlPoints())]


def test_landmark_names_are_typed_or_read_from_a_file(tmp_path):
    assert annotate.parseLandmarkNames("Sella\n Nasion ,Orbitale\n\n") == ["Sella", "Nasion", "Orbitale"]
    with pytest.raises(DataError, match=r"\['Nasion'\] given more than once"):
        annotate.parseLandmarkNames("Nasion, Sella, Nasion")
    with pytest.raises(DataError, match="No landmark names"):
        annotate.parseLandmarkNames(" \n, ")
    (tmp_path / "names.txt").write_text("Tip\nBase\n", encoding="utf-8")
    assert annotate.readLandmarkNames(tmp_path / "names.txt") == ["Tip", "Base"]
    (tmp_path / "points.csv").write_text("landmark,x,y,z\nB,1,2,3\nA,4,5,6\n", encoding="utf-8")
    assert annotate.readLandmarkNames(tmp_path / "points.csv") == ["B", "A"]  # the file's order
    with pytest.raises(DataError, match="absent.mrk.json"):
        annotate.readLandmarkNames(tmp_path / "absent.mrk.json")


@pytest.mark.parametrize("dimension", [3, 2])
def test_each_click_places_the_next_named_landmark_and_a_skipped_one_is_saved_as_missing(mrml, tmp_path, dimension):
    logic = SCNLandmarksLogic(mrml.scene)
    volume = _volume(mrml.scene, tmp_path, dimension)
    names = ["Tip", "Base", "Left", "Right"]
    node = annotate.createAnnotationNode(mrml.scene, names, volume)
    assert [node.GetNthControlPointLabel(i) for i in range(4)] == names
    assert node.GetNodeReference("SCNLandmarksInputVolume") is volume
    assert _statuses(node) == [slicer.vtkMRMLMarkupsNode.PositionUndefined] * 4
    assert (
        node.GetControlPointPlacementStartIndex() == 0 and annotate.annotationStatus(node).text == "Next: Tip (1 of 4)."
    )

    # What a click in place mode does: Slicer puts the point on the placement start index; the
    # module's observer then moves that index to the next landmark.
    z = 0.0 if dimension == 2 else 10.0
    node.SetNthControlPointPosition(node.GetControlPointPlacementStartIndex(), 3.0, 4.0, z)
    assert annotate.updatePlacement(node) == 1 and node.GetControlPointPlacementStartIndex() == 1
    assert annotate.placeNext(node, (5.0, 6.0, z)) == 1
    assert annotate.skipNext(node) == 2  # "Left" is not visible on this image
    assert annotate.annotationStatus(node).text == "Next: Right (4 of 4, 1 skipped)."
    with pytest.raises(DataError, match=r"1 landmark\(s\) not placed yet \(Right\)"):
        logic.saveTrainingPair(volume, node, tmp_path / "cases")
    assert not (tmp_path / "cases").exists()  # nothing written for an unfinished case
    assert annotate.placeNext(node, (7.0, 8.0, z)) == 3
    assert annotate.nextToPlace(node) is None and node.GetControlPointPlacementStartIndex() == 4
    assert annotate.annotationStatus(node).text == "All 4 landmarks done (3 placed, 1 skipped): save the training pair."
    with pytest.raises(DataError, match="placed or skipped"):
        annotate.placeNext(node, (0.0, 0.0, z))
    # A click after the last landmark (place mode is still on) adds no unnamed point.
    assert node.AddControlPoint(vtk.vtkVector3d(1.0, 1.0, z), "") == -1 and node.GetNumberOfControlPoints() == 4

    image, landmarks = logic.saveTrainingPair(volume, node, tmp_path / "cases")
    saved = json.loads(landmarks.read_text(encoding="utf-8"))["markups"][0]["controlPoints"]
    assert [(p["label"], p["positionStatus"]) for p in saved] == [
        ("Tip", "defined"),
        ("Base", "defined"),
        ("Left", "missing"),
        ("Right", "defined"),
    ]
    points = read_landmarks(landmarks, names=names, dimension=dimension).points_lps
    assert np.isnan(points[2]).all() and np.isfinite(np.delete(points, 2, axis=0)).all()
    np.testing.assert_allclose(points[0], [-3.0, -4.0, z][:dimension])  # RAS in the scene, LPS in the file
    data = inspectTrainingFolder(tmp_path / "cases")  # the folder trains as it is
    assert data.landmarkNames == tuple(names) and data.cases == (image.name.split(".")[0],)
    assert data.dimension == dimension

    # A landmark placed wrongly (or skipped) can be placed again: it becomes the next one.
    annotate.placeAgain(node, 2)
    assert annotate.nextToPlace(node) == 2 and node.GetControlPointPlacementStartIndex() == 2


@pytest.mark.parametrize("persistence", [0, 1])
def test_place_mode_gives_the_users_persistence_back_when_it_ends(mrml, tmp_path, persistence):
    markupsLogic = next(logic for logic in mrml.logics if logic.IsA("vtkSlicerMarkupsLogic"))
    interaction = mrml.applicationLogic.GetInteractionNode()
    interaction.SetPlaceModePersistence(persistence)  # as the user left the toolbar's "Place multiple"
    node = annotate.createAnnotationNode(mrml.scene, ["Tip", "Base"], _volume(mrml.scene, tmp_path, 3))
    placing = annotate.PlaceMode(markupsLogic, interaction)
    placing.start(node)
    placing.start(node)  # started again before the first ended
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()
    assert markupsLogic.GetActiveListID() == node.GetID()
    annotate.placeNext(node, (1.0, 2.0, 3.0))
    assert interaction.GetPlaceModePersistence()  # one click per landmark, without choosing place again
    interaction.SwitchToViewTransformMode()  # Esc, another mouse mode, or Slicer once the last point is placed
    assert interaction.GetPlaceModePersistence() == persistence
    # The user's own placements later are left alone.
    interaction.SetPlaceModePersistence(1 - persistence)
    interaction.SetCurrentInteractionMode(interaction.Place)
    interaction.SwitchToViewTransformMode()
    assert interaction.GetPlaceModePersistence() == 1 - persistence


def _reviewNode(scene, expected, flagged, statuses=None):
    statuses = statuses or [LandmarkStatus.DETECTED] * len(expected)
    names = [f"L{i}" for i in range(len(statuses))]
    points = np.arange(3 * len(names), dtype=float).reshape(-1, 3)
    points[[s == LandmarkStatus.MISSING for s in statuses]] = np.nan
    return createLandmarksNode(
        scene,
        "review",
        names,
        points,
        np.full(len(names), 0.5),
        statuses,
        expectedErrors=None if expected is None else np.asarray(expected),
        flagged=None if flagged is None else np.asarray(flagged),
        unit="px",
    )


def _session(scene, node) -> ReviewSession:
    review = ReviewSession(SCNLandmarksLogic(scene))
    review.setDetection(node)
    return review


def test_next_to_review_walks_the_points_from_the_largest_expected_error_down(mrml):
    node = _reviewNode(mrml.scene, [2.0, 9.0, 4.0, 9.0, 1.0], [False, True, False, True, False])
    review = _session(mrml.scene, node)
    order, current = [], None
    while (current := review.nextToReview(current)) is not None:
        order.append(current)
    assert order == [1, 3, 2, 0, 4]  # ties in landmark order
    # A corrected point needs no review: it drops out; the walk goes on from where it was.
    node.SetNthControlPointPosition(3, 100.0, 0.0, 0.0)
    assert review.nextToReview(1) == 2 and review.nextToReview(None) == 1
    assert review.nextToReview(3) == 2  # from the point just moved: on, not back to the top

    rows = review.rows()
    assert panel.tableHeaders(rows) == ("Landmark", "Expected error", "Status")
    table = panel.tableRows(rows, "px")
    assert [row.texts[1] for row in table] == ["2.00 px", "! 9.00 px", "4.00 px", "9.00 px", "1.00 px"]
    # With coverage radii (90 %): a radius column between the expected error and the status.
    assert panel.tableHeaders(rows, 0.9) == ("Landmark", "Expected error", "90 % radius", "Status")
    radii = [dataclasses.replace(row, coverageRadius=2.0 * row.expectedError) for row in rows]
    assert [row.texts[2] for row in panel.tableRows(radii, "px", 0.9)][:2] == ["4.00 px", "18.00 px"]
    assert panel.tableRows(radii, "px", 0.9)[0].texts[3] == rows[0].status
    assert table[1].color == panel.FLAGGED_COLOR  # above its landmark's usual error
    assert table[3].color == panel.STATUS_COLORS[LandmarkStatus.MOVED]  # flagged, but corrected already

    # An uncalibrated model: confidences, and the points in landmark order.
    plain = _reviewNode(
        mrml.scene, None, None, [LandmarkStatus.DETECTED, LandmarkStatus.MISSING, LandmarkStatus.DETECTED]
    )
    review = _session(mrml.scene, plain)
    rows = review.rows()
    assert panel.tableHeaders(rows)[1] == "Confidence" and panel.tableRows(rows)[0].texts[1] == "0.50"
    assert [review.nextToReview(c) for c in (None, 0, 2)] == [0, 2, None]


def test_a_calibrated_models_detection_carries_its_expected_errors_to_the_table(mrml):
    entry = sampleModel()  # the shipped brain model and its bundled sample, where all points are found
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(
        loadVolumeFile(mrml.scene, entry.sample), entry.path, device="cpu", keepHeatmaps=False
    )
    rows = logic.landmarkRows(result.markupsNode)
    expected = result.prediction.landmarks.expected_errors
    assert expected is not None and len(rows) == len(result.landmarkNames)
    np.testing.assert_allclose([row.expectedError for row in rows], expected, equal_nan=True)
    assert [row.flagged for row in rows] == [bool(f) for f in result.prediction.flagged]
    finite = [i for i, row in enumerate(rows) if math.isfinite(row.expectedError) and row.status != "missing"]
    assert len(finite) == len(rows)
    # Flagged points first, each group from the largest expected error down.
    first = max(finite, key=lambda i: (rows[i].reviewFirst, rows[i].expectedError, -i))
    assert _session(mrml.scene, result.markupsNode).nextToReview() == first
    assert all(row.texts[1].endswith(" mm") for row in panel.tableRows(rows, predictionUnit(result.markupsNode)))

"""The review session (`SCNLandmarksMRML.review`) on real MRML (slicer-core): the one rule behind the
orange flag and the review order, corrections and their undo (drags seen through the point list's
own interaction events, as in Slicer's and trame-slicer's views), export as `detect` writes it,
training pairs through the dataset spec's one writer, and the training job's start checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SCNLandmarks"))

from SCNLandmarksLib.data.spec import load_dataset_spec  # noqa: E402
from SCNLandmarksLib.errors import DataError  # noqa: E402
from SCNLandmarksLib.io.landmarks import read_landmarks  # noqa: E402
from SCNLandmarksLib.vocabulary import LandmarkStatus  # noqa: E402
from SCNLandmarksMRML import SCNLandmarksLogic, loadVolumeFile, panel  # noqa: E402
from SCNLandmarksMRML.markups import createLandmarksNode  # noqa: E402
from SCNLandmarksMRML.review import CHANGED, MOVING, ReviewSession  # noqa: E402

NAMES = ["Sella", "Orbitale", "Nasion", "Porion"]
# Sella is above its landmark's usual error at 5.0 px, Orbitale not at 11.4 px (its usual error is larger).
EXPECTED = [5.0, 11.4, 2.0, np.nan]
FLAGGED = [True, False, False, False]
STATUSES = [LandmarkStatus.DETECTED] * 3 + [LandmarkStatus.MISSING]


@pytest.fixture
def picture(tmp_path) -> Path:
    """A 2D picture without spacing (positions in pixels)."""
    path = tmp_path / "ceph.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 200), str(path))
    return path


@pytest.fixture
def session(mrml, picture) -> ReviewSession:
    """A review of a calibrated model's detection on the picture (Porion not found)."""
    volume = loadVolumeFile(mrml.scene, picture)
    points = np.array([[10.0, 12.0, 0.0], [20.0, 5.0, 0.0], [30.0, 25.0, 0.0], [np.nan] * 3])
    node = createLandmarksNode(
        mrml.scene,
        "ceph landmarks",
        NAMES,
        points,
        np.array([0.9, 0.8, 0.95, 0.0]),
        STATUSES,
        volumeNode=volume,
        expectedErrors=np.array(EXPECTED),
        flagged=np.array(FLAGGED),
        unit="px",
    )
    review = ReviewSession(SCNLandmarksLogic(mrml.scene))
    review.setDetection(node)
    return review


def _walk(review: ReviewSession) -> list[int]:
    order, current = [], None
    while (current := review.nextToReview(current)) is not None:
        order.append(current)
    return order


def test_the_flag_and_the_review_order_follow_one_rule(session):
    # The flagged point first though its expected error is smaller, then the others by expected error;
    # the table marks exactly the points the order puts first.
    assert _walk(session) == [0, 1, 2]
    table = panel.tableRows(session.rows(), session.unit)
    assert [row.texts[1] for row in table] == ["! 5.00 px", "11.40 px", "2.00 px", ""]
    assert [row.reviewFirst for row in session.rows()] == [True, False, False, False]

    # Corrected, Sella is neither flagged nor walked, and the walk goes on from where it was.
    session.movePoints({0: (11.0, 12.0, 0.0)})
    assert [row.reviewFirst for row in session.rows()] == [False] * 4
    assert not panel.tableRows(session.rows(), session.unit)[0].texts[1].startswith(panel.FLAGGED_MARK)
    assert session.nextToReview(0) == 1 and _walk(session) == [1, 2]


def test_an_uncalibrated_detection_is_walked_in_landmark_order(mrml, picture):
    node = createLandmarksNode(
        mrml.scene, "plain", NAMES[:3], np.zeros((3, 3)) + [[0.0], [1.0], [2.0]], np.full(3, 0.5), STATUSES[:3]
    )
    review = ReviewSession(SCNLandmarksLogic(mrml.scene))
    review.setDetection(node)
    assert not review.calibrated and _walk(review) == [0, 1, 2]


def test_moves_resets_and_drags_are_undone_step_by_step(session):
    node = session.markupsNode
    heard = []
    session.listen(heard.append)
    start = [None if row.positionRas is None else row.positionRas.copy() for row in session.rows()]
    assert not session.unsaved and not session.canUndo

    session.movePoints({1: (21.0, 6.0, 0.0)})
    assert session.unsaved and session.rows()[1].status == LandmarkStatus.MOVED and heard[-1] == CHANGED

    # A drag in a view: many position changes between the start and the end of the interaction, one step.
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    for x in (31.0, 32.0, 33.0):
        node.SetNthControlPointPosition(2, x, 25.0, 0.0)
    assert heard[-1] == MOVING
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert heard[-1] == CHANGED
    # Placing the missing landmark (the Markups module, a script): a step at once.
    node.SetNthControlPointPosition(3, 1.0, 2.0, 0.0)
    assert session.movedPositions().keys() == {1, 2, 3}

    session.resetPoints()  # all, one step
    assert session.movedPositions() == {} and session.rows()[3].positionRas is None

    assert session.undo() == 1  # the reset of all comes back at once
    assert session.movedPositions().keys() == {1, 2, 3}
    assert session.undo() == 3 and session.rows()[3].positionRas is None  # placed: unplaced again
    assert session.undo() == 2  # the whole drag
    np.testing.assert_allclose(session.rows()[2].positionRas, start[2])
    assert session.undo() == 1 and session.movedPositions() == {}
    assert session.undo() is None and not session.canUndo

    # A deleted control point comes back when its move is undone.
    session.movePoints({0: (9.0, 9.0, 0.0)})
    node.RemoveNthControlPoint(session.rows()[0].index)
    assert session.rows()[0].index == -1
    session.undo()  # the deletion
    session.undo()  # the move
    np.testing.assert_allclose(session.rows()[0].positionRas, start[0])


def test_export_writes_what_detect_writes_and_counts_as_saved(session, tmp_path):
    session.movePoints({1: (21.0, 6.0, 0.0)})
    written = session.export(tmp_path / "ceph.mrk.json")
    assert not session.unsaved
    markup = json.loads(written.read_text())["markups"][0]
    assert markup["coordinateUnits"] == "px"  # a picture's positions are pixels, not mm
    assert {p["position"][2] for p in markup["controlPoints"]} == {0.0}  # 2D points, in the image plane
    back = read_landmarks(written, names=NAMES, dimension=2)
    np.testing.assert_allclose(back.points_lps[1], [-21.0, -6.0])  # RAS to LPS
    np.testing.assert_allclose(back.expected_errors, EXPECTED, equal_nan=True)
    assert [p["description"].split(";")[0] for p in markup["controlPoints"]] == [
        "detected",
        "moved by user",
        "detected",
        "missing",
    ]
    table = session.export(tmp_path / "ceph.csv")
    assert table.read_text().splitlines()[0] == "landmark,x,y,confidence,expected_error,status"
    with pytest.raises(DataError, match="Not replacing"):
        session.export(written, overwrite=False)
    with pytest.raises(DataError, match="unknown landmark format"):
        session.export(tmp_path / "ceph.txt")
    assert not (tmp_path / "ceph.txt").exists()


def test_training_pairs_are_written_by_the_specs_one_writer(session, tmp_path, mrml):
    folder = tmp_path / "cases"
    session.movePoints({1: (21.0, 6.0, 0.0)})
    session.saveTrainingPair(folder, "a", keeps=False)  # a folder that goes with the session keeps nothing
    assert session.unsaved
    session.saveTrainingPair(folder, "b", split="validation")
    assert not session.unsaved
    session.saveTrainingPair(folder, "b")  # replaced: it keeps its split
    spec = load_dataset_spec(folder / "dataset.toml")
    assert [(e.id, e.split) for e in spec.entries] == [("a", "train"), ("b", "validation")]
    assert spec.landmark_names == tuple(NAMES) and spec.dimension == 2
    text = (folder / "dataset.toml").read_text()
    assert (
        'image = "a.tif"' in text and 'landmarks = "b.mrk.json"' in text
    )  # a picture: a model in pixels; relative paths
    landmarks = spec.load_landmarks(list(spec.entries))["a"]
    np.testing.assert_allclose(landmarks.points_lps[1], [-21.0, -6.0], atol=1e-4)
    assert np.isnan(landmarks.points_lps[3]).all()

    # Another landmark set, or an unreadable spec, is refused before anything is written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.toml").write_text('dimension = 2\nlandmarks = ["X"]\n[[images]]\nimage = "x.png"\n')
    (other / "x.png").write_bytes((tmp_path / "ceph.png").read_bytes())
    with pytest.raises(DataError, match="landmarks"):
        session.saveTrainingPair(other, "c")
    (other / "dataset.toml").write_text("dimension = [")
    with pytest.raises(DataError, match="not valid TOML"):
        session.saveTrainingPair(other, "c")
    assert sorted(p.name for p in other.iterdir()) == ["dataset.toml", "x.png"]


def test_a_training_is_checked_before_it_starts(session, tmp_path, tiny_model_3d):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        session.startTraining(empty, tiny_model_3d)
    folder = tmp_path / "cases"
    session.saveTrainingPair(folder, "a")
    with pytest.raises(DataError, match="3D"):
        session.startTraining(folder, tiny_model_3d)  # a 3D base for 2D cases
    assert session.trainingJob is None and not session.trainingRunning
    assert session.pollTraining() is None


def test_without_a_detection_there_is_nothing_to_correct(mrml, tmp_path):
    review = ReviewSession(SCNLandmarksLogic(mrml.scene))
    assert review.rows() == [] and review.nextToReview() is None and review.undo() is None
    with pytest.raises(DataError, match="detect landmarks first"):
        review.export(tmp_path / "x.mrk.json")

"""Detection off the main thread (`SCNLandmarksMRML.runner.DetectionRunner`) on real MRML with a
real model trained in the session: it completes with the synchronous result, reports progress,
is cancelled at every stage leaving the scene unchanged, and refuses a second start."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SCNLandmarks"))

from SCNLandmarksLib.errors import Cancelled, DataError, ModelFileError  # noqa: E402
from SCNLandmarksMRML import SCNLandmarksLogic, loadVolumeFile  # noqa: E402
from SCNLandmarksMRML.runner import DETECTING, DetectionBusy, DetectionRunner  # noqa: E402


@pytest.fixture
def volume(mrml, dataset_2d):
    image = dataset_2d.parent / re.findall(r'image = "([^"]+)"', dataset_2d.read_text(encoding="utf-8"))[-1]
    return loadVolumeFile(mrml.scene, image)


def _ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_threaded_detection_matches_the_synchronous_one_and_reports_progress(mrml, volume, tiny_model_2d):
    logic = SCNLandmarksLogic(mrml.scene)
    runner = DetectionRunner(logic)
    reports: list[tuple[float, str]] = []
    runner.start(volume, tiny_model_2d, "cpu", listener=lambda fraction, message: reports.append((fraction, message)))
    assert runner.running and runner.phase == "loading model"
    result = runner.wait()
    assert not runner.running and runner.progress == (1.0, "done")
    messages = [message for _, message in reports]
    for expected in (
        "loading model",
        "reading volume",
        "preparing image",
        "running the network",
        "locating landmarks",
        "creating landmarks",
        "done",
    ):
        assert any(message.startswith(expected) for message in messages), (expected, messages)
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    reference = logic.detectLandmarks(volume, tiny_model_2d, device="cpu")
    np.testing.assert_allclose(result.pointsRas, reference.pointsRas, atol=1e-6)
    assert result.landmarkNames == reference.landmarkNames and result.modelPath == str(tiny_model_2d)
    assert logic.hasHeatmaps(result.markupsNode)


@pytest.mark.parametrize(
    "stage", ["loading model", "reading volume", "preparing image", "running the network", "locating landmarks", "done"]
)
def test_cancel_at_each_stage_leaves_the_scene_unchanged(mrml, volume, tiny_model_2d, stage):
    logic = SCNLandmarksLogic(mrml.scene)
    runner = DetectionRunner(logic)
    before = _ids(mrml.scene)

    def cancelAtStage(fraction: float, message: str) -> None:
        if message.startswith(stage):
            runner.cancel()

    runner.start(volume, tiny_model_2d, "cpu", listener=cancelAtStage)
    with pytest.raises(Cancelled, match="nothing was changed"):
        runner.wait()
    assert _ids(mrml.scene) == before and not runner.running
    # The runner is usable again, and the next detection is not cancelled.
    runner.start(volume, tiny_model_2d, "cpu")
    assert runner.wait().markupsNode is not None


def test_cancel_after_the_network_before_the_points_are_made(mrml, volume, tiny_model_2d):
    logic = SCNLandmarksLogic(mrml.scene)
    runner = DetectionRunner(logic)
    before = _ids(mrml.scene)
    runner.start(volume, tiny_model_2d, "cpu")
    while runner.phase != DETECTING:
        assert runner.poll(0.01) is None
    while runner.workerRunning:
        time.sleep(0.01)
    runner.cancel()
    with pytest.raises(Cancelled):
        runner.poll()
    assert _ids(mrml.scene) == before


def test_a_second_start_is_refused_while_one_runs(mrml, volume, tiny_model_2d):
    logic = SCNLandmarksLogic(mrml.scene)
    runner = DetectionRunner(logic)
    before = _ids(mrml.scene)
    runner.start(volume, tiny_model_2d, "cpu")
    with pytest.raises(DetectionBusy, match="already running"):
        runner.start(volume, tiny_model_2d, "cpu")
    result = runner.wait()
    assert result.markupsNode.GetID() not in before
    assert mrml.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1  # one detection ran


def test_bad_inputs_are_refused_at_start_and_a_removed_volume_adds_nothing(mrml, volume, tiny_model_2d, tmp_path):
    logic = SCNLandmarksLogic(mrml.scene)
    runner = DetectionRunner(logic)
    before = _ids(mrml.scene)
    with pytest.raises(ModelFileError, match="not found"):
        runner.start(volume, tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="No input volume"):
        runner.start(None, tiny_model_2d)
    assert not runner.running and runner.poll() is None

    runner.start(volume, tiny_model_2d, "cpu")
    mrml.scene.RemoveNode(volume)
    with pytest.raises(DataError, match="removed from the scene"):
        runner.wait()
    assert _ids(mrml.scene) == sorted(set(before) - {volume.GetID()})

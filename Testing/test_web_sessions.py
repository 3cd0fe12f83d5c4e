"""The review station's sessions keep the reviewer's work when things go wrong: a correction made while a
new detection runs, a second tab of the same reviewer, another session saving to the training folder,
a failed write. Each session is the page's own app object on its own trame server (no browser), on
the bundled brain sample and model."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from vtk.util import numpy_support

pytest.importorskip("trame_slicer")

from SCNLandmarksLib.vocabulary import LandmarkStatus  # noqa: E402
from SCNLandmarksWeb import app as station  # noqa: E402
from SCNLandmarksWeb.locks import lockIfFree  # noqa: E402

REVIEWER = "a-reviewer-id-of-the-station-0123456789"
_servers = itertools.count()


def session(tmp_path: Path, name: str, training_folder: Path | None = None) -> station.LandmarkReviewApp:
    """A session of REVIEWER (autosaving beside the other sessions') with the sample image open."""
    from trame.app import get_server

    workdir = tmp_path / f"work-{name}"
    workdir.mkdir()
    app = station.LandmarkReviewApp(
        server=get_server(f"review-session-{next(_servers)}"),
        model="brain-afids-32",
        device="cpu",
        workdir=workdir,
        trainingFolder=training_folder,
        reviewer=REVIEWER,
        autosaveFolder=tmp_path / "autosave" / "reviewer" / name,
    )
    app._openSample()
    assert not app.state.error
    return app


async def detected(app: station.LandmarkReviewApp) -> None:
    app.detect(app.state.model_id, "")
    await app.detection
    assert not app.state.error and app.review.markupsNode is not None


def moved(app: station.LandmarkReviewApp, index: int = 0, by=(6.0, 0.0, 0.0)) -> np.ndarray:
    """Move one landmark as a drag would; returns where it went (RAS)."""
    node = app.review.markupsNode
    position = np.array(node.GetNthControlPointPosition(index)) + np.asarray(by)
    app.review.movePoints({index: position})
    return position


def test_points_are_held_while_a_new_detection_replaces_them(tmp_path):
    async def scenario():
        app = session(tmp_path, "one")
        await detected(app)
        first = app.review.markupsNode
        app.detect(app.state.model_id, "")  # nothing unsaved: no question, the detection starts
        assert app.state.busy and first.GetLocked()  # a drag in the views cannot move them now
        app.state.selected_landmark = 0
        app.resetSelected()
        app.undoMove()
        await app.detection
        second = app.review.markupsNode
        assert second is not first and not second.GetLocked()
        # A cancelled detection leaves the result shown, movable again.
        app.detect(app.state.model_id, "")
        app.cancel()
        await app.detection
        assert app.review.markupsNode is second and not second.GetLocked()
        app.shutdown()

    asyncio.run(scenario())


def test_a_second_tab_neither_offers_nor_deletes_an_open_sessions_corrections(tmp_path):
    async def scenario():
        first = session(tmp_path, "first")
        await detected(first)
        position = moved(first)
        assert first.autosave.folder.is_dir()
        second = session(tmp_path, "second")  # the same reviewer, another tab
        assert second.recoverable == [] and second.state.recovery == ""
        second.discardRecovered()
        assert first.autosave.folder.is_dir()
        first.shutdown()  # the tab is closed: its corrections are offered to the next session
        third = session(tmp_path, "third")
        assert [kept.folder for kept in third.recoverable] == [first.autosave.folder]
        assert np.allclose(third.recoverable[0].movedRas[0], position)
        third.discardRecovered()
        assert not first.autosave.folder.exists()
        assert not list(first.autosave.folder.parent.glob(".first*"))  # its session mark went too
        for app in (second, third):
            app.shutdown()

    asyncio.run(scenario())


def test_a_case_waits_for_another_sessions_save_without_stopping_the_page(tmp_path):
    folder = tmp_path / "training"

    async def scenario():
        app = session(tmp_path, "one", training_folder=folder)
        await detected(app)
        with lockIfFree(folder / station.TRAINING_FOLDER_LOCK) as taken:  # another session is saving
            assert taken
            app.saveTrainingPair("case1")  # returns at once
            assert "Waiting for another session" in app.state.info and not (folder / "case1.nrrd").exists()
            await asyncio.sleep(3 * station.SAVE_RETRY_S)
            assert not (folder / "case1.nrrd").exists()
        await asyncio.sleep(3 * station.SAVE_RETRY_S)
        assert app.state.info.startswith("Saved case case1") and not app.state.error
        assert (folder / "case1.nrrd").is_file() and (folder / "case1.mrk.json").is_file()
        app.shutdown()

    asyncio.run(scenario())


def test_an_unreadable_record_of_case_owners_refuses_the_save_and_is_kept(tmp_path):
    folder = tmp_path / "training"

    async def scenario():
        app = session(tmp_path, "one", training_folder=folder)
        await detected(app)
        app.saveTrainingPair("case1")
        owners = folder / station.CASE_OWNERS_FILE
        damaged = owners.read_text()[:-5]  # a write cut short
        owners.write_text(damaged)
        app.saveTrainingPair("case2")
        assert station.CASE_OWNERS_FILE in app.state.error and "nothing was saved" in app.state.error
        assert owners.read_text() == damaged and not (folder / "case2.nrrd").exists()
        app.shutdown()

    asyncio.run(scenario())


def test_a_replacement_that_fails_midway_leaves_the_case_as_it_was(tmp_path, monkeypatch):
    folder = tmp_path / "training"

    async def scenario():
        app = session(tmp_path, "one", training_folder=folder)
        await detected(app)
        app.saveTrainingPair("case1")
        before = {path.name: path.read_bytes() for path in folder.iterdir()}
        moved(app)
        voxels = numpy_support.vtk_to_numpy(app.volumeNode.GetImageData().GetPointData().GetScalars())
        voxels[: voxels.size // 2] = 0  # another image under the same case name
        app.volumeNode.GetImageData().Modified()

        def disk_full(*arguments, **keywords):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("SCNLandmarksLib.io.landmarks.write_landmarks", disk_full)
        app.saveTrainingPair("case1", replace=True)
        assert app.state.error
        assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no temporary left either
        monkeypatch.undo()
        app.saveTrainingPair("case1", replace=True)
        assert not app.state.error
        saved = json.loads((folder / "case1.mrk.json").read_text())["markups"][0]["controlPoints"][0]
        assert saved["description"] == LandmarkStatus.MOVED.value
        app.shutdown()

    asyncio.run(scenario())


def test_an_upload_the_server_cannot_store_is_reported_and_nothing_is_left(tmp_path, monkeypatch):
    app = session(tmp_path, "one")

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    app.uploadImage([{"name": "scan.nii.gz", "size": 4, "type": "", "content": b"data"}])
    assert app.state.error == "scan.nii.gz: the server could not store the file (No space left on device)."
    assert not list(app.workdir.glob("upload-*"))
    app.shutdown()

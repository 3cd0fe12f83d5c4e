"""The landmark review station in a browser: trame-slicer views around the module's logic.

The page is a second face on `SCNLandmarksLogic`: it opens an image into the MRML scene, runs the
same detection, lists the landmarks with their expected errors (calibrated models) and confidences,
walks the points to review from the largest expected error down, shows the heatmaps as a slice
overlay, lets the user drag points in Slicer's own slice views (one view for 2D images, the three
orthogonal views for 3D; moved points have a halo), downloads the corrected `.mrk.json`, saves
corrected cases as training pairs and fine-tunes the model on them (the module's own
`SCNLandmarksMRML.training` job, into the user models folder). One app is one review session
(`session` runs each in its own process). The model loads and runs on a worker thread and
fine-tuning in a process of its own, so the page keeps answering (progress, Cancel);
MRML changes happen on the server's main thread only. Every error is shown in the page in the
user's terms (details in the server log); none stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import vtk
from trame.app import TrameApp
from trame.app.file_upload import ClientFile
from trame.widgets import client, html
from trame_slicer.app.logic.slice_view_logic import connect_slice_view_slider_to_state
from trame_slicer.app.ui import create_vertical_view_gutter_ui
from trame_slicer.app.ui.slider import Slider
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageLayout
from trame_vuetify.widgets import vuetify3 as v

from SCNLandmarksLib.bundle import read_description
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import Cancelled, DataError, SCNLandmarksError
from SCNLandmarksLib.geometry import ras_to_lps
from SCNLandmarksLib.io.atomic import safe_filename, write_text_atomically
from SCNLandmarksLib.io.images import spacing_unit
from SCNLandmarksLib.io.paths import image_stem
from SCNLandmarksLib.vocabulary import LandmarkStatus
from SCNLandmarksMRML import catalogue
from SCNLandmarksMRML.headless import loadVolumeFile
from SCNLandmarksMRML.logic import TRAINING_SPEC_NAME, SCNLandmarksLogic
from SCNLandmarksMRML.markups import predictionCoverage
from SCNLandmarksMRML.review import CHANGED, MOVING, ReviewSession
from SCNLandmarksMRML.training import TrainingJob, caseCount
from SCNLandmarksMRML.volumes import (
    ColourImageError,
    checkScalarVolume,
    ijkToRasArray,
    matrixToArray,
    volumeDimension,
)

from . import access
from .autosave import Autosave, Recoverable
from .locks import lockIfFree
from .marks import ViewMarks

logger = logging.getLogger(__name__)

ALL_LANDMARKS = "all landmarks (each scaled to its peak)"
LAYOUT_2D = "2D"
LAYOUT_3D = "3D: three slices"
TABLE_REFRESH_S = 0.2  # at most this often while a point is dragged
ZOOM_FRACTION = 0.25  # "Zoom to" shows this fraction of the image's largest extent
PROJECTION_OPACITY = 0.6  # landmarks off the shown slice appear as faded projections
CANCELLED = "Detection cancelled; the previous result is unchanged."
# The all-landmarks heatmap (each landmark scaled to its peak) shows each landmark above this
# fraction of its peak: wide heatmaps (a brain's) then stay apart instead of merging into one blob.
ALL_LANDMARKS_FLOOR = 0.5
TRAINING_POLL_S = 0.5  # how long each look at the running fine-tuning waits for its end
DEFAULT_FINETUNE_MINUTES = 10.0
CANCELLING_FINETUNE = "cancelling: the current iteration ends first, the best model so far is kept"
MAX_FINETUNE_MINUTES = 24 * 60.0
# The browser asks before leaving a page (closing the tab, reloading, another address) that holds
# corrections not exported (they are also autosaved, but the reviewer should know).
LEAVE_GUARD_SCRIPT = """
if (!window.scnLandmarksLeaveGuard) {
  window.scnLandmarksLeaveGuard = true;
  window.addEventListener('beforeunload', (event) => {
    if (window.trame && window.trame.state.get('unsaved')) { event.preventDefault(); event.returnValue = ''; }
  });
}
"""
# Compact rows (Vuetify's compact density is 36 px), so that a laptop's screen (1366 x 768) lists
# a dozen landmarks beside the views.
PAGE_STYLE = """
#landmarks td, #landmarks th { height: 26px !important; padding: 0 6px !important; font-size: 0.8125rem; }
#landmarks th { line-height: 1.15; font-size: 0.75rem; }
#landmarks td { white-space: nowrap; }
"""
# The selected row is scrolled into the table's view whoever selected it (Next to review, a drag, Undo).
SHOW_SELECTED_ROW = (
    "window.document.querySelector('#landmarks tr.bg-blue-lighten-4')?.scrollIntoView({block: 'nearest'})"
)
ENDED_MESSAGE = (
    "This review session has ended. Corrections not exported were kept: open a new session to get them back."
)


# Who saved which case of a shared training folder (case id -> a digest of the reviewer's id), so one
# reviewer never replaces another's case.
CASE_OWNERS_FILE = ".scn-landmarks-case-owners.json"
# Sessions are processes of their own: one at a time adds a case to a shared training folder, under
# this file's lock. A session that finds it held tries again shortly, for at most a minute.
TRAINING_FOLDER_LOCK = ".scn-landmarks.lock"
SAVE_RETRY_S = 0.25
SAVE_WAIT_S = 60.0


def _caseOwners(folder: Path) -> dict[str, str]:
    """The case owners of a training folder ({} for a folder without any yet).

    Raises:
        DataError: the file cannot be read: saving on would forget every other reviewer's cases.
    """
    path = folder / CASE_OWNERS_FILE
    if not path.is_file():
        return {}
    try:
        owners = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(owners, dict):
            return owners
        problem = "not a JSON object"
    except (OSError, ValueError) as error:
        problem = str(error)
    logger.error("%s: %s", path, problem)
    raise DataError(
        f"The training folder's record of who saved which case ({path.name}) cannot be read; nothing "
        "was saved. Ask the station's administrator to restore or remove it."
    )


def _freeCaseId(caseId: str, taken: Callable[[str], bool]) -> str:
    """`caseId`, or `caseId-2`, `caseId-3`... the first name not `taken`."""
    number = 2
    while taken(candidate := f"{caseId}-{number}"):
        number += 1
    return candidate


@contextlib.contextmanager
def _quietVtk():
    """VTK/ITK reader errors go to the server log as one line of ours, not as ~100 of theirs."""
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)


def inUserTerms(message: str, aliases: dict[str, str]) -> str:
    """`message` with the server paths the user does not know replaced by what they know them as.

    Args:
        aliases: server path -> what the user knows it as (an upload's own file name).
    """
    for path, name in aliases.items():
        message = message.replace(path, name)
    return message


def userMessage(error: BaseException, aliases: dict[str, str]) -> str:
    """What the page says about an error: the user's file names, no server paths or internals.

    Args:
        error: the error raised.
        aliases: as for `inUserTerms`.
    """
    if not isinstance(error, SCNLandmarksError):
        return "Something went wrong on the server (the details are in its log). Your work is unchanged."
    message = inUserTerms(str(error), aliases)
    # Reader messages quoted from ITK/VTK carry class names and memory addresses: keep the file and the gist.
    if re.search(r"0x[0-9a-fA-F]{6,}|itk::|vtk[A-Z]", message):
        message = message.split(" (")[0].rstrip(":")
    return message


class LandmarkReviewApp(TrameApp):
    """Open → detect → correct → export: one review session on its own MRML scene.

    Args:
        server: a trame server (default: a new one).
        image: an image to open at start, or None.
        model: a catalogue model id or name, or a model file; default the first available model.
            It is loaded in the background at start, so the first detection is as quick as the next.
        device: "auto", "cpu" or "cuda".
        workdir: this session's temporary folder for uploads and exports (default: a new one).
        maxUploadBytes: the largest upload accepted.
        trainingFolder: where "Save as training pair" adds cases (a dataset folder shared by the
            station's sessions); default a folder of this session's own, removed with it. Fine-tuned
            models go to the user models folder (`catalogue.userModelsFolder`), as the module's do.
        dataRoots: the folders a path typed in the page may open files from (none: no typed paths).
        reviewer: who reviews (the station's per-browser id; default a new one): the training
            cases they saved are theirs to replace.
        autosaveFolder: where corrections not exported are kept after each change (see `autosave`);
            the reviewer's other sessions' folders beside it are offered back. None: not kept.
        endedMessage: what the page says when its session has ended under it (HTML).
    """

    def __init__(
        self,
        server=None,
        image: str | Path | None = None,
        model: str | None = None,
        device: str = "auto",
        workdir: Path | None = None,
        maxUploadBytes: int = 512 * 1024**2,
        trainingFolder: Path | None = None,
        dataRoots: Sequence[Path] = (),
        reviewer: str | None = None,
        autosaveFolder: Path | None = None,
        endedMessage: str = ENDED_MESSAGE,
    ):
        super().__init__(server)
        self.dataRoots = [Path(root).resolve() for root in dataRoots]
        self.device = device
        self.maxUploadBytes = maxUploadBytes
        self._ownWorkdir = None if workdir else tempfile.TemporaryDirectory(prefix="scn-landmarks-web-")
        self.workdir = Path(workdir) if workdir else Path(self._ownWorkdir.name)
        self.trainingFolder = Path(trainingFolder) if trainingFolder else self.workdir / "training-pairs"
        self.endedMessage = endedMessage
        self.finetuneCancelRequested = False  # (a Cancel may come before the job has started)
        self.slicerApp = SlicerApp()
        register_rca_factories(self.slicerApp.view_manager, self.server, slice_view_ui_f=self._sliceViewGutter)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout_dict(self._layouts())
        self.layoutManager.set_layout(LAYOUT_2D)
        self.logic = SCNLandmarksLogic(self.slicerApp.scene, self.slicerApp.app_logic)
        # One worker: model loads and detections run one after the other, never two models at once.
        self.modelWorker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scn-landmarks-model")
        self.modelLoads = 0
        self.volumeNode = None
        self.imagePath: Path | None = None
        self.detectionModel = ""  # the model file of the current detection
        # The detection under review, its corrections, export, training pairs and fine-tuning: this
        # page only shows the session and passes the user's actions to it.
        self.review = ReviewSession(self.logic)
        self.review.listen(self._onReviewChanged)
        self.marks = ViewMarks(self.slicerApp.scene, self._sliceNodes, self._showViewNames)
        self.grabObserver: int | None = None
        self.lastTableRefresh = 0.0
        self.cancelRequested = False
        self.detection: asyncio.Task | None = None
        self.pendingAction: Callable[[], None] | None = None
        self.pathAliases: dict[str, str] = {}
        if not trainingFolder:
            self.pathAliases[str(self.trainingFolder)] = "the session's training folder"
        self.models: dict[str, catalogue.ModelEntry] = {}
        self._refreshModels()
        self._initialState(model)
        self.autosave = Autosave(None, self.workdir)  # (a session started ahead keeps nothing yet)
        self.forReviewer(reviewer, autosaveFolder)
        self._buildUi()
        self._observeViews()
        self.server.controller.on_server_ready.add(self._preloadModel)
        if image:
            self.openImage(image)

    # ------------------------------------------------------------------------------------------
    # state

    def _initialState(self, model: str | None) -> None:
        state = self.state
        state.trame__title = "SCN Landmarks"
        chosen = self._catalogueId(model) if model else next(iter(self.models), None)
        state.model_id = chosen
        state.model_path = model if model and chosen is None else ""
        state.image_path = ""
        state.image_name = ""
        state.upload_key = 0
        state.data_roots = ", ".join(str(root) for root in self.dataRoots)
        state.max_upload_bytes = self.maxUploadBytes
        state.export_name = "landmarks.mrk.json"
        state.is_2d = True
        state.busy = False
        state.model_loading = False
        state.progress = 0
        state.progress_message = ""
        state.error = ""
        state.info = ""
        state.landmarks = []
        state.calibrated = False
        state.coverage_percent = ""  # "90" when the model gives 90 % coverage radii
        state.error_unit = "mm"
        state.selected_landmark = None
        state.view_names = {}  # view name -> the names it shows, comma-separated
        state.can_undo = False
        state.unsaved = False
        state.confirm_discard = False
        state.panel_open = True
        state.help_open = False
        state.heatmap_visible = False
        state.heatmap_kind = "final"
        state.heatmap_kind_items = [
            {"title": label, "value": kind} for kind, label in SCNLandmarksLogic.heatmapKinds().items()
        ]
        state.heatmap_landmark = ALL_LANDMARKS
        state.heatmap_landmark_items = [ALL_LANDMARKS]
        state.heatmap_opacity = 0.5
        state.cursor_position = ""
        state.position_unit = "LPS, mm"
        state.training_open = False
        state.recovery = ""
        state.recovery_export_name = ""
        # Shown instead of the page when its session ends under it (the station restarts, say).
        state.trame__template_error = (
            '<div style="font-family: sans-serif; margin: 3em; max-width: 40em;"><h2 id="title">This review '
            f'session has ended</h2><p id="message">{self.endedMessage}</p></div>'
        )
        state.training_folder = self.pathAliases.get(str(self.trainingFolder), str(self.trainingFolder))
        state.training_folder_kept = str(self.trainingFolder) not in self.pathAliases
        state.training_cases = ""
        state.case_id = ""
        state.confirm_replace_case = False
        state.finetune_minutes = DEFAULT_FINETUNE_MINUTES
        state.finetune_name = ""
        state.finetuning = False
        state.finetune_progress = 0
        state.finetune_message = ""
        state.finetune_result = ""
        state.finetune_added = False
        state.finetune_error = ""
        self._describeTrainingFolder()
        state.change("heatmap_visible", "heatmap_kind", "heatmap_landmark")(self._onHeatmapChoice)
        state.change("heatmap_opacity")(self._onHeatmapOpacity)
        state.change("selected_landmark")(self._onSelection)
        # A model chosen (by the reviewer, or for an image's dimension) loads while the image is opened.
        state.change("model_id")(self._preloadModel)

    def forReviewer(self, reviewer: str | None, autosaveFolder: Path | None) -> None:
        """Whose review this is: the station starts a session before its reviewer comes (a warm spare),
        and names the reviewer when it hands the session over.

        Args:
            reviewer: the station's per-browser id (None: a new one): the training cases they saved
                are theirs to replace.
            autosaveFolder: as for the constructor.
        """
        # Kept in shared folders as a digest only: the id itself is the browser's cookie.
        self.reviewerDigest = hashlib.sha256(
            f"scn-landmarks reviewer {reviewer or secrets.token_urlsafe(16)}".encode()
        ).hexdigest()[:16]
        self.autosave.close()
        self.autosave = Autosave(autosaveFolder, self.workdir)
        self.recoverable: list[Recoverable] = self.autosave.others()
        self._offerRecovery()

    def _refreshModels(self) -> None:
        """The model list: the shipped models and the user's (which any session may have added to)."""
        self.models = {entry.id: entry for entry in catalogue.availableModels()}
        self.state.model_items = [{"title": e.name, "value": e.id} for e in self.models.values()]

    def onModelMenu(self, opened: bool) -> None:
        if opened:
            self._refreshModels()

    def _catalogueId(self, model: str) -> str | None:
        return next((i for i, e in self.models.items() if model in (i, e.name)), None)

    def _modelPath(self, modelId: str | None, modelPath: str) -> str:
        """The chosen model file: a typed path wins over the catalogue choice."""
        if (modelPath or "").strip():
            return modelPath.strip()
        entry = self.models.get(modelId)
        return str(entry.path) if entry else ""

    def _showError(self, error: BaseException) -> None:
        if isinstance(error, SCNLandmarksError):
            logger.warning("%s", error)
        else:
            logger.error("web app action failed", exc_info=error)
        self.state.error = userMessage(error, self.pathAliases)
        self.state.info = ""

    def _unlessUnsaved(self, action: Callable[[], None]) -> None:
        """Run `action`, or first ask (export / discard / cancel) when corrections are not exported."""
        if self.review.unsaved and self.review.markupsNode is not None:
            self.pendingAction = action
            self.state.confirm_discard = True
        else:
            action()

    def proceed(self) -> None:
        """The user chose to go on (after exporting, or discarding the corrections)."""
        action, self.pendingAction = self.pendingAction, None
        self.state.confirm_discard = False
        if action is not None:
            action()  # it clears `unsaved` once it has really replaced the corrections (not if cancelled)

    def keepWork(self) -> None:
        self.pendingAction = None
        self.state.confirm_discard = False

    # ------------------------------------------------------------------------------------------
    # the model, in the background

    def _preloadModel(self, **_) -> None:
        """Load the chosen model (and torch) now, so the first detection is as quick as the next."""
        path = self._modelPath(self.state.model_id, self.state.model_path)
        if path:
            asyncio.get_event_loop().create_task(self._preload(path))

    async def _preload(self, path: str) -> None:
        try:
            await self._loadModel(path)
        except Exception as error:  # a detection with this model will say what is wrong
            logger.warning("model %s not preloaded: %s", path, error)

    async def _loadModel(self, path: str):
        """The model as a Predictor, loaded on the model worker (cached: quick once loaded)."""
        with self.state:
            self.modelLoads += 1
            self.state.model_loading = True
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.modelWorker, self.logic.loadPredictor, path, self.device
            )
        finally:
            with self.state:
                self.modelLoads -= 1
                self.state.model_loading = self.modelLoads > 0

    # ------------------------------------------------------------------------------------------
    # opening images

    def openImage(self, path: str | Path) -> None:
        """Open an image file (any format the module reads) and show it; replaces the current one."""
        self.state.error = ""
        name = self.pathAliases.get(str(path), Path(path).name)
        try:
            with _quietVtk():
                volumeNode = loadVolumeFile(self.slicerApp.scene, path)
            try:
                checkScalarVolume(volumeNode)  # refused now, not at the first detection
            except SCNLandmarksError as error:
                self._removeVolume(volumeNode)
                if isinstance(error, ColourImageError):  # (its own message names a Slicer module)
                    raise SCNLandmarksError(
                        f"{name}: a colour image (red, green and blue differ); landmarks are detected on grey "
                        "images. Save it as a greyscale image (8 or 16 bits) and open that."
                    ) from None
                raise
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)
            return
        self._clearDetection()
        if self.volumeNode is not None:
            self._removeVolume(self.volumeNode)
        self.volumeNode = volumeNode
        self.imagePath = Path(path)
        is2d = volumeDimension(volumeNode) == 2
        self.state.is_2d = is2d
        self.layoutManager.set_layout(LAYOUT_2D if is2d else LAYOUT_3D)
        self.slicerApp.display_manager.show_volume(volumeNode, do_reset_views=True)
        self.state.image_name = name
        # X-ray photos (PNG, JPEG...) carry no spacing: their positions are pixel columns and rows.
        unit = "pixels" if spacing_unit(path) == "px" else "mm"
        self.state.position_unit = f"x, y in {unit}" if is2d else f"LPS, {unit}"
        self.state.cursor_position = ""  # the old readout belongs to the old image
        self.state.export_name = f"{image_stem(name) or 'landmarks'}.mrk.json"
        self.state.case_id = safe_filename(image_stem(name), "case")
        self._markSaved()
        self.state.info = f"Opened {name}." + self._modelForDimension(2 if is2d else 3)

    def _modelForDimension(self, dimension: int) -> str:
        """Choose a catalogue model of the image's dimension when the chosen one is of the other (a
        cephalogram opened while the brain model is chosen); what changed, for the page, or ""."""
        chosen = self.models.get(self.state.model_id)
        if self.state.model_path.strip() or chosen is None or chosen.dimension in (None, dimension):
            return ""
        entry = next((e for e in self.models.values() if e.available and e.dimension == dimension), None)
        if entry is None:
            return ""
        self.state.model_id = entry.id
        return f" The model is now {entry.name}: {chosen.name} detects in {chosen.dimension}D images."

    def _removeVolume(self, volumeNode) -> None:
        """The volume and the nodes that came with it (storage, display) leave the scene."""
        scene = self.slicerApp.scene
        companions = [volumeNode.GetStorageNode()]
        companions += [volumeNode.GetNthDisplayNode(i) for i in range(volumeNode.GetNumberOfDisplayNodes())]
        scene.RemoveNode(volumeNode)
        for node in companions:
            if node is not None:
                scene.RemoveNode(node)

    def openTypedPath(self, path: str) -> None:
        """Open a file on the server, if it lies in the station's data folders (`access.dataFile`)."""
        try:
            found = access.dataFile(path or "", self.dataRoots)
        except SCNLandmarksError as error:
            self._showError(error)
            return
        self._unlessUnsaved(lambda: self.openImage(found))

    def openSample(self) -> None:
        self._unlessUnsaved(self._openSample)

    def _openSample(self) -> None:
        """Open the bundled sample of the chosen catalogue model; for a model of the user's, the sample of the
        shipped model with its landmarks (its base, usually); else another model's, and say so."""
        chosen = self.models.get(self.state.model_id)
        if chosen is not None and chosen.userModel:
            sameLandmarks = self._shippedSampleFor(chosen)
            if sameLandmarks is not None:
                self.openImage(sameLandmarks.sample)
                return
        entry = chosen if chosen is not None and chosen.sample is not None else catalogue.sampleModel()
        if entry is None or entry.sample is None:
            self.state.error = "No bundled sample image in this installation."
            return
        self.openImage(entry.sample)
        if entry is not chosen and not self.state.error:
            self.state.model_id = entry.id
            self.state.model_path = ""
            why = f"{chosen.name} has no sample image" if chosen is not None else "no model was chosen"
            self.state.info = f"Opened the sample of {entry.name}; the model is now {entry.name} ({why})."

    @staticmethod
    def _shippedSampleFor(userEntry: catalogue.ModelEntry) -> catalogue.ModelEntry | None:
        """The shipped model with a sample whose landmarks are those of `userEntry`, or None."""
        try:
            names = read_description(userEntry.path).landmark_names
            return next(
                (
                    entry
                    for entry in catalogue.catalogueModels()
                    if entry.hasSample and entry.available and read_description(entry.path).landmark_names == names
                ),
                None,
            )
        except SCNLandmarksError as error:
            logger.warning("%s", error)
            return None

    def uploadImage(self, files: list[dict[str, Any]] | None) -> None:
        """Open an uploaded image (stored in this session's temporary folder only)."""
        self.state.upload_key += 1  # a fresh, empty file field: a rejected file's name does not linger
        if not files:
            return
        upload = ClientFile(files[0] if isinstance(files, list) else files)
        name = Path(str(upload.name or "")).name or "upload"
        if upload.is_empty:
            self.state.error = f"{name}: the browser sent no content."
            return
        if len(upload.content) > self.maxUploadBytes:
            self.state.error = (
                f"{name}: {len(upload.content) / 1024**2:.0f} MB is more than this station accepts "
                f"({self.maxUploadBytes / 1024**2:.0f} MB)."
            )
            return
        path = Path(tempfile.mkdtemp(dir=self.workdir, prefix="upload-")) / re.sub(r"[^\w.+-]", "_", name)
        try:
            path.write_bytes(upload.content)
        except OSError as error:
            shutil.rmtree(path.parent, ignore_errors=True)
            logger.error("%s: upload not stored: %s", path, error)
            self.state.error = f"{name}: the server could not store the file ({error.strerror or error})."
            return
        self.pathAliases[str(path)] = name
        self._unlessUnsaved(lambda: self.openImage(path))

    # ------------------------------------------------------------------------------------------
    # detection

    def detect(self, modelId: str | None, modelPath: str) -> None:
        """Start detection with the model shown (the page sends it with the click); returns at once."""
        if self.state.busy:
            return
        self._unlessUnsaved(lambda: self._startDetection(self._modelPath(modelId, modelPath)))

    def _startDetection(self, modelPath: str, then: Callable[[], None] | None = None) -> None:
        """Detect on the open image in the background; `then` runs once the result is shown."""
        state = self.state
        state.error = ""
        if self.volumeNode is None:
            state.error = "Open an image first (file, path or sample)."
            return
        self.cancelRequested = False
        state.busy = True
        state.progress, state.progress_message = 0, "loading model"
        self._holdPoints(True)  # the new result replaces them: a correction made meanwhile would be lost
        self.detection = asyncio.get_event_loop().create_task(self._detect(modelPath, then))

    def _holdPoints(self, held: bool) -> None:
        """Lock (or unlock) the point list under review against drags in the views."""
        node = self.review.markupsNode
        if node is not None:
            node.SetLocked(held)

    async def _detect(self, modelPath: str, then: Callable[[], None] | None) -> None:
        """Load (if needed) and run the model off the main thread; the scene changes only on success."""
        loop = asyncio.get_running_loop()

        def progress(fraction: float, message: str) -> None:
            loop.call_soon_threadsafe(self._showProgress, fraction, message)

        def cancelled() -> bool:
            return self.cancelRequested

        try:
            predictor = await self._loadModel(modelPath)
            if cancelled():
                raise Cancelled(CANCELLED)
            job = self.logic.prepareDetection(self.volumeNode, predictor, self.device, progress, cancelled)
            await loop.run_in_executor(self.modelWorker, self.logic.runDetection, job)
            if cancelled():
                raise Cancelled(CANCELLED)
            with self.state:
                self.state.error_unit = predictor.description.unit
                self.detectionModel = modelPath
                self._showResult(self.logic.finishDetection(job))
                if then is not None:
                    then()
        except Cancelled:
            with self.state:
                self.state.info = CANCELLED
        except Exception as error:  # the page shows it; the server carries on
            with self.state:
                self._showError(error)
        finally:
            with self.state:
                self.state.busy = False
                self._holdPoints(False)  # (the previous result, when this one did not replace it)

    def _showResult(self, result) -> None:
        self._clearDetection()  # the previous result goes only once the new one is there
        node = result.markupsNode
        # The views name points near their slice only (see `marks`): the point list itself names none.
        node.GetDisplayNode().SetPointLabelsVisibility(False)
        self.marks.setLandmarks(node, self.logic.shortLandmarkNames(node))
        self.review.setDetection(node)
        self.state.calibrated = self.review.calibrated
        coverage = predictionCoverage(node)
        self.state.coverage_percent = "" if coverage is None else f"{100 * coverage:g}"
        # Dragging a point selects it (the session itself sees the drag's start and end).
        self.grabObserver = node.AddObserver(node.PointStartInteractionEvent, self._onPointGrabbed)
        display = node.GetDisplayNode()
        if display is not None and not self.state.is_2d:
            # Each of the three views shows every landmark: those off its slice as faded projections.
            display.SetSliceProjection(True)
            display.SetSliceProjectionUseFiducialColor(True)
            display.SetSliceProjectionOpacity(PROJECTION_OPACITY)
        self.state.heatmap_landmark_items = [ALL_LANDMARKS, *result.landmarkNames]
        self.state.heatmap_landmark = ALL_LANDMARKS
        self.state.info = result.summary
        self._markSaved()
        self._refreshTable()
        self._onHeatmapChoice()

    def cancel(self) -> None:
        self.cancelRequested = True
        self.state.progress_message = "cancelling"

    def _showProgress(self, fraction: float, message: str) -> None:
        if self.cancelRequested:
            return
        with self.state:
            self.state.progress = round(100 * fraction)
            self.state.progress_message = message

    def _clearDetection(self) -> None:
        """Forget the previous detection: its point list, heatmap and halos leave the scene."""
        node = self.review.markupsNode
        if node is not None and self.grabObserver is not None:
            node.RemoveObserver(self.grabObserver)
        self.grabObserver = None
        self.review.clear()
        self.marks.setLandmarks(None)
        self.state.coverage_percent = ""
        self.state.landmarks = []
        self.state.can_undo = False
        self.state.selected_landmark = None
        self.state.heatmap_visible = False

    # ------------------------------------------------------------------------------------------
    # review

    def _refreshTable(self) -> None:
        rows = []
        dimensions = 2 if self.state.is_2d else 3
        landmarkRows = self.review.rows()
        for index, row in enumerate(landmarkRows):
            lps = None if row.positionRas is None else ras_to_lps(np.asarray(row.positionRas)[None])[0]
            rows.append(
                {
                    "index": index,
                    "name": row.name,
                    "status": row.status,
                    "confidence": "" if not math.isfinite(row.confidence) else f"{row.confidence:.2f}",
                    "expected_error": f"{row.expectedError:.1f}" if math.isfinite(row.expectedError) else "",
                    "coverage_radius": f"{row.coverageRadius:.1f}" if math.isfinite(row.coverageRadius) else "",
                    "flagged": row.reviewFirst,
                    "position": "" if lps is None else ", ".join(f"{c:.1f}" for c in lps[:dimensions]),
                }
            )
        self.state.landmarks = rows
        self.state.can_undo = self.review.canUndo
        self.state.unsaved = self.review.unsaved
        self.lastTableRefresh = time.monotonic()
        self.marks.setRows(landmarkRows)

    def _onSelection(self, selected_landmark, **_) -> None:
        self.marks.select(selected_landmark)

    def _showViewNames(self, names: dict[str, list[str]]) -> None:
        with self.state:
            self.state.view_names = {view: ",".join(shown) for view, shown in names.items()}

    def _onPointGrabbed(self, caller, event) -> None:
        # The point under the mouse is the display node's active one: dragging a point selects it.
        display = caller.GetDisplayNode()
        index = display.GetActiveControlPoint() if display is not None else -1
        if index >= 0:
            with self.state:
                self.state.selected_landmark = index

    def _onReviewChanged(self, what: str) -> None:
        """The session's points changed: while a point is dragged the table follows at a readable
        rate; once they settle, the table, the undo button and the autosave follow."""
        if what == MOVING and time.monotonic() - self.lastTableRefresh <= TABLE_REFRESH_S:
            return
        if self.review.markupsNode is None:
            return
        with self.state:
            self._refreshTable()
            if what == CHANGED:
                self._keepCorrections()

    def undoMove(self) -> None:
        """Put the last moved (or reset) point back where it was before."""
        if self.state.busy:  # (a detection will replace the points)
            return
        index = self.review.undo()
        if index is not None:
            self.state.selected_landmark = index

    def selectLandmark(self, index: int) -> None:
        """Center the views on a landmark and, with a heatmap shown, show that landmark's heatmap."""
        if self.review.markupsNode is None:
            return
        self.state.selected_landmark = index
        self.logic.centerViewsOnLandmark(self.review.markupsNode, int(index))
        if self.state.heatmap_visible:
            self.state.heatmap_landmark = self.state.landmarks[int(index)]["name"]

    def nextToReview(self) -> None:
        """Center the views on the next point to check: largest expected error first (landmark order for
        a model without calibration), after the selected one; points the user moved count as checked."""
        if self.review.markupsNode is None:
            return
        index = self.review.nextToReview(self.state.selected_landmark)
        if index is None:
            self.state.selected_landmark = None  # the next click starts from the top again
            self.state.info = "Every point has been shown once; Next to review starts again from the first."
            return
        self.selectLandmark(index)

    def zoomToSelected(self) -> None:
        """Center the views on the selected landmark and zoom in around it."""
        if self.review.markupsNode is None or self.state.selected_landmark is None:
            return
        self.selectLandmark(int(self.state.selected_landmark))
        imageData = self.volumeNode.GetImageData()
        extent = np.abs(ijkToRasArray(self.volumeNode)[:3, :3] @ (np.array(imageData.GetDimensions()) - 1)).max()
        width = max(ZOOM_FRACTION * float(extent), 1.0)
        for sliceNode in self._sliceNodes():
            fieldOfView = np.array(sliceNode.GetFieldOfView())
            sliceNode.SetFieldOfView(width, width * fieldOfView[1] / fieldOfView[0], fieldOfView[2])

    def resetSelected(self) -> None:
        if self.review.markupsNode is not None and self.state.selected_landmark is not None and not self.state.busy:
            self.review.resetPoint(int(self.state.selected_landmark))

    def _onHeatmapChoice(self, **_) -> None:
        node = self.review.markupsNode
        if node is None or not self.logic.hasHeatmaps(node):
            return
        try:
            if self.state.heatmap_visible:
                landmark = self.state.heatmap_landmark
                everyLandmark = landmark == ALL_LANDMARKS
                heatmapNode = self.logic.showHeatmap(
                    node,
                    self.state.heatmap_kind,
                    None if everyLandmark else landmark,
                    float(self.state.heatmap_opacity),
                    scaledPerLandmark=everyLandmark,
                )
                if everyLandmark:
                    # Each landmark at its own peak 1: only the top of each shows, so neighbours stay apart.
                    display = heatmapNode.GetDisplayNode()
                    display.SetWindowLevelMinMax(ALL_LANDMARKS_FLOOR, 1.0)
                    display.SetLowerThreshold(ALL_LANDMARKS_FLOOR)
            else:
                self.logic.hideHeatmap(node)
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)

    def _onHeatmapOpacity(self, heatmap_opacity, **_) -> None:
        if self.review.markupsNode is not None and self.state.heatmap_visible:
            self.logic.setHeatmapOpacity(self.review.markupsNode, float(heatmap_opacity))

    # ------------------------------------------------------------------------------------------
    # views

    @staticmethod
    def _layouts() -> dict[str, Layout]:
        """One view for 2D images; for 3D the three orthogonal slices, axial the largest (as Slicer's)."""
        axial = ViewLayoutDefinition.axial_view()
        sideViews = Layout(
            LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]
        )
        return {
            LAYOUT_2D: Layout(LayoutDirection.Vertical, [axial]),
            LAYOUT_3D: Layout(LayoutDirection.Horizontal, [axial, sideViews], flex_sizes=["2", "1"]),
        }

    def _sliceViewGutter(self, server, viewId: str, view) -> None:
        """Reset-view button, and the slice slider for 3D images only (a 2D image has one slice)."""
        create_vertical_view_gutter_ui(server, viewId, view)
        tag = view.get_singleton_tag()
        html.Div(
            classes="slice-view",
            __properties=[("data_view", "data-view"), ("data_names", "data-names")],
            data_view=tag,
            data_names=(f"view_names['{tag}'] || ''",),  # the landmarks this view names (see `marks`)
            style="display: none;",
        )
        with html.Div(v_show="!is_2d", style="position: absolute; bottom: 0; left: 0; width: 100%;"):
            Slider(
                classes="slice-slider",
                typed_state=connect_slice_view_slider_to_state(server, view),
                theme="dark",
                dense=True,
            )

    def _sliceNodes(self) -> list:
        return [view.get_view_node() for view in self.slicerApp.view_manager.get_slice_views()]

    def _observeViews(self) -> None:
        """Show the position under the mouse (as Slicer's data probe), and drop points where released."""
        for view in self.slicerApp.view_manager.get_slice_views():
            interactor = view.interactor()
            sliceNode = view.get_view_node()
            interactor.AddObserver(
                "MouseMoveEvent",
                lambda caller, event, node=sliceNode: self._showCursor(node, caller.GetEventPosition()),
                1.0,
            )
            # Mouse moves are throttled on their way from the browser; the release carries the final
            # position, so a move there first puts a dragged point exactly where it was let go.
            interactor.AddObserver(
                "LeftButtonReleaseEvent", lambda caller, event: caller.InvokeEvent("MouseMoveEvent"), 10.0
            )

    def _showCursor(self, sliceNode, position) -> None:
        ras = matrixToArray(sliceNode.GetXYToRAS()) @ np.array([position[0], position[1], 0.0, 1.0])
        lps = ras_to_lps(ras[None, :3])[0]
        with self.state:
            self.state.cursor_position = ", ".join(f"{c:.2f}" for c in lps[: 2 if self.state.is_2d else 3])

    # ------------------------------------------------------------------------------------------
    # export

    def exportMarkups(self):
        """The current (corrected) points as a `.mrk.json` download (None, with the error shown, if none),
        as `scn-landmarks detect` writes them (the session's export)."""
        self.state.error = ""
        try:
            if self.review.markupsNode is None:
                raise SCNLandmarksError("Nothing to export: detect landmarks first.")
            # A new folder each time: nothing on the server is ever replaced.
            path = Path(tempfile.mkdtemp(dir=self.workdir, prefix="export-")) / "landmarks.mrk.json"
            self.review.export(path)
            content = path.read_bytes()
            path.unlink()
            self._markSaved()
            return self.server.protocol.addAttachment(content)
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)
            return None

    # ------------------------------------------------------------------------------------------
    # corrections kept across sessions (see `autosave`)

    def _markSaved(self) -> None:
        """The corrections are exported (or kept in the training folder), or there are none any more."""
        self.review.markSaved()
        self.state.unsaved = False
        self.autosave.clear()

    def _keepCorrections(self) -> None:
        """Write the corrections not exported to the autosave folder, where a later session finds them."""
        node = self.review.markupsNode
        if not self.review.unsaved or node is None or self.imagePath is None:
            return
        moved = {index: tuple(position) for index, position in self.review.movedPositions().items()}
        try:
            # Written as an export is (a copy: the corrections still count as not exported).
            self.autosave.write(
                self.imagePath,
                self.state.image_name,
                self.detectionModel,
                moved,
                lambda path: self.logic.exportLandmarks(node, path),
            )
        except (OSError, SCNLandmarksError) as error:  # the review goes on; the page still asks before leaving
            logger.warning("corrections not autosaved: %s", error)

    def _offerRecovery(self) -> None:
        kept = self.recoverable[0] if self.recoverable else None
        self.state.recovery = kept.summary if kept else ""
        self.state.recovery_export_name = f"{image_stem(kept.imageName) or 'landmarks'}.mrk.json" if kept else ""

    def downloadRecovered(self):
        """The kept corrections as a `.mrk.json` download (they stay offered until restored or discarded)."""
        if not self.recoverable:
            return None
        try:
            return self.server.protocol.addAttachment(self.recoverable[0].landmarks.read_bytes())
        except OSError as error:
            self._showError(error)
            return None

    def discardRecovered(self) -> None:
        if self.recoverable:
            kept = self.recoverable.pop(0)
            self.autosave.forget(kept)
            self.state.info = f"Discarded the kept corrections of {kept.imageName}."
        self._offerRecovery()

    def restoreRecovered(self) -> None:
        """Open the kept image, detect again with the same model, and put the moved points back."""
        if self.recoverable and not self.state.busy:
            self._unlessUnsaved(lambda: self._restore(self.recoverable[0]))

    def _restore(self, kept: Recoverable) -> None:
        path = kept.imagePath
        if path.is_relative_to(kept.folder):
            # The other session's copy of an upload becomes this session's (that folder goes once restored).
            own = Path(tempfile.mkdtemp(dir=self.workdir, prefix="restored-")) / path.name
            try:
                os.link(path, own)
                path = own
            except OSError as error:
                logger.warning("%s: restored from the autosave folder (%s)", path, error)
        self.pathAliases[str(path)] = kept.imageName
        self.openImage(path)
        if self.state.error:
            return
        entry = next((i for i, e in self.models.items() if str(e.path) == kept.modelPath), None)
        self.state.model_id, self.state.model_path = (entry, "") if entry else (self.state.model_id, kept.modelPath)
        self._startDetection(kept.modelPath, then=lambda: self._putBack(kept))

    def _putBack(self, kept: Recoverable) -> None:
        self.review.movePoints(kept.movedRas)  # now this session's (autosaved), before the other session's folder goes
        if kept in self.recoverable:
            self.recoverable.remove(kept)
        self.autosave.forget(kept)
        self._offerRecovery()
        self.state.info = (
            f"Restored your corrections of {kept.imageName} ({len(kept.movedRas)} moved); not exported yet."
        )

    # ------------------------------------------------------------------------------------------
    # learning from corrections

    def _saveLater(self, caseId: str, replace: bool, waitingSince: float) -> None:
        """Save the case once the session saving to the training folder now has finished."""
        if time.monotonic() - waitingSince > SAVE_WAIT_S:
            self.state.error = (
                f"Another session has been saving to the training folder for over {SAVE_WAIT_S:.0f} s; "
                f"case {caseId} was not saved. Try again."
            )
            return
        self.state.info = "Waiting for another session to finish saving to the training folder..."

        def retry() -> None:
            with self.state:
                self.saveTrainingPair(caseId, replace, waitingSince)

        asyncio.get_event_loop().call_later(SAVE_RETRY_S, retry)

    def _describeTrainingFolder(self) -> None:
        """How many cases the training folder holds (other sessions may add to a shared one)."""
        spec = self.trainingFolder / TRAINING_SPEC_NAME
        try:
            cases = len(load_dataset_spec(spec).entries) if spec.is_file() else 0
        except SCNLandmarksError as error:
            logger.warning("%s", error)
            self.state.training_cases = "its dataset.toml cannot be read (details in the server log)"
            return
        self.state.training_cases = caseCount(cases)

    def saveTrainingPair(self, caseId: str, replace: bool = False, waitingSince: float | None = None) -> None:
        """Add the image and its corrected points to the training folder as case `caseId`.

        A case of that name this reviewer saved is never replaced silently: the page asks first
        (`replace`). One saved by another reviewer of a shared folder (or by anything else) is never
        replaced from here: this case gets the next free name (`name-2`...), and the page says so.
        While another session saves to the folder, this one tries again shortly (`waitingSince`: when
        it first tried), never waiting on the event loop.
        """
        self.state.error = ""
        self.state.confirm_replace_case = False
        folder = self.trainingFolder
        renamedFrom = None
        try:
            if self.review.markupsNode is None:
                raise SCNLandmarksError("Nothing to save: detect landmarks (and correct them) first.")
            caseId = safe_filename((caseId or "").strip() or self.state.case_id, "case")
            # Checked and written under the folder's lock: two sessions may save the same name at once.
            with lockIfFree(folder / TRAINING_FOLDER_LOCK) as locked:
                if not locked:
                    self._saveLater(caseId, replace, waitingSince or time.monotonic())
                    return
                owners = _caseOwners(folder)

                def taken(name: str) -> bool:
                    return bool(self.logic.existingFiles(self.review.trainingPairPaths(folder, name)))

                if taken(caseId) and owners.get(caseId) != self.reviewerDigest:
                    renamedFrom, caseId = caseId, _freeCaseId(caseId, taken)
                elif taken(caseId) and not replace:
                    self.state.case_id = caseId
                    self.state.confirm_replace_case = True
                    return
                # A folder that goes with the session keeps nothing: the corrections still need exporting.
                self.review.saveTrainingPair(folder, caseId, overwrite=True, keeps=self.state.training_folder_kept)
                owners[caseId] = self.reviewerDigest
                write_text_atomically(folder / CASE_OWNERS_FILE, json.dumps(owners, indent=1))
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)
            return
        self.state.case_id = caseId
        self._describeTrainingFolder()
        self.state.finetune_error = ""  # (it may say the folder had no cases yet)
        saved = f"Saved case {caseId} to the training folder ({self.state.training_cases})."
        if renamedFrom is not None:
            saved = (
                f"The training folder already holds a case named {renamedFrom}, saved by another reviewer; "
                f"yours is saved beside it as {caseId} ({self.state.training_cases})."
            )
        if self.state.training_folder_kept:
            self._markSaved()  # the corrections are kept, on the server
        else:
            saved += " This folder is removed when the session ends: export the points to keep them."
        self.state.info = saved

    def startFinetune(self, modelId: str | None, modelPath: str, minutes, name: str = "") -> None:
        """Fine-tune the chosen model on the training folder's cases, in a process of its own; returns at once.

        The module's training job does it: the new model joins the user models folder (every
        session's model list, after restarts too); a Cancel keeps the best model so far.
        """
        state = self.state
        state.finetune_error = state.finetune_result = ""
        if state.finetuning:
            return  # one fine-tuning per session
        try:
            minutes = float(minutes)
        except (TypeError, ValueError):
            minutes = math.nan
        base = self._modelPath(modelId, modelPath)
        if not 0 < minutes <= MAX_FINETUNE_MINUTES:
            state.finetune_error = f"Give the training time in minutes (more than 0, at most {MAX_FINETUNE_MINUTES:g})."
        elif not base or not Path(base).is_file():
            state.finetune_error = "Choose the model to start from (the Model list or a model file)."
        elif not (self.trainingFolder / TRAINING_SPEC_NAME).is_file():
            state.finetune_error = "The training folder holds no cases yet: save a training pair first."
        if state.finetune_error:
            return
        state.finetuning = True
        state.finetune_progress = 0
        state.finetune_message = "starting: reading the base model and the cases"
        self.finetuneCancelRequested = False
        asyncio.get_event_loop().create_task(self._finetune(Path(base), minutes, (name or "").strip()))

    async def _finetune(self, base: Path, minutes: float, name: str) -> None:
        try:
            # (Reads the cases and the base model before starting: off the event loop.)
            job = await asyncio.to_thread(
                self.review.startTraining, self.trainingFolder, base, name, minutes, self.device
            )
            if self.finetuneCancelRequested:
                job.cancel()
            while True:
                outcome = await asyncio.to_thread(self.review.pollTraining, TRAINING_POLL_S)
                self._showFinetuneProgress(job)  # the last figures too: a short run may end between two looks
                if outcome is not None:
                    break
            with self.state:
                if outcome.entry is not None:
                    self._refreshModels()
                    self.state.model_id = outcome.entry.id
                    self.state.model_path = ""
                added = " It is chosen in the model list." if outcome.entry is not None else ""
                self.state.finetune_added = outcome.entry is not None
                self.state.finetune_result = inUserTerms(outcome.message, self.pathAliases) + added
        except Exception as error:  # the page says what happened, the server carries on
            with self.state:
                if isinstance(error, SCNLandmarksError):
                    logger.warning("%s", error)
                else:
                    logger.error("fine-tuning failed", exc_info=error)
                self.state.finetune_error = userMessage(error, self.pathAliases)
        finally:
            with self.state:
                self.state.finetuning = False

    def _showFinetuneProgress(self, job: TrainingJob) -> None:
        progress = job.progress
        if progress is None:
            return
        with self.state:
            self.state.finetune_progress = round(100 * progress.fraction)
            self.state.finetune_message = progress.text + (f" ({CANCELLING_FINETUNE})" if job.cancelRequested else "")

    def cancelFinetune(self) -> None:
        """Stop the fine-tuning at its next iteration; the best model so far is still added."""
        if not self.state.finetuning:
            return
        self.finetuneCancelRequested = True
        self.review.cancelTraining()
        self.state.finetune_message = CANCELLING_FINETUNE

    def shutdown(self) -> None:
        """The session is ending: no training outlives it, and its unfinished model is removed. Its
        corrections not exported stay in the autosave folder for the reviewer's next session."""
        self.review.endTraining()
        self.autosave.close()

    # ------------------------------------------------------------------------------------------
    # page

    def _buildUi(self) -> None:
        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("SCN Landmarks")
            self.ui.toolbar.density = "compact"
            # ≡ hides the controls, so that the views take the whole width, and shows them again.
            self.ui.icon.click = "panel_open = !panel_open"
            self.ui.icon.id = "panel-toggle"
            with self.ui.toolbar:
                v.VSpacer()
                html.Div("{{ image_name }}", classes="text-body-2 mx-4", id="image-name")
                html.Div(
                    "cursor ({{ position_unit }}): {{ cursor_position || '-' }}",
                    classes="text-caption mx-4",
                    style="min-width: 260px;",
                    id="cursor-position",
                )
                v.VBtn(
                    "Training",
                    prepend_icon="mdi-school-outline",
                    variant="text",
                    click=self.toggleTraining,
                    id="training-button",
                )
                v.VBtn(
                    icon="mdi-help-circle-outline",
                    variant="text",
                    id="help-button",
                    click="help_open = !help_open; training_open = false",
                )
            self.ui.footer.hide()
            with self.ui.content:
                with html.Div(classes="d-flex", style="height: calc(100vh - 48px);"):
                    # The table takes the height left; everything else keeps its size, so every
                    # control stays on screen however many landmarks there are.
                    with html.Div(
                        v_show="panel_open",
                        classes="pa-2",  # (a class setting display would win over v-show)
                        style="display: flex; flex-direction: column; width: 400px; flex: none; height: 100%; "
                        "overflow: hidden;",
                        id="panel",
                    ):
                        with html.Div(style="flex: none;"):
                            self._recoveryPanel()
                            self._openPanel()
                            self._detectPanel()
                        self._landmarkTable()
                        with html.Div(style="flex: none;"):
                            self._landmarkActions()
                            self._heatmapPanel()
                    with html.Div(classes="flex-grow-1", style="min-width: 0; position: relative;", id="views"):
                        self.layoutManager.initialize_layout_grid(self.ui)
                        self._helpCard()
                        self._trainingCard()
            self._confirmDialog()
            self._replaceCaseDialog()
            client.Script(LEAVE_GUARD_SCRIPT)
            client.Style(PAGE_STYLE)
            client.ClientStateChange(value="selected_landmark", change=SHOW_SELECTED_ROW)

    def _recoveryPanel(self) -> None:
        """The corrections another session of this reviewer left unexported: restore, download or discard."""
        download = self.server.controller.trigger_name(self.downloadRecovered)
        with v.VAlert(v_if="recovery", type="warning", density="compact", classes="mb-2", id="recovery"):
            html.Div(
                "Corrections not exported, kept from an earlier session: {{ recovery }}.",
                classes="text-body-2",
                id="recovery-text",
            )
            with html.Div(classes="d-flex mt-1", style="gap: 4px;"):
                v.VBtn("Restore", click=self.restoreRecovered, size="small", disabled=("busy",), id="recovery-restore")
                v.VBtn(
                    "Download .mrk.json",
                    size="small",
                    variant="tonal",
                    id="recovery-download",
                    click=(
                        f"trigger('{download}').then(content => {{ if (content) {{ "
                        "utils.download(recovery_export_name, content, 'application/json'); } })"
                    ),
                )
                v.VBtn("Discard", click=self.discardRecovered, size="small", variant="text", id="recovery-discard")

    def _openPanel(self) -> None:
        trigger = self.server.controller.trigger_name
        limit_check = (
            "$event.target.files[0] && $event.target.files[0].size > max_upload_bytes ? "
            "(error = $event.target.files[0].name + ': larger than this station accepts ('"
            " + Math.round(max_upload_bytes / 1048576) + ' MB).', upload_key++) : "
        )
        with html.Div(classes="d-flex align-center"):
            v.VFileInput(
                label="Upload an image",
                density="compact",
                hide_details=True,
                id="upload",
                key=("upload_key",),
                disabled=("busy",),
                prepend_icon="",
                change=f"{limit_check}trigger('{trigger(self.uploadImage)}', [$event.target.files])",
            )
            v.VBtn(
                "Sample", click=self.openSample, variant="tonal", disabled=("busy",), classes="ml-2", id="open-sample"
            )
        # Only with data folders (--data-root): the page opens no other files of the server.
        with html.Div(v_if="data_roots", classes="d-flex align-center mt-2"):
            v.VTextField(
                v_model=("image_path",),
                label="or a file on the server",
                title=("'In ' + data_roots",),
                density="compact",
                hide_details=True,
                id="image-path",
            )
            v.VBtn(
                "Open",
                click=f"trigger('{trigger(self.openTypedPath)}', [image_path])",
                classes="ml-2",
                disabled=("busy",),
                id="open-path",
            )

    def _detectPanel(self) -> None:
        trigger = self.server.controller.trigger_name
        with html.Div(classes="d-flex align-center mt-2"):
            v.VSelect(
                v_model=("model_id",),
                items=("model_items",),
                label="Model",
                density="compact",
                hide_details=True,
                update_menu=(self.onModelMenu, "[$event]"),
                id="model",
            )
            v.VChip("loading model", v_show="model_loading", size="small", classes="ml-2", id="model-loading")
            v.VBtn(
                "Detect",
                prepend_icon="mdi-crosshairs-gps",
                click=f"trigger('{trigger(self.detect)}', [model_id, model_path])",
                color="primary",
                disabled=("busy",),
                classes="ml-2",
                id="detect",
                title="Detect the landmarks with the chosen model",
            )
            v.VBtn("Cancel", click=self.cancel, v_show="busy", classes="ml-2", id="cancel")
        v.VTextField(
            v_model=("model_path",),
            label="or a model file on the server (.safetensors)",
            density="compact",
            hide_details=True,
            classes="mt-2",
            id="model-path",
        )
        v.VProgressLinear(
            v_show="busy",
            model_value=("progress",),
            indeterminate=("progress_message === 'loading model'",),
            height=6,
            classes="mt-2",
            id="progress",
        )
        html.Div("{{ progress_message }}", v_show="busy", classes="text-caption", id="progress-message")
        v.VAlert(text=("error",), v_show="error", type="error", density="compact", classes="mt-2", id="error")
        v.VAlert(text=("info",), v_show="info && !error", type="success", density="compact", classes="mt-2", id="info")

    def _landmarkTable(self) -> None:
        trigger = self.server.controller.trigger_name
        with v.VTable(
            density="compact",
            fixed_header=True,
            hover=True,
            classes="mt-2",
            style="flex: 1 1 0; min-height: 120px; overflow-y: auto;",
            id="landmarks",
        ):
            with html.Thead():
                with html.Tr():
                    html.Th("Landmark")
                    html.Th(
                        "Exp. error ({{ error_unit }})",
                        v_if="calibrated",
                        title="The error this point is expected to have (from the model's calibration)",
                    )
                    html.Th(
                        "{{ coverage_percent }} % radius ({{ error_unit }})",
                        v_if="coverage_percent",
                        title="The true point lies within this distance of the point with this probability "
                        "(from the model's calibration, per landmark)",
                    )
                    html.Th("Conf.", title="The model's confidence in [0, 1]")
                    html.Th("Status")
            with html.Tbody():
                with html.Tr(
                    v_for="row in landmarks",
                    key="row.index",
                    click=f"trigger('{trigger(self.selectLandmark)}', [row.index])",
                    classes=("{ 'bg-blue-lighten-4': row.index === selected_landmark }",),
                    style="cursor: pointer;",
                    __properties=[
                        ("data_name", "data-name"),
                        ("data_position", "data-position"),
                        ("data_flagged", "data-flagged"),
                    ],
                    data_name=("row.name",),
                    data_position=("row.position",),
                    data_flagged=("row.flagged",),
                ):
                    html.Td("{{ row.name }}")
                    with html.Td(
                        v_if="calibrated",
                        classes="expected-error",
                        style=("row.flagged ? 'color: #e65100; font-weight: bold' : ''",),
                    ):
                        html.Span("{{ row.expected_error }}")
                        v.VIcon(
                            "mdi-alert",
                            v_if="row.flagged",
                            size="x-small",
                            classes="ml-1",
                            color="orange-darken-3",
                            title="Above this landmark's usual error: check it",
                        )
                    html.Td("{{ row.coverage_radius }}", v_if="coverage_percent", classes="coverage-radius")
                    html.Td("{{ row.confidence }}")
                    html.Td(
                        "{{ row.status }}",
                        classes="landmark-status",
                        style=(f"row.status === '{LandmarkStatus.MOVED}' ? 'font-weight: bold' : ''",),
                    )

    def _landmarkActions(self) -> None:
        html.Div(
            "{{ selected_landmark === null ? 'Click a row or drag a point.' : "
            "landmarks[selected_landmark].name + ' (' + landmarks[selected_landmark].status + '): ' + "
            "landmarks[selected_landmark].position + ' (' + position_unit + ')' }}",
            v_show="landmarks.length",
            classes="text-caption mt-1 text-truncate",
            id="details-text",
        )
        with html.Div(classes="d-flex align-center mt-1", style="gap: 4px;"):
            v.VBtn(
                "Next to review",
                prepend_icon="mdi-arrow-right-bold",
                click=self.nextToReview,
                disabled=("!landmarks.length",),
                size="small",
                color="orange-darken-3",
                variant="tonal",
                id="next-to-review",
                title="Center the views on the next point to check, largest expected error first",
            )
            # Icons, their names in the tooltips: the buttons stay on one line, and the table gets the room.
            for icon, click, enabled, identifier, name in (
                (
                    "mdi-restore",
                    self.resetSelected,
                    "selected_landmark !== null && !busy",
                    "reset-point",
                    "Reset point",
                ),
                ("mdi-undo", self.undoMove, "can_undo && !busy", "undo-move", "Undo move"),
                ("mdi-magnify-plus-outline", self.zoomToSelected, "selected_landmark !== null", "zoom-to", "Zoom to"),
            ):
                v.VBtn(
                    icon=icon,
                    click=click,
                    disabled=(f"!({enabled})",),
                    size="small",
                    density="comfortable",
                    variant="tonal",
                    id=identifier,
                    title=name,
                )
            v.VSpacer()
            v.VBtn(
                "Export",
                title="Export .mrk.json: the corrected points, as scn-landmarks detect writes them",
                prepend_icon="mdi-download",
                disabled=("!landmarks.length",),
                size="small",
                color="primary",
                id="export",
                click=self._exportScript(),
            )

    def _exportScript(self, then: str = "") -> str:
        """Client code: fetch the export and download it; `then` runs only when it succeeded."""
        trigger = self.server.controller.trigger_name(self.exportMarkups)
        return (
            f"trigger('{trigger}').then(content => {{ if (content) {{ "
            f"utils.download(export_name, content, 'application/json'); {then} }} }})"
        )

    def _heatmapPanel(self) -> None:
        with html.Div(classes="d-flex align-center mt-2"):
            v.VSwitch(
                v_model=("heatmap_visible",),
                label="Heatmap",
                density="compact",
                hide_details=True,
                disabled=("!landmarks.length",),
                color="primary",
                id="heatmap-visible",
                style="flex: none;",
            )
            v.VSlider(
                v_model=("heatmap_opacity",),
                min=0,
                max=1,
                step=0.05,
                density="compact",
                hide_details=True,
                disabled=("!heatmap_visible",),
                classes="ml-4",
                id="heatmap-opacity",
                prepend_icon="mdi-opacity",
            )
        with html.Div(v_if="heatmap_visible", classes="d-flex", style="gap: 4px;"):
            v.VSelect(
                v_model=("heatmap_kind",),
                items=("heatmap_kind_items",),
                label="Kind",
                density="compact",
                hide_details=True,
                id="heatmap-kind",
            )
            v.VSelect(
                v_model=("heatmap_landmark",),
                items=("heatmap_landmark_items",),
                label="Landmark",
                density="compact",
                hide_details=True,
                id="heatmap-landmark",
            )

    def _helpCard(self) -> None:
        with v.VCard(
            v_show="help_open",
            id="help",
            width=360,
            elevation=8,
            style="position: absolute; top: 8px; right: 8px; z-index: 10;",
        ):
            v.VCardTitle("Using the views")
            with v.VCardText():
                with html.Ul(classes="pl-4"):
                    for line in (
                        "Drag a landmark to move it; Undo move (the undo arrow) puts it back, Reset point (the "
                        "circular arrow) restores the model's position.",
                        "Left-drag on the image: window/level (brightness, contrast).",
                        "Right-drag, or Ctrl + mouse wheel: zoom.",
                        "Middle-drag, or Shift + left-drag: pan.",
                        "Mouse wheel or the slider: move through the slices (3D images).",
                        "Click a row to center the views on it; Zoom to (the magnifier) zooms in on it.",
                        "Next to review: the points most likely wrong first (largest expected error); "
                        "an orange expected error is above that landmark's usual error.",
                        "Orange halo: a low-confidence point. Cyan halo, bold status: a point you moved. "
                        "Faded points: landmarks off the shown slice.",
                    ):
                        html.Li(line)
            with v.VCardActions():
                v.VBtn("Close", click="help_open = false", id="help-close")

    def toggleTraining(self) -> None:
        self.state.training_open = not self.state.training_open
        if self.state.training_open:
            self.state.help_open = False
            self._describeTrainingFolder()  # other sessions may have added cases

    def _trainingCard(self) -> None:
        trigger = self.server.controller.trigger_name
        with v.VCard(
            v_show="training_open",
            id="training",
            width=420,
            elevation=8,
            style="position: absolute; top: 8px; right: 8px; z-index: 10;",
        ):
            v.VCardTitle("Learn from corrections")
            with v.VCardText():
                html.Div(
                    "Training folder: {{ training_folder }}, {{ training_cases }}.",
                    classes="text-caption",
                    id="training-folder",
                )
                html.Div(
                    "It is removed when this session ends: start the station with --training-folder to keep "
                    "the cases and the models trained on them.",
                    v_if="!training_folder_kept",
                    classes="text-caption",
                )
                with html.Div(classes="d-flex align-center mt-2"):
                    v.VTextField(
                        v_model=("case_id",), label="Case name", density="compact", hide_details=True, id="case-id"
                    )
                    v.VBtn(
                        "Save as training pair",
                        click=f"trigger('{trigger(self.saveTrainingPair)}', [case_id])",
                        disabled=("!landmarks.length || busy",),
                        classes="ml-2",
                        variant="tonal",
                        id="save-training-pair",
                    )
                html.Div("Saves the image and its corrected points as one more case.", classes="text-caption mt-1")
                v.VDivider(classes="my-3")
                html.Div(
                    "Fine-tune the chosen model on the folder's cases. The new model joins the model list "
                    "(the user models folder, shared with the Slicer module) only when it is better than the "
                    "chosen one on the cases held aside (5 cases or more); Cancel keeps the best model so far.",
                    classes="text-caption",
                )
                v.VTextField(
                    v_model=("finetune_name",),
                    label="New model's name (optional)",
                    density="compact",
                    hide_details=True,
                    disabled=("finetuning",),
                    classes="mt-2",
                    id="finetune-name",
                )
                with html.Div(classes="d-flex align-center mt-2"):
                    v.VTextField(
                        v_model=("finetune_minutes",),
                        label="Minutes",
                        type="number",
                        min=0.1,
                        step=1,
                        density="compact",
                        hide_details=True,
                        style="max-width: 110px;",
                        disabled=("finetuning",),
                        id="finetune-minutes",
                    )
                    v.VBtn(
                        "Start fine-tuning",
                        color="primary",
                        classes="ml-2",
                        disabled=("finetuning",),
                        click=(
                            f"trigger('{trigger(self.startFinetune)}', "
                            "[model_id, model_path, finetune_minutes, finetune_name])"
                        ),
                        id="start-finetune",
                    )
                    v.VBtn(
                        "Cancel", v_show="finetuning", click=self.cancelFinetune, classes="ml-2", id="cancel-finetune"
                    )
                v.VProgressLinear(
                    v_show="finetuning",
                    model_value=("finetune_progress",),
                    height=6,
                    classes="mt-2",
                    id="finetune-progress",
                )
                html.Div("{{ finetune_message }}", v_show="finetuning", classes="text-caption", id="finetune-message")
                v.VAlert(
                    text=("finetune_error",),
                    v_show="finetune_error",
                    type="error",
                    density="compact",
                    classes="mt-2",
                    id="finetune-error",
                )
                v.VAlert(
                    text=("finetune_result",),
                    v_show="finetune_result && !finetune_error",
                    type=("finetune_added ? 'success' : 'info'",),
                    density="compact",
                    classes="mt-2",
                    id="finetune-result",
                )
            with v.VCardActions():
                v.VBtn("Close", click="training_open = false", id="training-close")

    @staticmethod
    @contextlib.contextmanager
    def _question(shownBy: str, cardId: str, title: str, text: str):
        """A dialog asking `text`, shown while the state variable `shownBy` is true; the caller adds the answers."""
        with v.VDialog(v_model=(shownBy,), persistent=True, max_width=460):
            with v.VCard(id=cardId):
                v.VCardTitle(title)
                v.VCardText(text)
                with v.VCardActions():
                    v.VSpacer()
                    yield

    def _replaceCaseDialog(self) -> None:
        replace = self.server.controller.trigger_name(self.saveTrainingPair)
        with self._question(
            "confirm_replace_case",
            "confirm-replace-case",
            "You saved this case already",
            "The training folder already holds the case {{ case_id }} you saved. Replace it with this "
            "image and these points, or cancel (and give the case another name)?",
        ):
            v.VBtn("Cancel", click="confirm_replace_case = false", id="replace-case-cancel")
            v.VBtn("Replace", click=f"trigger('{replace}', [case_id, true])", color="error", id="replace-case-button")

    def _confirmDialog(self) -> None:
        proceed = self.server.controller.trigger_name(self.proceed)
        with self._question(
            "confirm_discard",
            "confirm-discard",
            "Corrections not exported",
            "You moved landmarks and have not exported them since. Export them first, discard "
            "them, or cancel and keep working?",
        ):
            v.VBtn("Cancel", click=self.keepWork, id="confirm-cancel")
            v.VBtn("Discard", click=f"trigger('{proceed}')", color="error", id="confirm-discard-button")
            v.VBtn("Export", click=self._exportScript(f"trigger('{proceed}')"), color="primary", id="confirm-export")

"""The landmark review station in a browser: trame-slicer views around the module's logic.

The page is a second face on `SCNLandmarksLogic`: it opens an image into the MRML scene, runs the
same detection (the model on a worker thread, so the page shows progress; MRML changes on the
server's main thread), lists the landmarks with their confidences, shows the heatmaps as a slice
overlay, lets the user drag points in Slicer's own slice view, and downloads the corrected
`.mrk.json`. Every error is shown in the page; none stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from trame.app import TrameApp
from trame.widgets import html
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.utils import write_client_files_to_dir
from trame_vuetify.ui.vuetify3 import SinglePageLayout
from trame_vuetify.widgets import vuetify3 as v

from SCNLandmarksLib.errors import Cancelled, SCNLandmarksError
from SCNLandmarksLib.geometry import ras_to_lps
from SCNLandmarksLib.io.images import spacing_unit
from SCNLandmarksLib.io.paths import image_stem
from SCNLandmarksMRML import catalogue
from SCNLandmarksMRML.headless import loadVolumeFile
from SCNLandmarksMRML.logic import SCNLandmarksLogic
from SCNLandmarksMRML.volumes import matrixToArray

logger = logging.getLogger(__name__)

ALL_LANDMARKS = "all landmarks (max)"
LAYOUT = "Axial Only"
TABLE_REFRESH_S = 0.2  # at most this often while a point is dragged


class LandmarkReviewApp(TrameApp):
    """Open → detect → correct → export, on one MRML scene per server.

    Args:
        server: a trame server (default: a new one).
        image: an image to open at start, or None.
        model: a catalogue model id or name, or a model file; default the first available model.
        device: "auto", "cpu" or "cuda".
    """

    def __init__(self, server=None, image: str | Path | None = None, model: str | None = None,
                 device: str = "auto"):
        super().__init__(server)
        self.device = device
        self.slicerApp = SlicerApp()
        register_rca_factories(self.slicerApp.view_manager, self.server)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self.layoutManager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layoutManager.set_layout(LAYOUT)
        self.logic = SCNLandmarksLogic(self.slicerApp.scene, self.slicerApp.app_logic)
        self.uploads = tempfile.TemporaryDirectory(prefix="scn-landmarks-web-")
        self.volumeNode = None
        self.markupsNode = None
        self.markupsObservers: list[int] = []
        self.lastTableRefresh = 0.0
        self.cancelRequested = False
        self.models = {entry.id: entry for entry in catalogue.availableModels()}
        self._initialState(model)
        self._buildUi()
        self._observeCursor()
        if image:
            self.openImage(image)

    # ------------------------------------------------------------------------------------------
    # state

    def _initialState(self, model: str | None) -> None:
        state = self.state
        state.trame__title = "SCN Landmarks"
        state.model_items = [{"title": e.name, "value": e.id} for e in self.models.values()]
        chosen = self._catalogueId(model) if model else next(iter(self.models), None)
        state.model_id = chosen
        state.model_path = model if model and chosen is None else ""
        state.image_path = ""
        state.image_name = ""
        state.export_name = "landmarks.mrk.json"
        state.busy = False
        state.progress = 0
        state.progress_message = ""
        state.error = ""
        state.info = ""
        state.landmarks = []
        state.selected_landmark = None
        state.heatmap_visible = False
        state.heatmap_kind = "final"
        state.heatmap_kind_items = [{"title": label, "value": kind}
                                    for kind, label in SCNLandmarksLogic.heatmapKinds().items()]
        state.heatmap_landmark = ALL_LANDMARKS
        state.heatmap_landmark_items = [ALL_LANDMARKS]
        state.heatmap_opacity = 0.5
        state.cursor_lps = ""
        state.position_unit = "LPS, mm"
        state.change("heatmap_visible", "heatmap_kind", "heatmap_landmark")(self._onHeatmapChoice)
        state.change("heatmap_opacity")(self._onHeatmapOpacity)

    def _catalogueId(self, model: str) -> str | None:
        return next((i for i, e in self.models.items() if model in (i, e.name)), None)

    def _modelPath(self, modelId: str | None, modelPath: str) -> str:
        """The chosen model file: a typed path wins over the catalogue choice."""
        if (modelPath or "").strip():
            return modelPath.strip()
        entry = self.models.get(modelId)
        return str(entry.path) if entry else ""

    def _showError(self, error: BaseException) -> None:
        message = str(error) if isinstance(error, (SCNLandmarksError, Cancelled)) else (
            f"Unexpected error ({type(error).__name__}): {error}")
        if not isinstance(error, (SCNLandmarksError, Cancelled)):
            logger.exception("web app action failed", exc_info=error)
        self.state.error = message
        self.state.info = ""

    # ------------------------------------------------------------------------------------------
    # opening images

    def openImage(self, path: str | Path) -> None:
        """Open an image file (any format the module reads) and show it; replaces the current one."""
        self.state.error = ""
        try:
            volumeNode = loadVolumeFile(self.slicerApp.scene, path)
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)
            return
        self._clearDetection()
        if self.volumeNode is not None:
            self.slicerApp.scene.RemoveNode(self.volumeNode)
        self.volumeNode = volumeNode
        self.slicerApp.display_manager.show_volume(volumeNode, do_reset_views=True)
        self.state.image_name = Path(path).name
        # X-ray photos (PNG, JPEG...) carry no spacing: their positions are pixel columns and rows.
        self.state.position_unit = "x, y in pixels" if spacing_unit(path) == "px" else "LPS, mm"
        self.state.export_name = f"{image_stem(path) or 'landmarks'}.mrk.json"
        self.state.info = f"Opened {Path(path).name}."

    def openTypedPath(self, path: str) -> None:
        self.openImage((path or "").strip())

    def openSample(self) -> None:
        """Open the bundled sample image of the chosen catalogue model (or of any model with one)."""
        entry = self.models.get(self.state.model_id)
        if entry is None or entry.sample is None:
            entry = catalogue.sampleModel()
        if entry is None or entry.sample is None:
            self.state.error = "No bundled sample image in this installation."
            return
        self.state.model_id = entry.id
        self.openImage(entry.sample)

    def uploadImage(self, files: list[dict[str, Any]]) -> None:
        if not files:
            return
        folder = Path(tempfile.mkdtemp(dir=self.uploads.name))
        paths = write_client_files_to_dir(files if isinstance(files, list) else [files], folder)
        self.openImage(paths[0])

    # ------------------------------------------------------------------------------------------
    # detection

    async def detect(self, modelId: str | None, modelPath: str) -> None:
        """Run the chosen model on the open image, showing progress; errors appear in the page.

        The page sends the model fields with the click, so the model used is the one shown.
        """
        state = self.state
        if state.busy:
            return
        state.error = ""
        if self.volumeNode is None:
            state.error = "Open an image first (file, path or sample)."
            return
        loop = asyncio.get_running_loop()

        def progress(fraction: float, message: str) -> None:
            loop.call_soon_threadsafe(self._showProgress, fraction, message)

        self.cancelRequested = False
        state.busy = True
        self._showProgress(0.0, "starting")
        try:
            job = self.logic.prepareDetection(self.volumeNode, self._modelPath(modelId, modelPath), self.device,
                                              progress, lambda: self.cancelRequested)
            await loop.run_in_executor(None, self.logic.runDetection, job)
        except Exception as error:  # the page shows it; the server carries on
            with state:
                self._showError(error)
                state.busy = False
            return
        with state:
            state.busy = False
            try:
                result = self.logic.finishDetection(job)
            except Exception as error:  # the page shows it; the server carries on
                self._showError(error)
                return
            self._clearDetection()  # the previous result goes only once the new one is there
            self.markupsNode = result.markupsNode
            self.markupsObservers = [
                self.markupsNode.AddObserver(self.markupsNode.PointModifiedEvent, self._onPointMoving),
                self.markupsNode.AddObserver(self.markupsNode.PointEndInteractionEvent, self._onPointDropped)]
            state.heatmap_landmark_items = [ALL_LANDMARKS, *result.landmarkNames]
            state.heatmap_landmark = ALL_LANDMARKS
            state.info = result.summary
            self._refreshTable()
            self._onHeatmapChoice()

    def cancel(self) -> None:
        self.cancelRequested = True

    def _showProgress(self, fraction: float, message: str) -> None:
        with self.state:
            self.state.progress = round(100 * fraction)
            self.state.progress_message = message

    def _clearDetection(self) -> None:
        """Forget the previous detection: its point list and heatmap leave the scene."""
        if self.markupsNode is None:
            return
        for tag in self.markupsObservers:
            self.markupsNode.RemoveObserver(tag)
        heatmapNode = self.logic.heatmapNode(self.markupsNode)
        self.logic.forgetDetection(self.markupsNode)
        for node in (heatmapNode, self.markupsNode):
            if node is not None:
                self.slicerApp.scene.RemoveNode(node)
        self.markupsNode = None
        self.state.landmarks = []
        self.state.selected_landmark = None
        self.state.heatmap_visible = False

    # ------------------------------------------------------------------------------------------
    # review

    def _refreshTable(self) -> None:
        rows = []
        for row in self.logic.updatePointStatuses(self.markupsNode):
            lps = None if row.positionRas is None else ras_to_lps(np.asarray(row.positionRas)[None])[0]
            rows.append({"index": len(rows), "name": row.name, "status": row.status,
                         "confidence": "" if not math.isfinite(row.confidence) else f"{row.confidence:.2f}",
                         "position": "" if lps is None else ", ".join(f"{c:.1f}" for c in lps)})
        self.state.landmarks = rows
        self.lastTableRefresh = time.monotonic()

    def _onPointMoving(self, caller, event) -> None:
        # Dragging fires many modified events: the table follows at a readable rate.
        if time.monotonic() - self.lastTableRefresh > TABLE_REFRESH_S:
            self._onPointDropped(caller, event)

    def _onPointDropped(self, caller, event) -> None:
        with self.state:
            self._refreshTable()

    def selectLandmark(self, index: int) -> None:
        """Centre the views on a landmark and, with a heatmap shown, show that landmark's heatmap."""
        if self.markupsNode is None:
            return
        self.state.selected_landmark = index
        self.logic.centreViewsOnLandmark(self.markupsNode, int(index))
        if self.state.heatmap_visible:
            self.state.heatmap_landmark = self.state.landmarks[int(index)]["name"]

    def resetSelected(self) -> None:
        if self.markupsNode is None or self.state.selected_landmark is None:
            return
        self.logic.resetPoint(self.markupsNode, int(self.state.selected_landmark))
        self._refreshTable()

    def _onHeatmapChoice(self, **_) -> None:
        if self.markupsNode is None or not self.logic.hasHeatmaps(self.markupsNode):
            return
        try:
            if self.state.heatmap_visible:
                landmark = self.state.heatmap_landmark
                self.logic.showHeatmap(self.markupsNode, self.state.heatmap_kind,
                                       None if landmark == ALL_LANDMARKS else landmark,
                                       float(self.state.heatmap_opacity))
            else:
                self.logic.hideHeatmap(self.markupsNode)
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)

    def _onHeatmapOpacity(self, heatmap_opacity, **_) -> None:
        if self.markupsNode is not None and self.state.heatmap_visible:
            self.logic.setHeatmapOpacity(self.markupsNode, float(heatmap_opacity))

    def _observeCursor(self) -> None:
        """Show the physical (LPS) position under the mouse, as Slicer's data probe does."""
        for view in self.slicerApp.view_manager.get_slice_views():
            interactor = view.interactor()
            sliceNode = view.get_view_node()
            interactor.AddObserver("MouseMoveEvent", lambda caller, event, node=sliceNode:
                                   self._showCursor(node, caller.GetEventPosition()), 1.0)

    def _showCursor(self, sliceNode, position) -> None:
        ras = matrixToArray(sliceNode.GetXYToRAS()) @ np.array([position[0], position[1], 0.0, 1.0])
        lps = ras_to_lps(ras[None, :3])[0]
        with self.state:
            self.state.cursor_lps = ", ".join(f"{c:.2f}" for c in lps)

    # ------------------------------------------------------------------------------------------
    # export

    def exportMarkups(self):
        """The current (corrected) points as a `.mrk.json` download."""
        self.state.error = ""
        try:
            if self.markupsNode is None:
                raise SCNLandmarksError("Nothing to export: detect landmarks first.")
            path = Path(tempfile.mkdtemp(dir=self.uploads.name)) / "landmarks.mrk.json"
            self.logic.exportLandmarks(self.markupsNode, path)
            return self.server.protocol.addAttachment(path.read_bytes())
        except Exception as error:  # the page shows it; the server carries on
            self._showError(error)
            return None

    # ------------------------------------------------------------------------------------------
    # page

    def _buildUi(self) -> None:
        trigger = self.server.controller.trigger_name
        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("SCN Landmarks")
            with self.ui.toolbar:
                v.VSpacer()
                html.Div("{{ image_name }}", classes="text-body-2 mx-4", id="image-name")
                html.Div("cursor ({{ position_unit }}): {{ cursor_lps || '-' }}", classes="text-caption mx-4",
                         style="min-width: 260px;", id="cursor-lps")
            with self.ui.content:
                with html.Div(classes="d-flex", style="height: calc(100vh - 88px);"):
                    with html.Div(classes="pa-3", style="width: 420px; overflow-y: auto; flex: none;"):
                        self._openPanel(trigger)
                        self._detectPanel()
                        self._landmarkPanel()
                        self._heatmapPanel()
                    with html.Div(classes="flex-grow-1", style="min-width: 0; position: relative;", id="views"):
                        self.layoutManager.initialize_layout_grid(self.ui)

    def _openPanel(self, trigger) -> None:
        html.Div("Image", classes="text-subtitle-2")
        v.VFileInput(label="Upload an image", density="compact", hide_details=True, id="upload",
                     disabled=("busy",), change=f"trigger('{trigger(self.uploadImage)}', [$event.target.files])")
        with html.Div(classes="d-flex align-center my-2"):
            v.VTextField(v_model=("image_path",), label="or a file on the server", density="compact",
                         hide_details=True, id="image-path")
            v.VBtn("Open", click=f"trigger('{trigger(self.openTypedPath)}', [image_path])", classes="ml-2",
                   disabled=("busy",), id="open-path")
        v.VBtn("Open the sample", click=self.openSample, block=True, variant="tonal", disabled=("busy",),
               id="open-sample")

    def _detectPanel(self) -> None:
        trigger = self.server.controller.trigger_name
        html.Div("Model", classes="text-subtitle-2 mt-4")
        v.VSelect(v_model=("model_id",), items=("model_items",), density="compact", hide_details=True,
                  id="model")
        v.VTextField(v_model=("model_path",), label="or a model file (.safetensors)", density="compact",
                     hide_details=True, classes="mt-2", id="model-path")
        with html.Div(classes="d-flex mt-2"):
            v.VBtn("Detect landmarks", click=f"trigger('{trigger(self.detect)}', [model_id, model_path])",
                   color="primary", disabled=("busy",), classes="flex-grow-1", id="detect")
            v.VBtn("Cancel", click=self.cancel, v_show="busy", classes="ml-2", id="cancel")
        v.VProgressLinear(v_show="busy", model_value=("progress",), height=6, classes="mt-2", id="progress")
        html.Div("{{ progress_message }}", v_show="busy", classes="text-caption")
        v.VAlert(text=("error",), v_show="error", type="error", density="compact", classes="mt-2", id="error")
        v.VAlert(text=("info",), v_show="info && !error", type="success", density="compact", classes="mt-2",
                 id="info")

    def _landmarkPanel(self) -> None:
        trigger = self.server.controller.trigger_name
        html.Div("Landmarks (click to centre; drag points in the view to correct)", classes="text-subtitle-2 mt-4")
        with v.VTable(density="compact", fixed_header=True, height="320px", id="landmarks"):
            with html.Thead():
                with html.Tr():
                    for title in ("Landmark", "Confidence", "Status"):
                        html.Th(title)
                    html.Th("Position ({{ position_unit }})")
            with html.Tbody():
                with html.Tr(v_for="row in landmarks", key="row.index",
                             click=(f"trigger('{trigger(self.selectLandmark)}', [row.index])"),
                             classes=("{ 'bg-blue-lighten-4': row.index === selected_landmark }",),
                             style="cursor: pointer;", __properties=[("data_name", "data-name")],
                             data_name=("row.name",)):
                    html.Td("{{ row.name }}")
                    html.Td("{{ row.confidence }}")
                    html.Td("{{ row.status }}", classes="landmark-status")
                    html.Td("{{ row.position }}", classes="landmark-position")
        with html.Div(classes="d-flex mt-2"):
            v.VBtn("Reset point", click=self.resetSelected, disabled=("selected_landmark === null",),
                   variant="tonal", id="reset-point")
            v.VSpacer()
            v.VBtn("Export .mrk.json", prepend_icon="mdi-download", disabled=("!landmarks.length",), id="export",
                   click=(f"utils.download(export_name, trigger('{trigger(self.exportMarkups)}'), "
                          "'application/json')"))

    def _heatmapPanel(self) -> None:
        html.Div("Heatmap overlay", classes="text-subtitle-2 mt-4")
        v.VSwitch(v_model=("heatmap_visible",), label="Show heatmap", density="compact", hide_details=True,
                  disabled=("!landmarks.length",), id="heatmap-visible")
        v.VSelect(v_model=("heatmap_kind",), items=("heatmap_kind_items",), label="Heatmap", density="compact",
                  hide_details=True, disabled=("!heatmap_visible",), id="heatmap-kind")
        v.VSelect(v_model=("heatmap_landmark",), items=("heatmap_landmark_items",), label="Landmark",
                  density="compact", hide_details=True, disabled=("!heatmap_visible",), classes="mt-2",
                  id="heatmap-landmark")
        v.VSlider(v_model=("heatmap_opacity",), min=0, max=1, step=0.05, label="Opacity", density="compact",
                  hide_details=True, disabled=("!heatmap_visible",), id="heatmap-opacity")

"""SCNLandmarks: detect anatomical landmarks with Spatial Configuration Nets, review, correct, export.

Detection runs a Spatial Configuration Net (Payer et al., 2016/2019: a local-appearance component
times a spatial-configuration component) from `SCNLandmarksLib`, bundled with this module. This file
holds the Slicer module, its parameter node, a thin widget (it connects the GUI to the parameter
node and calls the logic) and the self-test. All MRML work is in the `SCNLandmarksMRML` subpackage
(no Qt), which also runs without the application (slicer-core), where it is tested.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibraryPath() -> None:
    """Use the bundled library; in a source checkout it sits beside the module folder."""
    try:
        import SCNLandmarksLib  # noqa: F401
    except ImportError:
        sourceTree = Path(__file__).resolve().parents[1]
        if (sourceTree / "SCNLandmarksLib").is_dir():
            sys.path.insert(0, str(sourceTree))


_addLibraryPath()

import SCNLandmarksMRML  # noqa: E402
from SCNLandmarksLib.errors import Cancelled, SCNLandmarksError  # noqa: E402
from SCNLandmarksLib.vocabulary import HeatmapKind, LandmarkStatus  # noqa: E402
from SCNLandmarksMRML.volumes import volumeDimension  # noqa: E402

LOAD_MODEL_FILE = "__load_model_file__"


#
# SCNLandmarks
#


class SCNLandmarks(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SCN Landmarks")
        self.parent.categories = [_("Landmark Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SCNLandmarks developers"]
        self.parent.helpText = _("""
Detects anatomical landmarks in 2D images (e.g. X-rays) and 3D volumes with a Spatial Configuration
Net. Review the points and their confidence, show the network's heatmaps over the image, move points
to correct them, then export them (.mrk.json, .fcsv, CSV) or save the image and corrected points as
a training case. See <a href="https://github.com/SCNLandmarks/SCNLandmarks">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Spatial Configuration Nets: C. Payer, D. Stern, H. Bischof, M. Urschler, "Integrating spatial
configuration into heatmap regression based CNNs for landmark localization", Medical Image
Analysis 54, 2019 (and MICCAI 2016).
""")


#
# SCNLandmarksParameterNode
#


@parameterNodeWrapper
class SCNLandmarksParameterNode:
    """What the module panel shows; saved with the scene.

    inputVolume - volume to detect landmarks in.
    modelPath - model file (from the catalogue or loaded by the user).
    device - "auto", "cuda" or "cpu".
    landmarks - the detection (point list) being reviewed.
    showHeatmap, heatmapKind, heatmapLandmark, heatmapOpacity - the overlay ("" = all landmarks).
    trainingFolder - where "Save as training pair" writes.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    device: str = "auto"
    landmarks: vtkMRMLMarkupsFiducialNode
    showHeatmap: bool = False
    heatmapKind: HeatmapKind = HeatmapKind.FINAL
    heatmapLandmark: str = ""
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    trainingFolder: Path


#
# SCNLandmarksWidget
#


class SCNLandmarksWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedLandmarks = None
        self._overlayState = None
        self._busy = False
        self._cancelRequested = False
        self._updatingGui = False
        self._modelInfo: dict[str, tuple[str, str]] = {}  # model path -> (info line, tooltip)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SCNLandmarks.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SCNLandmarksLogic()

        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self._populateModels()
        self._populateDevices()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved)

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelSelected)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceSelected)
        self.ui.heatmapLandmarkComboBox.currentIndexChanged.connect(self.onHeatmapLandmarkSelected)
        self.ui.detectButton.clicked.connect(self.onDetect)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.resultsTable.itemSelectionChanged.connect(self.onResultSelected)
        self.ui.resetPointButton.clicked.connect(self.onResetPoint)
        self.ui.resetAllButton.clicked.connect(self.onResetAll)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.saveTrainingPairButton.clicked.connect(self.onSaveTrainingPair)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node) -> None:
        if node is not None and node.IsA("vtkMRMLMarkupsFiducialNode"):
            self.logic.forgetDetection(node)

    # --------------------------------------------------------------------------------------------
    # parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # The active volume of the slice views, else the first volume.
            selection = slicer.app.applicationLogic().GetSelectionNode()
            volumeId = selection.GetActiveVolumeID() if selection else None
            volume = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
            volume = volume or slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume
        if not self._parameterNode.modelPath:
            index = self._firstModelIndex()
            if index >= 0:
                with SignalBlocker(self.ui.modelComboBox):
                    self.ui.modelComboBox.currentIndex = index
                self.onModelSelected(index)

    def setParameterNode(self, inputParameterNode: SCNLandmarksParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._updatingGui:
            return
        self._updatingGui = True
        try:
            self._updateManualWidgets()
            self._observeLandmarks(self._parameterNode.landmarks if self._parameterNode else None)
            self._updateResultsTable()
            self._updateButtons()
            self._updateOverlay()
        finally:
            self._updatingGui = False

    def _updateManualWidgets(self) -> None:
        """Widgets the parameter node wrapper cannot bind (their items are found at run time)."""
        if not self._parameterNode:
            return
        for combo, value in ((self.ui.modelComboBox, self._parameterNode.modelPath),
                             (self.ui.deviceComboBox, self._parameterNode.device),
                             (self.ui.heatmapLandmarkComboBox, self._parameterNode.heatmapLandmark)):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                with SignalBlocker(combo):
                    combo.currentIndex = index
        path = self._parameterNode.modelPath
        if path and path not in self._modelInfo:
            self._modelInfo[path] = (self.logic.modelInfo(path), self._modelDetails(path))
        text, details = self._modelInfo.get(path, ("", _("No model selected.")))
        self.ui.modelInfoLabel.text = text
        self.ui.modelInfoLabel.toolTip = details

    @staticmethod
    def _modelDetails(path: str) -> str:
        """Tooltip of the model information: description and model card of a catalogue model, and the file."""
        entry = SCNLandmarksMRML.entryForModel(path)
        details = [entry.description] if entry and entry.description else []
        if entry and entry.card and entry.card.is_file():
            details.append(_("Model card (data, training, accuracy, limits): {path}").format(path=entry.card))
        details.append(_("Model file: {path}").format(path=path))
        return "\n\n".join(details)

    def _updateButtons(self) -> None:
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume and parameters.modelPath) and not self._busy
        self.ui.detectButton.enabled = ready
        self.ui.detectButton.toolTip = _("Detect the model's landmarks in the input volume.") if ready else \
            _("Select an input volume and a model.")
        hasLandmarks = bool(parameters and parameters.landmarks) and not self._busy
        self.ui.resetAllButton.enabled = hasLandmarks and bool(self.logic.landmarkRows(parameters.landmarks))
        self.ui.resetPointButton.enabled = self.ui.resetAllButton.enabled and bool(self.ui.resultsTable.selectedItems())
        self.ui.exportButton.enabled = hasLandmarks
        self.ui.saveTrainingPairButton.enabled = hasLandmarks and bool(self._landmarksVolume())

    # --------------------------------------------------------------------------------------------
    # model and device selectors

    def _populateModels(self) -> None:
        """Catalogue models that ship with this installation; a catalogue model whose file is absent
        is listed disabled, saying why. Nothing is ever downloaded: other models are loaded from a file."""
        combo = self.ui.modelComboBox
        with SignalBlocker(combo):
            combo.clear()
            for entry in self.logic.catalogueModels():
                combo.addItem(entry.name if entry.available else _("{name} (not installed)").format(name=entry.name),
                              str(entry.path))
                tooltip = entry.description or str(entry.path)
                if not entry.available:
                    tooltip = entry.unavailableReason
                    combo.model().item(combo.count - 1).setEnabled(False)
                combo.setItemData(combo.count - 1, tooltip, qt.Qt.ToolTipRole)
            combo.addItem(_("Load model file..."), LOAD_MODEL_FILE)
            combo.setItemData(combo.count - 1, _("Use a model file (.safetensors) from this computer."),
                              qt.Qt.ToolTipRole)

    def _firstModelIndex(self) -> int:
        """Index of the first usable catalogue model in the selector, or -1."""
        combo = self.ui.modelComboBox
        for index in range(combo.count):
            data = combo.itemData(index)
            if data and data != LOAD_MODEL_FILE and combo.model().item(index).isEnabled():
                return index
        return -1

    def _populateDevices(self) -> None:
        combo = self.ui.deviceComboBox
        with SignalBlocker(combo):
            combo.clear()
            for choice in self.logic.deviceChoices():
                combo.addItem(choice.label, choice.key)
                if not choice.available:
                    combo.model().item(combo.count - 1).setEnabled(False)

    def onModelSelected(self, index: int) -> None:
        if not self._parameterNode or self._updatingGui:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == LOAD_MODEL_FILE:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Load SCN landmark model"), "",
                _("SCN landmark models (*.safetensors);;All files (*)"))
            if not path:
                self._updateManualWidgets()
                return
            with SignalBlocker(self.ui.modelComboBox):
                self.ui.modelComboBox.insertItem(self.ui.modelComboBox.count - 1, Path(path).name, path)
            data = path
        self._parameterNode.modelPath = data or ""

    def onDeviceSelected(self, index: int) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    # --------------------------------------------------------------------------------------------
    # detection

    def _ensureDependencies(self) -> bool:
        """Install torch (and friends) only after the user agreed; False if detection cannot run."""
        status = self.logic.dependencyStatus()
        if status.ready:
            return True
        if slicer.app.commandOptions().testingEnabled:
            self.ui.statusLabel.text = status.message
            return False
        if not status.torchAvailable:
            if status.pytorchUtilsAvailable:
                import PyTorchUtils

                if not slicer.util.confirmOkCancelDisplay(
                        status.message + "\n\n" + _("Install PyTorch now with the PyTorch extension?")):
                    return False
                with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
                    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                        return False
            else:
                if not slicer.util.confirmOkCancelDisplay(
                        status.message + "\n\n" + _("Install PyTorch ('torch', about 1 GB) with pip now?")):
                    return False
                with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
                    slicer.util.pip_install("torch")
        missing = self.logic.dependencyStatus().missingPipPackages
        if missing:
            if not slicer.util.confirmOkCancelDisplay(_("Install {packages} with pip now?").format(packages=", ".join(missing))):
                return False
            with slicer.util.tryWithErrorDisplay(_("Installation failed."), waitCursor=True):
                slicer.util.pip_install(" ".join(missing))
        ready = self.logic.dependencyStatus().ready
        if ready:
            self._modelInfo.clear()
            self._populateDevices()
            self._updateManualWidgets()
        return ready

    def _ensureModelFile(self) -> bool:
        """The selected model file must be on this computer (nothing is downloaded)."""
        path = self._parameterNode.modelPath
        if path and Path(path).is_file():
            return True
        entry = SCNLandmarksMRML.entryForModel(path)
        message = entry.unavailableReason if entry else \
            _("The model file {path} is not there. Choose a model, or 'Load model file...'.").format(path=path)
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message)
        return False

    def _runWithProgress(self, work):
        """Run work(progress, cancel) with the progress bar and Cancel button; None if it failed."""
        self._busy = True
        self._cancelRequested = False
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.setVisible(True)
        self.ui.cancelButton.enabled = True
        self._updateButtons()
        try:
            return work(self._onProgress, lambda: self._cancelRequested)
        except Cancelled as error:
            self.ui.statusLabel.text = str(error)
        except SCNLandmarksError as error:
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(str(error))
        except Exception as error:  # unexpected: show it, keep the details in the log
            logging.exception("SCNLandmarks failed")
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            slicer.util.errorDisplay(_("Landmark detection failed: {error}").format(error=error))
        finally:
            self._busy = False
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setVisible(False)
            self._updateButtons()
        return None

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message} (%p%)"
        slicer.app.processEvents()  # keeps the Cancel button responsive

    def onCancel(self) -> None:
        self._cancelRequested = True
        self.ui.cancelButton.enabled = False

    def onDetect(self) -> None:
        parameters = self._parameterNode
        if self._busy or not parameters or not self._ensureDependencies() or not self._ensureModelFile():
            return
        self.ui.statusLabel.text = _("Detecting...")
        result = self._runWithProgress(lambda progress, cancel: self.logic.detectLandmarks(
            parameters.inputVolume, parameters.modelPath, parameters.device, progress=progress, cancel=cancel))
        if result is None:
            return
        self._overlayState = None
        parameters.heatmapLandmark = ""
        parameters.landmarks = result.markupsNode
        self.ui.statusLabel.text = result.summary

    # --------------------------------------------------------------------------------------------
    # results table and correction

    def _observeLandmarks(self, node) -> None:
        if node is self._observedLandmarks:
            return
        events = (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                  slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
        if self._observedLandmarks is not None:
            for event in events:
                self.removeObserver(self._observedLandmarks, event, self._onLandmarksModified)
        self._observedLandmarks = node
        if node is not None:
            self.logic.observeCorrections(node)
            for event in events:
                self.addObserver(node, event, self._onLandmarksModified)
        combo = self.ui.heatmapLandmarkComboBox
        with SignalBlocker(combo):
            combo.clear()
            combo.addItem(_("All landmarks (maximum)"), "")
            for row in self.logic.landmarkRows(node) if node is not None else []:
                combo.addItem(row.name, row.name)
        self._updateManualWidgets()

    def _onLandmarksModified(self, caller=None, event=None) -> None:
        self._updateResultsTable()
        self._updateButtons()

    def _updateResultsTable(self) -> None:
        table = self.ui.resultsTable
        node = self._parameterNode.landmarks if self._parameterNode else None
        rows = self.logic.landmarkRows(node) if node else []
        selected = table.currentRow()
        with SignalBlocker(table):
            table.setRowCount(len(rows))
            for i, row in enumerate(rows):
                confidence = "" if row.confidence != row.confidence else f"{row.confidence:.2f}"
                color = {LandmarkStatus.LOW_CONFIDENCE: qt.QColor(255, 190, 130),
                          LandmarkStatus.MISSING: qt.QColor(225, 225, 225),
                          LandmarkStatus.MOVED: qt.QColor(170, 220, 255)}.get(row.status)
                for column, text in enumerate((row.name, confidence, str(row.status))):
                    item = table.item(i, column) or qt.QTableWidgetItem()
                    item.setText(text)
                    item.setBackground(qt.QBrush(color) if color else qt.QBrush())
                    item.setForeground(qt.QBrush(qt.QColor(0, 0, 0)) if color else qt.QBrush())
                    table.setItem(i, column, item)
            if 0 <= selected < len(rows):
                table.selectRow(selected)

    def _selectedLandmark(self) -> int | None:
        rows = {item.row() for item in self.ui.resultsTable.selectedItems()}
        return rows.pop() if len(rows) == 1 else None

    def onResultSelected(self) -> None:
        index = self._selectedLandmark()
        node = self._parameterNode.landmarks if self._parameterNode else None
        self._updateButtons()
        if index is None or node is None:
            return
        if self.logic.centreViewsOnLandmark(node, index) is None:
            self.ui.statusLabel.text = _("'{name}' has no position: place it in a view (Markups module, place mode) "
                                         "or reset it.").format(name=self.logic.landmarkRows(node)[index].name)

    def onResetPoint(self) -> None:
        index = self._selectedLandmark()
        if index is not None and self._parameterNode.landmarks:
            self.logic.resetPoint(self._parameterNode.landmarks, index)

    def onResetAll(self) -> None:
        node = self._parameterNode.landmarks
        if node:
            for index in range(len(self.logic.landmarkRows(node))):
                self.logic.resetPoint(node, index)

    # --------------------------------------------------------------------------------------------
    # heatmap overlay

    def onHeatmapLandmarkSelected(self, index: int) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.heatmapLandmark = self.ui.heatmapLandmarkComboBox.itemData(index) or ""

    def _updateOverlay(self) -> None:
        parameters = self._parameterNode
        node = parameters.landmarks if parameters else None
        state = None if not (parameters and node and parameters.showHeatmap) else \
            (node.GetID(), parameters.heatmapKind.value, parameters.heatmapLandmark)
        previous, self._overlayState = self._overlayState, state
        if state is None:
            if previous is not None:
                previousNode = slicer.mrmlScene.GetNodeByID(previous[0])
                if previousNode:
                    self.logic.hideHeatmap(previousNode)
            return
        if state == previous:
            self.logic.setHeatmapOpacity(node, parameters.heatmapOpacity)
            return
        if not self.logic.hasHeatmaps(node):
            self.ui.statusLabel.text = _("No heatmaps for '{name}': they are kept for detections of this session. "
                                         "Detect again to see them.").format(name=node.GetName())
            return
        try:
            self.logic.showHeatmap(node, parameters.heatmapKind.value, parameters.heatmapLandmark or None,
                                   parameters.heatmapOpacity)
        except SCNLandmarksError as error:
            self.ui.statusLabel.text = str(error)

    # --------------------------------------------------------------------------------------------
    # export

    def _landmarksVolume(self):
        node = self._parameterNode.landmarks if self._parameterNode else None
        volume = node.GetNodeReference(SCNLandmarksMRML.markups.VOLUME_REFERENCE_ROLE) if node else None
        return volume or (self._parameterNode.inputVolume if self._parameterNode else None)

    def onExport(self) -> None:
        node = self._parameterNode.landmarks
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export landmarks"), f"{node.GetName()}.mrk.json",
            _("Slicer markups (*.mrk.json);;Slicer fiducial list (*.fcsv);;CSV table (*.csv)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.exportLandmarks(node, path)
            self.ui.statusLabel.text = _("Landmarks exported to {path}").format(path=written)

    def onSaveTrainingPair(self) -> None:
        folder = self._parameterNode.trainingFolder
        if not str(folder) or str(folder) == ".":
            chosen = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Training folder"))
            if not chosen:
                return
            self._parameterNode.trainingFolder = Path(chosen)
            folder = Path(chosen)
        with slicer.util.tryWithErrorDisplay(_("Saving the training pair failed."), waitCursor=True):
            imagePath, landmarksPath = self.logic.saveTrainingPair(self._landmarksVolume(), self._parameterNode.landmarks,
                                                                   folder)
            self.ui.statusLabel.text = _("Saved {image} and {landmarks}.").format(image=imagePath, landmarks=landmarksPath)


class SignalBlocker:
    """Context manager: no Qt signals from a widget while its items are rebuilt."""

    def __init__(self, widget):
        self.widget = widget

    def __enter__(self):
        self.previous = self.widget.blockSignals(True)
        return self.widget

    def __exit__(self, *args):
        self.widget.blockSignals(self.previous)


#
# SCNLandmarksLogic
#


class SCNLandmarksLogic(ScriptedLoadableModuleLogic, SCNLandmarksMRML.SCNLandmarksLogic):
    """The MRML logic (`SCNLandmarksMRML.SCNLandmarksLogic`) on the application's scene, plus the
    module's parameter node. Use it from the Python console or other modules:

        logic = slicer.util.getModuleLogic("SCNLandmarks")
        result = logic.detectLandmarks(volumeNode, "/path/model.safetensors")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # also initialises the MRML logic on slicer.mrmlScene

    def getParameterNode(self) -> SCNLandmarksParameterNode:
        return SCNLandmarksParameterNode(super().getParameterNode())


#
# SCNLandmarksTest
#


class SCNLandmarksTest(ScriptedLoadableModuleTest):
    """Loads a sample, detects its landmarks with the real library, checks, corrects and exports them.

    The sample and model are the catalogue's (the entry with a "sample": the bundled brain model on
    the bundled MNI template), and the anatomy is checked: every landmark is found inside the volume
    and the AC-PC distance is 20-35 mm. Only when this installation has no catalogue sample model is
    a small synthetic 2D dataset generated and a tiny model trained on it briefly (about a minute on
    a CPU); either way the module must put the points exactly where the library's predictor does.
    """

    # Anatomically plausible AC-PC distance, mm (adults: about 23-30 mm).
    AC_PC_RANGE_MM = (20.0, 35.0)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SCNLandmarksDetectCorrectExport()

    def _sampleAndModel(self, workDir: Path):
        """(image path, model path, true landmarks path or None, tolerance mm or None, from the catalogue)."""
        entry = SCNLandmarksMRML.sampleModel()
        if entry is not None and entry.available and entry.hasSample:
            return entry.sample, entry.path, entry.sampleLandmarks, entry.toleranceMm, True
        from SCNLandmarksLib.config import config_from_dict
        from SCNLandmarksLib.data.synthetic import make_dataset
        from SCNLandmarksLib.train import train

        why = "no catalogue entry has a sample" if entry is None else \
            (entry.unavailableReason or f"the sample {entry.sample} is missing")
        self.delayDisplay(f"No catalogue sample model ({why}): training a tiny model on synthetic images")
        spec = make_dataset(workDir / "dataset", dimension=2, images=8, landmarks=4, size=(64, 48),
                            spacing=(1.0, 1.3), validation=1)
        config = config_from_dict({
            "dataset": str(spec), "output_dir": str(workDir / "run"),
            "grid": {"size": [32, 32], "spacing": [2.0, 2.0]}, "heatmap": {"sigma_init": 3.0},
            "model": {"params": {"filters": 16, "levels": 3, "dropout": 0.0, "sc_downsample": 4,
                                 "sc_kernel": 5, "sc_filters": 16}},
            # Few iterations: the test compares the module with the library, not accuracy.
            "training": {"iterations": 80, "batch_size": 4, "learning_rate": 1e-3,
                         "validate_every": 40, "checkpoint_every": 40}}, Path("/"))
        model = train(config, device="cpu").model_path
        image = spec.parent / "images" / "case007.mha"
        return image, model, spec.parent / "images" / "case007.mrk.json", None, False

    def _checkAnatomy(self, volume, result) -> None:
        """Every landmark found, inside the volume; AC-PC distance plausible (when the model has both)."""
        import numpy as np

        missing = [n for n, s in zip(result.landmarkNames, result.statuses) if s == LandmarkStatus.MISSING]
        self.assertEqual(missing, [], f"landmarks not found on the sample: {missing}")
        rasToIjk = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(rasToIjk)
        rasToIjk = slicer.util.arrayFromVTKMatrix(rasToIjk)
        size = np.array(volume.GetImageData().GetDimensions(), dtype=float)
        ijk = np.c_[result.pointsRas, np.ones(len(result.pointsRas))] @ rasToIjk.T
        outside = [n for n, v in zip(result.landmarkNames, ijk[:, :3])
                   if not (np.all(np.isfinite(v)) and np.all(v >= -0.5) and np.all(v <= size - 0.5))]
        self.assertEqual(outside, [], f"landmarks outside the volume: {outside}")
        if "AC" in result.landmarkNames and "PC" in result.landmarkNames:
            ac, pc = (result.pointsRas[result.landmarkNames.index(n)] for n in ("AC", "PC"))
            distance = float(np.linalg.norm(ac - pc))
            self.delayDisplay(f"AC-PC distance {distance:.1f} mm")
            low, high = self.AC_PC_RANGE_MM
            self.assertTrue(low <= distance <= high, f"AC-PC distance {distance:.1f} mm is not in {low}-{high} mm")

    def test_SCNLandmarksDetectCorrectExport(self):
        import numpy as np

        from SCNLandmarksLib.geometry import lps_to_ras
        from SCNLandmarksLib.inference import Predictor
        from SCNLandmarksLib.io.images import read_image
        from SCNLandmarksLib.io.landmarks import read_landmarks

        workDir = Path(tempfile.mkdtemp(prefix="SCNLandmarksTest"))
        image, model, truth, tolerance, fromCatalogue = self._sampleAndModel(workDir)
        self.delayDisplay(f"Loading {image.name}")
        volume = slicer.util.loadVolume(str(image))
        logic = SCNLandmarksLogic()
        result = logic.detectLandmarks(volume, str(model), device="cpu")
        self.delayDisplay(result.summary)
        self.assertEqual(result.markupsNode.GetNumberOfControlPoints(), len(result.landmarkNames))
        if fromCatalogue:
            self._checkAnatomy(volume, result)

        dimension = volumeDimension(volume)
        reference = Predictor.from_file(model, "cpu").predict(read_image(image, dimension))
        expected = reference.landmarks.points_lps
        if dimension == 2:
            expected = np.concatenate([expected, np.zeros((len(expected), 1))], axis=1)
        np.testing.assert_allclose(result.pointsRas, lps_to_ras(expected), atol=1e-3)
        if truth is not None and tolerance is not None:
            true = read_landmarks(truth, names=result.landmarkNames, dimension=dimension).points_lps
            errors = np.linalg.norm(reference.landmarks.points_lps - true, axis=1)
            self.assertLessEqual(float(np.nanmedian(errors)), tolerance)

        self.delayDisplay("Heatmap overlay")
        heatmap = logic.showHeatmap(result.markupsNode, "final", None, 0.5)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijkToRas(heatmap)),
                                   slicer.util.arrayFromVTKMatrix(_ijkToRas(volume)))

        self.delayDisplay("Correcting and exporting")
        node = result.markupsNode
        first = next(i for i, row in enumerate(logic.landmarkRows(node)) if row.positionRas is not None)
        moved = np.array(node.GetNthControlPointPositionVector(first)) + np.array([2.0, -1.0, 0.0])
        node.SetNthControlPointPosition(first, *moved)
        self.assertEqual(logic.landmarkRows(node)[first].status, LandmarkStatus.MOVED)
        exported = logic.exportLandmarks(node, workDir / "corrected.mrk.json")
        loaded = slicer.util.loadMarkups(str(exported))
        np.testing.assert_allclose(loaded.GetNthControlPointPositionVector(first), moved, atol=1e-6)
        logic.resetPoint(node, first)
        self.assertNotEqual(logic.landmarkRows(node)[first].status, LandmarkStatus.MOVED)

        self.delayDisplay("Refusing a model of the other dimension")
        before = slicer.mrmlScene.GetNumberOfNodes()
        other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
        other.SetAndObserveImageData(vtk.vtkImageData())
        other.GetImageData().SetDimensions(4, 4, 4 if dimension == 2 else 1)
        other.GetImageData().AllocateScalars(vtk.VTK_FLOAT, 1)
        with self.assertRaises(SCNLandmarksError):
            logic.detectLandmarks(other, str(model), device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before + 1)
        self.delayDisplay("Test passed")


def _ijkToRas(volumeNode) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix

"""SCNLandmarks: detect anatomical landmarks with Spatial Configuration Nets, review, correct, export.

Detection runs a Spatial Configuration Net (Payer et al., 2016/2019: a local-appearance component
times a spatial-configuration component) from `SCNLandmarksLib`, bundled with this module. This file
holds the Slicer module, its parameter node, a thin widget (it connects the GUI to the parameter
node and calls the logic) and the self-test. All MRML work is in the `SCNLandmarksMRML` subpackage
(no Qt), which also runs without the application (slicer-core), where it is tested.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
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

# Checked before anything that needs a newer Python is imported or evaluated (everything up to the
# `else` below keeps to Python 3.9): an older Slicer shows why the module cannot run (panel and
# log) instead of failing to load it.
from SCNLandmarksMRML.compatibility import compatibilityProblem

COMPATIBILITY_PROBLEM = compatibilityProblem((slicer.app.majorVersion, slicer.app.minorVersion))


def _importLibrary() -> None:
    """Import the bundled library (installed beside the module's scripts). In a source checkout it
    sits in the repository, whose other top-level folders (Testing, benchmarks) must not become
    importable packages: only the library's own folder is registered, not the repository."""
    try:
        import SCNLandmarksLib  # noqa: F401
    except ImportError:
        package = Path(__file__).resolve().parents[1] / "SCNLandmarksLib"
        spec = importlib.util.spec_from_file_location(
            "SCNLandmarksLib", package / "__init__.py", submodule_search_locations=[str(package)]
        )
        if spec is None or spec.loader is None or not package.is_dir():
            raise
        library = importlib.util.module_from_spec(spec)
        sys.modules["SCNLandmarksLib"] = library
        spec.loader.exec_module(library)


if COMPATIBILITY_PROBLEM:
    logging.error(COMPATIBILITY_PROBLEM)
    _MRMLLogic = object  # never instantiated: the widget only shows the problem
else:
    _importLibrary()
    import SCNLandmarksMRML
    from SCNLandmarksLib.errors import Cancelled, SCNLandmarksError
    from SCNLandmarksLib.vocabulary import HeatmapKind, LandmarkStatus
    from SCNLandmarksMRML import annotate, catalogue, dependencies, overlays, panel, training
    from SCNLandmarksMRML.review import CHANGED, ReviewSession
    from SCNLandmarksMRML.runner import DetectionRunner
    from SCNLandmarksMRML.volumes import volumeDimension

    _MRMLLogic = SCNLandmarksMRML.SCNLandmarksLogic

    @parameterNodeWrapper
    class SCNLandmarksParameterNode:
        """What the module panel shows; saved with the scene. Defined only where the module runs:
        its fields name the library's types, which an older Slicer cannot import.

        inputVolume - volume to detect landmarks in.
        modelPath - model file (from the catalogue or loaded by the user).
        device - "auto", "cuda" or "cpu".
        landmarks - the detection (point list) being reviewed.
        shortLabels - label the points on the views with the model's abbreviations.
        showHeatmap, heatmapKind, heatmapLandmark, heatmapOpacity - the overlay ("" = all landmarks).
        trainingFolder - where "Save as training pair" writes ("" = ask).
        """

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: str = "auto"
        landmarks: vtkMRMLMarkupsFiducialNode
        shortLabels: bool = False
        showHeatmap: bool = False
        heatmapKind: HeatmapKind = HeatmapKind.FINAL
        heatmapLandmark: str = ""
        heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
        trainingFolder: str = ""


# The results table is refreshed at most this often while a point is dragged.
TABLE_REFRESH_MS = 100
# How often the running detection is polled, and how long each poll lets the worker thread run:
# Slicer's event loop keeps the interpreter lock, so the worker runs Python only within polls. Short
# ones keep the GUI's pauses short, and the worker waits less for the next (benchmarks/detection_poll.py).
POLL_INTERVAL_MS = 20
POLL_WAIT_S = 0.01
# How often a training's progress is read (it runs in another process).
TRAINING_POLL_MS = 500
# How often the PyTorch probe, the model file reader and the installation log are looked at.
BACKGROUND_POLL_MS = 200
# The Train section's "Start from" choices.
BASE_SELECTED, BASE_FILE, BASE_NEW = "selected", "file", "new"


#
# SCNLandmarks
#


class SCNLandmarks(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SCN Landmarks")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["SCNLandmarks developers (SCNLandmarks project)"]
        self.parent.helpText = (COMPATIBILITY_PROBLEM + "<br><br>" if COMPATIBILITY_PROBLEM else "") + _("""
Detects anatomical landmarks in 2D images (e.g. X-rays) and 3D volumes with a Spatial Configuration
Net. Review the points and their confidence, show the network's heatmaps over the image, move points
to correct them, then export them (.mrk.json, .fcsv, CSV) or save the image and corrected points as
a training case. Try it on the bundled MNI152 brain template (Sample Data module, "SCN Landmarks";
its license is in the extension's Resources/Samples folder). Needs Slicer 5.10 or later. See
<a href="https://github.com/SCNLandmarks/SCNLandmarks">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Spatial Configuration Nets: C. Payer, D. Stern, H. Bischof, M. Urschler, "Integrating spatial
configuration into heatmap regression based CNNs for landmark localization", Medical Image
Analysis 54, 2019 (and MICCAI 2016). Sample image: MNI152NLin2009cAsym template, Copyright (C)
1993-2004 Louis Collins, McConnell Brain Imaging Center, Montreal Neurological Institute, McGill University.
""")
        if not COMPATIBILITY_PROBLEM:
            slicer.app.connect("startupCompleted()", registerSampleData)
            slicer.app.connect("startupCompleted()", installPendingTorch)


def pythonForChildren() -> str:
    """The Python that child processes (training, the PyTorch probe) run: Slicer's own."""
    return shutil.which("PythonSlicer") or sys.executable


def settingsFolder() -> Path:
    """Slicer's user settings folder (where the PyTorch reinstall note waits for the next start)."""
    return Path(slicer.app.slicerUserSettingsFilePath).parent


def installPendingTorch() -> None:
    """Replace PyTorch as the user agreed before the restart, before anything in this session loads
    it (a torch loaded in a session cannot be uninstalled under it)."""
    plan = dependencies.pendingTorchReinstall(settingsFolder())
    if plan is None or slicer.app.commandOptions().testingEnabled:
        return
    if dependencies.torchLoaded():
        logging.warning("SCN Landmarks: another module loaded PyTorch first; it is replaced at the next start.")
        return
    # Removed first: a failing installation must not be retried at every start without asking.
    dependencies.clearTorchReinstall(settingsFolder())
    slicer.util.showStatusMessage(_("SCN Landmarks: replacing PyTorch as you asked (this can take minutes)..."))
    with slicer.util.tryWithErrorDisplay(
        _("Replacing PyTorch failed. Open SCN Landmarks and click Detect to install it again."), waitCursor=True
    ):
        import PyTorchUtils

        dependencies.install(plan, PyTorchUtils.PyTorchUtilsLogic(), slicer.util.pip_install, replaceTorch=True)
        slicer.util.showStatusMessage(_("SCN Landmarks: PyTorch was replaced."), 5000)


def registerSampleData() -> None:
    """Offer the catalogue's bundled samples in the Sample Data module (local files: nothing is fetched)."""
    import SampleData

    icon = Path(__file__).parent / "Resources" / "Icons" / "SCNLandmarks.png"
    for source in SCNLandmarksMRML.catalogue.sampleDataSources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="SCN Landmarks",
            sampleName=source.sampleName,
            thumbnailFileName=str(icon),
            uris=source.uri,
            fileNames=source.fileName,
            nodeNames=source.nodeName,
            loadFileTypes="VolumeFile",
            checksums=source.checksum,
        )
        if source.licenseFile is not None:
            logging.info(
                "SCN Landmarks sample '%s' (for %s): license in %s",
                source.sampleName,
                source.modelName,
                source.licenseFile,
            )


#
# SCNLandmarksWidget
#


class SCNLandmarksWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.runner = None
        self.review = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._overlayState = None
        self._updatingGui = False
        self._modelInfo: dict[str, tuple[str, str]] = {}  # model path -> (info line, tooltip)
        # The model file reader imports torch (seconds, the first time): it runs on a worker thread.
        self._modelInfoReader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SCNLandmarks model info")
        self._modelInfoPending: dict[str, Future] = {}
        self._deviceFacts = None
        self._torchProbe = None
        self._installLog = None
        self._trainingDataStale = False
        self._loadedModelPaths: list[str] = []
        self._modelListKey = None
        self._tableColors: dict = {}
        self._trainingData = None
        self._annotationNode = None
        self._placeMode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if COMPATIBILITY_PROBLEM:
            label = qt.QLabel(COMPATIBILITY_PROBLEM)
            label.wordWrap = True
            label.setStyleSheet("color: #b00020; font-weight: bold")
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SCNLandmarks.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SCNLandmarksLogic()
        self.runner = DetectionRunner(self.logic)
        # The review of the detection shown (rows, order, corrections, export, training): this panel
        # only shows it and passes the user's actions to it, as the web app does.
        self.review = ReviewSession(self.logic)
        self.review.listen(self._onReviewChanged)

        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self._setupTrainSection()
        self._backgroundTimer = qt.QTimer()
        self._backgroundTimer.setInterval(BACKGROUND_POLL_MS)
        self._backgroundTimer.timeout.connect(self._onPollBackground)
        self._startTorchProbe()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self._onPollDetection)
        self._tableTimer = qt.QTimer()
        self._tableTimer.setSingleShot(True)
        self._tableTimer.setInterval(TABLE_REFRESH_MS)
        self._tableTimer.timeout.connect(self._onLandmarksRefresh)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self._hideHeatmapsFromInput()

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelSelected)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceSelected)
        self.ui.heatmapLandmarkComboBox.currentIndexChanged.connect(self.onHeatmapLandmarkSelected)
        self.ui.trainingFolderPathLineEdit.currentPathChanged.connect(self.onTrainingFolderChanged)
        self.ui.detectButton.clicked.connect(self.onDetect)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.resultsTable.itemSelectionChanged.connect(self.onResultSelected)
        self.ui.resetPointButton.clicked.connect(self.onResetPoint)
        self.ui.resetAllButton.clicked.connect(self.onResetAll)
        self.ui.undoMoveButton.clicked.connect(self.onUndoMove)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.saveTrainingPairButton.clicked.connect(self.onSaveTrainingPair)
        self.ui.nextToReviewButton.clicked.connect(self.onNextToReview)
        self.ui.readNamesButton.clicked.connect(self.onReadLandmarkNames)
        self.ui.startAnnotationButton.clicked.connect(self.onStartAnnotation)
        self.ui.skipLandmarkButton.clicked.connect(self.onSkipLandmark)
        self.ui.trainBaseComboBox.activated.connect(self.onTrainBaseActivated)
        self.ui.startTrainingButton.clicked.connect(self.onStartTraining)
        self.ui.cancelTrainingButton.clicked.connect(self.onCancelTraining)
        self.ui.removeModelButton.clicked.connect(self.onRemoveModel)
        self.ui.reinstallTorchButton.clicked.connect(self.onReinstallTorch)
        self.ui.advancedCollapsibleButton.contentsCollapsed.connect(lambda collapsed: self._updateEnvironment())
        self.ui.trainCollapsibleButton.contentsCollapsed.connect(self.onTrainSectionCollapsed)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.runner is not None and self.runner.running:
            self.runner.cancel()
        self._modelInfoReader.shutdown(wait=False, cancel_futures=True)
        if self.review is not None and self.review.trainingRunning:
            self.review.cancelTraining()  # it stops at its next iteration; nothing is registered without us
        self.removeObservers()

    def enter(self) -> None:
        if not COMPATIBILITY_PROBLEM:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.runner.running:
            self.runner.cancel()
        self._observeAnnotation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if overlays.isHeatmapNode(node):
            self._hideHeatmapsFromInput()

    def _hideHeatmapsFromInput(self) -> None:
        """Heatmaps are scalar volumes, but nothing to detect landmarks in (labelmaps: the .ui)."""
        proxy = self.ui.inputVolumeSelector.sortFilterProxyModel()
        proxy.hiddenNodeIDs = overlays.heatmapNodeIDs(slicer.mrmlScene)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node) -> None:
        if node is not None and node.IsA("vtkMRMLMarkupsFiducialNode"):
            self.logic.forgetDetection(node)
            if node is self._annotationNode:  # (Skip would act on a point list no longer in the scene)
                self._observeAnnotation(None)
                self._updateButtons()

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
            self._updateModelList()
            self._updateManualWidgets()
            self._observeLandmarks(self._parameterNode.landmarks if self._parameterNode else None)
            self._updateShortLabels()
            self._updateResultsTable()
            self._updateTrainingBase()  # "Start from" the Detection model: it may have changed
            self._updateButtons()
            self._updateOverlay()
        finally:
            self._updatingGui = False

    def _updateManualWidgets(self) -> None:
        """Widgets the parameter node wrapper cannot bind (their items are found at run time)."""
        if not self._parameterNode:
            return
        for combo, value in (
            (self.ui.deviceComboBox, self._parameterNode.device),
            (self.ui.heatmapLandmarkComboBox, self._parameterNode.heatmapLandmark),
        ):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                with SignalBlocker(combo):
                    combo.currentIndex = index
        folder = panel.trainingFolderText(self._parameterNode.trainingFolder)
        if self.ui.trainingFolderPathLineEdit.currentPath != folder:
            with SignalBlocker(self.ui.trainingFolderPathLineEdit):
                self.ui.trainingFolderPathLineEdit.currentPath = folder
            self._updateTrainingData()
        path = self._parameterNode.modelPath
        if path and path not in self._modelInfo and path not in self._modelInfoPending:
            self._modelInfoPending[path] = self._modelInfoReader.submit(self.logic.modelInfo, path)
            self._backgroundTimer.start()
        reading = (_("Reading the model file..."), self._modelDetails(path)) if path else ("", _("No model selected."))
        text, details = self._modelInfo.get(path, reading)
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
        busy = self.runner.running
        installing = dependencies.installationRunning()
        ready = bool(parameters and parameters.inputVolume and parameters.modelPath) and not busy and not installing
        self.ui.detectButton.enabled = ready
        if installing:
            self.ui.detectButton.toolTip = _("Python packages are being installed (see Advanced).")
        elif busy:
            self.ui.detectButton.toolTip = _("A detection is running.")
        else:
            self.ui.detectButton.toolTip = (
                _("Detect the model's landmarks in the input volume.")
                if ready
                else _("Select an input volume and a model.")
            )
        hasLandmarks = bool(parameters and parameters.landmarks) and not busy
        self.ui.resetAllButton.enabled = hasLandmarks and bool(self.review.rows())
        self.ui.resetPointButton.enabled = self.ui.resetAllButton.enabled and bool(self.ui.resultsTable.selectedItems())
        self.ui.undoMoveButton.enabled = hasLandmarks and self.review.canUndo
        self.ui.exportButton.enabled = hasLandmarks
        self.ui.saveTrainingPairButton.enabled = hasLandmarks and bool(self._landmarksVolume())
        self.ui.nextToReviewButton.enabled = self.ui.resetAllButton.enabled
        self.ui.reinstallTorchButton.enabled = not busy and not installing
        training = self.review.trainingRunning
        self.ui.startTrainingButton.enabled = self._trainingData is not None and not training and not installing
        self.ui.cancelTrainingButton.enabled = training and not self.review.trainingJob.cancelRequested
        self.ui.removeModelButton.enabled = self.ui.userModelComboBox.count > 0 and not training
        self.ui.skipLandmarkButton.enabled = (
            self._annotationNode is not None and annotate.nextToPlace(self._annotationNode) is not None
        )

    def _updateEnvironment(self) -> None:
        """The Advanced section: versions, devices, the model in use and its card."""
        if self.ui.advancedCollapsibleButton.collapsed:
            return
        lines = [f"{label}: {value}" for label, value in dependencies.environmentReport(self._deviceFacts)]
        path = self._parameterNode.modelPath if self._parameterNode else ""
        lines.append(f"model file: {path or 'none selected'}")
        entry = SCNLandmarksMRML.entryForModel(path)
        if entry and entry.card:
            lines.append(f"model card: {entry.card}")
        self.ui.environmentText.plainText = "\n".join(lines)

    # --------------------------------------------------------------------------------------------
    # model and device selectors

    def _updateModelList(self) -> None:
        """Rebuild the model selector so that it shows the model that will run (see `panel.modelChoices`)."""
        if not self._parameterNode:
            return
        current = self._parameterNode.modelPath
        key = (current, tuple(self._loadedModelPaths))
        if key == self._modelListKey:
            return
        models = catalogue.allModels()
        self._updateUserModels(models)
        choices, index = panel.modelChoices(models, current, self._loadedModelPaths)
        combo = self.ui.modelComboBox
        with SignalBlocker(combo):
            combo.clear()
            for choice in choices:
                combo.addItem(_(choice.label) if choice.data == panel.LOAD_MODEL_FILE else choice.label, choice.data)
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
                combo.model().item(combo.count - 1).setEnabled(choice.enabled)
            combo.currentIndex = index
        self._modelListKey = key
        if not current and index >= 0:
            self._parameterNode.modelPath = choices[index].data  # the first shipped model, shown selected

    def _updateUserModels(self, models) -> None:
        """The Train section's own list of the user's models: what its Remove button acts on."""
        combo = self.ui.userModelComboBox
        current = combo.itemData(combo.currentIndex) if combo.count else None
        with SignalBlocker(combo):
            combo.clear()
            for entry in models:
                if entry.userModel:
                    combo.addItem(entry.name, str(entry.path))
            index = combo.findData(current)
            if index >= 0:
                combo.currentIndex = index

    def _populateDevices(self) -> None:
        """Both device selectors, from what is known of torch (`_deviceFacts`), keeping the choices."""
        choices = self.logic.deviceChoices(self._deviceFacts)
        for combo in (self.ui.deviceComboBox, self.ui.trainDeviceComboBox):
            current = combo.itemData(combo.currentIndex) if combo.count else None
            with SignalBlocker(combo):
                combo.clear()
                for choice in choices:
                    combo.addItem(choice.label, choice.key)
                    if choice.tooltip:
                        combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
                    if not choice.available:
                        combo.model().item(combo.count - 1).setEnabled(False)
                index = combo.findData(current) if current else -1
                if index >= 0 and choices[index].available:
                    combo.currentIndex = index
        self._updateManualWidgets()  # the parameter node's device, shown again

    def _startTorchProbe(self) -> None:
        """Show what is known without torch now; ask torch itself in a child process (importing it
        here would freeze the panel for seconds and take a CUDA context before any detection)."""
        self._deviceFacts = dependencies.installedFacts()
        self._populateDevices()
        self._torchProbe = dependencies.TorchProbe(pythonForChildren())
        self._torchProbe.start()
        self._backgroundTimer.start()

    def _onPollBackground(self) -> None:
        """The PyTorch probe, the model file reader and the installation log, from the GUI thread."""
        if self._torchProbe is not None:
            facts = self._torchProbe.poll()
            if facts is not None:
                self._torchProbe = None
                self._deviceFacts = facts
                self._populateDevices()
                self._updateEnvironment()
                if facts.loadError and not self.runner.running:
                    self.ui.statusLabel.text = self.logic.dependencyStatus().message
        for path, future in list(self._modelInfoPending.items()):
            if future.done():
                del self._modelInfoPending[path]
                self._modelInfo[path] = (future.result(), self._modelDetails(path))
                self._updateManualWidgets()
        if self._installLog is not None:
            lines = self._installLog.take()
            if lines:
                self.ui.installLog.appendPlainText("\n".join(lines))
        if self._torchProbe is None and not self._modelInfoPending and self._installLog is None:
            self._backgroundTimer.stop()

    def onModelSelected(self, index: int) -> None:
        if not self._parameterNode or self._updatingGui:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == panel.LOAD_MODEL_FILE:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(),
                _("Load SCN landmark model"),
                "",
                _("SCN landmark models (*.safetensors);;All files (*)"),
            )
            if not path:
                self._modelListKey = None  # cancelled: show the model that will run again
                self._updateModelList()
                return
            self._loadedModelPaths.append(path)
            data = path
        self._parameterNode.modelPath = data or ""

    def onDeviceSelected(self, index: int) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onTrainingFolderChanged(self, path: str) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.trainingFolder = panel.trainingFolderText(path)
        self._updateTrainingData()

    # --------------------------------------------------------------------------------------------
    # dependencies

    def _ensureDependencies(self) -> bool:
        """torch and the rest are there, or installed now after the user agreed; False if not."""
        status = self.logic.dependencyStatus()
        if status.ready:
            return True
        if slicer.app.commandOptions().testingEnabled:  # tests never install anything
            self.ui.statusLabel.text = status.message
            return False
        if status.restartNeeded:
            self._offerRestart(status.message)
            return False
        return self._install(status, forceTorch=False)

    def _install(self, status, forceTorch: bool) -> bool:
        """Ask once (every package and its size), then install with the log in the Advanced section.

        A torch loaded in this session is not replaced under it: the next start replaces it
        (`installPendingTorch`). While the installation runs (pip processes GUI events) Detect,
        Start training and Reinstall are disabled, and a second installation is refused.
        """
        if dependencies.installationRunning():
            self.ui.statusLabel.text = _("Python packages are being installed: wait for that installation to finish.")
            return False
        plan = dependencies.installationPlan(status, forceTorch=forceTorch)
        if not plan:
            self.ui.statusLabel.text = status.message
            slicer.util.errorDisplay(status.message or _("Install the 'PyTorch' extension first."))
            return False
        replacesTorch = bool(status.torchVersion) and any(package.name == "torch" for package in plan)
        torchLoaded = replacesTorch and dependencies.torchLoaded()
        if not slicer.util.confirmOkCancelDisplay(
            dependencies.consentMessage(plan, replacesTorch, torchLoaded), windowTitle=_("Install Python packages")
        ):
            return False
        if torchLoaded:
            dependencies.requestTorchReinstall(settingsFolder(), plan)
            self._offerRestart(_("PyTorch is replaced when Slicer starts next."))
            return False
        self.ui.advancedCollapsibleButton.collapsed = False
        self.ui.installLog.clear()
        self._installLog = dependencies.LogLines()
        logging.getLogger().addHandler(self._installLog)
        self._backgroundTimer.start()
        self.ui.statusLabel.text = _("Installing Python packages (see the log in Advanced)...")
        self.ui.progressBar.setRange(0, 0)  # busy: pip reports no fraction
        self.ui.progressBar.setVisible(True)
        try:
            torchUtils = None
            if any(package.name == "torch" for package in plan):
                import PyTorchUtils

                torchUtils = PyTorchUtils.PyTorchUtilsLogic()
            self._setActionsEnabled(False)
            with self._installLog.printed():
                if not dependencies.install(plan, torchUtils, slicer.util.pip_install, replaceTorch=replacesTorch):
                    return False
        except Exception as error:  # pip and PyTorchUtils raise various errors; the log has the details
            logging.exception("SCNLandmarks: installation failed")
            slicer.util.errorDisplay(
                _("Installation failed: {error}\n\nSee the installation log (Advanced).").format(error=error)
            )
            return False
        finally:
            logging.getLogger().removeHandler(self._installLog)
            self._onPollBackground()  # the last lines
            self._installLog = None
            self.ui.progressBar.setVisible(False)
            self.ui.progressBar.setRange(0, 100)
            self.ui.statusLabel.text = ""
            self._updateButtons()
        after = self.logic.dependencyStatus()
        self._modelInfo.clear()
        self._startTorchProbe()
        self._updateManualWidgets()
        self._updateEnvironment()
        if after.restartNeeded:
            self._offerRestart(after.message)
            return False
        return after.ready

    def _setActionsEnabled(self, enabled: bool) -> None:
        """Detect, Start training and Reinstall (re-enabled by `_updateButtons`)."""
        for button in (self.ui.detectButton, self.ui.startTrainingButton, self.ui.reinstallTorchButton):
            button.enabled = enabled

    def _offerRestart(self, message: str) -> None:
        self.ui.statusLabel.text = message
        if slicer.util.confirmYesNoDisplay(
            message + "\n\n" + _("Restart Slicer now? Save your work first."), windowTitle=_("Restart Slicer")
        ):
            slicer.util.restart()

    def onReinstallTorch(self) -> None:
        if dependencies.installationRunning():
            return
        status = self.logic.dependencyStatus()
        if not status.pytorchUtilsAvailable:
            slicer.util.errorDisplay(
                _(
                    "The 'PyTorch' extension is not installed: install it from the Extensions "
                    "Manager and restart Slicer."
                )
            )
            return
        self._install(status, forceTorch=True)

    # --------------------------------------------------------------------------------------------
    # detection (the model runs on a worker thread; see SCNLandmarksMRML.runner)

    def _ensureModelFile(self) -> bool:
        """The selected model file must be on this computer (nothing is downloaded)."""
        path = self._parameterNode.modelPath
        if path and Path(path).is_file():
            return True
        entry = SCNLandmarksMRML.entryForModel(path)
        message = (
            entry.unavailableReason
            if entry
            else _("The model file {path} is not there. Choose a model, or 'Load model file...'.").format(path=path)
        )
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message)
        return False

    def onDetect(self) -> None:
        parameters = self._parameterNode
        if self.runner.running:
            self.ui.statusLabel.text = _("A detection is already running: wait for it or cancel it.")
            return
        if dependencies.installationRunning():
            return  # the button is disabled meanwhile; a queued click does nothing
        if not parameters or not self._ensureDependencies() or not self._ensureModelFile():
            return
        try:
            self.runner.start(parameters.inputVolume, parameters.modelPath, parameters.device)
        except SCNLandmarksError as error:
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = _("Detecting...")
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.setVisible(True)
        self.ui.cancelButton.enabled = True
        self._updateButtons()
        self._pollTimer.start()

    def _onPollDetection(self) -> None:
        try:
            result = self.runner.poll(POLL_WAIT_S)
        except Cancelled as error:
            self._detectionEnded(str(error))
            return
        except SCNLandmarksError as error:
            self._detectionEnded(str(error))
            slicer.util.errorDisplay(str(error))
            return
        except Exception as error:  # unexpected: show it, keep the details in the log
            logging.exception("SCNLandmarks failed")
            self._detectionEnded(_("Failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("Landmark detection failed: {error}").format(error=error))
            return
        fraction, message = self.runner.progress
        if self.runner.cancelRequested:
            message = _("cancelling (the current step finishes first)")
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message} (%p%)"
        if result is None:
            return
        self._detectionEnded(result.summary)
        self._overlayState = None
        self._parameterNode.heatmapLandmark = ""
        self._parameterNode.landmarks = result.markupsNode

    def _detectionEnded(self, message: str) -> None:
        self._pollTimer.stop()
        self.ui.statusLabel.text = message
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self._updateButtons()

    def onCancel(self) -> None:
        self.runner.cancel()
        self.ui.cancelButton.enabled = False

    # --------------------------------------------------------------------------------------------
    # results table and correction

    def _observeLandmarks(self, node) -> None:
        if node is self.review.markupsNode:
            return
        self.review.setDetection(node)
        combo = self.ui.heatmapLandmarkComboBox
        with SignalBlocker(combo):
            combo.clear()
            combo.addItem(_("All landmarks (maximum)"), "")
            for row in self.review.rows():
                combo.addItem(row.name, row.name)
        self._updateManualWidgets()

    def _onReviewChanged(self, what: str) -> None:
        # Dragging reports every mouse move: refresh at most every TABLE_REFRESH_MS; settled changes at once.
        if what == CHANGED:
            self._tableTimer.stop()
            self._onLandmarksRefresh()
        elif not self._tableTimer.isActive():
            self._tableTimer.start()

    def _onLandmarksRefresh(self) -> None:
        self._updateResultsTable()
        self._updateButtons()

    def _updateResultsTable(self) -> None:
        landmarkRows, coverage = self.review.rows(), self.review.coverage
        rows = panel.tableRows(landmarkRows, self.review.unit, coverage)
        headers = panel.tableHeaders(landmarkRows, coverage)
        table = self.ui.resultsTable
        with SignalBlocker(table):
            table.setColumnCount(len(headers))
            table.setHorizontalHeaderLabels(list(headers))
            panel.updateTable(QtTable(table), rows, qt.QTableWidgetItem, _setItemColor, self._tableColors)

    def _updateShortLabels(self) -> None:
        node = self._parameterNode.landmarks if self._parameterNode else None
        available = node is not None and self.logic.shortLandmarkNames(node) is not None
        self.ui.shortLabelsCheckBox.enabled = available
        self.ui.shortLabelsCheckBox.toolTip = (
            _(
                "Label the points in the views with the abbreviations the model provides; the table and exported "
                "files keep the full names."
            )
            if available
            else _("This model provides no short names (its landmark names are what the views show).")
        )
        if node is not None:
            self.logic.showShortLabels(node, bool(self._parameterNode.shortLabels) and available)

    def _selectedLandmark(self) -> int | None:
        rows = {item.row() for item in self.ui.resultsTable.selectedItems()}
        return rows.pop() if len(rows) == 1 else None

    def onResultSelected(self) -> None:
        index = self._selectedLandmark()
        node = self._parameterNode.landmarks if self._parameterNode else None
        self._updateButtons()
        if index is None or node is None:
            return
        if self.logic.centerViewsOnLandmark(node, index) is None:
            self.ui.statusLabel.text = _(
                "'{name}' has no position: place it in a view (Markups module, place mode) or reset it."
            ).format(name=self.review.rows()[index].name)

    def onResetPoint(self) -> None:
        index = self._selectedLandmark()
        if index is not None and self.review.rows():
            self.review.resetPoint(index)

    def onResetAll(self) -> None:
        if self.review.rows():
            self.review.resetPoints()

    def onUndoMove(self) -> None:
        index = self.review.undo()
        if index is not None:
            self.ui.resultsTable.selectRow(index)

    # --------------------------------------------------------------------------------------------
    # heatmap overlay

    def onHeatmapLandmarkSelected(self, index: int) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.heatmapLandmark = self.ui.heatmapLandmarkComboBox.itemData(index) or ""

    def _updateOverlay(self) -> None:
        parameters = self._parameterNode
        node = parameters.landmarks if parameters else None
        wanted = bool(parameters and parameters.showHeatmap)
        state = (node.GetID(), parameters.heatmapKind.value, parameters.heatmapLandmark) if wanted and node else None
        previous, self._overlayState = self._overlayState, state
        if state is None:
            if previous is not None:
                previousNode = slicer.mrmlScene.GetNodeByID(previous[0])
                if previousNode:
                    self.logic.hideHeatmap(previousNode)
            if wanted:
                self.ui.statusLabel.text = self.logic.heatmapProblem(None)
            return
        if state == previous:
            self.logic.setHeatmapOpacity(node, parameters.heatmapOpacity)
            return
        problem = self.logic.heatmapProblem(node)
        if problem:
            self.ui.statusLabel.text = problem
            return
        try:
            self.logic.showHeatmap(
                node, parameters.heatmapKind.value, parameters.heatmapLandmark or None, parameters.heatmapOpacity
            )
        except SCNLandmarksError as error:
            self.ui.statusLabel.text = str(error)

    # --------------------------------------------------------------------------------------------
    # export (asks before replacing a file: the logic says which files a write would replace)

    def _landmarksVolume(self):
        node = self._parameterNode.landmarks if self._parameterNode else None
        volume = node.GetNodeReference(SCNLandmarksMRML.markups.VOLUME_REFERENCE_ROLE) if node else None
        return volume or (self._parameterNode.inputVolume if self._parameterNode else None)

    def _mayWrite(self, paths) -> bool:
        question = self.logic.overwriteQuestion(paths)
        return not question or slicer.util.confirmYesNoDisplay(question, windowTitle=_("Replace files?"))

    def onExport(self) -> None:
        node = self._parameterNode.landmarks
        dialog = qt.QFileDialog(
            slicer.util.mainWindow(),
            _("Export landmarks"),
            f"{node.GetName()}.mrk.json",
            _("Slicer markups (*.mrk.json);;Slicer fiducial list (*.fcsv);;CSV table (*.csv)"),
        )
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)  # asked below, by the logic's rule
        if not dialog.exec_() or not dialog.selectedFiles():
            return
        path = dialog.selectedFiles()[0]
        if not self._mayWrite([path]):
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.review.export(path, overwrite=True)
            self.ui.statusLabel.text = _("Landmarks exported to {path}").format(path=written)

    def onSaveTrainingPair(self) -> None:
        folder = panel.trainingFolderText(self._parameterNode.trainingFolder)
        if not folder:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Training folder"))
            if not folder:
                return
            self._parameterNode.trainingFolder = folder
        volume = self._landmarksVolume()
        if not self._mayWrite(self.review.trainingPairPaths(folder, volumeNode=volume)):
            return
        with slicer.util.tryWithErrorDisplay(_("Saving the training pair failed."), waitCursor=True):
            imagePath, landmarksPath = self.review.saveTrainingPair(folder, overwrite=True, volumeNode=volume)
            self.ui.statusLabel.text = _("Saved {image} and {landmarks}.").format(
                image=imagePath, landmarks=landmarksPath
            )
        self._updateTrainingData()  # one more case to train on

    # --------------------------------------------------------------------------------------------
    # review first

    def onNextToReview(self) -> None:
        if not self.review.rows():
            return
        index = self.review.nextToReview(self._selectedLandmark())
        if index is None:
            self.ui.statusLabel.text = _("Nothing left to review (moved and missing points are skipped).")
            self.ui.resultsTable.clearSelection()
            return
        self.ui.resultsTable.selectRow(index)  # selecting the row centers the views on the point
        self.ui.resultsTable.scrollToItem(self.ui.resultsTable.item(index, 0))

    # --------------------------------------------------------------------------------------------
    # annotate a new landmark set (see SCNLandmarksMRML.annotate)

    def onReadLandmarkNames(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Landmark names"),
            "",
            _("Landmark or name files (*.mrk.json *.json *.fcsv *.csv *.txt);;All files (*)"),
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot read the landmark names."), waitCursor=True):
            self.ui.landmarkNamesEdit.plainText = "\n".join(annotate.readLandmarkNames(path))

    def onStartAnnotation(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None:
            slicer.util.errorDisplay(_("Select the input volume to annotate (Detection section)."))
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start annotating."), waitCursor=True):
            names = annotate.parseLandmarkNames(self.ui.landmarkNamesEdit.plainText)
            self._observeAnnotation(annotate.createAnnotationNode(slicer.mrmlScene, names, volume))
            self._parameterNode.landmarks = self._annotationNode  # "Save as training pair" saves it
            if self._placeMode is None:
                self._placeMode = annotate.PlaceMode(
                    slicer.modules.markups.logic(), slicer.app.applicationLogic().GetInteractionNode()
                )
            self._placeMode.start(self._annotationNode)
            self._onAnnotationChanged()

    def _observeAnnotation(self, node) -> None:
        if self._annotationNode is not None:
            self.removeObserver(
                self._annotationNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onAnnotationChanged
            )
        self._annotationNode = node
        if node is not None:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onAnnotationChanged)

    def _onAnnotationChanged(self, caller=None, event=None) -> None:
        node = self._annotationNode
        if node is None:
            return
        if annotate.updatePlacement(node) is None:
            # Every landmark placed or skipped (Slicer ends place mode itself after a click on the
            # last one, not after Skip); the user's persistence comes back (`annotate.PlaceMode`).
            slicer.app.applicationLogic().GetInteractionNode().SwitchToViewTransformMode()
        self.ui.annotationStatusLabel.text = annotate.annotationStatus(node).text
        self._updateButtons()

    def onSkipLandmark(self) -> None:
        if self._annotationNode is not None:
            annotate.skipNext(self._annotationNode)
            self._onAnnotationChanged()

    # --------------------------------------------------------------------------------------------
    # train (in a separate process; see SCNLandmarksMRML.training)

    def _setupTrainSection(self) -> None:
        base = self.ui.trainBaseComboBox
        for label, key in (
            (_("Detection model (fine-tune)"), BASE_SELECTED),
            (_("Model file..."), BASE_FILE),
            (_("New landmark set (from scratch)"), BASE_NEW),
        ):
            base.addItem(label, key)
        for key, minutes in training.TIME_BUDGETS.items():
            self.ui.trainBudgetComboBox.addItem(
                _("{budget} ({minutes:g} min)").format(
                    budget=_("Quick") if key == "quick" else _("Longer"), minutes=minutes
                ),
                key,
            )
        self.ui.trainingProgressBar.setVisible(False)
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(TRAINING_POLL_MS)
        self._trainTimer.timeout.connect(self._onPollTraining)
        self._trainBaseFile = ""
        self._trainBaseIndex = 0
        self._trainBaseShown = None

    def onTrainSectionCollapsed(self, collapsed: bool) -> None:
        if not collapsed and self._trainingDataStale:
            self._updateTrainingData()

    def _updateTrainingData(self) -> None:
        """The Train section's data line: the folder's cases and landmarks, or why it cannot train.

        Read when the section is open: reading the folder imports torch (seconds), which opening
        the module must not cost.
        """
        self._trainingDataStale = self.ui.trainCollapsibleButton.collapsed
        if self._trainingDataStale:
            return
        folder = panel.trainingFolderText(self._parameterNode.trainingFolder) if self._parameterNode else ""
        self._trainingData = None
        if not folder:
            self.ui.trainingDataLabel.text = _("Choose the training folder.")
        else:
            try:
                self._trainingData = training.inspectTrainingFolder(folder)
                self.ui.trainingDataLabel.text = self._trainingData.summary
            except SCNLandmarksError as error:
                self.ui.trainingDataLabel.text = str(error)
        self._updateTrainingBase()

    def _trainingBasePath(self) -> str | None:
        """The model to start from ("" when none is chosen yet), or None for a new landmark set."""
        key = self.ui.trainBaseComboBox.itemData(self.ui.trainBaseComboBox.currentIndex)
        if key == BASE_NEW:
            return None
        if key == BASE_FILE:
            return self._trainBaseFile
        return self._parameterNode.modelPath if self._parameterNode else ""

    def onTrainBaseActivated(self, index: int) -> None:
        combo = self.ui.trainBaseComboBox
        if combo.itemData(index) == BASE_FILE:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(),
                _("Model to start from"),
                "",
                _("SCN landmark models (*.safetensors);;All files (*)"),
            )
            if path:
                self._trainBaseFile = path
            elif not self._trainBaseFile:  # cancelled, and no file chosen before: the previous choice
                with SignalBlocker(combo):
                    combo.currentIndex = self._trainBaseIndex
        self._trainBaseIndex = combo.currentIndex
        self._updateTrainingBase()

    def _updateTrainingBase(self) -> None:
        """The line under "Start from": what training from that base does with these cases (read
        again only when the base or the cases changed: it reads the model file)."""
        base = self._trainingBasePath()
        if (base, self._trainingData) == self._trainBaseShown:
            return
        self._trainBaseShown = (base, self._trainingData)
        if self._trainingData is None:
            text = ""
        elif base is None:
            text = _("A new model is trained from scratch for these landmarks.")
        elif not base:
            text = _("Choose the model to start from.")
        else:
            try:
                text = training.checkBase(base, self._trainingData)
            except SCNLandmarksError as error:
                text = str(error)
        self.ui.trainBaseLabel.text = text
        self._updateButtons()

    def onStartTraining(self) -> None:
        if self._trainingData is None or dependencies.installationRunning() or not self._ensureDependencies():
            return
        base = self._trainingBasePath()
        if base == "":
            slicer.util.errorDisplay(_("Choose the model to start from."))
            return
        try:
            job = self.review.startTraining(
                self._trainingData,
                base,
                self.ui.trainNameLineEdit.text.strip(),
                training.TIME_BUDGETS[self.ui.trainBudgetComboBox.itemData(self.ui.trainBudgetComboBox.currentIndex)],
                self.ui.trainDeviceComboBox.itemData(self.ui.trainDeviceComboBox.currentIndex) or "auto",
                python=pythonForChildren(),
            )
        except SCNLandmarksError as error:
            self.ui.trainingStatusLabel.text = str(error)
            slicer.util.errorDisplay(str(error))
            return
        self.ui.trainingStatusLabel.text = _("Training '{name}' in a separate process...").format(name=job.name)
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.setVisible(True)
        self._trainTimer.start()
        self._updateButtons()

    def _onPollTraining(self) -> None:
        job = self.review.trainingJob
        try:
            outcome = self.review.pollTraining()
        except SCNLandmarksError as error:
            self._trainingEnded(str(error))
            slicer.util.errorDisplay(str(error))
            return
        progress = job.progress
        if progress is not None:
            self.ui.trainingProgressBar.value = round(100 * progress.fraction)
            self.ui.trainingStatusLabel.text = progress.text + (
                _(" (cancelling: the best model so far is kept)") if job.cancelRequested else ""
            )
        if outcome is None:
            return
        self._trainingEnded(outcome.message)
        if outcome.entry is not None:
            self._modelListKey = None
            if self._parameterNode is not None:  # None after a scene close: listed, selected by the user
                self._parameterNode.modelPath = str(outcome.entry.path)  # listed and selected at once

    def _trainingEnded(self, message: str) -> None:
        self._trainTimer.stop()
        self.ui.trainingProgressBar.setVisible(False)
        self.ui.trainingStatusLabel.text = message
        self._updateButtons()

    def onCancelTraining(self) -> None:
        self.review.cancelTraining()
        self._updateButtons()

    def onRemoveModel(self) -> None:
        combo = self.ui.userModelComboBox
        entry = SCNLandmarksMRML.entryForModel(combo.itemData(combo.currentIndex))
        if entry is None or not entry.userModel:
            return
        if not slicer.util.confirmYesNoDisplay(
            _("Remove '{name}' from your models? Its folder {folder} is deleted.").format(
                name=entry.name, folder=entry.path.parent
            ),
            windowTitle=_("Remove model"),
        ):
            return
        detecting = self._parameterNode is not None and entry == SCNLandmarksMRML.entryForModel(
            self._parameterNode.modelPath
        )
        with slicer.util.tryWithErrorDisplay(_("Cannot remove the model."), waitCursor=True):
            catalogue.removeUserModel(entry)
            self._modelListKey = None
            if detecting:
                self._parameterNode.modelPath = ""  # the first shipped model is selected again
            self._updateModelList()
            self._updateButtons()
            self.ui.trainingStatusLabel.text = _("'{name}' was removed.").format(name=entry.name)


class QtTable:
    """A QTableWidget seen through `panel.Table` (PythonQt makes rowCount a property)."""

    def __init__(self, table):
        self.table = table

    def rowCount(self) -> int:
        return self.table.rowCount

    def setRowCount(self, count: int) -> None:
        self.table.setRowCount(count)

    def item(self, row: int, column: int):
        return self.table.item(row, column)

    def setItem(self, row: int, column: int, item) -> None:
        self.table.setItem(row, column, item)


def _setItemColor(item, color) -> None:
    item.setBackground(qt.QBrush(qt.QColor(*color)) if color else qt.QBrush())
    item.setForeground(qt.QBrush(qt.QColor(0, 0, 0)) if color else qt.QBrush())


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


class SCNLandmarksLogic(ScriptedLoadableModuleLogic, _MRMLLogic):
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
        reason = self._skipReason()
        if reason:  # "Reload and Test" calls runTest directly: say why, and pass
            logging.warning(reason)
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_SCNLandmarksDetectCorrectExport()

    @staticmethod
    def _skipReason() -> str:
        """Why the test cannot run in this Slicer ("" when it can); it never installs anything."""
        return COMPATIBILITY_PROBLEM or dependencies.selfTestSkipReason()

    def _sampleAndModel(self, workDir: Path):
        """(image path, model path, true landmarks path or None, tolerance mm or None, from the catalogue)."""
        entry = SCNLandmarksMRML.sampleModel()
        if entry is not None and entry.available and entry.hasSample:
            return entry.sample, entry.path, entry.sampleLandmarks, entry.toleranceMm, True
        from SCNLandmarksLib.config import config_from_dict
        from SCNLandmarksLib.data.synthetic import make_dataset
        from SCNLandmarksLib.train import train

        why = (
            "no catalogue entry has a sample"
            if entry is None
            else (entry.unavailableReason or f"the sample {entry.sample} is missing")
        )
        self.delayDisplay(f"No catalogue sample model ({why}): training a tiny model on synthetic images")
        spec = make_dataset(
            workDir / "dataset", dimension=2, images=8, landmarks=4, size=(64, 48), spacing=(1.0, 1.3), validation=1
        )
        config = config_from_dict(
            {
                "dataset": str(spec),
                "output_dir": str(workDir / "run"),
                "grid": {"size": [32, 32], "spacing": [2.0, 2.0]},
                "heatmap": {"sigma_init": 3.0},
                "model": {
                    "params": {
                        "filters": 16,
                        "levels": 3,
                        "dropout": 0.0,
                        "sc_downsample": 4,
                        "sc_kernel": 5,
                        "sc_filters": 16,
                    }
                },
                # Few iterations: the test compares the module with the library, not accuracy.
                "training": {
                    "iterations": 80,
                    "batch_size": 4,
                    "learning_rate": 1e-3,
                    "validate_every": 40,
                    "checkpoint_every": 40,
                },
            },
            Path("/"),
        )
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
        outside = [
            n
            for n, v in zip(result.landmarkNames, ijk[:, :3])
            if not (np.all(np.isfinite(v)) and np.all(v >= -0.5) and np.all(v <= size - 0.5))
        ]
        self.assertEqual(outside, [], f"landmarks outside the volume: {outside}")
        if "AC" in result.landmarkNames and "PC" in result.landmarkNames:
            ac, pc = (result.pointsRas[result.landmarkNames.index(n)] for n in ("AC", "PC"))
            distance = float(np.linalg.norm(ac - pc))
            self.delayDisplay(f"AC-PC distance {distance:.1f} mm")
            low, high = self.AC_PC_RANGE_MM
            self.assertTrue(low <= distance <= high, f"AC-PC distance {distance:.1f} mm is not in {low}-{high} mm")

    def test_SCNLandmarksDetectCorrectExport(self):
        reason = self._skipReason()
        if reason:
            self.skipTest(reason)
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
        # The module's own path: the model runs on the worker thread, the points are made here.
        runner = DetectionRunner(logic)
        runner.start(volume, str(model), device="cpu")
        with self.assertRaises(SCNLandmarksError):
            runner.start(volume, str(model), device="cpu")  # a second start is refused
        result = runner.wait()
        self.delayDisplay(result.summary)
        self.assertEqual(result.markupsNode.GetNumberOfControlPoints(), len(result.landmarkNames))
        if fromCatalogue:
            self._checkAnatomy(volume, result)

        dimension = volumeDimension(volume)
        reference = Predictor.from_file(model, "cpu").predict(read_image(image, dimension))
        expected = reference.landmarks.points_lps
        if dimension == 2:
            expected = np.concatenate([expected, np.zeros((len(expected), 1))], axis=1)
        # Slicer may store the volume in another voxel order than the file; bfloat16 appearance layers
        # (auto precision where the CPU computes bfloat16 faster) then round a few thousandths of a mm apart.
        np.testing.assert_allclose(result.pointsRas, lps_to_ras(expected), atol=0.05)
        if truth is not None and tolerance is not None:
            true = read_landmarks(truth, names=result.landmarkNames, dimension=dimension).points_lps
            errors = np.linalg.norm(reference.landmarks.points_lps - true, axis=1)
            self.assertLessEqual(float(np.nanmedian(errors)), tolerance)

        self.delayDisplay("Heatmap overlay")
        heatmap = logic.showHeatmap(result.markupsNode, "final", None, 0.5)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(
            slicer.util.arrayFromVTKMatrix(_ijkToRas(heatmap)), slicer.util.arrayFromVTKMatrix(_ijkToRas(volume))
        )

        self.delayDisplay("Correcting and exporting (the review session the panel binds to)")
        node = result.markupsNode
        review = ReviewSession(logic)
        review.setDetection(node)
        first = next(i for i, row in enumerate(review.rows()) if row.positionRas is not None)
        moved = np.array(node.GetNthControlPointPositionVector(first)) + np.array([2.0, -1.0, 0.0])
        node.SetNthControlPointPosition(first, *moved)  # as a drag in a view does
        self.assertEqual(review.rows()[first].status, LandmarkStatus.MOVED)
        self.assertTrue(review.unsaved and review.canUndo)
        exported = review.export(workDir / "corrected.mrk.json")
        loaded = slicer.util.loadMarkups(str(exported))
        np.testing.assert_allclose(loaded.GetNthControlPointPositionVector(first), moved, atol=1e-6)
        self.assertEqual(review.undo(), first)
        self.assertNotEqual(review.rows()[first].status, LandmarkStatus.MOVED)

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

"""`SCNLandmarks.py` itself, imported and its panel set up: on an older Slicer, with a PyTorch that
cannot load, and without importing torch on the GUI thread.

Stand-ins replace the parts of the Slicer application that slicer-core lacks (Qt widgets, ctk, the
scripted-module base classes, the parameter node wrapper); everything MRML stays real. Each case
runs this file as a script in a child process (it replaces modules in `sys.modules`)::

    python Testing/test_slicer_app_setup.py MAJOR MINOR REPORT.json

which imports the module with `slicer.app` reporting Slicer MAJOR.MINOR, sets up the widget, waits
for the PyTorch probe and the model file reader, and writes what the panel shows to REPORT.json;
with a fifth argument, `panel`, it then also goes through the panel's steps that `panelSteps` lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
import typing
from concurrent.futures import Future
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "SCNLandmarks"


class Signal:
    """A signal (`connect`) or a method that does nothing: PythonQt attributes are either."""

    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def __call__(self, *args, **kwargs):
        return Widget()


class Widget:
    """A Qt widget as PythonQt shows it: properties as attributes, signals with `connect`, and the
    combo-box calls the module makes; anything else is a call that does nothing."""

    def __init__(self, name: str = "", text: str = ""):
        self.name = name
        self.text = text
        self.toolTip = ""
        self.enabled = True
        self.visible = True
        self.collapsed = name.endswith("CollapsibleButton")
        self.currentPath = ""
        self.plainText = ""
        self.currentIndex = -1
        self.rowCount = 0
        self.items: list[list] = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        signal = Signal()
        setattr(self, name, signal)
        return signal

    # combo boxes
    @property
    def count(self) -> int:
        return len(self.items)

    def addItem(self, label, data=None):
        self.items.append([label, data, True])
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self.items, self.currentIndex = [], -1

    def findData(self, data) -> int:
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def itemText(self, index):
        return self.items[index][0]

    def setItemData(self, *args):
        pass

    def model(self):
        combo = self
        return types.SimpleNamespace(
            item=lambda i: types.SimpleNamespace(setEnabled=lambda on: combo.items[i].__setitem__(2, on))
        )

    # everything else the module calls
    def blockSignals(self, block):
        return False

    def setVisible(self, visible):
        self.visible = visible

    def setRowCount(self, count):
        self.rowCount = count

    def appendPlainText(self, text):
        self.plainText += text + "\n"

    def selectedItems(self):
        return []

    def sortFilterProxyModel(self):
        return self.__dict__.setdefault("proxy", Widget("proxy"))


class Ui:
    def __init__(self):
        self.widgets: dict[str, Widget] = {}

    def __getattr__(self, name):
        if name.startswith("_") or name == "widgets":
            raise AttributeError(name)
        return self.widgets.setdefault(name, Widget(name))


def installStubs(major: int, minor: int) -> dict:
    """Put the application's missing parts into `sys.modules`; returns what the test inspects."""
    import slicer
    import slicer.util

    from SCNLandmarksMRML import createHeadlessScene

    headless = createHeadlessScene()
    labels: list[Widget] = []
    ui = Ui()
    seen = {"ui": ui, "labels": labels, "connections": []}

    qt = types.ModuleType("qt")
    qt.QTimer = lambda *args: Widget("timer")
    qt.QLabel = lambda text="": labels.append(Widget("label", text)) or labels[-1]
    qt.QHeaderView = types.SimpleNamespace(Stretch=1)
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, WaitCursor=16)
    for name in ("QBrush", "QColor", "QTableWidgetItem", "QFileDialog", "QWidget"):
        setattr(qt, name, Widget)
    sys.modules["qt"] = qt
    sys.modules["ctk"] = types.ModuleType("ctk")

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    sys.modules["slicer.i18n"] = i18n

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        # As the real wrapper: every annotation of the class must resolve in the module's names.
        hints = typing.get_type_hints(cls, include_extras=True)

        class Wrapped:
            def __init__(self, node):
                self.parameterNode = node
                for field in hints:
                    setattr(self, field, getattr(cls, field, None))

            def __getattr__(self, name):  # AddObserver and the rest: the node's, as the real wrapper
                return getattr(self.parameterNode, name)

            def connectGui(self, gui):
                return "tag"

            def disconnectGui(self, tag):
                pass

        return Wrapped

    wrapper.parameterNodeWrapper = parameterNodeWrapper
    wrapper.WithinRange = lambda low, high: (low, high)
    sys.modules["slicer.parameterNodeWrapper"] = wrapper

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=False)

        def setup(self):
            self.layout = Widget("layout")

        def resourcePath(self, path):
            return str(MODULE_DIR / "Resources" / path)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()

        def getParameterNode(self):
            return headless.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = object
    sys.modules["slicer.ScriptedLoadableModule"] = scripted

    slicer.app = types.SimpleNamespace(
        majorVersion=major,
        minorVersion=minor,
        connect=lambda signal, slot: seen["connections"].append(signal),
        applicationLogic=lambda: headless.applicationLogic,
        commandOptions=lambda: types.SimpleNamespace(testingEnabled=True),
        setOverrideCursor=lambda cursor: None,  # the wait cursor of slicer.util.tryWithErrorDisplay
        restoreOverrideCursor=lambda: None,
    )
    slicer.mrmlScene = headless.scene
    slicer.util.loadUI = lambda path: Widget("ui")
    slicer.util.childWidgetVariables = lambda widget: ui
    slicer.util.mainWindow = lambda: None
    return seen


def panelSteps(widget, module, seen: dict) -> dict:
    """Steps through the panel as a user and Slicer would; returns what each left shown."""
    import slicer

    from SCNLandmarksMRML import catalogue, training
    from SCNLandmarksMRML.overlays import HEATMAP_KIND_ATTRIBUTE

    ui, steps = seen["ui"], {}

    # Slicer starts: the bundled sample goes to Sample Data.
    registered = []
    sampleData = types.ModuleType("SampleData")
    sampleData.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **arguments: registered.append(arguments)
    )
    sys.modules["SampleData"] = sampleData
    module.registerSampleData()
    steps["sampleData"] = [
        {key: value for key, value in r.items() if key.startswith("load") or key == "checksums"} for r in registered
    ]

    # A heatmap joins the scene: the input volume selector hides it.
    heatmap = slicer.vtkMRMLScalarVolumeNode()
    heatmap.SetAttribute(HEATMAP_KIND_ATTRIBUTE, "final")
    slicer.mrmlScene.AddNode(heatmap)
    steps["heatmap"] = heatmap.GetID()
    steps["hiddenFromInput"] = list(ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs)

    # Train, "Start from" the Detection model: the line below follows that model.
    training.checkBase = lambda base, data: f"from {Path(base).name}"
    widget._trainingData = "the cases"  # read by checkBase only
    startFrom = []
    for name in ("a.safetensors", "b.safetensors"):
        widget._parameterNode.modelPath = f"/models/{name}"
        widget._onParameterNodeModified()  # what the parameter node's observer calls
        startFrom.append(ui.trainBaseLabel.text)
    steps["startFrom"] = startFrom

    # "Model file...": cancelled (the previous choice comes back), a file, cancelled again (kept).
    answers = iter(["", "/models/c.safetensors", ""])
    sys.modules["qt"].QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *args: next(answers))
    base, modelFile = ui.trainBaseComboBox, []
    for _ in range(3):
        base.currentIndex = 1
        widget.onTrainBaseActivated(1)
        modelFile.append([base.itemData(base.currentIndex), ui.trainBaseLabel.text])
    steps["modelFile"] = modelFile

    # Your models: the Train section's own list, which Remove acts on (not the Detection model).
    mine = catalogue.registerUserModel(catalogue.sampleModel().path, "Mine")
    widget._modelListKey = None
    widget._updateModelList()
    widget._updateButtons()
    steps["yourModels"] = [item[0] for item in ui.userModelComboBox.items]
    steps["removeEnabled"] = ui.removeModelButton.enabled
    slicer.util.confirmYesNoDisplay = lambda *args, **options: True
    widget.onRemoveModel()
    steps["yourModelsAfterRemove"] = [item[0] for item in ui.userModelComboBox.items]
    steps["removed"] = not mine.path.exists()
    steps["detectionModelAfterRemove"] = widget._parameterNode.modelPath

    # While packages are installed (pip processes GUI events), a second click starts nothing.
    from SCNLandmarksMRML import dependencies

    actions = (ui.detectButton, ui.startTrainingButton, ui.reinstallTorchButton)
    widget._parameterNode.inputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with dependencies.installing():
        widget._updateButtons()
        steps["enabledWhileInstalling"] = [button.enabled for button in actions]
        ui.statusLabel.text = "installing"
        widget.onDetect()
        widget.onReinstallTorch()
        steps["statusAfterClicks"] = ui.statusLabel.text
    widget._updateButtons()
    steps["enabledAfter"] = [button.enabled for button in actions]

    # The scene is closed while a training runs and the user is in another module; it then ends.
    widget.setParameterNode(None)
    entry = types.SimpleNamespace(path=Path("/models/new/model.safetensors"), name="new")
    outcome = training.TrainingOutcome(entry, "'new' was added to your models", False, {})
    job = types.SimpleNamespace(running=True, progress=None, cancelRequested=False, poll=lambda wait=0.0: outcome)
    widget.review.trainingJob = job
    widget._onPollTraining()
    steps["trainingEndedAfterSceneClose"] = ui.trainingStatusLabel.text
    return steps


def main(major: int, minor: int, report: Path, steps: bool = False) -> None:
    sys.path.insert(0, str(MODULE_DIR))
    from SCNLandmarksMRML import compatibility

    # This Python stands in for the supported one: the Slicer version alone decides here.
    compatibility.MINIMUM_PYTHON = sys.version_info[:2]
    seen = installStubs(major, minor)
    import SCNLandmarks

    widget = SCNLandmarks.SCNLandmarksWidget()
    # The model file reader's work waits until setup has returned, so that a torch import there
    # cannot be mistaken for one by setup itself (the probe asks torch in a child process).
    reader, held = widget._modelInfoReader, []
    widget._modelInfoReader = types.SimpleNamespace(submit=lambda *call: held.append((Future(), call)) or held[-1][0])
    widget.setup()
    torchOnSetup = "torch" in sys.modules
    for future, (function, *args) in held:
        future.set_result(reader.submit(function, *args).result())
    result = {
        "problem": SCNLandmarks.COMPATIBILITY_PROBLEM,
        "labels": [label.text for label in seen["labels"]],
        "parameterNodeClass": hasattr(SCNLandmarks, "SCNLandmarksParameterNode"),
        "connections": seen["connections"],
        "torchImportedBySetup": torchOnSetup,
        "libraryFile": getattr(sys.modules.get("SCNLandmarksLib"), "__file__", None),
        "topLevelTesting": "Testing" in sys.modules or any(Path(p).resolve() == MODULE_DIR.parent for p in sys.path),
    }
    if not SCNLandmarks.COMPATIBILITY_PROBLEM:
        # What the timer does in the application: poll until the probe and the reader answer.
        deadline = time.monotonic() + 120
        while (widget._torchProbe is not None or widget._modelInfoPending) and time.monotonic() < deadline:
            widget._onPollBackground()
            time.sleep(0.1)
        ui = seen["ui"]
        result.update(
            status=ui.statusLabel.text,
            devices=[item[0] for item in ui.deviceComboBox.items],
            trainDevices=[item[0] for item in ui.trainDeviceComboBox.items],
            reinstallEnabled=ui.reinstallTorchButton.enabled,
            reinstallConnected=bool(ui.reinstallTorchButton.clicked.slots),
            modelInfo=ui.modelInfoLabel.text,
        )
        if steps:
            result["steps"] = panelSteps(widget, SCNLandmarks, seen)
    report.write_text(json.dumps(result), encoding="utf-8")


def _panel(tmp_path: Path, version: tuple[int, int], pythonPath: Path | None = None, steps: bool = False) -> dict:
    import pytest

    pytest.importorskip("slicer")
    from SCNLandmarksMRML.catalogue import USER_MODELS_ENVIRONMENT

    report = tmp_path / "panel.json"
    environment = dict(os.environ, **{USER_MODELS_ENVIRONMENT: str(tmp_path / "user models")})
    if pythonPath is not None:  # first on the path of this process and of the probe it starts
        environment["PYTHONPATH"] = os.pathsep.join([str(pythonPath), environment.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, __file__, *map(str, version), str(report), *(["panel"] if steps else [])],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(report.read_text(encoding="utf-8"))


def test_on_slicer_5_8_the_module_loads_and_its_panel_says_which_slicer_to_install(tmp_path):
    panel = _panel(tmp_path, (5, 8))
    assert "needs 3D Slicer 5.10 or later" in panel["problem"] and "this is Slicer 5.8" in panel["problem"]
    assert panel["labels"] == [panel["problem"]]
    # Nothing that names the library's types is evaluated there (the parameter node is not defined).
    assert not panel["parameterNodeClass"]


def test_the_panel_opens_without_importing_torch_and_the_probe_fills_the_device_lists(tmp_path):
    panel = _panel(tmp_path, (5, 10))
    assert panel["problem"] == "" and panel["parameterNodeClass"]
    assert not panel["torchImportedBySetup"]
    assert not panel["topLevelTesting"]  # the repository is not put on sys.path
    assert [label.split(" (")[0] for label in panel["devices"]] == ["Auto", "GPU", "CPU"]
    assert panel["devices"] == panel["trainDevices"] and "being checked" not in panel["devices"][1]
    assert panel["modelInfo"].startswith("3D model, 32 landmarks")  # read off the GUI thread


def test_a_torch_that_cannot_load_leaves_the_panel_working_and_says_why(tmp_path):
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise OSError('[WinError 126] The specified module could not be found. "
        "Error loading C:/Slicer/torch/lib/c10.dll or one of its dependencies.')\n"
    )
    panel = _panel(tmp_path, (5, 10), pythonPath=broken.parent)
    assert panel["status"].startswith("PyTorch is installed but cannot be loaded: [WinError 126]")
    assert "c10.dll" in panel["status"]
    assert panel["devices"][0] == "Auto (PyTorch cannot be loaded)" and panel["devices"] == panel["trainDevices"]
    assert panel["modelInfo"].startswith("PyTorch is installed but cannot be loaded")
    assert panel["reinstallEnabled"] and panel["reinstallConnected"]


def test_the_panel_keeps_the_users_choices_and_survives_a_scene_close(tmp_path):
    steps = _panel(tmp_path, (5, 10), steps=True)["steps"]
    # Sample Data re-copies an updated sample: it is registered with its checksum.
    [sample] = steps["sampleData"]
    assert sample["checksums"].startswith("SHA256:") and sample["loadFileTypes"] == "VolumeFile"
    assert steps["hiddenFromInput"] == [steps["heatmap"]]
    assert steps["startFrom"] == ["from a.safetensors", "from b.safetensors"]  # not stale
    assert steps["modelFile"] == [
        ["selected", "from b.safetensors"],  # cancelled: the Detection model again, not a stuck "Model file..."
        ["file", "from c.safetensors"],
        ["file", "from c.safetensors"],  # cancelled: the file chosen before stays
    ]
    assert steps["yourModels"] == ["Mine"] and steps["removeEnabled"]
    assert steps["yourModelsAfterRemove"] == [] and steps["removed"]
    assert steps["detectionModelAfterRemove"] == "/models/b.safetensors"  # Remove left the Detection model alone
    assert steps["trainingEndedAfterSceneClose"] == "'new' was added to your models"
    assert steps["enabledWhileInstalling"] == [False, False, False] and steps["statusAfterClicks"] == "installing"
    assert steps["enabledAfter"] == [True, True, True]


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:] == ["panel"])

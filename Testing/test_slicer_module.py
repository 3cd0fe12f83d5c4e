"""The Slicer module's decisions, checked without Qt: supported versions, what Slicer loads parses on
the oldest supported Python, dependencies and devices, the self-test's skip, the model selector, the
results table, short labels, replacing files, the sample data and the extension's metadata."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # slicer-core: the MRML package below needs it (a test dependency, never skipped)

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SCNLandmarks"
sys.path.insert(0, str(MODULE_DIR))

from SCNLandmarksMRML import dependencies, panel  # noqa: E402
from SCNLandmarksMRML.catalogue import ModelEntry, catalogueModels, sampleDataSources  # noqa: E402
from SCNLandmarksMRML.compatibility import MINIMUM_PYTHON, MINIMUM_SLICER, compatibilityProblem  # noqa: E402
from SCNLandmarksMRML.markups import LandmarkRow  # noqa: E402

# ------------------------------------------------------------------------------------------------
# versions


def test_the_version_check_names_what_is_needed_and_what_was_found():
    assert (MINIMUM_SLICER, MINIMUM_PYTHON) == ((5, 10), (3, 12))
    assert compatibilityProblem((5, 10), (3, 12, 10)) == ""
    assert compatibilityProblem((5, 11, 0), (3, 13, 1)) == ""
    message = compatibilityProblem((5, 8, 1), (3, 9, 10))
    assert "needs 3D Slicer 5.10 or later (Python 3.12)" in message and "Slicer 5.8.1 with Python 3.9.10" in message
    assert compatibilityProblem((5, 10), (3, 11, 9)) != ""  # a custom build on an older Python


def _slicerLoadedFiles() -> list[Path]:
    """The module file, the MRML package the CMake installs, and the bundled library."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = [
        MODULE_DIR / item.replace("${MODULE_NAME}", "SCNLandmarks")
        for item in re.findall(r"^\s+(\S+\.py)\s*$", text, flags=re.MULTILINE)
    ]
    return listed + sorted((REPO / "SCNLandmarksLib").rglob("*.py"))


def _vermin(target: str, paths: list[Path]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-c",
        "import sys; from vermin import main; sys.exit(main())",
        "--no-tips",
        "--violations",
        "--eval-annotations",
        f"-t={target}-",
        *map(str, paths),
    ]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_every_file_slicer_loads_runs_on_the_oldest_supported_python(tmp_path):
    files = _slicerLoadedFiles()
    assert MODULE_DIR / "SCNLandmarksMRML" / "logic.py" in files and REPO / "SCNLandmarksLib" / "cli.py" in files
    checked = _vermin("3.12", files)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # What runs before the version check must parse on the Python of older Slicers (3.9), so that
    # the check can speak (that it also runs there is test_slicer_app_setup's Slicer 5.8 case).
    early = [
        MODULE_DIR / "SCNLandmarks.py",
        MODULE_DIR / "SCNLandmarksMRML" / "__init__.py",
        MODULE_DIR / "SCNLandmarksMRML" / "compatibility.py",
    ]
    checked = _vermin("3.9", early)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check does fail on a newer feature (copy.replace is 3.13).
    (tmp_path / "newer.py").write_text("import copy\nvalue = copy.replace(object())\n")
    assert _vermin("3.12", [tmp_path / "newer.py"]).returncode != 0


def test_the_compatibility_check_imports_nothing_else_of_the_package():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from SCNLandmarksMRML.compatibility import "
        "compatibilityProblem; loaded = [m for m in sys.modules if m.startswith(('SCNLandmarks', 'torch', "
        "'slicer', 'vtk'))]; print(loaded)"
    )
    shown = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "['SCNLandmarksMRML', 'SCNLandmarksMRML.compatibility']"


# ------------------------------------------------------------------------------------------------
# dependencies and devices


def test_the_torch_requirement_is_the_librarys_lower_bound_and_the_tested_range_its_upper():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch == "torch" + dependencies.TORCH_REQUIREMENT + "," + dependencies.TORCH_TESTED
    assert "<" not in dependencies.TORCH_REQUIREMENT  # a newer torch in the shared Python is kept


@pytest.mark.parametrize(
    "version, expected",
    [
        ("2.13.0+cpu", True),
        ("2.2", True),
        ("2.2.0", True),
        ("2.1.2", False),
        ("2.14.0", True),
        ("1.13.1+cu117", False),
        ("2.5.0rc1", True),
        ("garbage", False),
    ],
)
def test_torch_versions_against_the_requirement(version, expected):
    assert dependencies.satisfies(version, dependencies.TORCH_REQUIREMENT) is expected


def test_a_too_old_torch_is_not_ready_and_is_replaced_through_pytorchutils_only():
    status = dependencies.dependencyStatus(torchVersion="2.1.0", importedTorchVersion="", pytorchUtils=True, missing=[])
    assert not status.ready and status.torchUnsupported and not status.torchAvailable
    assert "2.1.0 is installed, but this module needs torch>=2.2" in status.message
    plan = dependencies.installationPlan(status, nvidiaGpu=False)
    torch = next(p for p in plan if p.name == "torch")
    assert torch.installer == "PyTorchUtils" and torch.requirement == "torch>=2.2"
    torchvision = next(p for p in plan if p.name == "torchvision")  # PyTorchUtils installs it too
    assert torchvision.installer == "PyTorchUtils" and torchvision.requirement == "torchvision>=0.17"
    question = dependencies.consentMessage(plan, replacesTorch=True)
    for package in plan:
        assert package.requirement in question and package.size in question
    assert "removed first; restart Slicer" in question

    # Without the PyTorch extension torch is never planned (no plain-pip fallback): the message says why.
    status = dependencies.dependencyStatus(
        torchVersion="", importedTorchVersion="", pytorchUtils=False, missing=["safetensors>=0.4"]
    )
    plan = dependencies.installationPlan(status, nvidiaGpu=True)
    assert [p.name for p in plan] == ["safetensors"] and plan[0].installer == "pip"
    assert "'PyTorch' extension" in status.message and "Extensions Manager" in status.message
    assert "safetensors>=0.4" in status.message

    status = dependencies.dependencyStatus(torchVersion="", importedTorchVersion="", pytorchUtils=True, missing=[])
    assert (
        dependencies.installationPlan(status, nvidiaGpu=True)[0].size
        == dependencies.DOWNLOAD_SIZES["torch (CUDA build)"]
    )


def test_a_newer_torch_than_tested_is_kept_with_a_warning():
    status = dependencies.dependencyStatus(
        torchVersion="2.15.1", importedTorchVersion="", pytorchUtils=True, missing=[]
    )
    assert status.ready and status.message == "" and not status.torchUnsupported
    assert "2.15.1 is newer than the releases this module was tested with (torch<2.14)" in status.warning
    assert dependencies.installationPlan(status, nvidiaGpu=False) == []  # nothing is replaced
    assert dependencies.dependencyStatus(torchVersion="2.13.0", pytorchUtils=True, missing=[]).warning == ""


def test_a_torch_that_cannot_load_is_reported_and_reinstalled():
    error = "[WinError 126] The specified module could not be found. Error loading c10.dll"
    status = dependencies.dependencyStatus(
        torchVersion="2.13.0", importedTorchVersion="", pytorchUtils=True, missing=[], torchLoadError=error
    )
    assert not status.ready and status.message.startswith(f"PyTorch is installed but cannot be loaded: {error}")
    assert "Reinstall PyTorch" in status.message
    plan = dependencies.installationPlan(status, nvidiaGpu=False)
    assert [p.name for p in plan][:2] == ["torch", "torchvision"]
    facts = dependencies.DeviceFacts("2.13.0", "", (), True, error)
    assert all("cannot be loaded" in choice.tooltip for choice in dependencies.deviceChoices(facts))
    assert dict(dependencies.environmentReport(facts))["torch"].endswith(error)


def test_a_torch_replaced_in_the_session_needs_a_restart():
    status = dependencies.dependencyStatus(
        torchVersion="2.13.0", importedTorchVersion="2.1.0", pytorchUtils=True, missing=[]
    )
    assert status.restartNeeded and not status.ready and "restart Slicer" in status.message
    assert dependencies.installationPlan(status, nvidiaGpu=False) == []
    same = dependencies.dependencyStatus(
        torchVersion="2.13.0+cpu", importedTorchVersion="2.13.0+cpu", pytorchUtils=False, missing=[]
    )
    assert same.ready and same.message == ""


def test_the_device_list_tells_the_truth():
    cpuBuildOnNvidia = dependencies.deviceChoices(dependencies.DeviceFacts("2.13.0+cpu", "", (), True))
    auto, cuda, cpu = cpuBuildOnNvidia
    assert "CPU-only" in auto.label and not cuda.available and "CPU-only build" in cuda.label
    assert "NVIDIA GPU" in cuda.tooltip and "Reinstall PyTorch" in cuda.tooltip and cpu.available
    twoGpus = dependencies.DeviceFacts("2.13.0+cu126", "12.6", ("NVIDIA H200", "NVIDIA H200"), True)
    withGpu = dependencies.deviceChoices(twoGpus)
    assert withGpu[1].available and withGpu[1].label == "GPU: NVIDIA H200 (+1 more)"
    driverTooOld = dependencies.deviceChoices(dependencies.DeviceFacts("2.13.0+cu126", "12.6", (), True))
    assert not driverTooOld[1].available and "driver" in driverTooOld[1].tooltip
    none = dependencies.deviceChoices(dependencies.DeviceFacts("2.13.0+cpu", "", (), False))
    assert none[1].label == "GPU (no CUDA GPU found)" and not none[1].available
    noTorch = dependencies.deviceChoices(dependencies.DeviceFacts("", "", (), True))
    assert "not installed" in noTorch[0].label
    report = dict(dependencies.environmentReport(dependencies.DeviceFacts("2.13.0+cpu", "", (), True)))
    assert report["torch build"] == "CPU only" and report["NVIDIA GPU on this computer"] == "yes"
    assert report["torch requirement"] == "torch>=2.2 (tested: torch<2.14)" and "CPU-only build" in report["note"]
    checking = dependencies.deviceChoices(dependencies.DeviceFacts("2.13.0+cu126", "", None, True))
    assert checking[1].label == "GPU (being checked)" and not checking[1].available and checking[0].available


def test_this_computers_devices_are_read_from_its_torch_in_a_child_process():
    import torch

    probe = dependencies.TorchProbe(sys.executable)
    probe.start()
    assert probe.running or probe.poll() is not None  # it returns at once
    facts = probe.wait()
    assert facts.torchVersion == torch.__version__ and facts.cudaBuild == (torch.version.cuda or "")
    assert len(facts.gpuNames) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert facts.loadError == "" and dependencies.installedFacts().gpuNames is None


class FakeTorchUtils:
    """PyTorchUtilsLogic as `dependencies.install` uses it: records the calls."""

    def __init__(self):
        self.calls = []

    def uninstallTorch(self):
        self.calls.append("uninstall")

    def installTorch(self, **options):
        self.calls.append(("install", options))
        if dependencies.installationRunning():  # pip processes events: a second click lands here
            with pytest.raises(dependencies.InstallationRunning):
                dependencies.install([], self, lambda requirements: None)
        return object()


def test_one_installation_at_a_time_with_torchvision_bounded(monkeypatch):
    status = dependencies.dependencyStatus(torchVersion="", importedTorchVersion="", pytorchUtils=True, missing=[])
    plan = dependencies.installationPlan(status, nvidiaGpu=False) + [
        dependencies.PlannedPackage("safetensors", "safetensors>=0.4", "pip", "")
    ]
    utils, pip = FakeTorchUtils(), []
    assert dependencies.install(plan, utils, pip.append) and not dependencies.installationRunning()
    assert utils.calls == [
        (
            "install",
            {"askConfirmation": False, "torchVersionRequirement": ">=2.2", "torchvisionVersionRequirement": ">=0.17"},
        )
    ]
    assert pip == [["safetensors>=0.4"]]
    # A torch loaded in this process is never uninstalled under it (this test process has torch).
    with pytest.raises(RuntimeError, match="next start"):
        dependencies.install(plan, FakeTorchUtils(), pip.append, replaceTorch=True)
    monkeypatch.setattr(dependencies, "torchLoaded", lambda: False)
    utils = FakeTorchUtils()
    dependencies.install(plan, utils, pip.append, replaceTorch=True)
    assert utils.calls[0] == "uninstall" and utils.calls[1][0] == "install"


def test_a_reinstall_waits_for_the_next_start_in_the_settings_folder(tmp_path):
    assert dependencies.torchLoaded()  # this process imported torch
    status = dependencies.dependencyStatus(torchVersion="2.13.0", importedTorchVersion="", pytorchUtils=True)
    plan = dependencies.installationPlan(status, nvidiaGpu=False, forceTorch=True)
    assert "replaced when Slicer starts next" in dependencies.consentMessage(plan, True, torchLoaded=True)
    assert dependencies.pendingTorchReinstall(tmp_path) is None
    dependencies.requestTorchReinstall(tmp_path, plan)
    assert dependencies.pendingTorchReinstall(tmp_path) == plan
    dependencies.clearTorchReinstall(tmp_path)
    assert dependencies.pendingTorchReinstall(tmp_path) is None
    (tmp_path / dependencies.REINSTALL_NOTE).write_text("not json")
    assert dependencies.pendingTorchReinstall(tmp_path) is None  # dropped: nothing installs without a readable yes
    assert not (tmp_path / dependencies.REINSTALL_NOTE).exists()


def test_log_lines_from_any_thread_wait_for_the_gui_thread():
    import logging
    import threading

    lines = dependencies.LogLines()
    lines.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.install")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        worker = threading.Thread(target=lambda: logger.info("from pip's reader thread"))
        worker.start()
        worker.join()
        logger.info("from the GUI thread")
    finally:
        logger.removeHandler(lines)
    assert lines.take() == ["from pip's reader thread", "from the GUI thread"] and lines.take() == []


def test_what_the_installer_prints_reaches_the_log_and_still_the_console(capsys):
    lines = dependencies.LogLines()
    with lines.printed():
        print("Collecting torch>=2.2")  # as slicer.util.logProcessOutput passes pip's lines on
        print("Downloading", end="")
        print(" 2.1 GB")
        sys.stdout.write("Successfully installed torch")
    assert lines.take() == ["Collecting torch>=2.2", "Downloading 2.1 GB", "Successfully installed torch"]
    assert capsys.readouterr().out == "Collecting torch>=2.2\nDownloading 2.1 GB\nSuccessfully installed torch"
    print("after the installation")
    assert lines.take() == []


def test_the_self_test_skips_with_a_reason_without_torch_and_runs_with_it():
    missing = dependencies.dependencyStatus(torchVersion="", importedTorchVersion="", pytorchUtils=True, missing=[])
    reason = dependencies.selfTestSkipReason(missing)
    assert reason.startswith("Skipped:") and "PyTorch is not installed" in reason and "never install" in reason
    assert dependencies.selfTestSkipReason() == ""  # this environment has torch: the real test runs


def test_a_missing_package_is_named():
    assert "PyTorch is needed" in dependencies.missingModuleMessage(ModuleNotFoundError("x", name="torch"))
    message = dependencies.missingModuleMessage(ModuleNotFoundError("x", name="safetensors.torch"))
    assert "'safetensors'" in message and "PyTorch" not in message


# ------------------------------------------------------------------------------------------------
# model selector, table, training folder


def _entry(tmp_path: Path, name: str, present: bool) -> ModelEntry:
    path = tmp_path / name / "model.safetensors"
    if present:
        path.parent.mkdir()
        path.write_bytes(b"model")
    return ModelEntry(name=name, path=path, description=f"{name} model")


def test_the_model_selector_always_shows_the_model_that_will_run(tmp_path):
    entries = [_entry(tmp_path, "absent", False), _entry(tmp_path, "shipped", True)]
    choices, index = panel.modelChoices(entries)
    assert [c.label for c in choices] == ["absent (not installed)", "shipped", "Load model file..."]
    assert index == 1 and not choices[0].enabled and "never downloaded" in choices[0].tooltip

    fromScene = tmp_path / "elsewhere" / "mine.safetensors"  # saved with a scene, not on this computer
    choices, index = panel.modelChoices(entries, str(fromScene))
    assert choices[index].data == str(fromScene) and choices[index].label == "mine.safetensors (file not found)"
    assert "load it again" in choices[index].tooltip

    loaded = tmp_path / "loaded.safetensors"
    loaded.write_bytes(b"model")
    # After "Load model file..." was cancelled the current model is still the one shown.
    choices, index = panel.modelChoices(entries, str(entries[1].path), [str(loaded)])
    assert choices[index].label == "shipped" and [c.label for c in choices][2] == "loaded.safetensors"
    choices, index = panel.modelChoices(entries, str(loaded), [str(loaded)])
    assert choices[index].label == "loaded.safetensors" and len(choices) == 4
    assert panel.modelChoices([entries[0]])[1] == -1


class FakeItem:
    def __init__(self):
        self._text = ""
        self.color = None
        self.owner = None

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = text


class FakeTable:
    """Records every call as QTableWidget would see it; refuses an item it already owns (Qt warns)."""

    def __init__(self):
        self.rows: list[list[FakeItem | None]] = []
        self.setItemCalls = 0

    def rowCount(self) -> int:
        return len(self.rows)

    def setRowCount(self, count: int) -> None:
        self.rows = [self.rows[r] if r < len(self.rows) else [None] * 3 for r in range(count)]

    def item(self, row: int, column: int):
        return self.rows[row][column]

    def setItem(self, row: int, column: int, item: FakeItem) -> None:
        assert item.owner is None, "an item the table already owns was inserted again"
        item.owner = self
        self.rows[row][column] = item
        self.setItemCalls += 1


def _setColor(item: FakeItem, color) -> None:
    item.color = color


def _rows(statuses, confidences) -> list[LandmarkRow]:
    return [LandmarkRow(f"L{i}", i, c, s, None, None) for i, (s, c) in enumerate(zip(statuses, confidences))]


def test_the_table_is_updated_in_place():
    table, colors = FakeTable(), {}
    rows = panel.tableRows(_rows(["detected", "low confidence", "missing"], [0.9, 0.3, float("nan")]))
    assert rows[2].texts == ("L2", "", "missing") and rows[1].color == panel.STATUS_COLORS["low confidence"]
    assert panel.updateTable(table, rows, FakeItem, _setColor, colors) == 9 and table.setItemCalls == 9
    owned = [item for row in table.rows for item in row]
    # A drag fires this for every mouse move: nothing changes, nothing is inserted again.
    for _ in range(3):
        assert panel.updateTable(table, rows, FakeItem, _setColor, colors) == 0
    moved = panel.tableRows(_rows(["moved by user", "low confidence", "missing"], [0.9, 0.3, float("nan")]))
    assert panel.updateTable(table, moved, FakeItem, _setColor, colors) == 1
    assert table.setItemCalls == 9 and [item for row in table.rows for item in row] == owned
    assert table.item(0, 2).text() == "moved by user"
    assert table.item(0, 0).color == panel.STATUS_COLORS["moved by user"]
    panel.updateTable(table, moved[:1], FakeItem, _setColor, colors)
    assert table.rowCount() == 1 and set(colors) == {(0, 0), (0, 1), (0, 2)} and table.setItemCalls == 9


def test_every_widget_the_module_uses_is_in_its_ui_file():
    """The widget cannot run here (no Qt); at least every `self.ui.<name>` it touches must exist."""
    import xml.etree.ElementTree as ElementTree

    ui = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "SCNLandmarks.ui")
    defined = {widget.get("name") for widget in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "SCNLandmarks.py").read_text(encoding="utf-8")))
    assert {"trainBaseComboBox", "startTrainingButton", "nextToReviewButton", "skipLandmarkButton"} <= used
    assert used - defined == set()


def test_the_training_folder_field_is_empty_by_default():
    assert panel.trainingFolderText("") == "" and panel.trainingFolderText(Path("")) == ""
    assert panel.trainingFolderText("/data/cases") == "/data/cases"
    ui = (MODULE_DIR / "Resources" / "UI" / "SCNLandmarks.ui").read_text(encoding="utf-8")
    assert "<string>trainingFolder</string>" not in ui  # bound by hand: the Path binding showed "."


# ------------------------------------------------------------------------------------------------
# on real MRML: short labels, replacing files, heatmap messages, measurements


def _cephalogramVolume(scene, tmp_path: Path):
    from SCNLandmarksMRML import loadVolumeFile

    rng = np.random.default_rng(0)
    array = (rng.random((240, 200)) * 200).astype(np.uint8)
    array[60:180, 40:160] += 50
    path = tmp_path / "ceph.png"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return loadVolumeFile(scene, path)


def test_short_labels_come_from_the_catalogue_and_exports_keep_full_names(mrml, tmp_path):
    from SCNLandmarksMRML import SCNLandmarksLogic, loadMarkupsFile
    from SCNLandmarksMRML.markups import LOW_CONFIDENCE_MARK

    entry = next(e for e in catalogueModels() if e.id == "cephalometric-19")
    assert entry.shortNames["Sella"] == "S" and entry.shortNames["Anterior nasal spine"] == "ANS"
    assert next(e for e in catalogueModels() if e.id == "brain-afids-32").shortNames is None  # AFIDs names are short
    logic = SCNLandmarksLogic(mrml.scene)
    volume = _cephalogramVolume(mrml.scene, tmp_path)
    result = logic.detectLandmarks(volume, entry.path, device="cpu", keepHeatmaps=False)
    node = result.markupsNode
    assert logic.shortLandmarkNames(node) == entry.shortNames
    assert logic.showShortLabels(node, True)
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    shown = [label.removesuffix(LOW_CONFIDENCE_MARK) for label in labels]  # low-confidence points are marked
    assert shown[:3] == ["S", "N", "Or"] and shown[-1] == "Ar"
    assert [row.name for row in logic.landmarkRows(node)] == result.landmarkNames  # the table keeps full names
    exported = loadMarkupsFile(mrml.scene, logic.exportLandmarks(node, tmp_path / "ceph.mrk.json"))
    assert [
        exported.GetNthControlPointLabel(i) for i in range(exported.GetNumberOfControlPoints())
    ] == result.landmarkNames
    assert [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())] == labels
    assert not logic.showShortLabels(node, False)
    assert node.GetNthControlPointLabel(0).removesuffix(LOW_CONFIDENCE_MARK) == "Sella"


def test_writes_ask_before_replacing_and_refuse_without_consent(mrml, tmp_path, tiny_model_2d, dataset_2d):
    from SCNLandmarksLib.errors import DataError
    from SCNLandmarksMRML import SCNLandmarksLogic, loadVolumeFile

    image = dataset_2d.parent / re.findall(r'image = "([^"]+)"', dataset_2d.read_text(encoding="utf-8"))[0]
    logic = SCNLandmarksLogic(mrml.scene)
    volume = loadVolumeFile(mrml.scene, image)
    node = logic.detectLandmarks(volume, tiny_model_2d, device="cpu").markupsNode
    target = tmp_path / "corrected.mrk.json"
    assert logic.overwriteQuestion([target]) == ""
    logic.exportLandmarks(node, target, overwrite=False)
    target.write_text("the clinician's corrected file")
    question = logic.overwriteQuestion([target, tmp_path / "other.fcsv"])
    assert question.startswith("This file exists") and str(target) in question and "other.fcsv" not in question
    with pytest.raises(DataError, match="Not replacing .*corrected.mrk.json"):
        logic.exportLandmarks(node, target, overwrite=False)
    assert target.read_text(encoding="utf-8") == "the clinician's corrected file"
    logic.exportLandmarks(node, target, overwrite=True)
    assert json.loads(target.read_text(encoding="utf-8"))["markups"]

    folder = tmp_path / "cases"
    imagePath, landmarksPath = logic.trainingPairPaths(volume, folder)
    assert logic.saveTrainingPair(volume, node, folder, overwrite=False) == (imagePath, landmarksPath)
    assert "These files exist" in logic.overwriteQuestion([imagePath, landmarksPath])
    before = {path: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(DataError, match="Not replacing"):
        logic.saveTrainingPair(volume, node, folder, overwrite=False)
    assert {path: path.read_bytes() for path in folder.iterdir()} == before


def test_heatmap_messages_and_foreign_measurements_survive_a_new_detection(mrml, tmp_path, tiny_model_2d, dataset_2d):
    from SCNLandmarksMRML import SCNLandmarksLogic, loadVolumeFile

    logic = SCNLandmarksLogic(mrml.scene)
    assert "detect landmarks first" in logic.heatmapProblem(None)
    image = dataset_2d.parent / re.findall(r'image = "([^"]+)"', dataset_2d.read_text(encoding="utf-8"))[0]
    volume = loadVolumeFile(mrml.scene, image)
    node = logic.detectLandmarks(volume, tiny_model_2d, device="cpu", keepHeatmaps=False).markupsNode
    assert "this session only" in logic.heatmapProblem(node)
    other = slicer.vtkMRMLStaticMeasurement()
    other.SetName("reviewer score")
    node.AddMeasurement(other)
    logic.detectLandmarks(volume, tiny_model_2d, device="cpu", markupsNode=node)
    names = [node.GetNthMeasurement(i).GetName() for i in range(node.GetNumberOfMeasurements())]
    assert sorted(names) == ["confidence", "reviewer score"] and logic.heatmapProblem(node) == ""


# ------------------------------------------------------------------------------------------------
# sample data, license, metadata


def test_the_bundled_sample_is_offered_to_sample_data_with_its_license():
    sources = sampleDataSources()
    assert len(sources) == 1
    source = sources[0]
    assert source.uri.startswith("file://") and Path(source.uri[len("file://") :]).is_file()
    assert source.fileName == "MNI152NLin2009cAsym_T1w_2mm.nii.gz" and source.nodeName == "MNI152NLin2009cAsym_T1w_2mm"
    assert source.licenseFile is not None and "Louis Collins" in source.licenseFile.read_text(encoding="utf-8")
    image = Path(source.uri[len("file://") :]).read_bytes()
    assert source.checksum == "SHA256:" + hashlib.sha256(image).hexdigest()  # an updated sample is copied again
    module = (MODULE_DIR / "SCNLandmarks.py").read_text(encoding="utf-8")
    assert "registerCustomSampleDataSource" in module and 'connect("startupCompleted()", registerSampleData)' in module


def test_license_and_extension_metadata_point_at_files_this_repository_holds():
    license = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license and "Version 2.0, January 2004" in license
    assert "END OF TERMS AND CONDITIONS" in license
    assert re.search(r'license = \{ text = "Apache-2.0" \}', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(rf'set\({key} "([^"]+)"\)', top).group(1)
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), url
    for key in ("EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_HOMEPAGE"):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert 'set(SCNLandmarks_MINIMUM_SLICER_VERSION "5.10")' in top and "VERSION_LESS" in top
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Installing the module in 3D Slicer") : readme.index("## Performance")]
    assert "3D Slicer 5.10 or later" in install and "torch>=2.2" in install and "torchvision>=0.17" in install
    assert 'set(EXTENSION_CATEGORY "Quantification")' in top and "SlicerSCNLandmarks" in install
    assert "Slicer 5.10" in (MODULE_DIR / "SCNLandmarks.py").read_text(encoding="utf-8")


def test_a_training_process_that_cannot_start_leaves_no_staging_folder(tmp_path):
    from SCNLandmarksMRML.training import TrainingData, TrainingFailed, TrainingJob

    data = TrainingData(tmp_path, tmp_path / "dataset.toml", 2, ("A",), ("case1",), "px")
    job = TrainingJob(data, None, "new", python=str(tmp_path / "no-such-python"), userFolder=tmp_path / "models")
    with pytest.raises(TrainingFailed, match="Cannot start the training process"):
        job.start()
    assert not job.running and [p for p in (tmp_path / "models").rglob("*") if p.is_dir()] == []

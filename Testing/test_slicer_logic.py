"""The SCNLandmarks Slicer logic on real MRML (slicer-core): volumes loaded through storage nodes,
markups, heatmap volumes, exports read back by Slicer and by the library, offscreen pictures.

Two kinds of predictor are used:

* `BlobOracle`, a stand-in with the library's Predictor interface that "detects" bright cubes the
  tests burnt into the images at known voxels. Its answers are exact, so the geometry chain
  (file -> storage node -> IJKToRAS -> SimpleITK image -> points -> RAS markups) is checked to
  1e-4 mm on oblique, anisotropic, flipped volumes and on a 2D PNG.
* the tiny SCN models trained in the session (Testing/conftest.py): the logic must put landmarks
  exactly where the library's own predictor puts them on the same file.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import socket
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)
import vtk  # noqa: E402 - slicer-core's

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SCNLandmarks"
sys.path.insert(0, str(MODULE_DIR))

from conftest import mirror_case  # noqa: E402

from SCNLandmarksLib.bundle import ModelDescription, StageDescription  # noqa: E402
from SCNLandmarksLib.config import InferenceConfig, IntensityConfig  # noqa: E402
from SCNLandmarksLib.errors import Cancelled, DataError, ModelFileError  # noqa: E402
from SCNLandmarksLib.geometry import lps_to_ras, ras_to_lps  # noqa: E402
from SCNLandmarksLib.landmark_set import LandmarkSet  # noqa: E402
from SCNLandmarksLib.vocabulary import STATUS_COLORS, HeatmapKind, LandmarkStatus  # noqa: E402
from SCNLandmarksMRML import (  # noqa: E402
    SCNLandmarksLogic,
    createHeadlessScene,
    imageFromVolumeNode,
    loadMarkupsFile,
    loadVolumeFile,
)
from SCNLandmarksMRML.catalogue import availableModels, catalogueModels, entryForModel, readCatalogue, sampleModel  # noqa: E402
from SCNLandmarksMRML.markups import LOW_CONFIDENCE_MARK, viewLabel  # noqa: E402
from SCNLandmarksMRML.volumes import ColourImageError, ijkToRasArray  # noqa: E402

NAMES = ["Apex", "Base", "Left", "Right"]
# Voxel (i, j[, k]) of each landmark's cube; "Right" is left out of the image (the oracle reports
# it missing), "Left" comes out with a low confidence.
VOXELS_3D = [(5, 6, 4), (14, 9, 3), (9, 16, 7), None]
VOXELS_2D = [(12, 8), (30, 20), (20, 33), None]
CONFIDENCES = [0.95, 0.9, 0.2, 0.01]
STATUS = [LandmarkStatus.DETECTED, LandmarkStatus.DETECTED, LandmarkStatus.LOW_CONFIDENCE, LandmarkStatus.MISSING]
# The labels on the views: "Left" is marked as of low confidence.
VIEW_LABELS = ["Apex", "Base", "Left" + LOW_CONFIDENCE_MARK, "Right"]


# ------------------------------------------------------------------------------------------------
# test data


def _oblique_direction() -> np.ndarray:
    """A rotation about an oblique axis with one axis flipped (determinant -1)."""
    c, s = math.cos(math.radians(25)), math.sin(math.radians(25))
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
    )
    return rotation @ np.diag([1.0, -1.0, 1.0])


def _with_cubes(shape_zyx, voxels, rng) -> np.ndarray:
    array = rng.uniform(0.0, 100.0, shape_zyx).astype(np.float32)
    for level, voxel in enumerate(voxels, start=1):
        if voxel is None:
            continue
        index = tuple(slice(v - 1, v + 2) for v in reversed(voxel))
        array[index] = 1000.0 * level
    return array


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Image files with cubes at known voxels, and the physical LPS truth SimpleITK gives for them."""
    folder = tmp_path_factory.mktemp("slicer_logic_files")
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(_with_cubes((12, 22, 20), VOXELS_3D, rng))
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(_oblique_direction().ravel().tolist())
    result = {
        "truth3d": np.array(
            [
                image.TransformContinuousIndexToPhysicalPoint([float(v) for v in voxel]) if voxel else [np.nan] * 3
                for voxel in VOXELS_3D
            ]
        )
    }
    for suffix in ("nrrd", "nii.gz"):
        sitk.WriteImage(image, str(folder / f"oblique.{suffix}"))
        result[suffix] = folder / f"oblique.{suffix}"

    xray = _with_cubes((40, 48), VOXELS_2D, rng)
    pixels = sitk.GetImageFromArray((xray / 20.0).astype(np.uint8))  # levels 50, 100, 150 survive
    sitk.WriteImage(pixels, str(folder / "xray.png"))
    sitk.WriteImage(pixels, str(folder / "xray_as_nrrd.nrrd"))
    result["png"] = folder / "xray.png"
    result["png_as_nrrd"] = folder / "xray_as_nrrd.nrrd"
    result["truth2d"] = np.array([[*voxel, 0.0] if voxel else [np.nan] * 3 for voxel in VOXELS_2D], dtype=float)

    grey = sitk.GetArrayFromImage(pixels)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True), str(folder / "grey_rgb.png"))
    result["grey_rgb_png"] = folder / "grey_rgb.png"  # an X-ray saved as colour: red = green = blue
    rgb = sitk.GetImageFromArray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(folder / "color.png"))
    result["rgb_png"] = folder / "color.png"
    frames = sitk.JoinSeries([sitk.GetImageFromArray(rng.random((6, 7, 8)).astype(np.float32))] * 3)
    sitk.WriteImage(frames, str(folder / "cine4d.nrrd"))
    result["4d"] = folder / "cine4d.nrrd"
    # Five values per voxel (NRRD kinds "vector domain domain domain"): loads as a vector volume.
    vectors = sitk.GetImageFromArray(rng.random((6, 7, 8, 5)).astype(np.float32), isVector=True)
    sitk.WriteImage(vectors, str(folder / "frames_as_vector.nrrd"))
    result["4d_vector"] = folder / "frames_as_vector.nrrd"
    # Slicer's own 4D NRRD (a sequence): the frame axis first, of kind "list".
    sitk.WriteImage(
        sitk.GetImageFromArray(rng.random((6, 7, 8, 3)).astype(np.float32), isVector=True),
        str(folder / "sequence.nrrd"),
        useCompression=False,
    )
    raw = (folder / "sequence.nrrd").read_bytes()
    (folder / "sequence.nrrd").write_bytes(raw.replace(b"kinds: vector ", b"kinds: list ", 1))
    result["sequence"] = folder / "sequence.nrrd"
    return result


# ------------------------------------------------------------------------------------------------
# a predictor with exact answers


class BlobPrediction:
    def __init__(self, image: sitk.Image, landmarks: LandmarkSet, status: list[str]):
        self.landmarks = landmarks
        self.status = status
        self.flagged = None  # an uncalibrated model's
        self._image = image

    def heatmap(
        self, kind: str = "final", landmark: int | None = None, scaled_per_landmark: bool = False
    ) -> sitk.Image:
        """Gaussians around the landmarks, computed on the input image's own grid (as the library does)."""
        if kind not in list(HeatmapKind):
            raise ValueError(f"no '{kind}' heatmap")
        size = self._image.GetSize()
        index = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")[::-1], axis=-1)
        index = index.reshape(-1, len(size)).astype(np.float64)
        origin = np.asarray(self._image.GetOrigin())
        matrix = np.asarray(self._image.GetDirection()).reshape(len(size), len(size)) @ np.diag(
            self._image.GetSpacing()
        )
        physical = index @ matrix.T + origin
        sigma = 2.0 * max(self._image.GetSpacing())
        chosen = range(len(self.landmarks.names)) if landmark is None else [landmark]
        peak = 1.0 if scaled_per_landmark and landmark is None else {"final": 1.0, "local": 0.8, "spatial": 0.6}[kind]
        values = np.zeros(len(physical))
        for k in chosen:
            if np.all(np.isfinite(self.landmarks.points_lps[k])):
                d2 = np.sum((physical - self.landmarks.points_lps[k]) ** 2, axis=1)
                values = np.maximum(values, np.exp(-d2 / (2 * sigma**2)) * peak)
        heatmap = sitk.GetImageFromArray(values.reshape(tuple(reversed(size))).astype(np.float32))
        heatmap.CopyInformation(self._image)
        return heatmap


class BlobOracle:
    """Predictor interface; landmark k is the center of the cube of intensity 1000*(k+1) (any scale)."""

    def __init__(self, dimension: int, names=NAMES, confidences=CONFIDENCES, status=STATUS):
        self.dimension = dimension
        self.landmark_names = list(names)
        self.device = "cpu"
        self.description = ModelDescription(
            dimension,
            tuple(names),
            "mm",
            IntensityConfig(),
            InferenceConfig(),
            StageDescription("scn", {}, (16,) * dimension, (1.0,) * dimension, (2.0,) * len(names), 1.0),
        )
        self.confidences = confidences
        self.statuses = status
        self.calls = 0

    def predict(self, image, heatmaps=False, progress=None, cancel=None, source="image"):
        self.calls += 1
        assert image.GetDimension() == self.dimension
        for fraction in (0.0, 0.5, 1.0):
            if cancel is not None and cancel():
                raise Cancelled("landmark detection cancelled")
            if progress is not None:
                progress(fraction, "oracle")
        array = sitk.GetArrayFromImage(image)
        top = float(array.max())
        levels = sorted({float(v) for v in np.unique(array) if v > 0.2 * top / len(self.landmark_names)})[-3:]
        points = []
        for k in range(len(self.landmark_names)):
            if k >= len(levels) or self.statuses[k] == LandmarkStatus.MISSING:
                points.append([np.nan] * self.dimension)
                continue
            where = np.argwhere(array == levels[k]).mean(axis=0)[::-1]  # (x, y[, z]) voxel center
            points.append(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in where]))
        landmarks = LandmarkSet(self.landmark_names, np.array(points, dtype=float), np.array(self.confidences))
        return BlobPrediction(image, landmarks, list(self.statuses))


# ------------------------------------------------------------------------------------------------
# helpers


def _ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _positions(markupsNode) -> np.ndarray:
    points = []
    for i in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined:
            points.append(markupsNode.GetNthControlPointPositionVector(i))
        else:
            points.append([np.nan] * 3)
    return np.array(points, dtype=float)


def _labels(markupsNode) -> list[str]:
    return [markupsNode.GetNthControlPointLabel(i) for i in range(markupsNode.GetNumberOfControlPoints())]


# ------------------------------------------------------------------------------------------------
# volumes in, images out


def test_png_loads_with_slicers_geometry(mrml, files):
    """The headless PNG reader gives the node Slicer's storage node gives for the same pixels (NRRD)."""
    png = loadVolumeFile(mrml.scene, files["png"])
    reference = loadVolumeFile(mrml.scene, files["png_as_nrrd"])
    assert png.IsA("vtkMRMLScalarVolumeNode") and not png.IsA("vtkMRMLVectorVolumeNode")
    np.testing.assert_allclose(ijkToRasArray(png), ijkToRasArray(reference), atol=1e-12)
    np.testing.assert_allclose(ijkToRasArray(png), np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-12)
    assert png.GetImageData().GetDimensions() == (48, 40, 1)
    assert png.GetStorageNode().GetFileName() == str(files["png"])
    for node in (png, reference):
        assert np.array_equal(
            slicer.util.arrayFromVolume(node)[0], sitk.GetArrayFromImage(sitk.ReadImage(str(files["png"])))
        )


@pytest.mark.parametrize("suffix", ["nrrd", "nii.gz"])
def test_volume_node_to_image_keeps_geometry(mrml, files, suffix):
    """Every voxel keeps its value at its physical place (Slicer may reorder a left-handed volume's
    slices, so the comparison is physical, not index by index)."""
    volume = loadVolumeFile(mrml.scene, files[suffix])
    converted = imageFromVolumeNode(volume, 3).image
    original = sitk.ReadImage(str(files[suffix]))
    assert abs(np.linalg.det(np.reshape(converted.GetDirection(), (3, 3)))) == pytest.approx(1.0)
    np.testing.assert_allclose(sorted(converted.GetSpacing()), sorted(original.GetSpacing()), atol=1e-5)
    corners = [[i, j, k] for i in (0, 19) for j in (0, 21) for k in (0, 11)]
    physical = sorted(tuple(np.round(original.TransformIndexToPhysicalPoint(c), 3)) for c in corners)
    size = converted.GetSize()
    mine = sorted(
        tuple(np.round(converted.TransformIndexToPhysicalPoint([i, j, k]), 3))
        for i in (0, size[0] - 1)
        for j in (0, size[1] - 1)
        for k in (0, size[2] - 1)
    )
    np.testing.assert_allclose(mine, physical, atol=2e-3)
    back = sitk.Resample(converted, original, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0, original.GetPixelID())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))


def test_png_becomes_a_2d_image(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["png"])
    converted = imageFromVolumeNode(volume, 2)
    assert converted.image.GetDimension() == 2 and converted.image.GetSize() == (48, 40)
    np.testing.assert_allclose(converted.pointsToRas([[12.0, 8.0]]), [[-12.0, -8.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(converted.rasToPoints([[-12.0, -8.0, 0.0]]), [[12.0, 8.0]], atol=1e-12)


# ------------------------------------------------------------------------------------------------
# detection


@pytest.mark.parametrize("suffix", ["nrrd", "nii.gz"])
def test_detect_3d_oblique_puts_points_at_the_truth(mrml, files, suffix):
    volume = loadVolumeFile(mrml.scene, files[suffix])
    logic = SCNLandmarksLogic(mrml.scene)
    messages = []
    result = logic.detectLandmarks(volume, BlobOracle(3), progress=lambda f, m: messages.append((f, m)))
    node = result.markupsNode
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and node.GetScene() is mrml.scene
    assert _labels(node) == VIEW_LABELS
    np.testing.assert_allclose(_positions(node), lps_to_ras(files["truth3d"]), atol=1e-4)
    np.testing.assert_allclose(result.pointsRas, lps_to_ras(files["truth3d"]), atol=1e-4)
    assert [r.status for r in logic.landmarkRows(node)] == STATUS
    np.testing.assert_allclose([r.confidence for r in logic.landmarkRows(node)], CONFIDENCES)
    assert node.GetNthControlPointDescription(2) == "low confidence; confidence 0.20"
    assert all(node.GetNthControlPointSelected(i) for i in range(4))  # Slicer's default: the user's to change
    assert not node.GetLocked() and not any(node.GetNthControlPointLocked(i) for i in range(4))
    assert node.GetNthControlPointPositionStatus(3) == slicer.vtkMRMLMarkupsNode.PositionUndefined
    measurement = node.GetMeasurement("confidence")
    values = measurement.GetControlPointValues()
    np.testing.assert_allclose([values.GetValue(i) for i in range(4)], CONFIDENCES)
    assert node.GetNodeReference("SCNLandmarksInputVolume") is volume
    assert messages[0][0] == 0.0 and messages[-1] == (1.0, "done")
    assert all(b[0] >= a[0] for a, b in zip(messages, messages[1:]))
    assert "2 of 4 landmarks found" not in result.summary and "3 of 4 landmarks found" in result.summary
    assert "on cpu" in result.summary


def test_the_worker_threads_step_touches_no_mrml_node(mrml, files):
    """`runDetection` runs on a worker thread in the module: MRML nodes are not thread-safe."""
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    job = logic.prepareDetection(volume, BlobOracle(3))

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the worker's step called {name} on the volume node")

    job.volumeNode = Untouchable()
    logic.runDetection(job)
    job.volumeNode = volume
    assert _positions(logic.finishDetection(job).markupsNode).shape == (4, 3)


def test_detect_2d_png_maps_points_into_the_slice(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["png"])
    # Put the X-ray somewhere else in space: the points must follow the slice (z of the slice).
    matrix = ijkToRasArray(volume)
    matrix[:3, 3] = (5.0, -7.0, 12.5)
    matrix[:3, :3] = matrix[:3, :3] @ np.diag([0.2, 0.3, 1.0])
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(volume, BlobOracle(2))
    expected = np.array([matrix[:3, :3] @ v + matrix[:3, 3] for v in files["truth2d"]])
    np.testing.assert_allclose(_positions(result.markupsNode), expected, atol=1e-6)
    assert np.allclose(_positions(result.markupsNode)[:3, 2], 12.5)


def test_a_grey_picture_stored_as_rgb_is_detected_on_as_grey(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["grey_rgb_png"])
    assert volume.IsA("vtkMRMLVectorVolumeNode")  # as Slicer loads it
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(volume, BlobOracle(2))
    grey = logic.detectLandmarks(loadVolumeFile(mrml.scene, files["png"]), BlobOracle(2))
    np.testing.assert_allclose(_positions(result.markupsNode), _positions(grey.markupsNode), atol=1e-6)
    assert np.isfinite(_positions(result.markupsNode)[:3]).all()


def test_pixel_unit_models_see_unit_spacing(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["png"])
    volume.SetSpacing(0.1, 0.1, 1.0)
    oracle = BlobOracle(2)
    oracle.description = dataclasses.replace(oracle.description, unit="px")
    seen = []
    original = oracle.predict
    oracle.predict = lambda image, **kw: (seen.append(image.GetSpacing()), original(image, **kw))[1]
    result = SCNLandmarksLogic(mrml.scene).detectLandmarks(volume, oracle)
    assert seen == [(1.0, 1.0)]
    expected = files["truth2d"][:3] * [-0.1, -0.1, 1.0]
    np.testing.assert_allclose(_positions(result.markupsNode)[:3], expected, atol=1e-6)


def test_a_pixel_model_on_a_volume_with_spacing_exports_its_points_and_errors_in_mm(mrml, files, tmp_path):
    from SCNLandmarksLib.io.landmarks import read_landmarks

    volume = loadVolumeFile(mrml.scene, files["png"])
    volume.SetSpacing(0.1, 0.1, 1.0)  # e.g. a DICOM X-ray: a model in pixels still detects in its pixels
    oracle = BlobOracle(2)
    oracle.description = dataclasses.replace(oracle.description, unit="px")
    original = oracle.predict

    def predict(image, **keywords):
        prediction = original(image, **keywords)
        prediction.landmarks = dataclasses.replace(prediction.landmarks, expected_errors=np.full(len(NAMES), 5.0))
        return prediction

    oracle.predict = predict
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, oracle).markupsNode
    path = logic.exportLandmarks(node, tmp_path / "points.mrk.json")
    written = json.loads(path.read_text())["markups"][0]
    assert written["coordinateUnits"] == "mm"
    errors = next(m for m in written["measurements"] if m["name"] == "expected error")
    assert errors["units"] == "mm" and np.allclose(errors["controlPointValues"][:3], 0.5)
    back = read_landmarks(path, names=NAMES, dimension=2)
    np.testing.assert_allclose(back.points_lps[:3], ras_to_lps(_positions(node))[:3, :2], atol=1e-9)


def test_a_pixel_models_case_is_saved_as_a_picture_to_fine_tune_it_in_pixels(mrml, files, tmp_path):
    from SCNLandmarksLib.data.spec import load_dataset_spec

    volume = loadVolumeFile(mrml.scene, files["png"])
    volume.SetSpacing(0.1, 0.1, 1.0)  # e.g. a DICOM cephalogram: a NRRD of it would be in mm
    volume.SetOrigin(4.0, -3.0, 0.0)
    oracle = BlobOracle(2)
    oracle.description = dataclasses.replace(oracle.description, unit="px")
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, oracle).markupsNode
    image, points = logic.saveTrainingPair(volume, node, tmp_path / "cases", "case1")
    assert image.name == "case1.tif"
    spec = load_dataset_spec(tmp_path / "cases" / "dataset.toml")
    entry = spec.entries[0]
    assert entry.unit == "px" and entry.read(2).GetSpacing() == (1.0, 1.0)
    rasToIjk = np.linalg.inv(ijkToRasArray(volume))
    index = (_positions(node)[:3] @ rasToIjk[:3, :3].T + rasToIjk[:3, 3])[:, :2]
    np.testing.assert_allclose(spec.load_landmarks([entry])["case1"].points_lps[:3], index, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(entry.read(2)), slicer.util.arrayFromVolume(volume)[0])


def test_a_single_slice_outside_the_axial_plane_is_exported_with_every_coordinate(mrml, files, tmp_path):
    from SCNLandmarksLib.io.landmarks import read_landmarks

    volume = loadVolumeFile(mrml.scene, files["png"])
    matrix = ijkToRasArray(volume)
    matrix[:3, :3] = np.array([[0.0, 0.0, 1.0], [0.2, 0.0, 0.0], [0.0, -0.3, 0.0]])  # a sagittal X-ray
    matrix[:3, 3] = (-4.0, 10.0, 20.0)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, BlobOracle(2)).markupsNode
    for suffix in ("mrk.json", "fcsv", "csv"):
        path = logic.exportLandmarks(node, tmp_path / f"points.{suffix}")
        back = read_landmarks(path, names=NAMES, dimension=3)
        np.testing.assert_allclose(lps_to_ras(back.points_lps)[:3], _positions(node)[:3], atol=1e-4)


def test_detect_refills_an_existing_node(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    first = logic.detectLandmarks(volume, BlobOracle(3)).markupsNode
    count = mrml.scene.GetNumberOfNodes()
    second = logic.detectLandmarks(volume, BlobOracle(3), markupsNode=first).markupsNode
    assert second is first and mrml.scene.GetNumberOfNodes() == count
    assert first.GetNumberOfControlPoints() == len(NAMES)


# ------------------------------------------------------------------------------------------------
# heatmaps


def test_a_heatmap_is_refused_once_its_image_is_gone_or_changed_and_goes_with_its_detection(mrml, files):
    logic = SCNLandmarksLogic(mrml.scene)
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    node = logic.detectLandmarks(volume, BlobOracle(3)).markupsNode
    heatmap = logic.showHeatmap(node, "final")
    composites = [mrml.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    # The voxels replaced by others of another size (a resample in place, say): refused, in words.
    slicer.util.updateVolumeFromArray(volume, np.zeros((4, 5, 6), np.float32))
    assert "changed since" in logic.heatmapProblem(node)
    with pytest.raises(DataError, match="changed since"):
        logic.showHeatmap(node, "final")
    mrml.scene.RemoveNode(volume)
    assert "is gone" in logic.heatmapProblem(node)
    # The detection removed (the module forgets it first): its heatmap leaves the views and the scene.
    logic.forgetDetection(node)
    mrml.scene.RemoveNode(node)
    assert not mrml.scene.IsNodePresent(heatmap)
    assert all(composite.GetForegroundVolumeID() is None for composite in composites)


@pytest.mark.parametrize("suffix", ["nrrd", "png"])
def test_heatmap_volume_shares_the_input_geometry(mrml, files, suffix):
    volume = loadVolumeFile(mrml.scene, files[suffix])
    logic = SCNLandmarksLogic(mrml.scene)
    dimension = 3 if suffix == "nrrd" else 2
    result = logic.detectLandmarks(volume, BlobOracle(dimension))
    heatmap = logic.showHeatmap(result.markupsNode, "local", "Base", opacity=0.4)
    assert heatmap.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_array_equal(ijkToRasArray(heatmap), ijkToRasArray(volume))
    assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    array = slicer.util.arrayFromVolume(heatmap)
    peak = np.array(np.unravel_index(np.argmax(array), array.shape)[::-1], dtype=float)
    peakRas = ijkToRasArray(volume) @ np.append(peak, 1.0)
    np.testing.assert_allclose(peakRas[:3], result.pointsRas[1], atol=1e-4)
    assert math.isclose(float(array.max()), 0.8, rel_tol=1e-3)

    display = heatmap.GetDisplayNode()
    assert display.GetColorNode().GetName() in ("Inferno", "PET-Heat")
    assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0
    composites = [mrml.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    for composite in composites:
        assert composite.GetForegroundVolumeID() == heatmap.GetID()
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert math.isclose(composite.GetForegroundOpacity(), 0.4)
    logic.setHeatmapOpacity(result.markupsNode, 0.7)
    assert all(math.isclose(c.GetForegroundOpacity(), 0.7) for c in composites)

    count = mrml.scene.GetNumberOfNodes()
    again = logic.showHeatmap(result.markupsNode, "final", None)
    assert again is heatmap and mrml.scene.GetNumberOfNodes() == count
    everything = slicer.util.arrayFromVolume(heatmap)
    assert everything.max() == pytest.approx(1.0, rel=1e-3)
    assert "final" in heatmap.GetName() and "all landmarks" in heatmap.GetName()
    logic.showHeatmap(result.markupsNode, "spatial", None)
    assert slicer.util.arrayFromVolume(heatmap).max() == pytest.approx(0.6, rel=1e-3)
    logic.showHeatmap(result.markupsNode, "spatial", None, scaledPerLandmark=True)
    assert "each scaled to its peak" in heatmap.GetName()
    assert slicer.util.arrayFromVolume(heatmap).max() == pytest.approx(1.0, rel=1e-3)
    logic.hideHeatmap(result.markupsNode)
    assert all(c.GetForegroundVolumeID() is None for c in composites)

    with pytest.raises(DataError, match="No landmark named"):
        logic.showHeatmap(result.markupsNode, "final", "Nose")
    with pytest.raises(DataError, match="Unknown heatmap kind"):
        logic.showHeatmap(result.markupsNode, "sharp")


def test_heatmaps_and_labelmaps_are_not_offered_as_input_volumes(mrml, files):
    from SCNLandmarksMRML.overlays import heatmapNodeIDs, isHeatmapNode

    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(volume, BlobOracle(3))
    added = []

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(caller, event, node):
        added.append((node.GetID(), isHeatmapNode(node)))

    tag = mrml.scene.AddObserver(mrml.scene.NodeAddedEvent, onNodeAdded)
    try:
        heatmap = logic.showHeatmap(result.markupsNode, "final", None)
    finally:
        mrml.scene.RemoveObserver(tag)
    # The module's widget hides the heatmap from its input selector when the scene announces it.
    assert (heatmap.GetID(), True) in added and heatmapNodeIDs(mrml.scene) == [heatmap.GetID()]
    assert not isHeatmapNode(volume)
    selector = _ui_widgets()["inputVolumeSelector"]
    hidden = next(p for p in selector.findall("property") if p.get("name") == "hideChildNodeTypes")
    assert [s.text for s in hidden.iter("string")] == ["vtkMRMLLabelMapVolumeNode"]


def test_heatmaps_need_a_detection_of_this_session(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    result = SCNLandmarksLogic(mrml.scene).detectLandmarks(volume, BlobOracle(3))
    with pytest.raises(DataError, match="Run the detection again"):
        SCNLandmarksLogic(mrml.scene).showHeatmap(result.markupsNode)


# ------------------------------------------------------------------------------------------------
# correction and export


def test_moved_point_is_marked_exported_and_reloaded(mrml, files, tmp_path):
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, BlobOracle(3)).markupsNode
    predicted = _positions(node)
    moved = predicted[0] + np.array([3.0, -2.0, 1.5])
    node.SetNthControlPointPosition(0, *moved)  # as dragging in a view does
    assert logic.landmarkRows(node)[0].status == LandmarkStatus.MOVED
    assert node.GetNthControlPointDescription(0).startswith(LandmarkStatus.MOVED)  # updated by the observer
    node.SetNthControlPointPosition(3, 1.0, 2.0, 3.0)  # the user places the missing landmark
    assert logic.landmarkRows(node)[3].status == LandmarkStatus.MOVED

    exported = logic.exportLandmarks(node, tmp_path / "corrected.mrk.json")
    data = json.loads(exported.read_text())
    assert data["markups"][0]["coordinateSystem"] == "LPS"
    assert [p["label"] for p in data["markups"][0]["controlPoints"]] == NAMES

    other = createHeadlessScene()
    loaded = loadMarkupsFile(other.scene, exported)
    assert _labels(loaded) == NAMES
    current = _positions(node)
    np.testing.assert_allclose(_positions(loaded), current, atol=1e-6)
    np.testing.assert_allclose(current[0], moved)
    assert loaded.GetNthControlPointDescription(0).startswith(LandmarkStatus.MOVED)

    from SCNLandmarksLib.io.landmarks import read_landmarks

    for suffix in ("mrk.json", "fcsv", "csv"):
        path = logic.exportLandmarks(node, tmp_path / f"corrected.{suffix}")
        back = read_landmarks(path, names=NAMES, dimension=3)
        np.testing.assert_allclose(lps_to_ras(back.points_lps), current, atol=1e-4)

    row = logic.resetPoint(node, "Apex")
    assert row.status == LandmarkStatus.DETECTED
    np.testing.assert_allclose(_positions(node)[0], predicted[0])
    logic.resetPoint(node, 3)
    assert logic.landmarkRows(node)[3].status == LandmarkStatus.MISSING


def test_low_confidence_is_marked_on_the_label_and_the_users_selection_is_left_alone(mrml, files, tmp_path):
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, BlobOracle(3)).markupsNode
    predicted = _positions(node)
    # The user unselects two points in the Markups module, the low-confidence one among them.
    node.SetNthControlPointSelected(0, False)
    node.SetNthControlPointSelected(2, False)
    chosen = [False, True, False, True]

    def selection() -> list[bool]:
        return [bool(node.GetNthControlPointSelected(i)) for i in range(4)]

    assert selection() == chosen

    node.SetNthControlPointPosition(1, *(predicted[1] + 4.0))  # an edit: the observer refreshes every point
    assert logic.landmarkRows(node)[1].status == LandmarkStatus.MOVED
    assert selection() == chosen and _labels(node) == VIEW_LABELS
    assert node.GetNthControlPointDescription(2) == "low confidence; confidence 0.20"
    # Moving the low-confidence point takes its mark away; resetting it brings the mark back.
    node.SetNthControlPointPosition(2, *(predicted[2] + 2.0))
    assert _labels(node)[2] == "Left" and node.GetNthControlPointDescription(2).startswith(LandmarkStatus.MOVED)
    logic.resetPoint(node, "Left")
    assert _labels(node) == VIEW_LABELS and selection() == chosen
    # A point the user renamed keeps the name, marked while it is of low confidence.
    node.SetNthControlPointLabel(2, "L")
    assert _labels(node)[2] == "L" + LOW_CONFIDENCE_MARK
    # Files name the landmarks without the mark.
    exported = logic.exportLandmarks(node, tmp_path / "marked.mrk.json")
    assert [p["label"] for p in json.loads(exported.read_text())["markups"][0]["controlPoints"]] == NAMES
    assert selection() == chosen
    assert node.GetNthControlPointPositionStatus(3) == slicer.vtkMRMLMarkupsNode.PositionUndefined
    with pytest.raises(DataError, match="unknown landmark format"):
        logic.exportLandmarks(node, tmp_path / "points.txt")


@pytest.mark.parametrize("suffix", ["nrrd", "png"])
def test_training_pair_is_a_dataset_the_library_reads(mrml, files, tmp_path, suffix):
    from SCNLandmarksLib.data.spec import load_dataset_spec
    from SCNLandmarksLib.io.images import read_image

    volume = loadVolumeFile(mrml.scene, files[suffix])
    dimension = 3 if suffix == "nrrd" else 2
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, BlobOracle(dimension)).markupsNode
    node.SetNthControlPointPosition(1, *(_positions(node)[1] + [1.0, 1.0, 0.0]))
    imagePath, landmarksPath = logic.saveTrainingPair(volume, node, tmp_path / "dataset", "case A")
    assert imagePath.name == "case_A.nrrd" and landmarksPath.name == "case_A.mrk.json"
    logic.saveTrainingPair(volume, node, tmp_path / "dataset", "case B", split="validation")

    spec = load_dataset_spec(tmp_path / "dataset" / "dataset.toml")
    assert spec.dimension == dimension and list(spec.landmark_names) == NAMES
    assert [(e.id, e.split) for e in spec.entries] == [("case_A", "train"), ("case_B", "validation")]
    image = read_image(spec.entries[0].image, dimension)
    assert np.array_equal(sitk.GetArrayFromImage(image).reshape(-1), slicer.util.arrayFromVolume(volume).reshape(-1))
    landmarks = spec.load_landmarks(list(spec.entries))["case_A"]
    expected = _positions(node)
    lps = lps_to_ras(expected)[:, :dimension]
    np.testing.assert_allclose(landmarks.points_lps, lps, atol=1e-4)
    assert np.isnan(landmarks.points_lps[3]).all()
    # The unmoved landmarks sit on their cubes in the written image, whatever its voxel order.
    for k in (0, 2):
        voxel = image.TransformPhysicalPointToIndex(landmarks.points_lps[k].tolist())
        level = sitk.GetArrayFromImage(image)[tuple(reversed(voxel))]
        assert level == sitk.GetArrayFromImage(image).max() * (k + 1) / 3.0

    other = slicer.vtkMRMLMarkupsFiducialNode()
    mrml.scene.AddNode(other)
    for name in ("X", "Y"):
        other.AddControlPoint(0.0, 0.0, 0.0, name)
    with pytest.raises(DataError, match="landmarks"):
        logic.saveTrainingPair(volume, other, tmp_path / "dataset", "case C")


def test_center_views_on_a_landmark(mrml, files):
    volume = loadVolumeFile(mrml.scene, files["nrrd"])
    logic = SCNLandmarksLogic(mrml.scene)
    node = logic.detectLandmarks(volume, BlobOracle(3)).markupsNode
    point = logic.centerViewsOnLandmark(node, "Left")
    np.testing.assert_allclose(point, _positions(node)[2])
    red = mrml.sliceLogics["Red"].GetSliceNode()
    width, height, _ = red.GetDimensions()
    center = slicer.util.arrayFromVTKMatrix(red.GetXYToRAS()) @ [width / 2, height / 2, 0, 1]
    np.testing.assert_allclose(center[:3], point, atol=1e-6)
    assert logic.centerViewsOnLandmark(node, "Right") is None  # missing: nothing to center on


# ------------------------------------------------------------------------------------------------
# bad input: a clear message and an unchanged scene


def _assert_refused(scene, call, error, pattern):
    before = _ids(scene)
    with pytest.raises(error, match=pattern):
        call()
    assert _ids(scene) == before


def test_bad_inputs_are_refused_and_leave_the_scene_unchanged(mrml, files, tmp_path):
    scene = mrml.scene
    logic = SCNLandmarksLogic(scene)
    volume3d = loadVolumeFile(scene, files["nrrd"])
    xray = loadVolumeFile(scene, files["png"])
    color = loadVolumeFile(scene, files["rgb_png"])
    cine = loadVolumeFile(scene, files["4d_vector"])
    assert color.IsA("vtkMRMLVectorVolumeNode") and cine.IsA("vtkMRMLVectorVolumeNode")
    _assert_refused(scene, lambda: loadVolumeFile(scene, files["4d"]), DataError, "4D image.*as a sequence")

    _assert_refused(scene, lambda: logic.detectLandmarks(None, BlobOracle(3)), DataError, "No input volume")
    _assert_refused(
        scene, lambda: logic.detectLandmarks(color, BlobOracle(2)), ColourImageError, "colour image.*Vector to Scalar"
    )
    _assert_refused(
        scene,
        lambda: logic.detectLandmarks(cine, BlobOracle(3)),
        DataError,
        "vector or 4D volume \\(5 values per voxel\\)",
    )
    _assert_refused(
        scene,
        lambda: logic.detectLandmarks(volume3d, BlobOracle(2)),
        DataError,
        "model detects landmarks in 2D images.*3D volume",
    )
    _assert_refused(
        scene,
        lambda: logic.detectLandmarks(xray, BlobOracle(3)),
        DataError,
        "model detects landmarks in 3D volumes.*single 2D slice",
    )
    _assert_refused(
        scene,
        lambda: logic.detectLandmarks(xray, tmp_path / "nothing.safetensors"),
        ModelFileError,
        "model file not found",
    )
    _assert_refused(scene, lambda: logic.detectLandmarks(xray, ""), ModelFileError, "No model selected")
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    _assert_refused(scene, lambda: logic.detectLandmarks(empty, BlobOracle(3)), DataError, "no image data")

    # Cancelled before the model runs, and while it runs.
    oracle = BlobOracle(3)
    _assert_refused(
        scene,
        lambda: logic.detectLandmarks(volume3d, oracle, cancel=lambda: True),
        Cancelled,
        "cancelled; nothing was changed",
    )
    assert oracle.calls == 0
    polls = iter([False, False, False, True, True, True, True])
    _assert_refused(
        scene, lambda: logic.detectLandmarks(volume3d, oracle, cancel=lambda: next(polls)), Cancelled, "cancelled"
    )
    assert oracle.calls == 1

    # A failure while filling the new point list removes it (and its display node) again.
    import SCNLandmarksMRML.markups as markupsModule

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    original = markupsModule._fillLandmarksNode
    markupsModule._fillLandmarksNode = broken
    try:
        _assert_refused(scene, lambda: logic.detectLandmarks(volume3d, BlobOracle(3)), RuntimeError, "disk full")
    finally:
        markupsModule._fillLandmarksNode = original

    # A 4D NRRD loaded as a sequence: its proxy volume is one frame.
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    storage.SetFileName(str(files["sequence"]))
    scene.AddNode(storage)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    sequence.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(sequence)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    sequencesLogic = next(lg for lg in mrml.logics if lg.IsA("vtkSlicerSequencesLogic"))
    sequencesLogic.UpdateProxyNodesFromSequences(browser)
    frame = browser.GetProxyNode(sequence)
    assert frame.IsA("vtkMRMLScalarVolumeNode") and not frame.IsA("vtkMRMLVectorVolumeNode")
    _assert_refused(scene, lambda: logic.detectLandmarks(frame, BlobOracle(3)), DataError, "frame of the 4D sequence")


# ------------------------------------------------------------------------------------------------
# offscreen picture


@pytest.mark.parametrize("method", ["numpy", "vtk"])
@pytest.mark.parametrize("suffix", ["nrrd", "png"])
def test_render_overlay_png(mrml, files, tmp_path, suffix, method):
    from SCNLandmarksMRML.rendering import offscreenRenderingAvailable

    if method == "vtk" and not offscreenRenderingAvailable():
        pytest.skip("no offscreen OpenGL (EGL/OSMesa) here")
    volume = loadVolumeFile(mrml.scene, files[suffix])
    logic = SCNLandmarksLogic(mrml.scene, mrml.applicationLogic)
    dimension = 3 if suffix == "nrrd" else 2
    result = logic.detectLandmarks(volume, BlobOracle(dimension))
    heatmap = logic.showHeatmap(result.markupsNode, "final", "Base", opacity=0.6)
    before = _ids(mrml.scene)
    rendered = logic.renderOverlayPng(
        tmp_path / "overlay.png",
        volume,
        heatmap,
        result.markupsNode,
        opacity=0.6,
        centerRas=result.pointsRas[1],
        sizePx=300,
        method=method,
    )
    assert rendered.method == method
    assert _ids(mrml.scene) == before
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(rendered.path)))
    assert picture.shape == rendered.rgb.shape and picture.shape[2] == 3 and max(picture.shape[:2]) == 300
    assert [m[0] for m in rendered.markers] == VIEW_LABELS[:3]
    column, row = rendered.pixelOf(result.pointsRas[1])
    assert 0 <= column < picture.shape[1] and 0 <= row < picture.shape[0]
    assert abs(rendered.markers[1][2]) < 1e-6  # the slice passes through "Base"
    # The heatmap shows in heat colors (red over blue) around "Base"; without it the image is gray.
    plain = logic.renderOverlayPng(
        tmp_path / "plain.png", volume, None, None, centerRas=result.pointsRas[1], sizePx=300, method=method
    ).rgb.astype(int)
    assert np.all(np.abs(plain[..., 0] - plain[..., 2]) <= 2)
    warm = picture[..., 0].astype(int) - picture[..., 2].astype(int) > 60
    assert warm.sum() > 200
    rows, columns = np.nonzero(warm)
    assert abs(np.median(columns) - column) < 0.25 * picture.shape[1]
    assert abs(np.median(rows) - row) < 0.25 * picture.shape[0]
    # The point "Base" is drawn in the detected (green) color, on the landmark.
    around = picture[int(round(row)) - 2 : int(round(row)) + 3, int(round(column)) - 2 : int(round(column)) + 3]
    green = around.reshape(-1, 3).astype(int)
    assert np.any((green[:, 1] > green[:, 0] + 60) & (green[:, 1] > green[:, 2] + 60))
    if method == "numpy":
        assert tuple(picture[int(round(row)), int(round(column))]) == STATUS_COLORS[LandmarkStatus.DETECTED]
    # "Left", of low confidence, is drawn in its status color (orange) where it lies in the slice.
    _label, (column, row), distance = rendered.markers[2]
    if abs(distance) <= 0.5 * max(volume.GetSpacing()):
        around = picture[int(round(row)) - 2 : int(round(row)) + 3, int(round(column)) - 2 : int(round(column)) + 3]
        difference = np.abs(around.reshape(-1, 3).astype(int) - STATUS_COLORS[LandmarkStatus.LOW_CONFIDENCE])
        assert np.any(difference.max(axis=1) <= 40)


# ------------------------------------------------------------------------------------------------
# the real library with tiny trained models


def _dataset_image(spec: Path, index: int = 0) -> Path:
    text = spec.read_text()
    return spec.parent / re.findall(r'image = "([^"]+)"', text)[index]


def test_real_model_3d_matches_the_library_predictor(mrml, tiny_model_3d, dataset_3d):
    from SCNLandmarksLib.inference import Predictor
    from SCNLandmarksLib.io.images import read_image

    path = _dataset_image(dataset_3d, -1)
    volume = loadVolumeFile(mrml.scene, path)
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(volume, tiny_model_3d, device="cpu")
    reference = Predictor.from_file(tiny_model_3d, "cpu").predict(read_image(path, 3))
    statuses = [row.status for row in logic.landmarkRows(result.markupsNode)]
    assert _labels(result.markupsNode) == [viewLabel(n, s) for n, s in zip(reference.landmarks.names, statuses)]
    # The scene stores this oblique volume with another voxel order than the file: the same image,
    # summed in another order, which bfloat16 appearance layers (auto precision on CPUs with AMX)
    # round to 0.004 mm and 0.001 in confidence apart (float32: 3e-6 mm).
    np.testing.assert_allclose(result.pointsRas, lps_to_ras(reference.landmarks.points_lps), atol=0.01)
    np.testing.assert_allclose(result.confidences, reference.landmarks.confidences, atol=0.005)
    assert result.statuses == reference.status
    heatmap = logic.showHeatmap(result.markupsNode, "spatial", 0)
    np.testing.assert_array_equal(ijkToRasArray(heatmap), ijkToRasArray(volume))
    assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert result.device == "cpu"
    _assert_refused(
        mrml.scene,
        lambda: logic.detectLandmarks(volume, tiny_model_3d.parent / "missing.safetensors"),
        ModelFileError,
        "not found",
    )


def test_real_model_2d_on_a_png_matches_the_library_predictor(mrml, tiny_model_2d, dataset_2d, tmp_path, files):
    from SCNLandmarksLib.inference import Predictor
    from SCNLandmarksLib.io.images import read_image

    source = sitk.ReadImage(str(_dataset_image(dataset_2d, -1)))
    array = sitk.GetArrayFromImage(source)
    scaled = (array - array.min()) / max(float(np.ptp(array)), 1e-6) * 65535.0
    png = tmp_path / "xray.png"
    sitk.WriteImage(sitk.GetImageFromArray(scaled.astype(np.uint16)), str(png))
    volume = loadVolumeFile(mrml.scene, png)
    logic = SCNLandmarksLogic(mrml.scene)
    result = logic.detectLandmarks(volume, tiny_model_2d, device="cpu")
    reference = Predictor.from_file(tiny_model_2d, "cpu").predict(read_image(png, 2))
    expected = np.array([[*p, 0.0] for p in reference.landmarks.points_lps])
    np.testing.assert_allclose(result.pointsRas, lps_to_ras(expected), atol=1e-3)
    np.testing.assert_allclose(result.confidences, reference.landmarks.confidences, atol=1e-4)
    heatmap = logic.showHeatmap(result.markupsNode)
    np.testing.assert_array_equal(ijkToRasArray(heatmap), ijkToRasArray(volume))

    metaImage = loadVolumeFile(mrml.scene, _dataset_image(dataset_2d, 0))  # 2D MetaImage, oblique
    oblique = logic.detectLandmarks(metaImage, tiny_model_2d, device="cpu")
    reference = Predictor.from_file(tiny_model_2d, "cpu").predict(read_image(_dataset_image(dataset_2d, 0), 2))
    expected = np.array([[*p, 0.0] for p in reference.landmarks.points_lps])
    np.testing.assert_allclose(oblique.pointsRas, lps_to_ras(expected), atol=1e-3)

    volume3d = loadVolumeFile(mrml.scene, files["nrrd"])
    _assert_refused(
        mrml.scene,
        lambda: logic.detectLandmarks(volume3d, tiny_model_2d, device="cpu"),
        DataError,
        "model detects landmarks in 2D images, but 'oblique' is a 3D volume",
    )


def test_a_mirror_image_is_detected_and_the_summary_says_so(mrml, mirror_model_2d, dataset_2d, tmp_path):
    from SCNLandmarksLib.data.spec import load_dataset_spec
    from SCNLandmarksLib.io.images import read_image, write_image

    spec = load_dataset_spec(dataset_2d)
    entry = spec.split("validation")[0]
    image, truth = mirror_case(read_image(entry.image, 2), spec.load_landmarks([entry])[entry.id].points_lps)
    write_image(image, tmp_path / "left_facing.mha")
    volume = loadVolumeFile(mrml.scene, tmp_path / "left_facing.mha")
    result = SCNLandmarksLogic(mrml.scene).detectLandmarks(volume, mirror_model_2d, device="cpu")
    assert "landmarks were found on its mirror image" in result.summary
    expected = lps_to_ras(np.array([[*p, 0.0] for p in truth]))
    assert np.linalg.norm(result.pointsRas - expected, axis=1).max() < 1.0


# ------------------------------------------------------------------------------------------------
# the module's GUI and build files


def _module_source() -> str:
    return (MODULE_DIR / "SCNLandmarks.py").read_text(encoding="utf-8")


def _ui_widgets() -> dict[str, ElementTree.Element]:
    tree = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "SCNLandmarks.ui")
    return {w.get("name"): w for w in tree.iter("widget")}


def test_every_widget_the_module_uses_is_in_the_ui_file():
    used = set(re.findall(r"\bself\.ui\.(\w+)", _module_source()))
    assert used, "the module uses no widgets from the .ui file?"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"widgets used in SCNLandmarks.py but not in SCNLandmarks.ui: {missing}"


def test_parameter_names_in_the_ui_file_are_parameter_node_fields():
    tree = ast.parse(_module_source())
    # (Defined under the module's version check, not at its top level.)
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SCNLandmarksParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound, "no widget is bound to the parameter node"
    assert set(bound.values()) <= fields, f"unknown parameters: {set(bound.values()) - fields}"


def test_logic_package_imports_no_gui():
    for path in (MODULE_DIR / "SCNLandmarksMRML").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("qt", "ctk", "PythonQt"), f"{path.name} imports {name}"
                assert not name.startswith("slicer.util") and not name.startswith("slicer.Scripted"), (
                    f"{path.name} imports {name}"
                )
    assert "slicer.util" not in "".join(p.read_text() for p in (MODULE_DIR / "SCNLandmarksMRML").glob("*.py"))


def test_cmake_lists_name_existing_files():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = re.findall(r"^\s+(\S+\.(?:py|ui|png|json))\s*$", text, flags=re.MULTILINE)
    assert "SCNLandmarksMRML/logic.py" in [item.replace("${MODULE_NAME}", "SCNLandmarks") for item in listed]
    for item in listed:
        assert (MODULE_DIR / item.replace("${MODULE_NAME}", "SCNLandmarks")).is_file(), item
    python_files = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "SCNLandmarksMRML").glob("*.py")}
    assert python_files <= {item.replace("${MODULE_NAME}", "SCNLandmarks") for item in listed}
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_CATEGORY"):
        assert key in top
    assert re.search(r'EXTENSION_DEPENDS\s+"?PyTorch', top)
    assert "WITH_GENERIC_TESTS" in text
    entry = json.loads((MODULE_DIR / "Resources" / "SCNLandmarks.json").read_text())  # ExtensionsIndex form
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert f'EXTENSION_CATEGORY "{entry["category"]}"' in top
    assert entry["build_dependencies"] == ["PyTorch"]
    icon = sitk.ReadImage(str(MODULE_DIR / "Resources" / "Icons" / "SCNLandmarks.png"))
    assert icon.GetSize() == (128, 128)


# ------------------------------------------------------------------------------------------------
# catalogue (nothing is ever downloaded), dependencies


def test_catalogue_offers_only_shipped_models(tmp_path):
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "model.safetensors").write_bytes(b"model bytes")
    (tmp_path / "sample.nrrd").write_bytes(b"image bytes")
    catalogue = tmp_path / "models.json"
    catalogue.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "Shipped",
                        "id": "ship",
                        "file": "shipped/model.safetensors",
                        "card": "shipped/MODEL_CARD.md",
                        "dimension": 2,
                        "description": "a model",
                        "sample": "sample.nrrd",
                    },
                    {
                        "name": "Absent",
                        "file": "absent/model.safetensors",
                        "url": "https://example.org/absent.safetensors",
                        "sha256": "0" * 64,
                        "sample": "sample.nrrd",
                    },
                    {"description": "no name, no file: skipped"},
                ]
            }
        )
    )
    entries = readCatalogue(catalogue)
    assert [e.name for e in entries] == ["Shipped", "Absent"]
    shipped, absent = entries
    assert shipped.available and shipped.hasSample and shipped.unavailableReason == ""
    assert (shipped.dimension, shipped.id, shipped.description) == (2, "ship", "a model")
    assert shipped.card == (tmp_path / "shipped" / "MODEL_CARD.md").resolve()
    assert absent.id == "absent" and absent.dimension is None and absent.card is None
    assert not absent.available and not hasattr(absent, "url") and not hasattr(absent, "sha256")
    assert "never downloaded" in absent.unavailableReason and "Load model file" in absent.unavailableReason
    assert [e.name for e in catalogueModels([catalogue])] == ["Shipped", "Absent"]
    assert [e.name for e in availableModels([catalogue])] == ["Shipped"]
    assert sampleModel([catalogue]).name == "Shipped"
    assert entryForModel(tmp_path / "shipped" / ".." / "shipped" / "model.safetensors", [catalogue]).name == "Shipped"
    assert entryForModel(tmp_path / "mine.safetensors", [catalogue]) is None and entryForModel("", [catalogue]) is None
    assert catalogueModels([tmp_path / "missing.json"]) == [] and sampleModel([tmp_path / "missing.json"]) is None
    (tmp_path / "broken.json").write_text("{")
    assert readCatalogue(tmp_path / "broken.json") == []


def test_the_shipped_catalogue_and_the_module_download_nothing(monkeypatch, tmp_path):
    entries = SCNLandmarksLogic.catalogueModels()
    assert entries, "Resources/Models/models.json lists no model"
    for entry in entries:
        assert entry.path.is_relative_to(REPO / "Resources" / "Models"), entry.path
        assert entry.card is None or entry.card.is_file() or not entry.available, (
            f"shipped without its card: {entry.card}"
        )
        assert entry.sample is None or entry.sample.is_file(), entry.sample

    # With every network connection failing, the catalogue lists, each shipped model loads and detects
    # on its sample, and an entry whose file is absent says so instead of fetching it.
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    available = SCNLandmarksLogic.availableModels()
    assert [e.name for e in available] == [e.name for e in entries if e.available]
    headless = createHeadlessScene()
    logic = SCNLandmarksLogic(headless.scene, headless.applicationLogic)
    for entry in available:
        assert logic.loadPredictor(entry.path, "cpu").landmark_names
        if entry.sample is not None:
            volume = loadVolumeFile(headless.scene, entry.sample)
            assert logic.detectLandmarks(volume, entry.path, device="cpu").landmarkNames
    catalogue_file = tmp_path / "models.json"
    catalogue_file.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "id": "absent",
                        "name": "Absent",
                        "file": "absent/model.safetensors",
                        "url": "https://example.org/absent.safetensors",
                    }
                ]
            }
        )
    )
    absent = readCatalogue(catalogue_file)
    assert not absent[0].available and not (tmp_path / "absent").exists()


def test_dependency_status_and_devices():
    status = SCNLandmarksLogic.dependencyStatus()
    assert status.torchAvailable and status.ready and status.message == ""
    choices = SCNLandmarksLogic.deviceChoices()
    assert [c.key for c in choices] == ["auto", "cuda", "cpu"]
    assert choices[2].available

"""Tests of SCNLandmarksLib.io: image reading/writing and landmark files (incl. Slicer interop)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import ImageGeometry, lps_to_ras
from SCNLandmarksLib.io import (
    GREY_TOLERANCE,
    is_grey,
    read_image,
    read_landmarks,
    read_landmarks_csv,
    spacing_unit,
    write_image,
    write_landmarks,
    write_landmarks_csv,
)
from SCNLandmarksLib.io.images import slice_placement
from SCNLandmarksLib.landmark_set import LandmarkSet

AFIDS_DIR = Path("/work/shared/data/afids")
AFIDS_FCSV = AFIDS_DIR / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
AFIDS_CSV = AFIDS_DIR / "afids_groundtruth.csv"


def rotation_3d(a: float, b: float, c: float) -> np.ndarray:
    """A proper rotation (det +1) from three angles in radians: Rz(a) @ Ry(b) @ Rx(c)."""
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


def rotation_2d(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


OBLIQUE_3D = ImageGeometry((6, 5, 4), (0.7, 1.3, 2.1), (-12.5, 30.25, 7.0), tuple(rotation_3d(0.3, -0.2, 0.5).ravel()))
OBLIQUE_2D = ImageGeometry((40, 30), (0.15, 0.35), (4.0, -9.5), tuple(rotation_2d(0.4).ravel()))


def make_image(array: np.ndarray, geometry: ImageGeometry | None = None, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    return geometry.apply_to(image) if geometry is not None else image


# ----------------------------------------------------------------------------------------------------
# images


def test_png_grayscale_has_pixel_spacing(tmp_path):
    array = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    image = make_image(array)
    image.SetSpacing((0.5, 0.25))  # stored as PNG pHYs (print resolution), which must be ignored
    path = tmp_path / "gray.png"
    sitk.WriteImage(image, str(path))

    result = read_image(path)

    assert result.GetDimension() == 2
    assert result.GetPixelID() == sitk.sitkFloat32
    assert result.GetSpacing() == (1.0, 1.0)
    assert result.GetOrigin() == (0.0, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), array.astype(np.float32))
    assert spacing_unit(path) == "px"
    assert spacing_unit(tmp_path / "x.JPG") == "px"
    assert spacing_unit(tmp_path / "x.tiff") == "px"
    assert spacing_unit(tmp_path / "x.nii.gz") == "mm"
    assert spacing_unit(tmp_path / "x.mha") == "mm"


@pytest.mark.parametrize("channels", [3, 4])
def test_color_png_becomes_luminance(tmp_path, channels):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(12, 17, channels), dtype=np.uint8)
    path = tmp_path / "color.png"
    sitk.WriteImage(make_image(array, is_vector=True), str(path))

    result = read_image(path, dimension=2)

    expected = 0.299 * array[..., 0] + 0.587 * array[..., 1] + 0.114 * array[..., 2]
    assert result.GetNumberOfComponentsPerPixel() == 1
    assert result.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(result), expected, atol=1e-3)


def test_a_grey_picture_stored_as_rgb_is_read_as_its_grey_values(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(12, 17), dtype=np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[3, 4, 2] = min(int(grey[3, 4]) + GREY_TOLERANCE, 255)  # a JPEG's rounding of its colour planes
    path = tmp_path / "xray.png"
    sitk.WriteImage(make_image(rgb, is_vector=True), str(path))

    assert is_grey(rgb) and not is_grey(rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path, dimension=2)), grey.astype(np.float32))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_3d_oblique_geometry_round_trips(tmp_path, suffix):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(make_image(array, OBLIQUE_3D), str(path))

    result = read_image(path, dimension=3)

    geometry = ImageGeometry.of(result)
    assert geometry.size == OBLIQUE_3D.size
    # NIfTI stores its affine in float32, the others as decimal text/double: exact there.
    tolerance = 1e-5 if suffix == ".nii.gz" else 1e-12
    np.testing.assert_allclose(geometry.spacing, OBLIQUE_3D.spacing, atol=tolerance)
    np.testing.assert_allclose(geometry.origin, OBLIQUE_3D.origin, atol=tolerance)
    np.testing.assert_allclose(geometry.direction, OBLIQUE_3D.direction, atol=tolerance)
    assert result.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), array.astype(np.float32))


def test_single_slice_volume_becomes_2d(tmp_path):
    array = np.arange(7 * 9, dtype=np.uint8).reshape(1, 7, 9)  # W x H x 1 like the hand .mha files
    direction = np.eye(3)
    direction[:2, :2] = rotation_2d(0.25)
    geometry = ImageGeometry((9, 7, 1), (0.11, 0.13, 1.0), (3.0, -4.0, 5.0), tuple(direction.ravel()))
    path = tmp_path / "hand.mha"
    sitk.WriteImage(make_image(array, geometry), str(path))

    result = read_image(path, dimension=2)

    assert result.GetSize() == (9, 7)
    np.testing.assert_allclose(result.GetSpacing(), (0.11, 0.13))
    np.testing.assert_allclose(result.GetOrigin(), (3.0, -4.0))
    np.testing.assert_allclose(np.reshape(result.GetDirection(), (2, 2)), direction[:2, :2], atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), array[0].astype(np.float32))
    assert spacing_unit(path) == "mm"


def test_dicom_series_directory_reads_as_3d(tmp_path):
    slices, spacing, origin = 3, (0.8, 0.9, 2.5), (-20.0, 15.0, 40.0)
    array = np.arange(slices * 6 * 5, dtype=np.int16).reshape(slices, 6, 5) * 3
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99"
    for k in range(slices):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing(spacing[:2])
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.98",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(str(v) for v in (origin[0], origin[1], origin[2] + k * spacing[2])),
            "0018|0050": str(spacing[2]),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(image)

    result = read_image(tmp_path, dimension=3)

    assert result.GetSize() == (5, 6, slices)
    np.testing.assert_allclose(result.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), origin, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), array.astype(np.float32))

    single = read_image(tmp_path / "slice001.dcm", dimension=2)  # one DICOM file: a 2D image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(single), array[1].astype(np.float32))


def test_4d_image_is_rejected(tmp_path):
    path = tmp_path / "four_d.nii"
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkUInt8), str(path))
    with pytest.raises(DataError, match="4D") as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_wrong_dimension_is_rejected(tmp_path):
    path = tmp_path / "flat.png"
    sitk.WriteImage(sitk.Image([4, 3], sitk.sitkUInt8), str(path))
    with pytest.raises(DataError, match="is 2D but the model expects 3D images") as error:
        read_image(path, dimension=3)
    assert str(path) in str(error.value)


def test_two_component_image_is_rejected(tmp_path):
    path = tmp_path / "field.mha"
    sitk.WriteImage(sitk.Image([4, 3], sitk.sitkVectorFloat32, 2), str(path))
    with pytest.raises(DataError, match="2 components") as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_missing_and_corrupt_files_raise_data_error(tmp_path):
    missing = tmp_path / "nothing.nrrd"
    with pytest.raises(DataError, match="not found") as error:
        read_image(missing)
    assert str(missing) in str(error.value)

    for name, content in (
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really a png"),
        ("broken.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n\x00\x01"),
    ):
        corrupt = tmp_path / name
        corrupt.write_bytes(content)
        with pytest.raises(DataError, match="cannot read image") as error:
            read_image(corrupt)
        assert str(corrupt) in str(error.value)


def test_write_image_round_trip_and_failure_leaves_nothing(tmp_path):
    image = make_image(np.linspace(0, 1, 6 * 5 * 4, dtype=np.float32).reshape(4, 5, 6), OBLIQUE_3D)
    path = tmp_path / "heatmap.nii.gz"
    write_image(image, path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayFromImage(image))

    target = tmp_path / "float.png"  # PNG cannot hold float32 pixels
    with pytest.raises(DataError, match="cannot write image") as error:
        write_image(make_image(np.zeros((3, 4), np.float32)), target)
    assert str(target) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.nii.gz"]


def sagittal_slice(array: np.ndarray) -> sitk.Image:
    """A one-slice 3D image of `array` (y, x) outside the axial plane: oblique in a sagittal-like plane,
    one axis flipped, anisotropic pixels (e.g. a lateral X-ray whose DICOM gives its orientation)."""
    image = sitk.GetImageFromArray(array[None])
    angle = math.radians(20.0)
    rows, columns = (0.0, math.cos(angle), math.sin(angle)), (0.0, math.sin(angle), -math.cos(angle))
    image.SetDirection(np.column_stack([rows, columns, np.cross(rows, columns)]).ravel().tolist())
    image.SetSpacing((0.3, 0.45, 2.0))
    image.SetOrigin((11.0, -20.0, 35.0))
    return image


def test_a_single_slice_outside_the_axial_plane_is_read_in_its_plane_with_its_landmarks(tmp_path):
    from SCNLandmarksLib.data.spec import load_dataset_spec

    volume = sagittal_slice(np.arange(30 * 40, dtype=np.float32).reshape(30, 40))
    write_image(volume, tmp_path / "xray.nrrd")
    index = np.array([[3.0, 4.0], [31.5, 2.25], [17.0, 28.0]])
    in_space = np.array([volume.TransformContinuousIndexToPhysicalPoint([*i, 0.0]) for i in index])
    write_landmarks(LandmarkSet(["a", "b", "c"], in_space), tmp_path / "xray.mrk.json")
    (tmp_path / "dataset.toml").write_text(
        'dimension = 2\nlandmarks = ["a", "b", "c"]\n[[images]]\nid = "xray"\nimage = "xray.nrrd"\n'
        'landmarks = "xray.mrk.json"\nsplit = "train"\n'
    )
    spec = load_dataset_spec(tmp_path / "dataset.toml")
    plane = spec.entries[0].read(2)
    assert np.allclose(plane.GetSpacing(), (0.3, 0.45)) and plane.GetDirection() == (1.0, 0.0, 0.0, 1.0)
    points = spec.load_landmarks(list(spec.entries))["xray"].points_lps
    np.testing.assert_allclose(ImageGeometry.of(plane).physical_to_index(points), index, atol=1e-9)
    placement = slice_placement(tmp_path / "xray.nrrd")
    np.testing.assert_allclose(placement.to_space(points), in_space, atol=1e-9)
    axial = sitk.GetImageFromArray(np.zeros((1, 3, 4), np.float32))
    axial.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))  # flipped, yet in the axial plane
    write_image(axial, tmp_path / "axial.nrrd")
    assert slice_placement(tmp_path / "axial.nrrd") is None
    assert read_image(tmp_path / "axial.nrrd", 2).GetDirection() == (0.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("suffix, data", [(".mhd", ".raw"), (".nhdr", ".raw")])
def test_a_header_and_data_format_written_twice_leaves_its_two_files_only(tmp_path, suffix, data):
    image = make_image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), OBLIQUE_3D)
    path = tmp_path / f"heatmap{suffix}"
    write_image(image, path)
    write_image(image, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f"heatmap{data}"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayFromImage(image))


# ----------------------------------------------------------------------------------------------------
# landmark files: reading


NAMES = ["AC", "PC", "Genu", "Tip"]
POINTS_LPS = np.array([[1.5, -2.25, 3.0], [-4.0, 5.5, -6.125], [np.nan] * 3, [10.0, 20.0, 30.0]])


def markups_document(system: str, points: np.ndarray, names: list[str]) -> dict:
    control_points = []
    for i, (name, point) in enumerate(zip(names, points)):
        if np.all(np.isfinite(point)):
            control_points.append(
                {"id": str(i + 1), "label": name, "position": list(point), "positionStatus": "defined"}
            )
        else:  # Slicer writes missing points with an empty position string
            control_points.append({"id": str(i + 1), "label": name, "position": "", "positionStatus": "missing"})
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
        "Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": control_points}],
    }


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_read_markups_json(tmp_path, system):
    stored = POINTS_LPS if system == "LPS" else lps_to_ras(POINTS_LPS)
    path = tmp_path / "points.mrk.json"
    path.write_text(json.dumps(markups_document(system, stored, NAMES)))

    landmarks = read_landmarks(path)

    assert landmarks.names == NAMES
    np.testing.assert_array_equal(landmarks.points_lps, POINTS_LPS)
    assert landmarks.present.tolist() == [True, True, False, True]
    assert landmarks.confidences is None


def test_read_markups_json_reorders_and_treats_undefined_as_missing(tmp_path):
    document = markups_document("LPS", POINTS_LPS, NAMES)
    document["markups"][0]["controlPoints"][0]["positionStatus"] = "undefined"
    path = tmp_path / "points.json"
    path.write_text(json.dumps(document))

    landmarks = read_landmarks(path, names=["Tip", "Extra", "PC", "AC", "Genu"])

    assert landmarks.names == ["Tip", "Extra", "PC", "AC", "Genu"]
    np.testing.assert_array_equal(landmarks.points_lps[0], POINTS_LPS[3])
    np.testing.assert_array_equal(landmarks.points_lps[2], POINTS_LPS[1])
    assert landmarks.present.tolist() == [True, False, True, False, False]


def fcsv_text(system_line: str, points: np.ndarray, names: list[str]) -> str:
    lines = [
        "# Markups fiducial file version = 4.6",
        system_line,
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, (name, point) in enumerate(zip(names, points)):
        if np.all(np.isfinite(point)):
            lines.append(
                f"vtkMRMLMarkupsFiducialNode_{i},{','.join(repr(float(v)) for v in point)},"
                f"0,0,0,1,1,1,0,{name},description {i},vtkMRMLScalarVolumeNode1"
            )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "system_line, is_ras",
    [
        ("# CoordinateSystem = 0", True),
        ("# CoordinateSystem = RAS", True),
        ("# CoordinateSystem = 1", False),
        ("# CoordinateSystem = LPS", False),
    ],
)
def test_read_fcsv_honours_coordinate_system(tmp_path, system_line, is_ras):
    stored = lps_to_ras(POINTS_LPS) if is_ras else POINTS_LPS
    path = tmp_path / "points.fcsv"
    path.write_text(fcsv_text(system_line, stored, NAMES))

    landmarks = read_landmarks(path, names=NAMES)

    assert landmarks.names == NAMES
    np.testing.assert_array_equal(landmarks.points_lps, POINTS_LPS)


def test_read_fcsv_honours_column_order_and_quoted_labels(tmp_path):
    path = tmp_path / "points.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
        "# columns = label,z,y,x\n"
        '"Left, lateral",3,2,1\n'
        "Right,6,5,4\n"
    )
    landmarks = read_landmarks(path)
    assert landmarks.names == ["Left, lateral", "Right"]
    np.testing.assert_array_equal(landmarks.points_lps, [[1, 2, 3], [4, 5, 6]])


def test_read_fcsv_without_coordinate_system_assumes_lps_like_slicer(tmp_path, caplog):
    path = tmp_path / "old.fcsv"
    path.write_text(fcsv_text("# no coordinate system line", POINTS_LPS, NAMES))
    landmarks = read_landmarks(path)
    np.testing.assert_array_equal(landmarks.points_lps[landmarks.present], POINTS_LPS[[0, 1, 3]])
    assert "assuming LPS" in caplog.text


def test_read_landmarks_errors_name_the_file(tmp_path):
    path = tmp_path / "points.mrk.json"
    path.write_text(json.dumps(markups_document("LPS", POINTS_LPS, NAMES)))
    with pytest.raises(DataError, match="unknown landmark") as error:
        read_landmarks(path, names=["AC", "PC", "Tip"])
    assert str(path) in str(error.value) and "Genu" in str(error.value)

    duplicate = tmp_path / "duplicate.fcsv"
    duplicate.write_text(fcsv_text("# CoordinateSystem = LPS", POINTS_LPS[:2], ["AC", "AC"]))
    with pytest.raises(DataError, match="more than once") as error:
        read_landmarks(duplicate)
    assert str(duplicate) in str(error.value)

    unlabelled = tmp_path / "unlabelled.fcsv"
    unlabelled.write_text(fcsv_text("# CoordinateSystem = LPS", POINTS_LPS[:2], ["AC", ""]))
    with pytest.raises(DataError, match="no label") as error:
        read_landmarks(unlabelled)
    assert str(unlabelled) in str(error.value)

    malformed = tmp_path / "malformed.fcsv"
    malformed.write_text(
        fcsv_text("# CoordinateSystem = LPS", POINTS_LPS[:2], ["AC", "PC"]).replace("-4.0", "minus four")
    )
    with pytest.raises(DataError, match="line 5") as error:
        read_landmarks(malformed)
    assert str(malformed) in str(error.value)

    missing = tmp_path / "absent.mrk.json"
    with pytest.raises(DataError, match="not found") as error:
        read_landmarks(missing)
    assert str(missing) in str(error.value)

    broken = tmp_path / "broken.mrk.json"
    broken.write_text('{"markups": [')
    with pytest.raises(DataError, match="not valid JSON") as error:
        read_landmarks(broken)
    assert str(broken) in str(error.value)


def test_read_landmarks_dimension(tmp_path):
    path = tmp_path / "flat.mrk.json"
    points = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    path.write_text(json.dumps(markups_document("LPS", points, ["a", "b"])))
    landmarks = read_landmarks(path, dimension=2)
    assert landmarks.dimension == 2
    np.testing.assert_array_equal(landmarks.points_lps, points[:, :2])

    table = tmp_path / "flat.csv"
    table.write_text("landmark,x,y\na,1,2\n")
    with pytest.raises(DataError, match="model expects 3D"):
        read_landmarks(table, dimension=3)


def test_read_landmarks_csv_physical(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(
        "image,landmark,x,y,confidence,annotator\n"
        "001,Sella,10.5,20.25,0.9,A\n"
        "001,Nasion,30,40,,A\n"
        "002,Nasion,nan,nan,,B\n"
        "002,Sella,1,2,0.5,B\n"
        "\n"
    )
    sets = read_landmarks_csv(path, names=["Sella", "Nasion", "Menton"])

    assert list(sets) == ["001", "002"]
    assert sets["001"].names == ["Sella", "Nasion", "Menton"]
    np.testing.assert_array_equal(sets["001"].points_lps, [[10.5, 20.25], [30.0, 40.0], [np.nan, np.nan]])
    np.testing.assert_array_equal(sets["002"].points_lps, [[1.0, 2.0], [np.nan, np.nan], [np.nan, np.nan]])
    np.testing.assert_array_equal(sets["001"].confidences, [0.9, np.nan, np.nan])

    with pytest.raises(DataError, match="unknown landmark") as error:
        read_landmarks_csv(path, names=["Sella"])
    assert str(path) in str(error.value) and "Nasion" in str(error.value)


def test_read_landmarks_csv_accepts_landmark_name_column(tmp_path):
    path = tmp_path / "ceph.csv"  # the column layout of the shared cephalometric tables
    path.write_text("image,landmark_index,landmark_name,x,y\n001,0,Sella,10.5,20.0\n001,1,Nasion,3,4\n")
    sets = read_landmarks_csv(path)
    assert sets["001"].names == ["Sella", "Nasion"]
    np.testing.assert_array_equal(sets["001"].points_lps, [[10.5, 20.0], [3.0, 4.0]])
    assert sets["001"].confidences is None


@pytest.mark.parametrize("geometry", [OBLIQUE_2D, OBLIQUE_3D], ids=["2d", "3d"])
def test_read_landmarks_csv_index_uses_geometry(tmp_path, geometry):
    rng = np.random.default_rng(1)
    d = geometry.dimension
    index = rng.uniform(0, np.asarray(geometry.size) - 1, size=(3, d))
    axes = ["x", "y", "z"][:d]
    with open(tmp_path / "index.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "landmark", *axes])
        for i, row in enumerate(index):
            writer.writerow(["case", f"L{i}", *[repr(float(v)) for v in row]])

    sets = read_landmarks_csv(tmp_path / "index.csv", coordinates="index", geometries={"case": geometry})

    np.testing.assert_allclose(sets["case"].points_lps, geometry.index_to_physical(index), atol=1e-12)
    with pytest.raises(DataError, match="no image geometry for 'case'") as error:
        read_landmarks_csv(tmp_path / "index.csv", coordinates="index", geometries={})
    assert "index.csv" in str(error.value)


def test_read_landmarks_csv_reports_line_of_bad_number(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image,landmark,x,y\nA,a,1,2\nA,b,3,four\n")
    with pytest.raises(DataError, match=r"line 3: column 'y' holds 'four'") as error:
        read_landmarks_csv(path)
    assert str(path) in str(error.value)


@pytest.mark.skipif(not (AFIDS_FCSV.is_file() and AFIDS_CSV.is_file()), reason="afids data not present")
def test_read_real_afids_fcsv():
    with open(AFIDS_CSV, newline="") as stream:
        rows = list(csv.DictReader(stream))
    expected = np.array([[float(r["x_lps"]), float(r["y_lps"]), float(r["z_lps"])] for r in rows])
    names = [str(int(r["afid_number"])) for r in rows]  # the fcsv label column holds the AFID number

    landmarks = read_landmarks(AFIDS_FCSV, names=names)

    assert landmarks.present.all()
    np.testing.assert_allclose(landmarks.points_lps, expected, atol=1e-5)  # the table has 6 decimals


# ----------------------------------------------------------------------------------------------------
# landmark files: writing and round trips


def example_set(dimension: int) -> LandmarkSet:
    points = POINTS_LPS[:, :dimension].copy()
    return LandmarkSet(NAMES, points, np.array([0.25, 0.875, np.nan, 1.0]))


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv", ".csv"])
def test_write_read_round_trip(tmp_path, suffix, dimension):
    original = example_set(dimension)
    path = tmp_path / f"out{suffix}"
    write_landmarks(original, path)

    result = read_landmarks(path, names=NAMES, dimension=dimension)

    assert result.names == NAMES
    np.testing.assert_array_equal(result.points_lps, original.points_lps)
    if suffix == ".fcsv":  # fcsv has no place for confidences
        assert result.confidences is None
    else:
        np.testing.assert_array_equal(result.confidences, original.confidences)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_write_landmarks_csv_round_trip(tmp_path):
    sets = {"case 1": example_set(3), "case,2": LandmarkSet(NAMES, POINTS_LPS[::-1] * 2.0, None)}
    path = tmp_path / "many.csv"
    write_landmarks_csv(path, sets)

    result = read_landmarks_csv(path, names=NAMES)

    assert list(result) == list(sets)
    for key, original in sets.items():
        np.testing.assert_array_equal(result[key].points_lps, original.points_lps)
    np.testing.assert_array_equal(result["case 1"].confidences, sets["case 1"].confidences)
    assert np.isnan(result["case,2"].confidences).all()


def test_markups_json_content(tmp_path):
    path = tmp_path / "out.mrk.json"
    status = ["detected", "low confidence", "missing", "detected"]
    write_landmarks(example_set(2), path, status=status)
    markup = json.loads(path.read_text())["markups"][0]

    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    points = markup["controlPoints"]
    assert [p["id"] for p in points] == ["1", "2", "3", "4"]
    assert [p["label"] for p in points] == NAMES
    assert [p["description"] for p in points] == status
    assert [p["positionStatus"] for p in points] == ["defined", "defined", "missing", "defined"]
    assert points[0]["position"] == [1.5, -2.25, 0.0]
    assert points[2]["position"] == [0.0, 0.0, 0.0]
    assert markup["measurements"][0]["name"] == "confidence"
    assert markup["measurements"][0]["controlPointValues"][:2] == [0.25, 0.875]

    with pytest.raises(ValueError, match="3 entries for 4 landmarks"):
        write_landmarks(example_set(2), path, status=status[:3])


def test_pixel_positions_are_not_labelled_mm(tmp_path, caplog):
    path = tmp_path / "picture.mrk.json"
    write_landmarks(example_set(2), path, unit="px")
    assert json.loads(path.read_text())["markups"][0]["coordinateUnits"] == "px"
    with caplog.at_level("WARNING"):
        read_back = read_landmarks(path, names=NAMES)
    np.testing.assert_allclose(read_back.points_lps[:, :2], example_set(2).points_lps)
    assert "coordinateUnits" not in caplog.text  # our own pixel files read back without a complaint


def test_csv_with_status_column_reads_back(tmp_path):
    path = tmp_path / "out.csv"
    status = ["detected", "low confidence", "missing", "detected"]
    write_landmarks(example_set(3), path, status=status)

    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["status"] for r in rows] == status
    assert rows[2]["x"] == "" and rows[2]["confidence"] == ""
    result = read_landmarks(path)
    np.testing.assert_array_equal(result.points_lps, POINTS_LPS)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.fcsv"
    path.write_text("old content\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(DataError, match="disk full") as error:
        write_landmarks(example_set(3), path)
    assert str(path) in str(error.value)
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.fcsv"]


# ----------------------------------------------------------------------------------------------------
# Slicer interoperability (slicer-core: real MRML storage nodes, headless)


def load_with_slicer(path: Path, storage_class: str):
    """Read `path` into a fiducial node of a fresh MRML scene with the given storage node class."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def test_slicer_reads_our_markups_json(tmp_path):
    landmarks = example_set(3)
    path = tmp_path / "ours.mrk.json"
    status = ["detected", "low confidence", "missing", "detected"]
    write_landmarks(landmarks, path, status)

    node = load_with_slicer(path, "vtkMRMLMarkupsJsonStorageNode")

    assert node.GetNumberOfControlPoints() == len(NAMES)
    assert [node.GetNthControlPointLabel(i) for i in range(len(NAMES))] == NAMES
    missing = [node.GetNthControlPointPositionStatus(i) == node.PositionMissing for i in range(len(NAMES))]
    assert missing == [False, False, True, False]
    assert [node.GetNthControlPointDescription(i) for i in range(len(NAMES))] == status
    for i in np.flatnonzero(landmarks.present):
        np.testing.assert_allclose(
            node.GetNthControlPointPositionVector(int(i)), lps_to_ras(landmarks.points_lps[i]), atol=1e-12
        )
    measurement = node.GetMeasurement("confidence")
    values = measurement.GetControlPointValues()
    np.testing.assert_array_equal(
        [values.GetValue(i) for i in range(values.GetNumberOfValues())], landmarks.confidences
    )


def test_slicer_reads_our_fcsv(tmp_path):
    landmarks = example_set(3)
    path = tmp_path / "ours.fcsv"
    write_landmarks(LandmarkSet(["a, with comma", *NAMES[1:]], landmarks.points_lps), path)

    node = load_with_slicer(path, "vtkMRMLMarkupsFiducialStorageNode")

    present = np.flatnonzero(landmarks.present)
    assert node.GetNumberOfControlPoints() == len(present)
    assert [node.GetNthControlPointLabel(i) for i in range(len(present))] == ["a, with comma", "PC", "Tip"]
    for j, i in enumerate(present):
        np.testing.assert_allclose(
            node.GetNthControlPointPositionVector(j), lps_to_ras(landmarks.points_lps[i]), atol=1e-12
        )


@pytest.mark.parametrize(
    "suffix, storage_class",
    [(".mrk.json", "vtkMRMLMarkupsJsonStorageNode"), (".fcsv", "vtkMRMLMarkupsFiducialStorageNode")],
)
def test_we_read_files_written_by_slicer(tmp_path, suffix, storage_class):
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    ras = lps_to_ras(POINTS_LPS)
    for name, point in zip(NAMES, ras):
        node.AddControlPoint(np.nan_to_num(point, nan=7.0).tolist(), name)
    node.SetNthControlPointPositionMissing(2)  # Slicer keeps the stale position of a missing point
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    path = tmp_path / f"slicer{suffix}"
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1

    landmarks = read_landmarks(path, names=NAMES)

    np.testing.assert_allclose(landmarks.points_lps, POINTS_LPS, atol=1e-12)
    assert landmarks.present.tolist() == [True, True, False, True]

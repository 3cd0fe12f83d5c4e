"""Landmark data as users have it: foreign formats, infinite coordinates, description labels, dataset init."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli

from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import ImageGeometry, lps_to_ras
from SCNLandmarksLib.io import read_image, read_landmarks, read_landmarks_csv
from SCNLandmarksLib.io.landmark_formats import (
    detect_format,
    read_isbi,
    read_labelme,
    read_landmark_file,
    read_landmark_table,
    read_wide_csv,
)

AFIDS_DIR = Path("/work/shared/data/afids")
AFIDS_FCSV = AFIDS_DIR / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
AFIDS_CSV = AFIDS_DIR / "afids_groundtruth.csv"

ANGLE = math.radians(20.0)
# A 2D image whose index -> physical mapping has every ingredient: origin, anisotropic spacing and an
# oblique direction with a flip.
OBLIQUE_DIRECTION = (math.cos(ANGLE), math.sin(ANGLE), math.sin(ANGLE), -math.cos(ANGLE))


def write_oblique_image(path: Path, size: tuple[int, int] = (40, 30)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.zeros(size[::-1], dtype=np.uint8))
    image.SetSpacing((0.3, 0.7))
    image.SetOrigin((-12.5, 40.25))
    image.SetDirection(OBLIQUE_DIRECTION)
    sitk.WriteImage(image, str(path))
    return image


def physical(image: sitk.Image, index: tuple[float, float]) -> list[float]:
    """SimpleITK's own mapping of a continuous index: the reference the readers must match exactly."""
    return list(image.TransformContinuousIndexToPhysicalPoint(index))


@pytest.fixture
def oblique(tmp_path) -> tuple[sitk.Image, ImageGeometry]:
    image = write_oblique_image(tmp_path / "image.mha")
    return image, ImageGeometry.of(read_image(tmp_path / "image.mha"))


# ----------------------------------------------------------------------------------------------------
# defect 3: an infinite coordinate is a broken file, empty or nan a missing landmark


FCSV_HEADER = (
    "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
)


def test_infinite_coordinate_in_fcsv_names_file_line_and_landmark(tmp_path):
    path = tmp_path / "points.fcsv"
    path.write_text(FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,AC,,\n2,4,inf,6,0,0,0,1,1,1,0,PC,,\n")
    with pytest.raises(
        DataError,
        match=r"points\.fcsv, line 5: column 'y' holds the infinite value 'inf' "
        r"for landmark 'PC'",
    ):
        read_landmarks(path)


def test_empty_or_nan_coordinate_in_fcsv_stays_missing(tmp_path):
    path = tmp_path / "points.fcsv"
    path.write_text(FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,AC,,\n2,nan,,6,0,0,0,1,1,1,0,PC,,\n")
    landmarks = read_landmarks(path)
    assert landmarks.present.tolist() == [True, False]


@pytest.mark.parametrize(
    "text, line",
    [("image,landmark,x,y\nA,a,1,2\nA,b,-inf,3\n", 3), ("image,landmark,x,y,confidence\nA,a,1,2,Infinity\n", 2)],
)
def test_infinite_value_in_csv_table_names_line_and_landmark(tmp_path, text, line):
    path = tmp_path / "table.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"table\.csv, line {line}: column '\w+' holds the infinite value"):
        read_landmarks_csv(path)


def test_nan_and_empty_in_csv_table_stay_missing(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("image,landmark,x,y\nA,a,1,2\nA,b,nan,3\nA,c,,\n")
    assert read_landmarks_csv(path)["A"].present.tolist() == [True, False, False]


def test_infinite_position_in_markups_json_names_line_and_landmark(tmp_path):
    path = tmp_path / "points.mrk.json"
    document = {
        "@schema": "markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "controlPoints": [
                    {"label": "AC", "position": [1.0, 2.0, 3.0]},
                    {"label": "PC", "position": [4.0, math.inf, 6.0]},
                ],
            }
        ],
    }
    path.write_text(json.dumps(document, indent=2))  # writes Infinity, as Python's and VTK's JSON do
    text_lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(text_lines, 1) if '"position"' in text and "PC" in text_lines[i - 2])
    with pytest.raises(
        DataError,
        match=rf"points\.mrk\.json, line {line}: control point 2 \(landmark 'PC'\) "
        r"has the infinite position",
    ):
        read_landmarks(path)


# ----------------------------------------------------------------------------------------------------
# numbers as labels, names in the descriptions (AFIDs and other tools)


def test_fcsv_descriptions_name_the_points_when_labels_do_not(tmp_path, caplog):
    path = tmp_path / "afids.fcsv"
    path.write_text(FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,1,PC,\n2,4,5,6,0,0,0,1,1,1,0,2,AC,\n")
    with caplog.at_level(logging.INFO, logger="SCNLandmarksLib.io.landmarks"):
        landmarks = read_landmarks(path, names=["AC", "PC", "RMB"])
    assert landmarks.names == ["AC", "PC", "RMB"]
    np.testing.assert_array_equal(landmarks.points_lps[:2], [[4, 5, 6], [1, 2, 3]])
    assert not landmarks.present[2]
    assert sum("descriptions" in record.message for record in caplog.records) == 1


def test_markups_json_descriptions_name_the_points_when_labels_do_not(tmp_path, caplog):
    path = tmp_path / "points.mrk.json"
    path.write_text(
        json.dumps(
            {
                "@schema": "markups-schema-v1.0.3.json#",
                "markups": [
                    {
                        "type": "Fiducial",
                        "coordinateSystem": "RAS",
                        "controlPoints": [
                            {"label": "F-1", "description": "Nasion", "position": [1.0, 2.0, 3.0]},
                            {"label": "F-2", "description": "Sella", "position": [4.0, 5.0, 6.0]},
                        ],
                    }
                ],
            }
        )
    )
    with caplog.at_level(logging.INFO, logger="SCNLandmarksLib.io.landmarks"):
        landmarks = read_landmarks(path, names=["Sella", "Nasion"])
    np.testing.assert_array_equal(landmarks.points_lps, lps_to_ras(np.array([[4.0, 5, 6], [1, 2, 3]])))
    assert sum("descriptions" in record.message for record in caplog.records) == 1


def test_labels_win_when_they_are_the_names(tmp_path, caplog):
    path = tmp_path / "points.fcsv"
    path.write_text(FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,AC,PC,\n2,4,5,6,0,0,0,1,1,1,0,PC,AC,\n")
    with caplog.at_level(logging.INFO, logger="SCNLandmarksLib.io.landmarks"):
        landmarks = read_landmarks(path, names=["AC", "PC"])
    np.testing.assert_array_equal(landmarks.points_lps, [[1, 2, 3], [4, 5, 6]])
    assert not any("descriptions" in record.message for record in caplog.records)


def test_neither_labels_nor_descriptions_is_an_error_naming_the_labels(tmp_path):
    path = tmp_path / "points.fcsv"
    path.write_text(FCSV_HEADER + "1,1,2,3,0,0,0,1,1,1,0,1,detected,\n")
    with pytest.raises(DataError, match=r"points\.fcsv: unknown landmark\(s\) \['1'\]"):
        read_landmarks(path, names=["AC"])


@pytest.mark.skipif(not (AFIDS_FCSV.is_file() and AFIDS_CSV.is_file()), reason="afids data not present")
def test_real_afids_fcsv_by_description():
    with open(AFIDS_CSV, newline="") as stream:
        rows = list(csv.DictReader(stream))
    names = [r["name"] for r in rows]  # the fcsv describes each point by these names; its labels are 1..32

    landmarks = read_landmarks(AFIDS_FCSV, names=names)

    expected = np.array([[float(r["x_lps"]), float(r["y_lps"]), float(r["z_lps"])] for r in rows])
    np.testing.assert_allclose(landmarks.points_lps, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Slicer markups JSON, schema 1.0.0 to the current one


MARKUPS_VERSIONS = {
    # 1.0.0 (Slicer 4.11): no coordinateUnits, no measurements, positionStatus without "missing"
    "1.0.0": {
        "coordinateSystem": "RAS",
        "controlPoints": [
            {
                "id": "1",
                "label": "A",
                "description": "",
                "associatedNodeID": "",
                "position": [1.5, -2.0, 3.25],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            },
            {"id": "2", "label": "B", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
        ],
    },
    # 1.0.3 (Slicer 5.0-5.2): coordinateUnits as text, per-point measurement values, "missing"
    "1.0.3": {
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "controlPoints": [
            {"id": "1", "label": "A", "position": [-1.5, 2.0, 3.25], "positionStatus": "defined"},
            {"id": "2", "label": "B", "position": [9.0, 9.0, 9.0], "positionStatus": "missing"},
        ],
        "measurements": [{"name": "confidence", "enabled": True, "controlPointValues": [0.75, 0.0]}],
    },
    # 1.0.4 (current): coordinateUnits may be a DICOM code triplet
    "1.0.4": {
        "coordinateSystem": "LPS",
        "coordinateUnits": ["mm", "UCUM", "millimeter"],
        "fixedNumberOfControlPoints": False,
        "controlPoints": [
            {"id": "1", "label": "A", "position": [-1.5, 2.0, 3.25], "positionStatus": "defined"},
            {"id": "2", "label": "B", "position": "", "positionStatus": "missing"},
        ],
    },
}


@pytest.mark.parametrize("version", sorted(MARKUPS_VERSIONS))
def test_markups_json_schema_versions(tmp_path, version, caplog):
    path = tmp_path / "points.mrk.json"
    schema = (
        "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        f"Schema/markups-schema-v{version}.json#"
    )
    path.write_text(json.dumps({"@schema": schema, "markups": [{"type": "Fiducial", **MARKUPS_VERSIONS[version]}]}))
    with caplog.at_level(logging.WARNING):
        landmarks = read_landmark_file(path, names=["A", "B"])
    assert landmarks.points_lps[0].tolist() == [-1.5, 2.0, 3.25]
    assert landmarks.present.tolist() == [True, False]
    assert not caplog.records  # no unit warning for ["mm", "UCUM", "millimeter"]
    if version == "1.0.3":
        assert landmarks.confidences.tolist() == [0.75, 0.0]


# ----------------------------------------------------------------------------------------------------
# LabelMe, ISBI 2015, wide CSV: pixel formats mapped through the image geometry


def labelme_document(points: dict[str, tuple[float, float]], size: tuple[int, int]) -> dict:
    shapes = [
        {"label": label, "points": [list(point)], "group_id": None, "shape_type": "point", "flags": {}}
        for label, point in points.items()
    ]
    shapes.append({"label": "jaw", "points": [[1, 1], [5, 1], [5, 5]], "shape_type": "polygon", "flags": {}})
    return {
        "version": "5.0.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": "image.png",
        "imageData": None,
        "imageHeight": size[1],
        "imageWidth": size[0],
    }


def test_labelme_pixel_corner_origin_maps_to_exact_physical_position(tmp_path, oblique):
    image, geometry = oblique
    path = tmp_path / "image.json"
    # LabelMe's (10.5, 20.5) is the center of pixel column 10, row 20: ITK index (10, 20).
    path.write_text(json.dumps(labelme_document({"Nasion": (10.5, 20.5), "Sella": (0.0, 0.0)}, (40, 30))))

    landmarks = read_labelme(path, geometry, names=["Sella", "Nasion", "Menton"])

    assert landmarks.names == ["Sella", "Nasion", "Menton"]
    np.testing.assert_allclose(landmarks.points_lps[1], physical(image, (10.0, 20.0)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(landmarks.points_lps[0], physical(image, (-0.5, -0.5)), rtol=0, atol=1e-12)
    assert not landmarks.present[2]
    assert detect_format(path) == "labelme"


def test_labelme_errors_name_the_file(tmp_path, oblique):
    _, geometry = oblique
    path = tmp_path / "image.json"
    path.write_text(json.dumps(labelme_document({"Nasion": (1.0, 2.0)}, (41, 30))))
    with pytest.raises(DataError, match=r"image\.json: the annotations are for an image of 41 x 30 pixels"):
        read_labelme(path, geometry)
    path.write_text(json.dumps(labelme_document({"Nasion": (1.0, 2.0), "Sella": (math.inf, 2.0)}, (40, 30)), indent=1))
    line = [i for i, text in enumerate(path.read_text().splitlines(), 1) if '"points"' in text][1]  # Sella's
    with pytest.raises(DataError, match=rf"image\.json, line {line}: point 'Sella' has the infinite position"):
        read_labelme(path, geometry)
    path.write_text(
        json.dumps(
            labelme_document({"Nasion": (1.0, 2.0)}, (40, 30))
            | {
                "shapes": [
                    {"label": "Nasion", "points": [[1, 2]], "shape_type": "point"},
                    {"label": "Nasion", "points": [[3, 4]], "shape_type": "point"},
                ]
            }
        )
    )
    with pytest.raises(DataError, match=r"image\.json: landmark name\(s\) \['Nasion'\] occur more than once"):
        read_labelme(path, geometry)


def test_isbi_text_file_maps_pixels_to_exact_physical_position(tmp_path, oblique):
    image, geometry = oblique
    path = tmp_path / "001.txt"
    # Points, then the challenge's per-image classification labels (one number a line).
    path.write_text("12,7\n3,25\n,\n1\n3\n")

    landmarks = read_isbi(path, geometry, names=["Sella", "Nasion", "Orbitale"])

    np.testing.assert_allclose(landmarks.points_lps[0], physical(image, (12.0, 7.0)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(landmarks.points_lps[1], physical(image, (3.0, 25.0)), rtol=0, atol=1e-12)
    assert landmarks.present.tolist() == [True, True, False]
    assert read_isbi(path, geometry).names == ["0", "1", "2"]
    with pytest.raises(DataError, match=r"001\.txt: the file holds 3 points but 2 landmark names"):
        read_isbi(path, geometry, names=["Sella", "Nasion"])
    path.write_text("12,7\n3,inf\n")
    with pytest.raises(
        DataError,
        match=r"001\.txt, line 2: column 'y' holds the infinite value 'inf' for "
        r"landmark 'Nasion'",
    ):
        read_isbi(path, geometry, names=["Sella", "Nasion"])


@pytest.mark.parametrize("header", [None, "id,x_0,y_0,x_1,y_1"])
def test_wide_csv_with_or_without_header(tmp_path, oblique, header):
    image, geometry = oblique
    path = tmp_path / "landmarks.csv"
    path.write_text((header + "\n" if header else "") + "scan,12,7,nan,\nother,1,2,3,4\n")

    table = read_wide_csv(path, "index", {"scan": geometry}, images=["scan"])

    assert list(table) == ["scan"]
    assert table["scan"].names == ["0", "1"]
    np.testing.assert_allclose(table["scan"].points_lps[0], physical(image, (12.0, 7.0)), rtol=0, atol=1e-12)
    assert table["scan"].present.tolist() == [True, False]
    assert detect_format(path, table=True) == "wide-csv"
    named = read_landmark_table(path, "auto", "physical", names=["Sella", "Nasion"])
    assert named["other"].names == ["Sella", "Nasion"]
    assert named["other"].points_lps.tolist() == [[1, 2], [3, 4]]


def test_wide_csv_3d_header_and_errors(tmp_path):
    path = tmp_path / "landmarks.csv"
    for header in ("id,x_AC,y_AC,z_AC", "ID,X_AC,Y_AC,Z_AC"):
        path.write_text(f"{header}\nbrain,1,2,3\n")
        table = read_wide_csv(path, "physical")
        assert table["brain"].names == ["AC"] and table["brain"].points_lps.tolist() == [[1, 2, 3]]
    path.write_text("brain,1,2,3\n")
    with pytest.raises(DataError, match=r"landmarks\.csv, line 1: 3 coordinates are not 2D points"):
        read_wide_csv(path, "physical")
    path.write_text("a,1,2\nb,3,Inf\n")
    with pytest.raises(
        DataError,
        match=r"landmarks\.csv, line 2: column 'y_0' holds the infinite value 'Inf' "
        r"for landmark '0'",
    ):
        read_wide_csv(path, "physical")
    path.write_text("a,1,2\na,3,4\n")
    with pytest.raises(DataError, match=r"line 2: image 'a' occurs more than once"):
        read_wide_csv(path, "physical")


def test_detect_format(tmp_path):
    cases = {
        "a.mrk.json": '{"markups": []}',
        "b.json": '{"markups": []}',
        "c.json": '{"shapes": []}',
        "d.fcsv": "",
        "e.txt": "1,2\n",
        "f.csv": "landmark,x,y\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert [detect_format(tmp_path / name) for name in cases] == [
        "mrk.json",
        "mrk.json",
        "labelme",
        "fcsv",
        "isbi",
        "csv",
    ]
    (tmp_path / "g.csv").write_text("image,landmark_index,landmark_name,x,y\n")
    assert detect_format(tmp_path / "g.csv", table=True) == "csv"
    (tmp_path / "h.json").write_text('{"points": []}')
    with pytest.raises(DataError, match=r"h\.json: a JSON file that is neither Slicer markups"):
        detect_format(tmp_path / "h.json")


# ----------------------------------------------------------------------------------------------------
# dataset specs and `scn-landmarks dataset init`


def test_spec_reads_labelme_files_and_rejects_a_table_format_for_them(tmp_path):
    image = write_oblique_image(tmp_path / "a.mha")
    (tmp_path / "a.json").write_text(json.dumps(labelme_document({"Nasion": (10.5, 20.5)}, (40, 30))))
    spec_path = tmp_path / "dataset.toml"
    spec_path.write_text(
        'dimension = 2\nlandmarks = ["Sella", "Nasion"]\n\n'
        '[[images]]\nid = "a"\nimage = "a.mha"\nlandmarks = "a.json"\n'
    )
    spec = load_dataset_spec(spec_path)
    landmarks = spec.load_landmarks(list(spec.entries))["a"]
    np.testing.assert_allclose(landmarks.points_lps[1], physical(image, (10.0, 20.0)), rtol=0, atol=1e-12)
    assert not landmarks.present[0]

    spec_path.write_text(
        'dimension = 2\nlandmarks = ["Nasion"]\nlandmarks_format = "wide-csv"\n\n'
        '[[images]]\nid = "a"\nimage = "a.mha"\nlandmarks = "a.json"\n'
    )
    with pytest.raises(DataError, match=r"dataset\.toml: landmarks_format 'wide-csv' is a table format"):
        load_dataset_spec(spec_path)


def test_dataset_init_end_to_end_on_labelme_folder(tmp_path):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir(), annotations.mkdir()
    truth = {
        "p.v1": {"Sella": (3.5, 4.5), "Nasion": (30.5, 10.5)},  # a dotted stem keeps its dots
        "p.v2": {"Nasion": (20.0, 12.0)},
    }
    written = {stem: write_oblique_image(images / f"{stem}.mha") for stem in [*truth, "lonely"]}
    for stem, points in truth.items():
        (annotations / f"{stem}.json").write_text(json.dumps(labelme_document(points, (40, 30))))
    (annotations / "orphan.json").write_text(json.dumps(labelme_document({"Sella": (1, 1)}, (40, 30))))
    out = tmp_path / "specs" / "dataset.toml"

    result = cli("dataset", "init", "--images", str(images), "--landmarks", str(annotations), "--out", str(out))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "images found: 3" in lines
    assert "paired: 2 (landmark format labelme)" in lines
    assert "unpaired images: 1: lonely.mha" in lines
    assert "unpaired landmark files: 1: orphan.json" in lines
    assert "landmark names (2): Sella, Nasion" in lines
    assert "landmark points: 3 present, 1 missing" in lines

    spec = load_dataset_spec(out)
    assert [e.id for e in spec.entries] == ["p.v1", "p.v2"]
    assert spec.landmark_names == ("Sella", "Nasion")
    loaded = spec.load_landmarks(list(spec.entries))
    for stem, points in truth.items():
        for name, (x, y) in points.items():
            position = loaded[stem].points_lps[spec.landmark_names.index(name)]
            np.testing.assert_allclose(position, physical(written[stem], (x - 0.5, y - 0.5)), rtol=0, atol=1e-12)
    assert not loaded["p.v2"].present[0]

    before = out.read_text()
    refused = cli("dataset", "init", "--images", str(images), "--landmarks", str(annotations), "--out", str(out))
    assert refused.returncode == 2
    assert f"would replace existing file(s) {out}; nothing was written (give --overwrite" in refused.stderr
    assert out.read_text() == before

    names = tmp_path / "names.txt"
    names.write_text("Nasion\nSella\nMenton\n")
    replaced = cli(
        "dataset",
        "init",
        "--images",
        str(images),
        "--landmarks",
        str(annotations),
        "--out",
        str(out),
        "--names",
        str(names),
        "--overwrite",
    )
    assert replaced.returncode == 0, replaced.stderr
    assert load_dataset_spec(out).landmark_names == ("Nasion", "Sella", "Menton")
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset.toml"]  # no temporary left behind


def test_dataset_init_on_a_wide_table_with_names(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    first = write_oblique_image(images / "0001.mha")
    write_oblique_image(images / "0002.mha")
    write_oblique_image(images / "scan.v2.mha")
    table = tmp_path / "landmarks.csv"
    table.write_text("0001,12,7,3,25\n0003,1,1,2,2\nscan.v2,1,1,2,2\n")
    names = tmp_path / "names.txt"
    names.write_text("thumb\nindex finger\n")
    out = tmp_path / "dataset.toml"

    result = cli(
        "dataset", "init", "--images", str(images), "--landmarks", str(table), "--names", str(names), "--out", str(out)
    )

    assert result.returncode == 0, result.stderr
    assert "paired: 2 (landmark format wide-csv, index coordinates)" in result.stdout
    assert "unpaired images: 1: 0002.mha" in result.stdout
    assert "unpaired table rows: 1: 0003" in result.stdout
    spec = load_dataset_spec(out)
    assert [e.id for e in spec.entries] == ["0001", "scan.v2"]
    assert spec.landmarks_csv == table and spec.csv_coordinates == "index"
    landmarks = spec.load_landmarks(list(spec.entries))["0001"]
    np.testing.assert_allclose(
        landmarks.points_lps, [physical(first, (12.0, 7.0)), physical(first, (3.0, 25.0))], rtol=0, atol=1e-12
    )


def test_dataset_init_refuses_broken_files_and_writes_nothing(tmp_path):
    write_oblique_image(tmp_path / "a.mha")
    (tmp_path / "a.txt").write_text("1,2\n3,inf\n")
    out = tmp_path / "dataset.toml"
    result = cli("dataset", "init", "--images", str(tmp_path), "--landmarks", str(tmp_path), "--out", str(out))
    assert result.returncode == 2
    assert "a.txt, line 2: column 'y' holds the infinite value 'inf' for landmark '1'" in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mha", "a.txt"]


def test_dataset_init_refuses_two_landmark_files_for_one_image(tmp_path):
    write_oblique_image(tmp_path / "a.mha")
    (tmp_path / "a.txt").write_text("1,2\n")
    (tmp_path / "a.fcsv").write_text(FCSV_HEADER)
    result = cli(
        "dataset",
        "init",
        "--images",
        str(tmp_path),
        "--landmarks",
        str(tmp_path),
        "--out",
        str(tmp_path / "dataset.toml"),
    )
    assert result.returncode == 2
    assert "landmark files a.fcsv and a.txt have the same stem 'a'" in result.stderr
    assert not (tmp_path / "dataset.toml").exists()

"""`scn-landmarks dataset check` on a synthetic set with known annotation mistakes injected."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import cli

from SCNLandmarksLib.data.check import FindingKind, check_dataset
from SCNLandmarksLib.data.synthetic import make_dataset
from SCNLandmarksLib.io.landmarks import read_landmarks, write_landmarks
from SCNLandmarksLib.landmark_set import LandmarkSet


def test_a_clean_set_has_no_findings(tmp_path):
    spec = make_dataset(tmp_path, dimension=2, images=8, landmarks=6, size=(48, 40), spacing=(1.0, 1.2))
    assert check_dataset(spec) == []


def test_injected_mistakes_are_each_found_and_nothing_else(tmp_path):
    spec = make_dataset(tmp_path, dimension=2, images=10, landmarks=6, size=(48, 40), spacing=(1.0, 1.2))
    images = tmp_path / "images"
    # The same radiograph twice, under another id.
    shutil.copy(images / "case003.mha", images / "again.mha")
    shutil.copy(images / "case003.mrk.json", images / "again.mrk.json")
    spec.write_text(
        spec.read_text() + '[[images]]\nid = "again"\nimage = "images/again.mha"\nlandmarks = "images/again.mrk.json"\n'
    )
    # A point 100 voxels beyond the image's edge.
    outside = read_landmarks(images / "case005.mrk.json", dimension=2)
    outside.points_lps[2] += 100.0
    write_landmarks(outside, images / "case005.mrk.json")
    # Two labels exchanged.
    swapped = read_landmarks(images / "case007.mrk.json", dimension=2)
    points = swapped.points_lps.copy()
    points[[1, 4]] = points[[4, 1]]
    write_landmarks(LandmarkSet(swapped.names, points), images / "case007.mrk.json")

    found = {(f.image, f.landmark, f.kind) for f in check_dataset(spec)}
    assert found == {
        ("again", None, FindingKind.DUPLICATE_IMAGE),
        ("case005", "L3", FindingKind.OUTSIDE_IMAGE),
        ("case007", "L2", FindingKind.SWAPPED),
    }

    run = cli("dataset", "check", str(spec), "--json", timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    listed = json.loads(run.stdout)
    assert {(f["image"], f["landmark"], f["kind"]) for f in listed} == {
        ("again", None, "duplicate image"),
        ("case005", "L3", "outside image"),
        ("case007", "L2", "swapped labels"),
    }
    swap = next(f for f in listed if f["kind"] == "swapped labels")
    assert "'L2' and 'L5'" in swap["message"]


def test_a_misplaced_point_and_a_foreign_spacing_are_found(tmp_path):
    spec = make_dataset(tmp_path, dimension=2, images=8, landmarks=6, size=(48, 40), spacing=(1.0, 1.2))
    images = tmp_path / "images"
    moved = read_landmarks(images / "case002.mrk.json", dimension=2)
    moved.points_lps[0] += np.array([6.0, -5.0])  # inside the image, far from its landmark's place
    write_landmarks(moved, images / "case002.mrk.json")
    import SimpleITK as sitk

    coarse = sitk.ReadImage(str(images / "case004.mha"))
    coarse.SetSpacing((3.0, 3.6))
    sitk.WriteImage(coarse, str(images / "case004.mha"))
    findings = check_dataset(spec)
    kinds = {(f.image, f.landmark, f.kind) for f in findings}
    assert ("case002", "L1", FindingKind.MISPLACED) in kinds
    assert ("case004", None, FindingKind.SPACING) in kinds
    misplaced = next(f for f in findings if f.kind == FindingKind.MISPLACED)
    assert "7.8 mm from where" in misplaced.message

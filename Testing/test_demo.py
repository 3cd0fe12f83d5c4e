"""The README's main job, `scn-landmarks demo`, run as a user runs it: a separate process started
from another folder.

With the tiny models trained in the session (Testing/conftest.py) on synthetic images (3D NIfTI, 2D
PNG), its landmark files must read back (library reader) to what its summary says, and its pictures
must be real overlays. With the bundled brain model (once it ships), the default run must find all
32 AFIDs on the bundled MNI template with a plausible AC-PC distance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

from SCNLandmarksLib.bundle import read_description  # noqa: E402
from SCNLandmarksLib.io.landmarks import read_landmarks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "Resources" / "Models" / "brain-afids-32" / "model.safetensors"
BUNDLED_SAMPLE = REPO / "Resources" / "Samples" / "MNI152NLin2009cAsym_T1w_2mm.nii.gz"
STATUSES = {"detected", "low confidence", "missing"}


def run_demo(*arguments, cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "SCNLandmarksLib.cli", "demo", *map(str, arguments)],
        cwd=cwd,
        env=environment,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _dataset_image(spec: Path, index: int = -1) -> Path:
    return spec.parent / re.findall(r'image = "([^"]+)"', spec.read_text())[index]


def _nan_for_none(rows, key) -> np.ndarray:
    return np.array([row[key] if row[key] is not None else [np.nan] * 3 for row in rows], dtype=float)


def check_outputs(completed, out: Path, stem: str, model: Path, dimension: int) -> dict:
    """Everything the demo promises, for any model and image; returns the summary."""
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[100%] done" in completed.stderr  # progress on stderr
    assert f"Wrote to {out.resolve()}" in completed.stdout

    summary = json.loads((out / "summary.json").read_text())
    names = list(read_description(model).landmark_names)
    rows = summary["landmarks"]
    assert [row["name"] for row in rows] == names
    assert summary["model"]["path"] == str(model.resolve()) and summary["model"]["dimension"] == dimension
    assert summary["image"]["dimension"] == dimension
    assert summary["device"] == "cpu"
    assert summary["totalSeconds"] >= summary["detectionSeconds"] > 0
    for row in rows:
        assert row["status"] in STATUSES
        assert (row["ras"] is None) == (row["lps"] is None) == (row["status"] == "missing")
        assert row["confidence"] is None or 0.0 <= row["confidence"] <= 1.0
        if row["ras"] is not None:
            np.testing.assert_allclose(row["lps"], [-row["ras"][0], -row["ras"][1], row["ras"][2]])

    # The landmark files read back (library reader, LPS) to the summary's positions and confidences.
    lps = _nan_for_none(rows, "lps")
    confidences = np.array([np.nan if row["confidence"] is None else row["confidence"] for row in rows])
    for suffix in ("mrk.json", "fcsv", "csv"):
        path = out / f"{stem}.{suffix}"
        assert path.name in summary["files"]["landmarks"]
        # As `detect` writes them: a 2D image's points are 2D.
        landmarks = read_landmarks(path, names=names, dimension=dimension)
        assert list(landmarks.names) == names
        np.testing.assert_allclose(landmarks.points_lps, lps[:, :dimension], atol=1e-3, equal_nan=True)
        if suffix != "fcsv":
            np.testing.assert_allclose(landmarks.confidences, confidences, atol=1e-3, equal_nan=True)
    if dimension == 2:
        assert np.allclose(lps[~np.isnan(lps[:, 2]), 2], 0.0)  # in the image plane

    markdown = (out / "summary.md").read_text()
    assert summary["model"]["name"] in markdown and "| # | landmark | RAS (mm) | LPS (mm) |" in markdown
    for row in rows:
        assert f"| {row['name']} |" in markdown

    # Review first: a calibrated model's found points carry expected errors; the flagged ones come
    # largest expected error first.
    calibrated = read_description(model).calibration is not None
    assert summary["model"]["calibrated"] == calibrated
    found = [row for row in rows if row["status"] != "missing"]
    if calibrated:
        assert all(row["expectedError"] > 0 and row["flagged"] is not None for row in found)
        flagged = sorted((row for row in found if row["flagged"]), key=lambda row: -row["expectedError"])
        assert summary["reviewFirst"] == [row["name"] for row in flagged]
        assert "**Review first**" in markdown or "no point is expected to be worse" in markdown
    else:
        assert all(row["expectedError"] is None and row["flagged"] is None for row in rows)
        assert summary["reviewFirst"] == [] and "the model is not calibrated" in markdown

    # Pictures: real images of a useful size, gray anatomy with the heatmap in heat colors and points.
    views = ["axial", "coronal", "sagittal"] if dimension == 3 else ["overlay"]
    pictures = [out / f"{stem}_{view}.png" for view in views]
    assert summary["files"]["pictures"] == [p.name for p in pictures]
    assert summary["outputFolder"] == str(out.resolve())
    found = {row["name"] for row in rows if row["status"] != "missing"}
    for picture in pictures:  # 3D: each slice passes through a landmark, drawn there with its name
        through = summary["pictureSlices"][picture.name]["throughLandmark"]
        assert (through in found) if dimension == 3 and found else through is None
    heat = green = 0
    for picture in pictures:
        assert f"]({picture.name})" in markdown
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(picture))).astype(int)
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 200, rgb.shape
        assert rgb.std() > 10, f"{picture.name} is nearly uniform"
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        gray = (np.abs(r - g) < 8) & (np.abs(g - b) < 8)
        assert gray.mean() > 0.3, f"{picture.name}: the heatmap hides the image"
        heat += int(((r - b > 60) & (r > 120)).sum())
        green += int(((g - r > 60) & (g - b > 60)).sum())
    assert heat > 1000, "no heatmap in heat colors"
    assert green > 20, "no detected point drawn"
    return summary


def test_demo_3d_with_a_tiny_model(tmp_path, tiny_model_3d, dataset_3d):
    image = tmp_path / "input" / "scan.nii.gz"  # a synthetic oblique, anisotropic volume, as NIfTI
    image.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(_dataset_image(dataset_3d))), str(image))
    out = tmp_path / "out 3d"
    completed = run_demo("--out", out, "--model", tiny_model_3d, "--image", image, "--device", "cpu", cwd=tmp_path)
    summary = check_outputs(completed, out, "scan", tiny_model_3d, 3)
    assert summary["image"]["size"] == list(sitk.ReadImage(str(image)).GetSize())
    assert summary["model"]["name"] == tiny_model_3d.name  # not a catalogue model


def test_demo_2d_png_with_a_tiny_model(tmp_path, tiny_model_2d, dataset_2d):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(_dataset_image(dataset_2d))))
    scaled = (array - array.min()) / max(float(np.ptp(array)), 1e-6) * 65535.0
    image = tmp_path / "xray.png"
    sitk.WriteImage(sitk.GetImageFromArray(scaled.astype(np.uint16)), str(image))
    out = tmp_path / "out2d"
    completed = run_demo("--out", out, "--model", tiny_model_2d, "--image", image, "--device", "cpu", cwd=tmp_path)
    check_outputs(completed, out, "xray", tiny_model_2d, 2)


def test_demo_refuses_bad_input_with_one_clear_line(tmp_path, tiny_model_2d, capsys):
    completed = run_demo("--out", tmp_path / "out", "--image", tmp_path / "nothing.nii.gz", cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing.nii.gz'}: image file not found"]
    completed = run_demo("--model", tmp_path / "nothing.safetensors", cwd=tmp_path)
    assert completed.returncode == 2 and "model file not found" in completed.stderr

    # A 2D model on a 3D volume: the logic's own message (in-process, to keep the suite quick).
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7, 8), np.float32)), str(volume))
    from SCNLandmarksLib.cli import main

    capsys.readouterr()
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_2d),
            "--image",
            str(volume),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model detects landmarks in 2D images" in lines[0] and "3D volume" in lines[0]


@pytest.mark.skipif(not BUNDLED_MODEL.is_file(), reason="the bundled brain-afids-32 model is not in this checkout")
def test_default_demo_finds_the_32_afids_on_the_bundled_template(tmp_path):
    completed = run_demo("--out", "demo-output", "--device", "cpu", cwd=tmp_path)  # the README's command
    out = tmp_path / "demo-output"
    summary = check_outputs(completed, out, "MNI152NLin2009cAsym_T1w_2mm", BUNDLED_MODEL, 3)
    assert summary["image"]["path"] == str(BUNDLED_SAMPLE.resolve())
    rows = {row["name"]: row for row in summary["landmarks"]}
    assert len(rows) == 32 and "AC" in rows and "PC" in rows
    missing = [name for name, row in rows.items() if row["status"] == "missing"]
    assert missing == [], f"AFIDs not found on the template: {missing}"
    assert all(row["confidence"] is not None and row["confidence"] > 0 for row in rows.values())
    distance = float(np.linalg.norm(np.subtract(rows["AC"]["lps"], rows["PC"]["lps"])))
    assert 20.0 <= distance <= 35.0, f"AC-PC distance {distance:.1f} mm"
    assert summary["acPcDistanceMm"] == pytest.approx(distance, abs=1e-2)
    assert f"AC-PC distance: {distance:.1f} mm" in completed.stdout

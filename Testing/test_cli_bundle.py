"""Model files load safely (never unpickled) and the CLI trains, detects and reports end to end."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli, mirror_case, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from SCNLandmarksLib.bundle import METADATA_KEY, load_model, read_description, save_model
from SCNLandmarksLib.config import save_config
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import DataError, ModelFileError
from SCNLandmarksLib.inference import Predictor
from SCNLandmarksLib.io.images import read_image, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks
from SCNLandmarksLib.io.paths import image_stem, output_stems

REPO = Path(__file__).resolve().parents[1]


def test_model_file_is_self_describing(tiny_model_2d):
    description = read_description(tiny_model_2d)
    assert description.dimension == 2 and description.landmark_names == ("L1", "L2", "L3", "L4")
    assert description.unit == "mm" and not description.in_pixels and len(description.coarse.sigmas) == 4
    assert description.coarse.grid_size == (32, 32) and description.refinement is None
    assert description.provenance["iterations"] > 0 and description.validation["mean_error"] < 0.5
    with safe_open(str(tiny_model_2d), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
    assert header["format"] == "scn-landmarks-model" and header["format_version"] == 2


def _version_1_header(description) -> dict:
    """The metadata as version 1 wrote it (the shipped models' format): the coarse stage's fields at
    the top level, the refinement's patch size as "patch_size"."""
    header = {
        "format": "scn-landmarks-model",
        "format_version": 1,
        "architecture": description.coarse.architecture,
        "dimension": description.dimension,
        "in_channels": 1,
        "landmark_names": list(description.landmark_names),
        "params": description.coarse.params,
        "grid_spacing": list(description.coarse.grid_spacing),
        "training_grid_size": list(description.coarse.grid_size),
        "unit": description.unit,
        "intensity": {"normalization": "percentile", "low": 1.0, "high": 99.0},
        "sigmas": list(description.coarse.sigmas),
        "gamma": description.coarse.gamma,
        "inference": {"missing_below": 0.1, "low_confidence_below": 0.5, "max_grid_voxels": 48000000},
        "provenance": {"iterations": 7},
        "validation": {},
    }
    if description.refinement is not None:
        r = description.refinement
        header["refinement"] = {
            "architecture": r.architecture,
            "params": r.params,
            "patch_size": list(r.grid_size),
            "grid_spacing": list(r.grid_spacing),
            "sigmas": list(r.sigmas),
            "gamma": r.gamma,
        }
    return header


def test_a_model_file_of_format_version_1_loads_and_detects_the_same(tiny_model_2d, dataset_2d, tmp_path):
    with safe_open(str(tiny_model_2d), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    current = read_description(tiny_model_2d)
    old = tmp_path / "version1.safetensors"
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(_version_1_header(current))})
    description = read_description(old)
    assert description.coarse == current.coarse and description.landmark_names == current.landmark_names
    assert description.inference == current.inference and description.provenance == {"iterations": 7}
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    image = read_image(entry.image, 2)
    current_predictor = Predictor.from_file(tiny_model_2d, "cpu")
    current_predictor.mean_configuration = None  # version 1 files have none: detection in the image's pose
    before = current_predictor.predict(image)
    after = Predictor.from_file(old, "cpu").predict(image)
    np.testing.assert_array_equal(after.landmarks.points_lps, before.landmarks.points_lps)
    assert after.status == before.status

    broken = _version_1_header(current)
    del broken["training_grid_size"]
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(broken)})
    with pytest.raises(ModelFileError, match=r"lacks \['training_grid_size'\]") as failure:
        read_description(old)
    assert str(old) in str(failure.value)


def test_untrusted_truncated_and_foreign_files_are_refused(tiny_model_2d, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": Payload()}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(tiny_model_2d).read_bytes()[:5000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    for path, problem in (
        (pickled, "not a readable model file"),
        (truncated, "not a readable model file"),
        (foreign, "not an SCNLandmarks model"),
        (tmp_path / "absent.safetensors", "not found"),
    ):
        with pytest.raises(ModelFileError, match=problem) as failure:
            Predictor.from_file(path, "cpu")
        assert str(path) in str(failure.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "setting, problem",
    [
        ({"mirror_axis": 2}, "inference.mirror_axis 2 is not an axis of 2D images"),
        ({"refinement_views": 0}, "inference.refinement_views 0 is not a whole number >= 1"),
        ({"max_grid_voxels": 0}, "inference.max_grid_voxels 0 is not >= 1"),
    ],
)
def test_a_model_file_with_impossible_decoding_settings_is_refused(tiny_model_2d, tmp_path, setting, problem):
    loaded = load_model(tiny_model_2d)
    inference = dataclasses.replace(loaded.description.inference, **setting)
    path = save_model(
        tmp_path / "decoding.safetensors", dataclasses.replace(loaded.description, inference=inference), loaded.coarse
    )
    with pytest.raises(ModelFileError, match=problem) as failure:
        Predictor.from_file(path, "cpu")
    assert str(path) in str(failure.value)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"landmark_names": "abc"}, "landmark_names 'abc' is not a list of landmark names"),
        ({"coarse": {"grid_spacing": [0.0, 0.0]}}, r"coarse.grid_spacing \[0.0, 0.0\] is not > 0"),
    ],
)
def test_a_model_file_with_impossible_metadata_is_refused_naming_it(tiny_model_2d, tmp_path, change, problem):
    with safe_open(str(tiny_model_2d), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in change.items():
        metadata[key] = {**metadata[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(ModelFileError, match=problem) as failure:
        Predictor.from_file(path, "cpu")
    assert str(path) in str(failure.value)


def test_cli_train_detect_info_end_to_end(dataset_2d, tmp_path):
    config = tiny_config(dataset_2d, tmp_path / "run", 2, iterations=120, validate_every=60)
    config_path = tmp_path / "train.toml"
    save_config(config, config_path)
    trained = cli("train", str(config_path), "--device", "cpu")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "120/120" in trained.stderr and "validation mean" in trained.stderr
    model = Path(json.loads(trained.stdout)["model"])

    spec = load_dataset_spec(dataset_2d)
    entries = spec.split("validation")
    out = tmp_path / "detected"
    for form, suffix in (("mrk.json", ".mrk.json"), ("fcsv", ".fcsv"), ("csv", ".csv")):
        # Each format run rewrites the heatmaps of the run before it, which it may only do when told to.
        detected = cli(
            "detect",
            str(model),
            *[str(e.image) for e in entries],
            "--out",
            str(out),
            "--format",
            form,
            "--heatmaps",
            "--device",
            "cpu",
            *(["--overwrite"] if form != "mrk.json" else []),
        )
        assert detected.returncode == 0, detected.stderr[-2000:]
        assert f"[2/2] {entries[1].image}" in detected.stderr
        truth = spec.load_landmarks(entries)
        for entry in entries:
            found = read_landmarks(out / f"{entry.id}{suffix}", names=spec.landmark_names, dimension=2)
            assert np.linalg.norm(found.points_lps - truth[entry.id].points_lps, axis=1).mean() < 1.0
    assert (out / f"{entries[0].id}_heatmap_final.nrrd").is_file()

    # Batch mode on a folder: a broken file is reported by name, the good images are still written.
    folder = tmp_path / "folder"
    folder.mkdir()
    for entry in entries:
        shutil.copy(entry.image, folder / entry.image.name)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    batch = cli("detect", str(model), str(folder), "--out", str(tmp_path / "batch"), "--device", "cpu")
    assert batch.returncode == 2
    assert f"error: {folder / 'broken.png'}: cannot read image" in batch.stderr
    assert f"{len(entries)} of {len(entries) + 1} images" in batch.stderr
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == sorted(
        [f"{e.id}.mrk.json" for e in entries] + ["summary.csv"]
    )

    evaluated = cli(
        "evaluate",
        str(model),
        "--dataset",
        str(dataset_2d),
        "--split",
        "validation",
        "--out",
        str(tmp_path / "evaluation"),
        "--device",
        "cpu",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    summary = json.loads(evaluated.stdout)
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["overall"]["count"] == 8 and metrics["overall"]["mean"] < 1.0
    report = Path(summary["report"]).read_text(encoding="utf-8")
    assert "Per-landmark" in report and (tmp_path / "evaluation" / "overlays").is_dir()

    info = cli("info", str(model))
    assert info.returncode == 0 and json.loads(info.stdout)["landmark_names"] == ["L1", "L2", "L3", "L4"]


def test_cli_detect_says_when_it_found_the_landmarks_on_the_mirror_image(mirror_model_2d, dataset_2d, tmp_path):
    spec = load_dataset_spec(dataset_2d)
    entry = spec.split("validation")[0]
    image, truth = mirror_case(read_image(entry.image, 2), spec.load_landmarks([entry])[entry.id].points_lps)
    path = tmp_path / "left_facing.mha"
    write_image(image, path)
    detected = cli("detect", str(mirror_model_2d), str(path), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert detected.returncode == 0, detected.stderr[-2000:]
    assert "4/4 landmarks (found on the mirror image)" in detected.stderr
    found = read_landmarks(tmp_path / "out" / "left_facing.mrk.json", names=spec.landmark_names, dimension=2)
    assert np.linalg.norm(found.points_lps - truth, axis=1).max() < 1.0


def test_cli_detect_labels_positions_in_each_image_s_unit(tiny_model_2d, dataset_2d, tmp_path):
    # A model in pixels finds pixel positions on a picture without spacing, mm on a volume: the files
    # say so. (A model in mm refuses such a picture without --spacing: test_stated_spacing.py.)
    loaded = load_model(tiny_model_2d)
    pixel_model = save_model(
        tmp_path / "pixels.safetensors", dataclasses.replace(loaded.description, unit="px"), loaded.coarse
    )
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    picture = tmp_path / "picture.png"
    write_image(sitk.Cast(sitk.RescaleIntensity(read_image(entry.image, 2), 0, 255), sitk.sitkUInt8), picture)
    detected = cli("detect", str(pixel_model), str(picture), str(entry.image), "--out", str(tmp_path / "out"))
    assert detected.returncode == 0, detected.stderr[-2000:]
    units = {
        name: json.loads((tmp_path / "out" / name).read_text())["markups"][0]["coordinateUnits"]
        for name in ("picture.mrk.json", f"{entry.image.name.split('.')[0]}.mrk.json")
    }
    assert units == {"picture.mrk.json": "px", f"{entry.image.name.split('.')[0]}.mrk.json": "mm"}
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]
    assert header == "image,flagged_points,largest_expected_error_mm/px,error"


def test_cli_detect_on_a_slice_outside_the_axial_plane_writes_points_and_heatmaps_in_space(
    tiny_model_2d, dataset_2d, tmp_path
):
    from test_io import sagittal_slice

    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    pixels = sitk.GetArrayFromImage(read_image(entry.image, 2))
    plane = sitk.GetImageFromArray(pixels)  # the same pixels where the plane frame puts them
    plane.SetSpacing(read_image(entry.image, 2).GetSpacing())
    write_image(plane, tmp_path / "plane.mha")
    volume = sagittal_slice(pixels)
    volume.SetSpacing((*plane.GetSpacing(), 2.0))
    write_image(volume, tmp_path / "lateral.nrrd")
    detected = cli(
        "detect", str(tiny_model_2d), str(tmp_path / "plane.mha"), str(tmp_path / "lateral.nrrd"),
        "--out", str(tmp_path / "out"), "--heatmaps", "--device", "cpu",
    )  # fmt: skip
    assert detected.returncode == 0, detected.stderr[-2000:]
    names = list(load_dataset_spec(dataset_2d).landmark_names)
    in_plane = read_landmarks(tmp_path / "out" / "plane.mrk.json", names=names, dimension=2).points_lps
    in_space = read_landmarks(tmp_path / "out" / "lateral.mrk.json", names=names).points_lps
    assert in_space.shape == (len(names), 3) and np.isfinite(in_plane).all()
    index = [volume.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in in_space]
    np.testing.assert_allclose(np.array(index)[:, :2], in_plane / plane.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(np.array(index)[:, 2], 0.0, atol=1e-9)
    heatmap = sitk.ReadImage(str(tmp_path / "out" / "lateral_heatmap_final.nrrd"))
    assert heatmap.GetSize() == volume.GetSize() and np.allclose(heatmap.GetDirection(), volume.GetDirection())
    assert np.allclose(heatmap.GetOrigin(), volume.GetOrigin())


def test_cli_detect_goes_on_after_an_image_smaller_than_a_grid_cell(tiny_model_2d, dataset_2d, tmp_path):
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    tiny = sitk.Image([1, 3], sitk.sitkFloat32)
    tiny.SetSpacing((0.1, 0.1))
    write_image(tiny, tmp_path / "tiny.nrrd")
    detected = cli(
        "detect", str(tiny_model_2d), str(tmp_path / "tiny.nrrd"), str(entry.image), "--out", str(tmp_path / "out")
    )
    assert "Traceback" not in detected.stderr, detected.stderr[-2000:]
    assert (tmp_path / "out" / f"{image_stem(entry.image)}.mrk.json").is_file()
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    image = tmp_path / "image.png"
    write_image(sitk.Image([8, 8], sitk.sitkUInt8), image)
    missing = cli("detect", str(tmp_path / "nope.safetensors"), str(image), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: model file not found"
    no_image = cli("detect", str(tmp_path / "nope.safetensors"), str(tmp_path / "none.png"), "--out", str(tmp_path))
    assert no_image.returncode == 2
    assert no_image.stderr.strip() == f"error: {tmp_path / 'none.png'}: file not found"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_training_leaves_a_resumable_checkpoint(dataset_2d, tmp_path):
    import signal
    import time

    from SCNLandmarksLib.train import CHECKPOINT

    config = tiny_config(dataset_2d, tmp_path / "run", 2, iterations=100000, checkpoint_every=100000)
    config_path = tmp_path / "train.toml"
    save_config(config, config_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "SCNLandmarksLib.cli", "train", str(config_path), "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while not (config.output_dir / "config.toml").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "cancelled: training cancelled at iteration" in stderr
    assert torch.load(config.output_dir / CHECKPOINT, weights_only=True)["iteration"] >= 1


def test_each_input_gets_its_own_output_name():
    assert image_stem("scan.v1.png") == "scan.v1" and image_stem("a/brain.nii.gz") == "brain"
    assert image_stem("case.mrk.json") == "case" and image_stem("x.seg.nrrd") == "x"
    assert output_stems(["d/scan.v1.png", "d/scan.v2.png"]) == ["scan.v1", "scan.v2"]
    assert output_stems(["d/scan.png", "d/Scan.nii.gz", "d/other.png"]) == ["scan.png", "Scan.nii.gz", "other"]
    assert output_stems(["a/x/scan.png", "b/x/scan.png"]) == ["a_x_scan.png", "b_x_scan.png"]
    with pytest.raises(DataError, match="given more than once"):
        output_stems(["d/scan.png", "d/./scan.png"])


def test_detect_keeps_dotted_names_apart_and_never_replaces_a_file_unasked(tiny_model_2d, dataset_2d, tmp_path):
    entry = load_dataset_spec(dataset_2d).split("validation")[0]
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("scan.v1", "scan.v2"):
        shutil.copy(entry.image, folder / f"scan{name[4:]}{entry.image.suffix}")
    out = tmp_path / "out"
    first = cli("detect", str(tiny_model_2d), str(folder), "--out", str(out), "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["scan.v1.mrk.json", "scan.v2.mrk.json", "summary.csv"]

    corrected = out / "scan.v1.mrk.json"
    corrected.write_text("the clinician's corrections")
    again = cli("detect", str(tiny_model_2d), str(folder), "--out", str(out), "--device", "cpu", "--heatmaps")
    assert again.returncode == 2
    assert str(corrected) in again.stderr and "--overwrite" in again.stderr and "nothing was written" in again.stderr
    assert corrected.read_text() == "the clinician's corrections"
    assert sorted(p.name for p in out.iterdir()) == ["scan.v1.mrk.json", "scan.v2.mrk.json", "summary.csv"]

    replaced = cli("detect", str(tiny_model_2d), str(folder), "--out", str(out), "--device", "cpu", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert read_landmarks(corrected).names == ["L1", "L2", "L3", "L4"]

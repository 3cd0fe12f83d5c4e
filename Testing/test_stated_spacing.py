"""A spacing stated for pictures without one (dataset spec `spacing`, `dataset init --spacing`,
`detect --spacing`): their positions and pixel-coordinate landmarks become millimetres, exactly."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli, tiny_config

from SCNLandmarksLib.bundle import load_model, read_description, save_model
from SCNLandmarksLib.cli import main
from SCNLandmarksLib.data.check import FindingKind, check_dataset
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.data.synthetic import make_dataset
from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.evaluation import evaluate_model
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.io.images import read_image, read_image_information, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks
from SCNLandmarksLib.train import train

# mm per pixel, x then y: anisotropic, so that an exchanged x and y shows; exact in binary.
SPACING = (0.5, 0.625)
NAMES = ["L1", "L2", "L3", "L4"]


def _spec_text(spacing: tuple[float, ...] | None, ids: list[str], extra: str = "") -> str:
    lines = [
        "dimension = 2",
        "landmarks = " + json.dumps(NAMES),
        'landmarks_csv = "landmarks.csv"',
        'csv_coordinates = "index"',
        *([f"spacing = {list(spacing)}"] if spacing else []),
        "",
    ]
    for number, image_id in enumerate(ids):
        split = "validation" if number >= len(ids) - 2 else "train"
        lines += ["[[images]]", f'id = "{image_id}"', f'image = "pictures/{image_id}.png"', f'split = "{split}"', ""]
    return "\n".join(lines) + extra


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(folder, {id: (N, 2) pixel positions}): the synthetic set as 8-bit PNGs (no spacing, origin 0,
    identity direction) with its landmarks in one pixel-index table, and a spec stating SPACING."""
    folder = tmp_path_factory.mktemp("pictures")
    source = load_dataset_spec(
        make_dataset(folder / "source", 2, images=6, landmarks=4, size=(64, 48), spacing=SPACING)
    )
    (folder / "pictures").mkdir()
    pixels, rows = {}, []
    for entry in source.entries:
        image = read_image(entry.image, 2)
        write_image(
            sitk.Cast(sitk.RescaleIntensity(image, 0, 255), sitk.sitkUInt8), folder / "pictures" / f"{entry.id}.png"
        )
        index = ImageGeometry.of(image).physical_to_index(source.load_landmarks([entry])[entry.id].points_lps)
        pixels[entry.id] = np.round(index, 3)
        rows.append(",".join([entry.id, *(repr(float(v)) for v in pixels[entry.id].ravel())]))
    (folder / "landmarks.csv").write_text("\n".join(rows) + "\n")
    (folder / "dataset.toml").write_text(_spec_text(SPACING, list(pixels)))
    return folder, pixels


@pytest.fixture(scope="module")
def trained(pictures, tmp_path_factory) -> tuple[Path, Path]:
    """(model file, the same model reporting every landmark): a tiny SCN trained for a few iterations
    on the pictures in mm, enough to be a model in mm; its weak peaks would be reported missing."""
    folder, _ = pictures
    run = tmp_path_factory.mktemp("run")
    model = train(
        tiny_config(folder / "dataset.toml", run, 2, iterations=20, validate_every=20), device="cpu"
    ).model_path
    loaded = load_model(model)
    inference = dataclasses.replace(loaded.description.inference, missing_below=0.0)
    return model, save_model(
        run / "reported.safetensors", dataclasses.replace(loaded.description, inference=inference), loaded.coarse
    )


@pytest.fixture(scope="module")
def mm_model(trained) -> Path:
    return trained[1]


def test_a_stated_spacing_puts_pictures_and_their_pixel_landmarks_in_mm_exactly(pictures, tmp_path):
    folder, pixels = pictures
    spec = load_dataset_spec(folder / "dataset.toml")
    entry = spec.entries[0]
    assert entry.spacing == SPACING and entry.unit == "mm"
    image = entry.read(2)
    assert image.GetSpacing() == SPACING and image.GetOrigin() == (0.0, 0.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 1.0)
    assert entry.read_information() == ((64, 48), SPACING)
    loaded = spec.load_landmarks(list(spec.entries))
    for image_id, index in pixels.items():
        np.testing.assert_array_equal(loaded[image_id].points_lps, index * np.asarray(SPACING))
    assert [f for f in check_dataset(spec) if f.kind == FindingKind.SPACING] == []

    # An entry's own spacing wins over the spec's; a file with its own spacing keeps it.
    shutil.copytree(folder, tmp_path / "copy", ignore=shutil.ignore_patterns("source"))
    volume = tmp_path / "copy" / "pictures" / "volume.mha"
    stored = read_image(folder / "source" / "images" / "case000.mha", 2)
    write_image(stored, volume)
    own = '[[images]]\nid = "volume"\nimage = "pictures/volume.mha"\nlandmarks = "volume.mrk.json"\n'
    shutil.copy(folder / "source" / "images" / "case000.mrk.json", tmp_path / "copy" / "volume.mrk.json")
    text = _spec_text(SPACING, list(pixels), own).replace(
        f'id = "{entry.id}"\n', f'id = "{entry.id}"\nspacing = [0.25, 0.75]\n'
    )
    (tmp_path / "copy" / "dataset.toml").write_text(text)
    mixed = load_dataset_spec(tmp_path / "copy" / "dataset.toml")
    by_id = {e.id: e for e in mixed.entries}
    assert by_id[entry.id].read(2).GetSpacing() == (0.25, 0.75)
    np.testing.assert_array_equal(
        mixed.load_landmarks([by_id[entry.id]])[entry.id].points_lps, pixels[entry.id] * np.array([0.25, 0.75])
    )
    assert by_id["volume"].spacing is None and by_id["volume"].read(2).GetSpacing() == stored.GetSpacing()


def test_a_spacing_for_a_file_that_carries_one_is_refused_naming_spec_and_image(pictures, tmp_path):
    folder, pixels = pictures
    volume = folder / "source" / "images" / "case000.mha"
    spec = tmp_path / "dataset.toml"
    spec.write_text(
        f'dimension = 2\nlandmarks = ["L1"]\n[[images]]\nid = "ct"\nimage = "{volume}"\nspacing = [0.1, 0.1]\n'
    )
    with pytest.raises(DataError, match=rf"{spec}: image 'ct' \({volume}\) carries its own spacing"):
        load_dataset_spec(spec)
    with pytest.raises(DataError, match=rf"{volume}: the file carries its own spacing"):
        read_image(volume, 2, (0.1, 0.1))
    with pytest.raises(DataError, match="carries its own spacing"):
        read_image_information(volume, (0.1, 0.1))
    shutil.copytree(folder / "pictures", tmp_path / "pictures")
    shutil.copy(folder / "landmarks.csv", tmp_path / "landmarks.csv")
    for bad, message in (("[0.1]", "must be 2 or 3 positive numbers"), ("[0.1, -1]", "positive"), ("[1, 1, 1]", "2D")):
        (tmp_path / "bad.toml").write_text(_spec_text(None, list(pixels)).replace("\n\n", f"\nspacing = {bad}\n\n", 1))
        with pytest.raises(DataError, match=message):
            load_dataset_spec(tmp_path / "bad.toml")


def test_dataset_init_writes_the_spacing(pictures, tmp_path, capsys):
    folder, pixels = pictures
    out = tmp_path / "spec.toml"
    arguments = ["dataset", "init", "--images", str(folder / "pictures"), "--landmarks", str(folder / "landmarks.csv")]
    assert main([*arguments, "--csv-coordinates", "index", "--spacing", "0.5", "0.625", "--out", str(out)]) == 0
    assert "pictures in mm: 0.5 x 0.625 mm per pixel" in capsys.readouterr().out
    spec = load_dataset_spec(out)
    assert "spacing = [0.5, 0.625]" in out.read_text()
    loaded = spec.load_landmarks(list(spec.entries))
    for image_id, index in pixels.items():
        np.testing.assert_array_equal(loaded[image_id].points_lps, index * np.asarray(SPACING))


def test_training_on_pictures_with_a_spacing_is_in_mm_and_detect_spacing_finds_mm(pictures, trained, tmp_path):
    folder, _ = pictures
    assert read_description(trained[0]).unit == "mm"
    mm_model = trained[1]
    picture = folder / "pictures" / "case004.png"
    # The same pixels in a file that carries the stated spacing (origin 0, identity direction).
    same = sitk.ReadImage(str(picture))
    same.SetSpacing(SPACING)
    volume = tmp_path / "same.mha"
    sitk.WriteImage(same, str(volume))
    out = tmp_path / "out"
    detected = cli("detect", str(mm_model), str(picture), str(volume), "--spacing", "0.5", "0.625", "--out", str(out))
    assert detected.returncode == 0, detected.stderr[-2000:]
    files = {name: out / f"{name}.mrk.json" for name in ("case004", "same")}
    assert {json.loads(f.read_text())["markups"][0]["coordinateUnits"] for f in files.values()} == {"mm"}
    found = {name: read_landmarks(f, names=NAMES, dimension=2).points_lps for name, f in files.items()}
    assert np.isfinite(found["case004"]).all()
    np.testing.assert_allclose(found["case004"], found["same"], atol=1e-4)
    # In mm on the picture's own pixel grid: inside the picture, not 1/SPACING times beyond it.
    index = found["case004"] / np.asarray(SPACING)
    assert np.all(index > -0.5) and np.all(index < np.array([63.5, 47.5]))


def test_a_mm_model_refuses_pictures_in_pixels_and_a_pixel_model_refuses_spacing(pictures, mm_model, tmp_path):
    folder, pixels = pictures
    picture = folder / "pictures" / "case004.png"
    volume = folder / "source" / "images" / "case000.mha"
    detected = cli("detect", str(mm_model), str(picture), str(volume), "--out", str(tmp_path / "out"))
    assert detected.returncode == 2
    assert (
        f"error: {picture}: a picture without spacing (positions in pixels), but the model works in mm; give its "
        "spacing in mm per pixel with --spacing X Y" in detected.stderr
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case000.mrk.json", "summary.csv"]

    # Evaluation follows the spec: without its spacing, the pictures are refused before any detection.
    shutil.copytree(folder / "pictures", tmp_path / "pictures")
    shutil.copy(folder / "landmarks.csv", tmp_path / "landmarks.csv")
    (tmp_path / "dataset.toml").write_text(_spec_text(None, list(pixels)))
    with pytest.raises(
        DataError, match=rf"{tmp_path / 'dataset.toml'}: image 'case004' .* state the pictures' spacing"
    ):
        evaluate_model(mm_model, tmp_path / "dataset.toml", "validation", tmp_path / "evaluation", device="cpu")

    # A model in pixels works on the picture as before, and refuses --spacing (it would rescale it).
    loaded = load_model(mm_model)
    pixel_model = save_model(
        tmp_path / "pixels.safetensors", dataclasses.replace(loaded.description, unit="px"), loaded.coarse
    )
    plain = cli("detect", str(pixel_model), str(picture), "--out", str(tmp_path / "px"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads((tmp_path / "px" / "case004.mrk.json").read_text())["markups"][0]["coordinateUnits"] == "px"
    refused = cli("detect", str(pixel_model), str(picture), "--spacing", "0.5", "0.625", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2
    assert "works in pixels (trained on pictures without spacing): detect without --spacing" in refused.stderr


def test_a_cluster_run_reads_pictures_with_the_stated_spacing(pictures, mm_model, tmp_path):
    pytest.importorskip("distributed", reason="the cluster extra: pip install 'scn-landmarks[cluster]'")
    folder, _ = pictures
    picture = folder / "pictures" / "case004.png"
    plain = cli("detect", str(mm_model), str(picture), "--spacing", "0.5", "0.625", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    spaced = cli(
        "detect", str(mm_model), str(picture), "--spacing", "0.5", "0.625", "--out", str(tmp_path / "cluster"),
        "--cluster", "local:1",
    )  # fmt: skip
    assert spaced.returncode == 0, spaced.stderr[-2000:]
    found = {
        run: json.loads((tmp_path / run / "case004.mrk.json").read_text())["markups"][0] for run in ("plain", "cluster")
    }
    assert found["cluster"]["coordinateUnits"] == "mm"
    points = {run: np.array([p["position"] for p in markup["controlPoints"]]) for run, markup in found.items()}
    np.testing.assert_allclose(points["cluster"], points["plain"], atol=1e-4)
    unstated = cli("detect", str(mm_model), str(picture), "--out", str(tmp_path / "refused"), "--cluster", "local:1")
    assert unstated.returncode == 2 and "give its spacing in mm per pixel with --spacing" in unstated.stderr

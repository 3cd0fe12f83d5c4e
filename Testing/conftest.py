"""Shared fixtures: synthetic datasets and tiny models trained for real in the test session."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCNLandmarksLib.bundle import load_model, save_model
from SCNLandmarksLib.config import config_from_dict
from SCNLandmarksLib.data.synthetic import make_dataset
from SCNLandmarksLib.geometry import ImageGeometry, mirror_points
from SCNLandmarksLib.train import TrainingResult, train

# The quick run (`pytest -m "not slow"`) leaves out what trains models, runs the shipped models on
# their samples, starts child processes, a browser or a cluster: tests in these modules, and tests
# that use these fixtures.
SLOW_MODULES = {
    "test_cluster",
    "test_demo",
    "test_finetune",
    "test_shipped_models",
    "test_slicer_app_setup",
    "test_slicer_training",
    "test_training",
    "test_web_app",
    "test_web_sessions",
}
SLOW_FIXTURES = {"trained_2d", "trained_3d", "tiny_model_2d", "tiny_model_3d", "mirror_model_2d", "server", "browser"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def user_models_folder(tmp_path_factory) -> Path:
    """The user models folder of the whole session (and of the processes it starts): never the
    real user's."""
    folder = tmp_path_factory.mktemp("user-models")
    os.environ["SCN_LANDMARKS_USER_MODELS"] = str(folder)
    return folder


@pytest.fixture
def mrml():
    """A headless MRML scene (slicer-core), cleared afterwards; for the module's tests."""
    from SCNLandmarksMRML import createHeadlessScene

    headless = createHeadlessScene()
    yield headless
    headless.scene.Clear(1)


REPO = Path(__file__).resolve().parents[1]
TINY_SCN = {"filters": 16, "levels": 3, "dropout": 0.0, "sc_downsample": 4, "sc_kernel": 5, "sc_filters": 16}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`scn-landmarks ARGS...` in a separate process, as a user runs it (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "SCNLandmarksLib.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def oblique_direction(dimension: int, degrees: float = 25.0, mirror_axis: int = 1) -> np.ndarray:
    """A rotated direction with one axis flipped (determinant -1): the hard case for geometry code."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if dimension == 2:
        rotation = np.array([[c, -s], [s, c]])
    else:
        rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
            [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
        )
    flip = np.eye(dimension)
    flip[mirror_axis, mirror_axis] = -1.0
    return rotation @ flip


def mirror_case(image: sitk.Image, points_lps: np.ndarray) -> tuple[sitk.Image, np.ndarray]:
    """The same voxels reflected left-right in physical space (a left-facing X-ray for a right-facing
    model), and where the landmarks now are."""
    geometry = ImageGeometry.of(image)
    center = geometry.center_physical()
    return geometry.mirrored(0, center).apply_to(sitk.Image(image)), mirror_points(points_lps, 0, center)


def tiny_config(spec: Path, output_dir: Path, dimension: int, **training) -> object:
    """A small but real SCN configuration for the synthetic datasets."""
    grid = (
        {"size": [32, 32], "spacing": [2.0, 2.0]}
        if dimension == 2
        else {"size": [24, 24, 24], "spacing": [2.5, 2.5, 2.5]}
    )
    values = {
        "dataset": str(spec),
        "output_dir": str(output_dir),
        "grid": grid,
        "heatmap": {"sigma_init": 3.0 if dimension == 2 else 4.0},
        "augmentation": {"translation": 4.0, "rotation_deg": 10.0},
        "model": {"params": TINY_SCN},
        "training": {
            "iterations": 400 if dimension == 2 else 250,
            "batch_size": 4 if dimension == 2 else 2,
            "learning_rate": 1e-3,
            "validate_every": 100,
            "checkpoint_every": 100,
            **training,
        },
    }
    return config_from_dict(values, Path("/"))


@pytest.fixture(scope="session")
def dataset_2d(tmp_path_factory) -> Path:
    """2D synthetic dataset: anisotropic spacing, oblique flipped direction."""
    return make_dataset(
        tmp_path_factory.mktemp("dataset2d"),
        dimension=2,
        images=12,
        landmarks=4,
        size=(64, 48),
        spacing=(1.0, 1.3),
        direction=oblique_direction(2),
    )


@pytest.fixture(scope="session")
def dataset_3d(tmp_path_factory) -> Path:
    """3D synthetic dataset: anisotropic spacing, oblique flipped direction."""
    return make_dataset(
        tmp_path_factory.mktemp("dataset3d"),
        dimension=3,
        images=8,
        landmarks=4,
        size=(32, 30, 24),
        spacing=(1.5, 1.6, 2.0),
        direction=oblique_direction(3),
    )


def _source_key() -> str:
    """A hash of everything a fixture's training depends on: the library, this file, torch."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted([*(REPO / "SCNLandmarksLib").rglob("*.py"), Path(__file__)]):
        digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _trained(request, spec: Path, output_dir: Path, dimension: int):
    """(config, TrainingResult) of a tiny SCN trained for real, or the same run's files from pytest's
    cache when neither the library nor this file changed since (the synthetic data is seeded), so
    that rerunning one test takes seconds. A clean checkout (CI) always trains."""
    config = tiny_config(spec, output_dir, dimension)
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cached = None if cache is None else cache.mkdir(f"scn-tiny-{dimension}d-{_source_key()}")
    summary = None if cached is None else cached / "result.json"
    if summary is not None and summary.is_file():
        shutil.copytree(cached, output_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("result.json"))
        values = json.loads(summary.read_text(encoding="utf-8"))
        return config, TrainingResult(**{**values, "model_path": output_dir / values["model_path"]})
    result = train(config, device="cpu")
    if cached is not None:
        shutil.copytree(output_dir, cached, dirs_exist_ok=True)
        values = {**dataclasses.asdict(result), "model_path": result.model_path.name}
        (cached / "result.json").write_text(json.dumps(values), encoding="utf-8")
    return config, result


@pytest.fixture(scope="session")
def trained_2d(request, dataset_2d, tmp_path_factory):
    """(config, TrainingResult) of a tiny 2D SCN."""
    return _trained(request, dataset_2d, tmp_path_factory.mktemp("run2d"), 2)


@pytest.fixture(scope="session")
def trained_3d(request, dataset_3d, tmp_path_factory):
    """(config, TrainingResult) of a tiny 3D SCN."""
    return _trained(request, dataset_3d, tmp_path_factory.mktemp("run3d"), 3)


@pytest.fixture(scope="session")
def tiny_model_2d(trained_2d) -> Path:
    return trained_2d[1].model_path


@pytest.fixture(scope="session")
def tiny_model_3d(trained_3d) -> Path:
    return trained_3d[1].model_path


@pytest.fixture(scope="session")
def mirror_model_2d(tiny_model_2d, tmp_path_factory) -> Path:
    """The tiny 2D model, its file saying that images may come mirrored left-right (mirror_axis 0)."""
    loaded = load_model(tiny_model_2d)
    description = loaded.description
    description = dataclasses.replace(description, inference=dataclasses.replace(description.inference, mirror_axis=0))
    return save_model(tmp_path_factory.mktemp("mirror") / "model.safetensors", description, loaded.coarse)


def with_stored_training(path: Path, target: Path, **training) -> Path:
    """A copy of a model file whose stored training configuration says `training` (weights unchanged)."""
    loaded = load_model(path)
    description = loaded.description
    config = description.provenance["config"]
    stored = {**config, "training": {**config["training"], **training}}
    if "refinement" in config:
        stored["refinement"] = {**config["refinement"], "training": {**config["refinement"]["training"], **training}}
    description = dataclasses.replace(description, provenance={**description.provenance, "config": stored})
    return save_model(target, description, loaded.coarse, loaded.refinement)


def relabelled_by(model: Path, spec_path: Path, folder: Path) -> Path:
    """A copy of a dataset (images and spec) whose landmarks are `model`'s own detections: cases on
    which nothing can beat the model, neither an offset nor a model identical to it."""
    from SCNLandmarksLib.data.spec import load_dataset_spec
    from SCNLandmarksLib.inference import Predictor
    from SCNLandmarksLib.io.landmarks import write_landmarks

    spec = load_dataset_spec(spec_path)
    predictor = Predictor.from_file(model, "cpu")
    (folder / "images").mkdir(parents=True)
    lines = [f"dimension = {spec.dimension}", "landmarks = " + json.dumps(list(spec.landmark_names)), ""]
    for entry in spec.entries:
        image = folder / "images" / entry.image.name
        shutil.copyfile(entry.image, image)
        write_landmarks(
            predictor.predict(sitk.ReadImage(str(image))).landmarks, folder / "images" / f"{entry.id}.mrk.json"
        )
        lines += ["[[images]]", f'id = "{entry.id}"', f'image = "images/{image.name}"']
        lines += [f'landmarks = "images/{entry.id}.mrk.json"', ""]
    (folder / "dataset.toml").write_text("\n".join(lines))
    return folder / "dataset.toml"

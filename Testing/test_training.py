"""Training for real on synthetic data: accuracy, exact resume, cancel, NaN guard, DDP, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from SCNLandmarksLib.bundle import load_model, read_description
from SCNLandmarksLib.config import (
    HeatmapConfig,
    TrainingConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from SCNLandmarksLib.data.preparation import normalize_image
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.errors import Cancelled, DataError, TrainingError
from SCNLandmarksLib.evaluation import evaluate_model
from SCNLandmarksLib.heatmaps import gaussian_heatmaps, peak_height, refine_peaks
from SCNLandmarksLib.inference import REFINEMENT_VIEW_SHIFT, Predictor, view_directions
from SCNLandmarksLib.io.images import read_image
from SCNLandmarksLib.losses import heatmap_loss
from SCNLandmarksLib.train import CHECKPOINT, _learning_rate_factor, train

REPO = Path(__file__).resolve().parents[1]


def test_gaussian_targets_are_normalised_and_missing_landmarks_are_zero():
    spacing = (0.5, 0.7)
    sigma = torch.tensor([2.0, 3.0])
    index = torch.tensor([[[40.2, 30.7], [float("nan"), float("nan")]]])
    present = torch.tensor([[True, False]])
    targets = gaussian_heatmaps(index, present, (80, 60), spacing, sigma, gamma=10.0)
    integral = float(targets[0, 0].sum()) * spacing[0] * spacing[1]
    assert integral == pytest.approx(10.0, rel=1e-3)  # gamma: the Gaussian integrates to gamma
    assert float(targets[0, 0].max()) == pytest.approx(float(peak_height(sigma, 10.0, 2)[0]), rel=0.05)
    assert float(targets[0, 1].abs().max()) == 0.0


@pytest.mark.parametrize("dimension", [2, 3])
def test_sub_voxel_refinement_recovers_known_peaks(dimension):
    rng = np.random.default_rng(dimension)
    size = (21, 17, 13)[:dimension]
    truth = torch.as_tensor(rng.uniform(3, 10, (1, 5, dimension)), dtype=torch.float32)
    heatmaps = gaussian_heatmaps(
        truth, torch.ones(1, 5, dtype=torch.bool), size, (1.0,) * dimension, torch.full((5,), 1.6), gamma=1.0
    )
    index, _ = refine_peaks(heatmaps[0])
    np.testing.assert_allclose(index.numpy(), truth[0].numpy(), atol=1e-3)


def test_loss_ignores_missing_landmarks():
    config = HeatmapConfig(sigma_init=2.0)
    target = torch.zeros(1, 2, 10, 10)
    prediction = torch.zeros(1, 2, 10, 10)
    present = torch.tensor([[True, False]])
    sigma = torch.tensor([2.0, 2.0])
    base, _ = heatmap_loss(prediction, target, present, (1.0, 1.0), sigma, config)
    prediction[0, 1] = 5.0  # anything in a missing landmark's channel is not penalised
    same, _ = heatmap_loss(prediction, target, present, (1.0, 1.0), sigma, config)
    prediction[0, 0, 3, 3] = 1.0
    worse, _ = heatmap_loss(prediction, target, present, (1.0, 1.0), sigma, config)
    assert float(same) == float(base) and float(worse) > float(base)


def validation_errors(predictor: Predictor, dataset: Path, refine: bool = True) -> tuple[np.ndarray, list[list[str]]]:
    """Point errors (mm) of all validation landmarks of a synthetic dataset, and the statuses per image."""
    spec = load_dataset_spec(dataset)
    entries = spec.split("validation")
    truth = spec.load_landmarks(entries)
    errors, statuses = [], []
    for entry in entries:
        image = read_image(entry.image)
        prediction = predictor.predict(image, refine=refine)
        errors.append(np.linalg.norm(prediction.landmarks.points_lps - truth[entry.id].points_lps, axis=1))
        statuses.append(prediction.status)
    return np.concatenate(errors), statuses


def test_short_training_reaches_sub_voxel_point_error(trained_2d, dataset_2d):
    """A tiny SCN on the 2 mm grid finds synthetic landmarks on held-out images within 0.5 mm."""
    config, result = trained_2d
    assert result.iterations == config.training.iterations
    assert result.best_validation_error < 0.5
    assert result.history[0]["mean_error"] >= result.best_validation_error
    errors, statuses = validation_errors(Predictor.from_file(result.model_path, "cpu"), dataset_2d)
    assert all(status == ["detected"] * 4 for status in statuses)
    assert np.mean(errors) < 0.5
    assert (config.output_dir / "config.toml").is_file()
    assert load_config(config.output_dir / "config.toml").grid == config.grid


def test_axes_named_in_a_configuration_must_exist_in_its_grid(trained_2d):
    config, _ = trained_2d
    values = config_to_dict(config)
    assert config_from_dict({**values, "inference": {"mirror_axis": 0}}, Path("/")).inference.mirror_axis == 0
    for section, key in (("inference", "mirror_axis"), ("augmentation", "mirror_axis")):
        with pytest.raises(DataError, match=rf"\[{section}\]: {key} 2 outside 0..1"):
            config_from_dict({**values, section: {**values[section], key: 2}}, Path("/"), "ceph.toml")
    with pytest.raises(DataError, match=r"\[inference\]: refinement_views 0 must be a whole number >= 1"):
        config_from_dict({**values, "inference": {"refinement_views": 0}}, Path("/"), "ceph.toml")
    paired = {
        **values,
        "inference": {"mirror_axis": 0},
        "augmentation": {**values["augmentation"], "mirror_axis": 0, "mirror_pairs": [["L1", "L2"]]},
    }
    with pytest.raises(DataError, match="mirror_axis cannot be used with left/right landmark pairs"):
        config_from_dict(paired, Path("/"))


def test_3d_model_detects_landmarks_on_oblique_anisotropic_flipped_volumes(trained_3d, dataset_3d):
    config, result = trained_3d
    entry = load_dataset_spec(dataset_3d).split("validation")[0]
    assert read_image(entry.image).GetDirection() != tuple(np.eye(3).ravel())
    errors, _ = validation_errors(Predictor.from_file(result.model_path, "cpu"), dataset_3d)
    assert np.mean(errors) < 1.25, f"mean error {np.mean(errors):.2f} mm on a 2.5 mm grid"


def _fast_config(spec: Path, output_dir: Path, **training):
    values = {"iterations": 6, "batch_size": 2, "checkpoint_every": 3, "validate_every": 3, **training}
    return tiny_config(spec, output_dir, 2, **values)


def test_resume_equals_uninterrupted_training(dataset_2d, tmp_path):
    straight = _fast_config(dataset_2d, tmp_path / "straight")
    train(straight, device="cpu")
    interrupted = _fast_config(dataset_2d, tmp_path / "interrupted")
    with pytest.raises(Cancelled):
        train(interrupted, device="cpu", cancel=lambda: True)  # stops (and checkpoints) after iteration 1
    state = torch.load(interrupted.output_dir / CHECKPOINT, weights_only=True)
    assert state["iteration"] == 1
    train(interrupted, resume=True, device="cpu")
    a = torch.load(straight.output_dir / CHECKPOINT, weights_only=True)
    b = torch.load(interrupted.output_dir / CHECKPOINT, weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for key, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][key]), key
    assert repr(a["history"]) == repr(b["history"])  # repr: NaN entries compare equal


def test_a_resumed_run_takes_the_learning_rate_of_its_configuration(dataset_2d, tmp_path):
    # How a diverged run goes on (its error says so): a lower learning rate, resumed.
    config = _fast_config(dataset_2d, tmp_path / "run", learning_rate=1e-3)
    with pytest.raises(Cancelled):
        train(config, device="cpu", cancel=lambda: True)
    lower = dataclasses.replace(config, training=dataclasses.replace(config.training, learning_rate=1e-6))
    rates: list[float] = []
    train(lower, resume=True, device="cpu", progress=lambda info: rates.append(info["learning_rate"]))
    assert len(rates) == 5 and 0 < max(rates) <= 1e-6


def test_cpu_training_autocasts_to_bfloat16_only_where_the_hardware_multiplies_it(dataset_2d, tmp_path, monkeypatch):
    def weights(name: str, hardware: bool, mixed_precision: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setenv("SCN_LANDMARKS_CPU_BFLOAT16", "amx" if hardware else "none")
        config = _fast_config(dataset_2d, tmp_path / name, iterations=3, mixed_precision=mixed_precision)
        train(config, device="cpu")
        return torch.load(config.output_dir / CHECKPOINT, weights_only=True)["trainable"]

    reduced = weights("reduced", hardware=True, mixed_precision=True)
    without_units = weights("without_units", hardware=False, mixed_precision=True)
    switched_off = weights("switched_off", hardware=True, mixed_precision=False)
    assert all(torch.equal(without_units[k], switched_off[k]) for k in reduced)  # both float32
    assert not all(torch.equal(reduced[k], switched_off[k]) for k in reduced)
    assert all(torch.isfinite(v).all() for v in reduced.values())


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(dataset_2d, tmp_path):
    config = _fast_config(
        dataset_2d,
        tmp_path / "nan",
        iterations=50,
        checkpoint_every=1,
        validate_every=1,
        learning_rate=1e12,
        gradient_clip=1e30,
    )
    config = dataclasses.replace(config, heatmap=dataclasses.replace(config.heatmap, learnable_sigma=False))
    with pytest.raises(TrainingError, match="non-finite|loss became") as failure:
        train(config, device="cpu")
    assert str(config.output_dir / CHECKPOINT) in str(failure.value)
    state = torch.load(config.output_dir / CHECKPOINT, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert all(torch.isfinite(load_model(config.output_dir / "model.safetensors").coarse.sigmas))
    for _, value in load_model(config.output_dir / "model.safetensors").coarse.network.state_dict().items():
        assert torch.isfinite(value).all()

    # Diverged before its first checkpoint: the message does not promise one.
    early = dataclasses.replace(config, output_dir=tmp_path / "early")
    early = dataclasses.replace(early, training=dataclasses.replace(early.training, checkpoint_every=1000))
    with pytest.raises(TrainingError, match="No checkpoint was written before it"):
        train(early, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_training_on_gloo(dataset_2d, tmp_path):
    config = _fast_config(dataset_2d, tmp_path / "ddp", iterations=4)
    config_path = tmp_path / "ddp.toml"
    save_config(config, config_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "SCNLandmarksLib.cli",
        "train",
        str(config_path),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "distributed training on 2 processes (gloo)" in run.stderr
    predictor = Predictor.from_file(config.output_dir / "model.safetensors", "cpu")
    assert predictor.landmark_names == ["L1", "L2", "L3", "L4"]


def _write_spec(folder: Path, name: str, dimension: int, entries: str, landmarks='["L1", "L2", "L3", "L4"]') -> Path:
    spec = folder / f"{name}.toml"
    spec.write_text(f"dimension = {dimension}\nlandmarks = {landmarks}\n{entries}")
    return spec


def test_bad_inputs_get_clear_errors_naming_the_file(dataset_2d, tmp_path):
    source = dataset_2d.parent / "images"
    broken = tmp_path / "broken.mha"
    broken.write_bytes(b"not an image at all")
    cases = {
        "unreadable image": (
            _write_spec(
                tmp_path,
                "unreadable",
                2,
                f'[[images]]\nimage = "{broken}"\nlandmarks = "{source / "case000.mrk.json"}"\nsplit = "train"\n',
            ),
            str(broken),
        ),
        "unknown landmark": (
            _write_spec(
                tmp_path,
                "unknown",
                2,
                f'[[images]]\nimage = "{source / "case000.mha"}"\n'
                f'landmarks = "{source / "case000.mrk.json"}"\nsplit = "train"\n',
                landmarks='["L1", "L2", "L3"]',
            ),
            "case000.mrk.json",
        ),
        "mismatched dimension": (
            _write_spec(
                tmp_path,
                "dimension",
                3,
                f'[[images]]\nimage = "{source / "case000.mha"}"\n'
                f'landmarks = "{source / "case000.mrk.json"}"\nsplit = "train"\n',
            ),
            "case000.mha",
        ),
        "empty dataset": (_write_spec(tmp_path, "empty", 2, ""), "empty.toml"),
    }
    for problem, (spec, named) in cases.items():
        dimension = load_dataset_spec(spec).dimension if problem != "empty dataset" else 2
        config = tiny_config(spec, tmp_path / "out", dimension, iterations=2)
        with pytest.raises(DataError) as failure:
            train(config, device="cpu")
        assert named in str(failure.value), f"{problem}: {failure.value}"


def coarse_to_fine_config(dataset: Path, output_dir: Path, coarse_iterations: int, refinement_iterations: int, **top):
    """A deliberately coarse SCN (4 mm grid) plus a 0.5 mm patch refiner for the synthetic 2D dataset."""
    values = config_to_dict(tiny_config(dataset, output_dir, 2))
    values["grid"] = {"size": [16, 16], "spacing": [4.0, 4.0]}
    values["heatmap"]["sigma_init"] = 6.0
    values["model"]["params"] = {**values["model"]["params"], "levels": 2, "sc_downsample": 2, "sc_kernel": 3}
    values["training"].update(iterations=coarse_iterations, validate_every=150)
    values["refinement"] = {
        "grid": {"size": [24, 24], "spacing": [0.5, 0.5]},
        "offset_mm": 3.0,
        "heatmap": {"sigma_init": 1.0},
        "model": {"architecture": "unet", "params": {"filters": 16, "levels": 3, "dropout": 0.0}},
        "augmentation": {"translation": 0.0, "rotation_deg": 10.0},
        "training": {
            "iterations": refinement_iterations,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "validate_every": 150,
            "checkpoint_every": 150,
        },
    }
    return config_from_dict({**values, **top}, Path("/"))


def test_a_refinement_stage_is_added_to_a_trained_model_whose_coarse_stage_stays_as_it_is(
    trained_2d, dataset_2d, tmp_path
):
    """`[training] iterations = 0` with an initial model: the coarse stage is the model file's, untouched,
    scored once on the validation images, and the new refinement stage trains behind it."""
    config, base_result = trained_2d
    values = config_to_dict(config)
    refiner = config_to_dict(coarse_to_fine_config(dataset_2d, tmp_path / "unused", 1, 6))["refinement"]
    refiner["training"].update(validate_every=3, checkpoint_every=3)
    values.update(
        output_dir=str(tmp_path / "refined"),
        initial_model=str(base_result.model_path),
        training={**values["training"], "iterations": 0},
        refinement=refiner,
    )
    result = train(config_from_dict(values, Path("/")), device="cpu")
    base = Predictor.from_file(base_result.model_path, "cpu")
    newest = Predictor.from_file(tmp_path / "refined" / "last.safetensors", "cpu")
    assert newest.refinement is not None and base.refinement is None
    for predictor in (newest, Predictor.from_file(result.model_path, "cpu")):
        torch.testing.assert_close(predictor.coarse.sigmas, base.coarse.sigmas)
        for key, value in base.coarse.network.state_dict().items():
            torch.testing.assert_close(predictor.coarse.network.state_dict()[key], value)
    state = torch.load(tmp_path / "refined" / CHECKPOINT, weights_only=True)
    assert state["iteration"] == 0 and [h["iteration"] for h in state["history"]] == [0]

    # Only an initial model can be kept, and only to add a refinement stage; a refinement stage always trains.
    with pytest.raises(
        DataError, match=r"\[training\]: iterations = 0 keeps an initial_model's .* lacks an initial_model"
    ):
        config_from_dict({key: value for key, value in values.items() if key != "initial_model"}, Path("/"))
    with pytest.raises(DataError, match=r"\[training\]: iterations = 0 .* lacks a \[refinement\] section"):
        config_from_dict({key: value for key, value in values.items() if key != "refinement"}, Path("/"))
    no_refiner_steps = {**refiner, "training": {**refiner["training"], "iterations": 0}}
    with pytest.raises(DataError, match=r"\[refinement.training\]: iterations and batch_size must be >= 1"):
        config_from_dict({**values, "refinement": no_refiner_steps}, Path("/"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("validate_every", 0, "step_every, validate_every and checkpoint_every must be >= 1"),
        ("checkpoint_every", 0, "step_every, validate_every and checkpoint_every must be >= 1"),
        ("iterations", "5", "iterations = '5' must be a whole number"),
        ("learning_rate", -1.0, "learning rates and weight_decay must be >= 0"),
        ("learning_rate", "fast", "learning_rate = 'fast' must be a number"),
    ],
)
def test_a_training_section_out_of_range_is_refused_naming_the_file(key, value, message):
    values = {
        "dataset": "d.toml",
        "output_dir": "out",
        "grid": {"size": [32, 32], "spacing": [2.0, 2.0]},
        "training": {key: value},
    }
    with pytest.raises(DataError, match=rf"ceph\.toml \[training\]: {re.escape(message)}"):
        config_from_dict(values, Path("/"), "ceph.toml")


def test_more_coarse_iterations_on_a_finished_run_keep_its_refinement(dataset_2d, tmp_path):
    """Resuming a run without validation whose refinement had finished, with more coarse iterations: the
    model file keeps both stages (it once kept the coarse stage alone)."""
    first = coarse_to_fine_config(dataset_2d, tmp_path / "run", 10, 10, validation_split="none")
    train(first, device="cpu")
    longer = coarse_to_fine_config(dataset_2d, tmp_path / "run", 20, 10, validation_split="none")
    result = train(longer, resume=True, device="cpu")
    description = read_description(result.model_path)
    assert description.refinement is not None and description.provenance["iterations"] == 10
    assert Predictor.from_file(result.model_path, "cpu").refinement is not None


def test_coarse_to_fine_refinement_improves_a_coarse_model(dataset_2d, tmp_path):
    """A deliberately coarse SCN (4 mm grid) plus a 0.5 mm patch refiner: one model file, better points."""
    result = train(coarse_to_fine_config(dataset_2d, tmp_path / "c2f", 150, 300), device="cpu")
    predictor = Predictor.from_file(result.model_path, "cpu")
    assert predictor.refinement is not None and read_description(result.model_path).refinement.grid_size == (24, 24)
    refined = float(np.mean(validation_errors(predictor, dataset_2d)[0]))
    coarse = float(np.mean(validation_errors(predictor, dataset_2d, refine=False)[0]))
    assert refined < 0.3 and refined < 0.8 * coarse, f"refined {refined:.3f} mm vs coarse {coarse:.3f} mm"

    # Test-time views: a point refined in 9 views is the mean of the single-view refinements of the
    # patches centred around it, and refines as well. In float32: the views run in other batches than
    # the single views, and bfloat16 kernels may round differently by batch on other CPUs.
    single = Predictor.from_file(result.model_path, "cpu", "float32")
    viewed = Predictor.from_file(result.model_path, "cpu", "float32")
    viewed.inference = dataclasses.replace(viewed.inference, refinement_views=9)
    spec = load_dataset_spec(dataset_2d)
    entry = spec.split("validation")[0]
    normalized = normalize_image(read_image(entry.image), viewed.description.intensity)
    rough = spec.load_landmarks([entry])[entry.id].points_lps + np.array([1.5, -1.0])
    patch = viewed.description.refinement
    half_extent = (np.asarray(patch.grid_size) - 1.0) / 2.0 * np.asarray(patch.grid_spacing)
    shifts = REFINEMENT_VIEW_SHIFT * half_extent * view_directions(9, 2)
    single_views = np.array([single._refine(normalized, rough + shift)[0] for shift in shifts])
    averaged, spread = viewed._refine(normalized, rough)
    np.testing.assert_allclose(averaged, single_views.mean(axis=0), atol=1e-4)
    cells = np.sqrt(np.mean(np.sum((single_views - averaged) ** 2, axis=2), axis=0)) / np.mean(patch.grid_spacing)
    np.testing.assert_allclose(spread, np.log1p(cells), atol=1e-4)  # the "view_spread" evidence
    assert float(np.mean(validation_errors(viewed, dataset_2d)[0])) < 0.3

    # A turned header takes passes in the canonical pose: the refinement still runs once per image, in
    # the pose of the pass whose points are returned, and refines as well as on the image as given.
    refinements = []
    refine_patches = predictor._refine
    predictor._refine = lambda *args: (refinements.append(args), refine_patches(*args))[1]
    angle = math.radians(25.0)
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    entries = spec.split("validation")
    truth = spec.load_landmarks(entries)
    turned_errors = []
    for entry in entries:
        image = read_image(entry.image)
        direction = np.array(image.GetDirection()).reshape(2, 2)
        image.SetDirection((turn @ direction).ravel().tolist())
        image.SetOrigin((turn @ np.array(image.GetOrigin())).tolist())
        found = predictor.predict(image)
        assert found.canonical_pass
        turned_errors.append(np.linalg.norm(found.landmarks.points_lps - truth[entry.id].points_lps @ turn.T, axis=1))
    assert len(refinements) == len(entries)
    turned = float(np.mean(np.concatenate(turned_errors)))
    assert turned < 0.3 and turned < 0.8 * coarse, f"turned {turned:.3f} mm vs coarse {coarse:.3f} mm"

    # The evaluation report compares both ways of running the model on the same images.
    metrics = json.loads(
        evaluate_model(result.model_path, dataset_2d, "validation", tmp_path / "eval", "cpu").read_text()
    )
    shipped, single = metrics["inference_modes"]
    assert shipped["mode"].startswith("coarse-to-fine") and single["mode"].startswith("single resolution")
    assert shipped["mean"] == pytest.approx(refined, abs=1e-6) and single["mean"] == pytest.approx(coarse, abs=1e-6)
    assert "## Inference modes" in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")


def test_fine_tuning_starts_from_a_model_file_of_the_same_design(trained_2d, dataset_2d, tmp_path):
    from SCNLandmarksLib.errors import ModelFileError

    config, result = trained_2d
    base = config_to_dict(config)
    # No learning at all: the run's model must be the starting model, landmark for landmark.
    values = {**base, "output_dir": str(tmp_path / "tuned"), "initial_model": str(result.model_path)}
    values["training"] = {
        **base["training"],
        "iterations": 2,
        "learning_rate": 0.0,
        "sigma_learning_rate": 0.0,
        "validate_every": 2,
        "checkpoint_every": 2,
    }
    tuned = train(config_from_dict(values, Path("/")), device="cpu")
    start, after = Predictor.from_file(result.model_path, "cpu"), Predictor.from_file(tuned.model_path, "cpu")
    torch.testing.assert_close(after.coarse.sigmas, start.coarse.sigmas)
    for key, value in start.coarse.network.state_dict().items():
        torch.testing.assert_close(after.coarse.network.state_dict()[key], value)
    assert read_description(tuned.model_path).provenance["config"]["initial_model"] == str(result.model_path)

    # Dropout shapes only training (the trained model had none), so a fine-tuning run may change it.
    more_dropout = {
        **values,
        "output_dir": str(tmp_path / "more-dropout"),
        "model": {**base["model"], "params": {**base["model"]["params"], "dropout": 0.2}},
    }
    with_dropout = train(config_from_dict(more_dropout, Path("/")), device="cpu")
    assert read_description(with_dropout.model_path).coarse.params["dropout"] == 0.2

    other = {
        **values,
        "output_dir": str(tmp_path / "other"),
        "model": {**base["model"], "params": {**base["model"]["params"], "filters": 4}},
    }
    with pytest.raises(ModelFileError, match="network parameters differ") as failure:
        train(config_from_dict(other, Path("/")), device="cpu")
    assert str(result.model_path) in str(failure.value)


def test_a_schedule_cut_by_the_time_budget_still_ends_annealed():
    training = TrainingConfig(iterations=1000, schedule="cosine")
    spent = [0.0]
    factor = _learning_rate_factor(training, lambda: spent[0])
    assert factor(0) == 1.0 and factor(500) == pytest.approx(0.5)
    # A fifth of the iterations done when the budget is spent: the rate is where the budget says.
    spent[0] = 0.5
    assert factor(200) == pytest.approx(0.5)
    spent[0] = 1.0
    assert factor(200) == pytest.approx(0.0, abs=1e-12)
    # Iterations ahead of the budget count as they are.
    spent[0] = 0.1
    assert factor(900) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    stepped = _learning_rate_factor(TrainingConfig(iterations=1000, schedule="step", step_every=400), lambda: 0.9)
    assert stepped(10) == pytest.approx(0.01)

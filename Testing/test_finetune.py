"""Learning from corrections: `scn-landmarks finetune` and `scn-landmarks train --dataset`, for real on
tiny synthetic datasets and tiny models trained in the session."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import relabelled_by, tiny_config, with_stored_training

from SCNLandmarksLib.autoconfig import config_for_dataset, held_aside_ids
from SCNLandmarksLib.bundle import load_model, read_description
from SCNLandmarksLib.cli import main
from SCNLandmarksLib.config import InferenceConfig, config_from_dict, config_to_dict, load_config
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.data.synthetic import make_dataset
from SCNLandmarksLib.errors import DataError, ModelFileError
from SCNLandmarksLib.finetune import finetune, finetune_config
from SCNLandmarksLib.train import stage_settings, train


def _last_json_line(captured: str) -> dict:
    return json.loads(captured.strip().splitlines()[-1])


def test_held_aside_cases_are_every_fifth_and_stable():
    ids = [f"c{n:02d}" for n in range(12)]
    assert held_aside_ids(ids) == ["c04", "c09"]
    assert held_aside_ids(list(reversed(ids))) == ["c04", "c09"]
    assert held_aside_ids(ids[:4]) == []


def test_finetune_derives_its_configuration_from_the_base(tiny_model_2d, trained_2d, dataset_2d, tmp_path):
    base_config = trained_2d[0]
    base = read_description(tiny_model_2d)
    config = finetune_config(tiny_model_2d, base, dataset_2d, tmp_path, base.landmark_names)
    assert config.grid == base_config.grid and config.augmentation == base_config.augmentation
    assert config.model.architecture == base.coarse.architecture and config.model.params == base.coarse.params
    assert config.heatmap.sigma_init == base_config.heatmap.sigma_init and config.heatmap.gamma == base.coarse.gamma
    assert config.training.learning_rate == pytest.approx(0.2 * base_config.training.learning_rate)
    assert config.training.batch_size == base_config.training.batch_size
    assert config.initial_model == tiny_model_2d and config.intensity == base.intensity
    assert config.refinement is None
    assert config.training.iterations == max(100, int(0.2 * base_config.training.iterations))

    # A coarse stage kept from an earlier model file (iterations = 0) gets the length of a base that
    # says nothing of it, not the shortest fine-tuning.
    stored = base.provenance["config"]
    kept = dataclasses.replace(
        base,
        provenance={**base.provenance, "config": {**stored, "training": {**stored["training"], "iterations": 0}}},
    )
    assert finetune_config(tiny_model_2d, kept, dataset_2d, tmp_path, base.landmark_names).training.iterations == 200


def test_finetune_command_writes_model_card_and_compares_on_held_aside_cases(
    tiny_model_2d, dataset_2d, tmp_path, capsys
):
    out = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                str(tiny_model_2d),
                str(dataset_2d),
                "--out",
                str(out),
                "--iterations",
                "20",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = _last_json_line(capsys.readouterr().out)
    assert summary["held_aside"] == 2 and summary["training_cases"] == 10 and summary["corrected_cases"] == 12
    assert summary["outcome"] in ("kept base", "base + offset", "fine-tuned", "fine-tuned + offset")
    assert summary["base_mean_error"] > 0 and summary["new_mean_error"] > 0
    assert set(summary["held_aside_errors"]) == {"base", "base + offset", "fine-tuned", "fine-tuned + offset"}
    assert set(summary["leave_one_out_errors"]) == {"base", "base + offset"}
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert str(tiny_model_2d) in card and "case004, case009" in card and "20 of 20 iterations" in card
    assert f"| base | {summary['leave_one_out_errors']['base']:.2f} | {summary['base_mean_error']:.2f} |" in card
    assert f"| fine-tuned | - | {summary['new_mean_error']:.2f} |" in card
    written = read_description(out / "model.safetensors")
    if summary["outcome"] == "kept base":
        assert (out / "model.safetensors").read_bytes() == tiny_model_2d.read_bytes()
    else:
        assert written.provenance["base_model"] == str(tiny_model_2d)
        assert written.provenance["held_aside"] == ["case004", "case009"]
        assert (written.convention is not None) == summary["outcome"].endswith("+ offset")
    # The run's configuration is a normal one: `scn-landmarks train` reruns it.
    assert load_config(out / "training" / "config.toml").initial_model == tiny_model_2d


def test_finetune_honours_the_time_budget(tiny_model_2d, dataset_2d, tmp_path):
    result = finetune(tiny_model_2d, dataset_2d, tmp_path / "quick", minutes=0.05, iterations=100_000, device="cpu")
    assert 0 < result.iterations["coarse"] < 100_000
    tuned = result.decision.held_aside["fine-tuned"]
    assert tuned.mean_error == tuned.mean_error and tuned.cases == 2  # validated, not NaN
    load_model(result.model_path)  # a complete model file
    load_model(tmp_path / "quick" / "training" / "model.safetensors")
    assert (tmp_path / "quick" / "training" / "checkpoint.pt").is_file()
    assert "time budget 0.05 min" in result.card_path.read_text(encoding="utf-8")


def test_finetune_keeps_the_base_when_the_new_model_is_not_better(dataset_2d, tmp_path):
    """A coarse-to-fine base whose stored learning rates are 0: the run copies the base's two stages
    exactly and cannot improve on them, so the base is kept, unchanged."""
    values = config_to_dict(tiny_config(dataset_2d, tmp_path / "c2f", 2, iterations=20, validate_every=20))
    values["refinement"] = {
        "grid": {"size": [16, 16], "spacing": [0.5, 0.5]},
        "offset_mm": 3.0,
        "heatmap": {"sigma_init": 1.0},
        "model": {"architecture": "unet", "params": {"filters": 8, "levels": 2, "dropout": 0.0}},
        "training": {"iterations": 20, "batch_size": 4, "validate_every": 20},
    }
    trained = train(config_from_dict(values, Path("/")), device="cpu")
    # last.safetensors holds both stages (model.safetensors only a refinement that beat the coarse SCN).
    base = with_stored_training(
        trained.model_path.parent / "last.safetensors",
        tmp_path / "base.safetensors",
        learning_rate=0.0,
        sigma_learning_rate=0.0,
    )
    assert read_description(base).refinement is not None

    result = finetune(base, relabelled_by(base, dataset_2d, tmp_path / "own"), tmp_path / "out", iterations=4)
    assert result.outcome == "kept base" and result.iterations == {"coarse": 4, "refinement": 4}
    held = result.decision.held_aside
    assert held["fine-tuned"].mean_error == pytest.approx(held["base"].mean_error, abs=1e-4)
    assert result.model_path.read_bytes() == base.read_bytes()
    assert "No candidate is better than the base" in result.card_path.read_text(encoding="utf-8")
    # Both stages started from the base's weights (a learning rate of 0 left them there).
    start, run = load_model(base), load_model(tmp_path / "out" / "training" / "last.safetensors")
    for ours, theirs in ((run.coarse, start.coarse), (run.refinement, start.refinement)):
        for key, value in theirs.network.state_dict().items():
            torch.testing.assert_close(ours.network.state_dict()[key], value)


def test_finetune_with_other_landmarks_reuses_the_local_appearance_weights(tiny_model_2d, tmp_path):
    spec = make_dataset(tmp_path / "three", dimension=2, images=4, landmarks=3, size=(64, 48), spacing=(1.0, 1.3))
    result = finetune(tiny_model_2d, spec, tmp_path / "out", iterations=2, device="cpu")
    assert result.outcome == "not validated" and result.held_aside == [] and len(result.training_cases) == 4
    card = result.card_path.read_text(encoding="utf-8")
    assert "**new landmarks**" in card and "Not validated" in card
    base, new = load_model(tiny_model_2d), load_model(result.model_path)
    assert new.description.landmark_names == ("L1", "L2", "L3")
    base_weights, new_weights = base.coarse.network.state_dict(), new.coarse.network.state_dict()
    for key, value in base_weights.items():
        if key.startswith("local_net."):  # two small Adam steps away from the base's
            assert (new_weights[key] - value).abs().max() < 1e-2, key
    assert new_weights["local_heatmaps.weight"].shape[0] == 3

    # A second run into the same folder would replace that model: refused before any work, unless asked.
    before = result.model_path.read_bytes()
    with pytest.raises(DataError, match="would replace existing file"):
        finetune(tiny_model_2d, spec, tmp_path / "out", iterations=2, device="cpu")
    assert result.model_path.read_bytes() == before


def test_finetune_refuses_a_base_inside_its_output_folder_and_leaves_it(tiny_model_2d, dataset_2d, tmp_path):
    # e.g. a previous fine-tuning's training/model.safetensors: the run clears and rewrites that folder
    base = tmp_path / "out" / "training" / "model.safetensors"
    base.parent.mkdir(parents=True)
    base.write_bytes(tiny_model_2d.read_bytes())
    with pytest.raises(DataError, match="lies in the output folder"):
        finetune(base, dataset_2d, tmp_path / "out", iterations=1, device="cpu", overwrite=True)
    assert base.read_bytes() == tiny_model_2d.read_bytes()


@pytest.mark.parametrize("problem", ["not a model", "empty folder", "no cases", "unknown landmark", "3D cases"])
def test_finetune_bad_input_names_the_file_and_writes_no_model(problem, tiny_model_2d, dataset_3d, tmp_path):
    base, dataset = tiny_model_2d, tmp_path / "cases"
    dataset.mkdir()
    named = str(dataset)
    if problem == "not a model":
        base = tmp_path / "notes.safetensors"
        base.write_text("not a model")
        named = str(base)
        make_dataset(dataset, images=2)
    elif problem == "no cases":
        (dataset / "dataset.toml").write_text('dimension = 2\nlandmarks = ["A"]\n')
    elif problem == "unknown landmark":
        make_dataset(dataset, images=2)
        case = dataset / "images" / "case001.mrk.json"
        case.write_text(case.read_text().replace('"L2"', '"Gnathion"'))
        named = str(case)
    elif problem == "3D cases":
        dataset = dataset_3d
        named = str(dataset_3d)
    with pytest.raises((DataError, ModelFileError)) as failure:
        finetune(base, dataset, tmp_path / "out", iterations=2, device="cpu")
    assert named in str(failure.value), f"{problem}: {failure.value}"
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_train_from_a_dataset_alone_writes_a_configuration_that_reruns(dataset_2d, tmp_path, capsys):
    spec = load_dataset_spec(dataset_2d)
    # A spec without splits: the command holds every fifth case aside for validation.
    unsplit = tmp_path / "unsplit.toml"
    unsplit.write_text(
        dataset_2d.read_text()
        .replace('split = "train"', "")
        .replace('split = "validation"', "")
        .replace('image = "images/', f'image = "{dataset_2d.parent}/images/')
        .replace('landmarks = "images/', f'landmarks = "{dataset_2d.parent}/images/')
    )
    out = tmp_path / "auto"
    assert main(["train", "--dataset", str(unsplit), "--out", str(out), "--minutes", "0.05", "--device", "cpu"]) == 0
    summary = _last_json_line(capsys.readouterr().out)
    config = load_config(out / "config.toml")
    assert config.dimension == 2 and min(config.grid.spacing) >= 1.0
    covered = [size * spacing for size, spacing in zip(config.grid.size, config.grid.spacing)]
    assert covered[0] >= 63.0 and covered[1] >= 47 * 1.3
    assert load_dataset_spec(config.dataset).split("validation")[0].id == "case004"
    assert 0 < summary["iterations"] <= config.training.iterations
    assert read_description(out / "model.safetensors").landmark_names == spec.landmark_names

    # Resumed through the same command, the run keeps the configuration it began with.
    derived = (out / "config.toml").read_bytes()
    resume = ["train", "--dataset", str(unsplit), "--out", str(out), "--resume", "--minutes", "0.02", "--device", "cpu"]
    assert main(resume) == 0
    assert (out / "config.toml").read_bytes() == derived
    assert main([*resume[:4], str(tmp_path / "never"), *resume[5:]]) == 2
    assert "no configuration to resume" in capsys.readouterr().err

    first = (out / "model.safetensors").read_bytes()
    rerun = ["train", str(out / "config.toml"), "--minutes", "0.02", "--device", "cpu"]
    assert main(rerun) == 2 and "holds a trained run" in capsys.readouterr().err  # hours of work kept
    assert (out / "model.safetensors").read_bytes() == first
    assert main([*rerun, "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    load_model(out / "model.safetensors")


@pytest.mark.parametrize("dimension, views", [(2, 9), (3, 1)])
def test_images_much_finer_than_the_coarse_grid_get_a_refinement_decoded_as_measured(dimension, views, tmp_path):
    size, spacing = ((640, 480), (1.0, 1.0)) if dimension == 2 else ((96, 96, 64), (0.25, 1.0, 1.0))
    spec = make_dataset(tmp_path / "data", dimension, images=3, landmarks=4, size=size, spacing=spacing, validation=1)
    config = config_for_dataset(spec, tmp_path / "auto", minutes=0.1)
    assert config.refinement is not None and config.inference.refinement_views == views
    assert not config.inference.refinement_prior
    small = make_dataset(tmp_path / "small", 2, images=3, landmarks=4, size=(64, 48), spacing=(1.0, 1.0), validation=1)
    unrefined = config_for_dataset(small, tmp_path / "small-auto", minutes=0.1)
    assert unrefined.refinement is None and unrefined.inference == InferenceConfig()


def test_a_dataset_given_by_a_relative_path_is_found_from_the_output_folder(dataset_2d, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset_2d.parent)
    config = config_for_dataset(dataset_2d.name, tmp_path / "auto", minutes=0.05)
    assert load_dataset_spec(config.dataset).path.resolve() == dataset_2d.resolve()
    assert config.training.iterations >= 20


def test_a_time_budget_is_shared_by_work_not_by_iterations(dataset_2d, tmp_path):
    """Refinement iterations on small patches are cheap: counted as iterations, a refinement with many
    of them took most of a budget and cut the coarse stage short."""
    base = config_to_dict(tiny_config(dataset_2d, tmp_path, 2, iterations=100, batch_size=2))
    refinement = {
        "grid": {"size": [16, 16], "spacing": [0.5, 0.5]},
        "model": {"architecture": "unet"},
        "training": {"iterations": 150, "batch_size": 4},
    }
    coarse, refine = stage_settings(config_from_dict({**base, "refinement": refinement}, Path("/")))
    assert coarse.training.iterations < refine.training.iterations
    assert coarse.work == 100 * 2 * 32 * 32 and refine.work == 150 * 4 * 16 * 16
    assert coarse.work > refine.work


def test_train_needs_a_configuration_or_a_dataset(tmp_path, capsys):
    assert main(["train"]) == 2
    assert "either a configuration file or --dataset" in capsys.readouterr().err

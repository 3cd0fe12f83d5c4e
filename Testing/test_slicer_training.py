"""Learning from corrections in the module (Qt-free part, shared with the web app): the user's own
model catalogue (files beside, never inside, the shipped one; written atomically; removable) and the
training job, which runs a real `scn-landmarks finetune` / `train --dataset` in a child process,
reports its progress, can be cancelled, and registers the new model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SCNLandmarks"))

from conftest import relabelled_by, with_stored_training  # noqa: E402

from SCNLandmarksLib.bundle import read_description  # noqa: E402
from SCNLandmarksLib.cli import main  # noqa: E402
from SCNLandmarksLib.data.synthetic import make_dataset  # noqa: E402
from SCNLandmarksLib.errors import Cancelled, DataError, ModelFileError  # noqa: E402
from SCNLandmarksLib.finetune import finetune  # noqa: E402
from SCNLandmarksLib.io.landmarks import read_landmarks, write_landmarks  # noqa: E402
from SCNLandmarksLib.landmark_set import LandmarkSet  # noqa: E402
from SCNLandmarksMRML import catalogue, panel  # noqa: E402
from SCNLandmarksMRML.training import TrainingFailed, TrainingJob, checkBase, inspectTrainingFolder  # noqa: E402


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "my models"
    monkeypatch.setenv(catalogue.USER_MODELS_ENVIRONMENT, str(folder))
    return folder


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# the user catalogue


def test_the_user_models_folder_is_per_user_and_never_the_install_folder(user_folder, monkeypatch):
    assert catalogue.userModelsFolder() == user_folder.resolve()
    monkeypatch.delenv(catalogue.USER_MODELS_ENVIRONMENT)
    default = catalogue.userModelsFolder()
    assert not default.is_relative_to(catalogue.MODULE_DIR) and "SCNLandmarks" in default.parts
    monkeypatch.setenv(catalogue.USER_MODELS_ENVIRONMENT, str(catalogue.MODULE_DIR / "Resources" / "mine"))
    with pytest.raises(DataError, match="cannot be inside the module's own folder"):
        catalogue.userModelsFolder()
    assert catalogue.userModels() == []  # listing says why in the log and shows the shipped models only


def test_a_registered_model_is_listed_after_the_shipped_ones_with_its_card_and_can_be_removed(
    user_folder, tiny_model_2d, tmp_path
):
    shipped = catalogue.availableModels()
    card = tmp_path / "card.md"
    card.write_text("# my card\n", encoding="utf-8")
    entry = catalogue.registerUserModel(tiny_model_2d, "My hands / v1", description="mine", card=card)
    assert entry.userModel and entry.available and entry.path.is_relative_to(user_folder.resolve())
    assert entry.card.read_text(encoding="utf-8") == "# my card\n" and entry.dimension == 2
    assert entry.path.read_bytes() == tiny_model_2d.read_bytes() and entry.id == "my_hands_v1"
    second = catalogue.registerUserModel(tiny_model_2d, "My hands / v1")  # same name: its own folder
    assert second.id == "my_hands_v1-2" and "**Not validated**" not in second.card.read_text(encoding="utf-8")
    assert "Validation:" in second.card.read_text(encoding="utf-8")  # a card made from the model's metadata

    # Files only: a fresh listing (another process, a restart) sees the same entries, after the shipped ones.
    listed = catalogue.availableModels()
    assert [e.name for e in listed] == [e.name for e in shipped] + ["My hands / v1", "My hands / v1"]
    assert catalogue.entryForModel(entry.path) == entry and not any(e.userModel for e in listed[: len(shipped)])
    choices, _ = panel.modelChoices(catalogue.allModels(), str(entry.path))
    assert any(choice.label == "My hands / v1 (your model)" for choice in choices)

    catalogue.removeUserModel(entry)
    assert [e.id for e in catalogue.userModels()] == ["my_hands_v1-2"] and not entry.path.exists()
    with pytest.raises(DataError, match="only those can be removed"):
        catalogue.removeUserModel(shipped[0])
    assert shipped[0].path.is_file()


def test_nothing_half_written_is_ever_listed(user_folder, tiny_model_2d, tmp_path, monkeypatch):
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("not a model", encoding="utf-8")
    with pytest.raises(ModelFileError, match="notes.safetensors"):
        catalogue.registerUserModel(not_a_model, "Broken")
    assert _tree(user_folder) == []

    # A full disk while copying: an error naming the folder, nothing added, nothing left behind.
    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    user_folder.mkdir()
    monkeypatch.setattr(catalogue.shutil, "copyfile", full_disk)
    with pytest.raises(DataError, match="No space left on device.*nothing was added"):
        catalogue.registerUserModel(tiny_model_2d, "Full")
    monkeypatch.undo()
    assert _tree(user_folder) == []

    # What a killed process leaves: a staging folder with part of a model, a folder without entry,
    # an entry whose model file was deleted by hand. None is listed.
    staging = catalogue.stagingFolder(user_folder)
    (staging / catalogue.USER_MODEL_FILE).write_bytes(tiny_model_2d.read_bytes()[:1000])
    (user_folder / "no-entry").mkdir()
    shutil.copyfile(tiny_model_2d, user_folder / "no-entry" / catalogue.USER_MODEL_FILE)
    gone = catalogue.registerUserModel(tiny_model_2d, "Gone")
    gone.path.unlink()
    assert catalogue.userModels() == []

    # Left by a Slicer closed mid-training two days ago: removed when the next model is staged; the
    # recent staging folder (perhaps a training still running) is kept.
    abandoned = user_folder / f"{catalogue.STAGING_PREFIX}closed"
    (abandoned / "checkpoints").mkdir(parents=True)
    (abandoned / "checkpoints" / "checkpoint.pt").write_bytes(b"weights")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in [abandoned, abandoned / "checkpoints", abandoned / "checkpoints" / "checkpoint.pt"]:
        os.utime(path, (two_days_ago, two_days_ago))
    catalogue.stagingFolder(user_folder)
    assert not abandoned.exists() and staging.exists()


# ------------------------------------------------------------------------------------------------
# the training folder and the base


def test_bad_training_folders_and_bases_are_named(user_folder, tmp_path, dataset_2d, tiny_model_2d, tiny_model_3d):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*the training folder is empty"):
        inspectTrainingFolder(empty)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="loose: not a training folder"):
        inspectTrainingFolder(tmp_path / "loose")

    data = inspectTrainingFolder(dataset_2d.parent)
    assert data.cases[:2] == ("case000", "case001") and len(data.cases) == 12 and data.dimension == 2
    assert data.summary.startswith("12 cases (2D), 4 landmarks: L1, L2, L3, L4") and data.unit == "mm"

    # A case saved from another landmark set: named, with its file.
    mixed = tmp_path / "mixed"
    shutil.copytree(dataset_2d.parent, mixed)
    landmarks = next(mixed.glob("images/case003*.mrk.json"))
    text = landmarks.read_text(encoding="utf-8")
    landmarks.write_text(text.replace('"L2"', '"Sella"'), encoding="utf-8")
    with pytest.raises(DataError, match=r"case003.*\(case 'case003'\): the landmarks \['Sella'\] are not among"):
        inspectTrainingFolder(mixed)

    assert checkBase(tiny_model_2d, data).startswith("Fine-tunes model.safetensors on its own 4 landmarks")
    # A catalogue model is named by its entry: every catalogue model's file is model.safetensors.
    mine = catalogue.registerUserModel(tiny_model_2d, "My hands")
    assert mine.path.name == "model.safetensors"
    assert checkBase(mine.path, data).startswith("Fine-tunes My hands on its own 4 landmarks")
    assert TrainingJob(data, mine.path, userFolder=user_folder).baseName == "My hands"
    other = tmp_path / "other"
    make_dataset(other, images=3, landmarks=3)
    renamed = (other / "dataset.toml").read_text(encoding="utf-8").replace('"L3"', '"Tip"')
    (other / "dataset.toml").write_text(renamed, encoding="utf-8")
    for path in (other / "images").glob("*.mrk.json"):
        path.write_text(path.read_text(encoding="utf-8").replace('"L3"', '"Tip"'), encoding="utf-8")
    assert "other landmarks than model.safetensors (2 of 3 in common): new landmark heads" in checkBase(
        tiny_model_2d, inspectTrainingFolder(other)
    )
    with pytest.raises(DataError, match="the base model is 3D, the cases in .* are 2D"):
        checkBase(tiny_model_3d, data)
    not_a_model = tmp_path / "base.safetensors"
    not_a_model.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="base.safetensors"):
        checkBase(not_a_model, data)


def test_a_relative_dataset_path_is_read_from_where_the_command_runs(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "cases", images=3, landmarks=2, size=(32, 32), validation=0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "cases", "--out", "out", "--minutes", "0.01", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# the training job: real child processes


def _run(job: TrainingJob, until=None) -> list:
    """Poll the job to its end like the widget's timer does; the distinct progress reports seen.

    `until(progress)`: called on each new report; True cancels the job."""
    job.start()
    seen = []
    while job.running:
        try:
            job.poll(0.05)
        finally:
            progress = job.progress
            if progress is not None and (not seen or progress != seen[-1]):
                seen.append(progress)
                if until is not None and until(progress):
                    job.cancel()
    return seen


@pytest.fixture
def four_cases(tmp_path) -> Path:
    """Four corrected cases: all train and none is held aside, so the fine-tuned model is not validated."""
    folder = tmp_path / "corrections"
    make_dataset(folder, images=4, landmarks=4, size=(64, 48), spacing=(1.0, 1.3), validation=0)
    return folder


def test_fine_tuning_in_a_child_process_reports_progress_and_adds_no_model_it_could_not_validate(
    user_folder, tiny_model_2d, four_cases
):
    job = TrainingJob(
        inspectTrainingFolder(four_cases), base=tiny_model_2d, name="Corrected", minutes=5, device="cpu", iterations=12
    )
    seen = _run(job)
    outcome = job.poll()
    assert [p.iteration for p in seen] == sorted(p.iteration for p in seen) and seen[-1].iteration == 12
    assert all(p.iterations == 12 and p.stage == "coarse" and p.loss > 0 and p.etaSeconds >= 0 for p in seen)
    assert "coarse stage: iteration 12 of 12, loss" in seen[-1].text
    # Four cases are too few to hold some aside: the model was never compared with its base, so it
    # joins no model list (the base stays the one to use).
    assert not outcome.cancelled and outcome.result["outcome"] == "not validated" and outcome.entry is None
    assert outcome.message.startswith("Not validated: 4 cases are too few") and "nothing was added" in outcome.message
    assert catalogue.userModels() == [] and _tree(user_folder) == []  # no staging folder left either


def _conventionCases(tiny_model_2d, dataset_2d, tmp_path) -> tuple[Path, Path]:
    """A base that learns nothing (learning rates 0) and cases whose corrections move every landmark
    by the same amount from where the base puts it: (base, spec)."""
    base = with_stored_training(
        tiny_model_2d, tmp_path / "base.safetensors", learning_rate=0.0, sigma_learning_rate=0.0
    )
    spec = relabelled_by(base, dataset_2d, tmp_path / "shifted")
    for landmarks in (spec.parent / "images").glob("*.mrk.json"):
        points = read_landmarks(landmarks, dimension=2)
        write_landmarks(LandmarkSet(points.names, points.points_lps + [1.5, -1.0]), landmarks)
    return base, spec


def test_cancel_keeps_the_best_model_so_far_and_registers_it_when_it_beats_the_base(
    user_folder, tiny_model_2d, dataset_2d, tmp_path
):
    # A clinic's convention (every point 1.5 mm right, 1 mm down of the base's): the offset beats the
    # base whenever the fine-tuning stops, so the cancelled run still adds the winner.
    base, spec = _conventionCases(tiny_model_2d, dataset_2d, tmp_path)
    job = TrainingJob(
        inspectTrainingFolder(spec.parent), base=base, name="Stopped", minutes=5, device="cpu", iterations=400
    )
    seen = _run(job, until=lambda progress: progress.iteration > 40)
    outcome = job.poll()
    assert outcome.cancelled and outcome.result["cancelled"] and 40 < outcome.result["iterations"]["coarse"] < 400
    assert seen[-1].iteration < 400
    entry = outcome.entry
    assert outcome.result["outcome"] == "base + offset" and entry is not None and entry.name == "Stopped"
    assert "Stopped early (cancelled): the best model up to then" in entry.description
    assert (entry.path.parent / "training" / "config.toml").is_file()  # the run stays with its model
    assert "cancelled by the user" in entry.card.read_text(encoding="utf-8")
    assert [e.path for e in catalogue.userModels()] == [entry.path]
    assert not (entry.path.parent / "stop-requested").exists()


def test_a_base_that_stays_better_is_kept_and_nothing_is_added(user_folder, tiny_model_2d, dataset_2d, tmp_path):
    # A base whose stored learning rates are 0, on cases labelled by its own detections: the new model
    # is the base again and no offset can help, so nothing beats it on any CPU's arithmetic.
    base = with_stored_training(
        tiny_model_2d, tmp_path / "base.safetensors", learning_rate=0.0, sigma_learning_rate=0.0
    )
    folder = relabelled_by(base, dataset_2d, tmp_path / "own detections").parent
    job = TrainingJob(inspectTrainingFolder(folder), base=base, minutes=5, device="cpu", iterations=6)
    seen = _run(job)
    outcome = job.poll()
    measured = [p for p in seen if p.heldAsideError is not None]
    assert measured and measured[-1].heldAsideError >= 0 and measured[-1].unit == "mm"
    assert "; held-aside error " in measured[-1].text and measured[-1].text.endswith(" mm")
    assert outcome.entry is None and outcome.result["outcome"] == "kept base"
    assert outcome.message.startswith("No candidate is better than base.safetensors: nothing was added")
    assert "on the 2 held-aside cases: base 0.00, base + offset 0.00, fine-tuned 0.00" in outcome.message
    assert catalogue.userModels() == [] and _tree(user_folder) == []


def test_a_clinic_convention_is_added_as_the_base_with_an_offset(user_folder, tiny_model_2d, dataset_2d, tmp_path):
    # Cases whose corrections move every landmark by the same amount from where the base puts it.
    base, spec = _conventionCases(tiny_model_2d, dataset_2d, tmp_path)
    job = TrainingJob(inspectTrainingFolder(spec.parent), base=base, minutes=5, device="cpu", iterations=6)
    _run(job)
    outcome = job.poll()
    assert outcome.result["outcome"] == "base + offset" and outcome.entry is not None
    assert "base + offset chosen. Mean error (mm) leave-one-out over 12 cases: base 1.80, base + offset" in (
        outcome.entry.description
    )
    added = read_description(outcome.entry.path)
    assert added.convention is not None and added.convention.cases == 12


def test_a_new_landmark_set_is_trained_from_scratch_and_registered(user_folder, tmp_path):
    folder = tmp_path / "new set"
    make_dataset(folder, images=6, landmarks=3, size=(48, 40))
    job = TrainingJob(inspectTrainingFolder(folder), base=None, name="Three points", minutes=0.15, device="cpu")
    seen = _run(job)
    outcome = job.poll()
    assert job.command()[3:5] == ["train", "--dataset"]
    assert seen and seen[-1].heldAsideError is not None and not outcome.cancelled
    entry = outcome.entry
    assert (
        "New landmark set trained on 6 cases" in entry.description
        and "mm mean error on the held-aside" in entry.description
    )
    assert "- 2D, 3 landmarks: L1, L2, L3" in entry.card.read_text(encoding="utf-8")
    assert (entry.path.parent / "config.toml").is_file()


def test_the_library_finetune_honours_cancel_with_the_best_model_so_far(tiny_model_2d, dataset_2d, tmp_path):
    reached = []
    result = finetune(
        tiny_model_2d,
        dataset_2d,
        tmp_path / "out",
        iterations=40,
        device="cpu",
        progress=lambda info: reached.append(info["iteration"]),
        cancel=lambda: len(reached) >= 9,
    )
    assert result.cancelled and result.iterations["coarse"] == 9 and result.model_path.is_file()
    assert result.outcome in ("kept base", "base + offset", "fine-tuned", "fine-tuned + offset")
    assert result.decision is not None and "fine-tuned" in result.decision.held_aside
    assert "cancelled by the user" in result.card_path.read_text(encoding="utf-8")
    with pytest.raises(Cancelled):  # cancelled before the first validation: nothing to keep
        finetune(tiny_model_2d, dataset_2d, tmp_path / "early", iterations=40, device="cpu", cancel=lambda: True)


def test_a_killed_training_adds_nothing_and_says_so(user_folder, tiny_model_2d, four_cases):
    job = TrainingJob(inspectTrainingFolder(four_cases), base=tiny_model_2d, minutes=5, device="cpu", iterations=400)

    def kill(progress) -> bool:
        os.kill(job._process.pid, signal.SIGKILL)  # what the system does on a full disk or out of memory
        return False

    with pytest.raises(TrainingFailed, match=r"killed \(signal 9\): nothing was added"):
        _run(job, until=kill)
    assert catalogue.userModels() == [] and not job.running and not job.staging.exists()


def test_a_failing_command_gives_its_own_message(user_folder, dataset_2d, tmp_path):
    not_a_model = tmp_path / "base.safetensors"
    not_a_model.write_bytes(b"\x00" * 64)
    job = TrainingJob(inspectTrainingFolder(dataset_2d.parent), base=not_a_model, minutes=1, device="cpu")
    with pytest.raises(TrainingFailed, match="base.safetensors"):
        _run(job)
    assert catalogue.userModels() == [] and _tree(user_folder) == []


def test_the_command_prints_progress_and_result_as_json_lines(tiny_model_2d, dataset_2d, tmp_path, capsys):
    stop = tmp_path / "stop"
    stop.touch()  # already there: stops after the first iteration
    # Nothing validated yet: a fine-tune cancelled this early keeps nothing (status 130, as on Ctrl-C).
    assert (
        main(
            [
                "finetune",
                str(tiny_model_2d),
                str(dataset_2d),
                "--out",
                str(tmp_path / "a"),
                "--iterations",
                "30",
                "--device",
                "cpu",
                "--progress-json",
                "--stop-file",
                str(stop),
            ]
        )
        == 130
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["iteration"] for line in lines] == [1] and lines[0]["event"] == "progress"
    assert (
        main(
            [
                "finetune",
                str(tiny_model_2d),
                str(dataset_2d),
                "--out",
                str(tmp_path / "b"),
                "--iterations",
                "6",
                "--device",
                "cpu",
                "--progress-json",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["event"] == "result" and lines[-1]["cancelled"] is False
    assert {line["event"] for line in lines[:-1]} == {"progress"} and lines[-2]["iteration"] == 6
    assert "validation" in lines[-2]  # the held-aside error of the last iteration

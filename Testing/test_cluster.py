"""`detect --cluster`: a cohort on Dask workers writes what a plain `detect` writes, survives a killed
worker and a corrupt image, resumes, and takes a BIDS dataset; on a local cluster of 2 worker processes."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli

from SCNLandmarksLib.batch import BatchImage, ImageOutcome
from SCNLandmarksLib.bundle import read_description, save_description
from SCNLandmarksLib.cluster import COHORT_COLUMNS, _outcome_from_rows, cohort_rows
from SCNLandmarksLib.data.spec import load_dataset_spec
from SCNLandmarksLib.io.images import read_image, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks
from SCNLandmarksLib.landmark_set import LandmarkSet

distributed = pytest.importorskip("distributed", reason="the cluster extra: pip install 'scn-landmarks[cluster]'")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")

IMAGES = 6


def _local_cluster():
    """Two worker processes on loopback, one image at a time each, as `--cluster local:2` starts them."""
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
    )


@pytest.fixture(scope="module")
def cluster():
    """A running scheduler with two workers (the test's own: it can kill them), and a client of it."""
    with _local_cluster() as running, distributed.Client(running) as client:
        client.wait_for_workers(2, timeout=120)
        yield running.scheduler_address, client


@pytest.fixture(scope="module")
def cohort(dataset_2d, tmp_path_factory) -> tuple[Path, Path]:
    """A folder of images with one corrupt file, and a BIDS dataset (one subject with sessions, one
    without) of the same kind of images."""
    root = tmp_path_factory.mktemp("cohort")
    folder = root / "images"
    folder.mkdir()
    entries = load_dataset_spec(dataset_2d).entries
    for entry in entries[:IMAGES]:
        shutil.copy(entry.image, folder / entry.image.name)
    (folder / "corrupt.mha").write_bytes(b"ObjectType = Image\nNDims = 2\nDimSize = 64 48\nElementDataFile = LOCAL\n")
    bids = root / "bids"
    (bids / "dataset_description.json").parent.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.10.0"}')
    for entry, place in zip(entries[IMAGES : IMAGES + 2], ("sub-01/anat/sub-01", "sub-02/ses-1/anat/sub-02_ses-1")):
        target = bids / f"{place}_T1w.nii.gz"
        target.parent.mkdir(parents=True)
        write_image(read_image(entry.image), target)
    return folder, bids


@pytest.fixture(scope="module")
def plain_run(tiny_model_2d, cohort, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same cohort through a plain `detect`."""
    out = tmp_path_factory.mktemp("plain")
    return out, cli("detect", str(tiny_model_2d), *map(str, cohort), "--out", str(out), "--device", "cpu")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_cluster_run_writes_what_detect_writes_and_reports_a_corrupt_image(
    tiny_model_2d, cohort, plain_run, cluster, tmp_path
):
    folder, bids = cohort
    plain, plain_result = plain_run
    assert plain_result.returncode == 2, plain_result.stderr[-2000:]
    # A folder of .mha files is no DICOM series: GDCM is not asked, so it does not complain.
    assert "No Series were found" not in plain_result.stderr
    out = tmp_path / "cluster"
    run = cli("detect", str(tiny_model_2d), str(folder), str(bids), "--out", str(out), "--cluster", cluster[0])
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"error: {folder / 'corrupt.mha'}: cannot read image" in run.stderr
    assert " -> " not in run.stderr  # a progress bar, not a line per image
    assert f"{IMAGES + 3}/{IMAGES + 3} images, 1 failed" in run.stderr and "images/min, ETA" in run.stderr

    written = _files(out)
    expected = _files(plain)
    assert set(written) == set(expected) | {"cohort.csv", "cohort.parquet", "cohort-model.json"}
    assert {name: written[name] for name in expected} == expected  # landmarks and summary byte for byte
    assert "sub-02/ses-1/anat/sub-02_ses-1_T1w.mrk.json" in written
    description = json.loads(written["dataset_description.json"])
    assert description["DatasetType"] == "derivative" and description["SourceDatasets"] == [{"URL": bids.as_uri()}]
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert summary[0]["image"] == "corrupt.mha" and "cannot read image" in summary[0]["error"]
    assert [row["error"] for row in summary[1:]] == [""] * (IMAGES + 2)

    # The cohort table: every image's points as its landmark file has them, in input order.
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    images = sorted(folder.glob("case*.mha")) + sorted(bids.rglob("*_T1w.nii.gz"))
    assert [row["image"] for row in rows] == [str(image) for image in images for _ in range(4)]
    for image in images:
        stem = image.name.split(".")[0]
        landmark_file = next(out.rglob(f"{stem}.mrk.json"))
        landmarks = read_landmarks(landmark_file, dimension=2)
        mine = [row for row in rows if row["image"] == str(image)]
        assert [row["landmark"] for row in mine] == landmarks.names
        np.testing.assert_array_equal([[float(row["x"]), float(row["y"])] for row in mine], landmarks.points_lps)
        assert [row["status"] for row in mine] == [
            point["description"] for point in json.loads(landmark_file.read_text())["markups"][0]["controlPoints"]
        ]
    parquet = pyarrow_parquet.read_table(out / "cohort.parquet").to_pydict()
    assert parquet["image"] == [row["image"] for row in rows]
    assert parquet["x"] == [float(row["x"]) for row in rows] and parquet["flagged"] == [None] * len(rows)

    # The same run again replaces nothing unasked.
    kept = (out / "case000.mrk.json").stat().st_mtime_ns
    again = cli("detect", str(tiny_model_2d), str(folder), "--out", str(out), "--cluster", cluster[0])
    assert again.returncode == 2 and "nothing was written" in again.stderr and "--overwrite" in again.stderr
    assert (out / "case000.mrk.json").stat().st_mtime_ns == kept


def test_skip_existing_redoes_only_unfinished_images(tiny_model_2d, cohort, cluster, tmp_path):
    folder, _ = cohort
    out = tmp_path / "cluster"
    first = cli("detect", str(tiny_model_2d), str(folder), "--out", str(out), "--cluster", cluster[0])
    assert first.returncode == 2, first.stderr[-2000:]
    finished = _files(out)
    # An interrupted run: one image's file never written, the table cut in the middle of the last row
    # (its image is in order, last), no summary yet.
    (out / "case002.mrk.json").unlink()
    table = (out / "cohort.csv").read_bytes()
    (out / "cohort.csv").write_bytes(table[: table.rindex(b",")])
    (out / "summary.csv").unlink()
    (out / "cohort.parquet").unlink()
    kept = (out / "case000.mrk.json").stat().st_mtime_ns

    # Resumed on another cluster: two worker processes the command starts itself.
    resume_arguments = ["detect", str(tiny_model_2d), str(folder), "--out", str(out), "--cluster", "local:2"]
    resume_arguments.append("--skip-existing")
    resumed = cli(*resume_arguments)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    # Redone: the missing file, the image whose rows were cut, and the corrupt one (still corrupt).
    assert f"{IMAGES} of {IMAGES + 1} images ({IMAGES - 2} done before)" in resumed.stderr
    assert (out / "case000.mrk.json").stat().st_mtime_ns == kept
    assert _files(out) == finished

    # A file no row of the table accounts for (corrected by hand after a plain run, say) is not
    # replaced without --overwrite; nor are the results resumed with another model.
    rows = (out / "cohort.csv").read_text().splitlines()
    (out / "cohort.csv").write_text("\n".join(r for r in rows if "case000" not in r) + "\n")
    (out / "case000.mrk.json").write_text((out / "case000.mrk.json").read_text().replace("detected", "corrected"))
    corrected = (out / "case000.mrk.json").read_bytes()
    refused = cli(*resume_arguments)
    assert refused.returncode == 2 and "case000.mrk.json" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "case000.mrk.json").read_bytes() == corrected
    described = read_description(tiny_model_2d)
    other = save_description(  # another model file: the same weights, another provenance
        tiny_model_2d, tmp_path / "other.safetensors", dataclasses.replace(described, provenance={"copy": True})
    )
    (out / "case000.mrk.json").unlink()
    changed = cli(*[str(other) if a == str(tiny_model_2d) else a for a in resume_arguments])
    assert changed.returncode == 2 and "used another model" in changed.stderr


def test_a_killed_worker_costs_only_its_images(tiny_model_2d, cohort, plain_run, tmp_path):
    folder = tmp_path / "good"
    shutil.copytree(cohort[0], folder, ignore=shutil.ignore_patterns("corrupt.mha"))
    out = tmp_path / "cluster"
    # A fresh cluster of its own: its workers load torch and the model on their first image, which
    # gives the time to kill one while it holds images.
    with _local_cluster() as running, distributed.Client(running) as client:
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)
        run = subprocess.Popen(
            [sys.executable, "-m", "SCNLandmarksLib.cli", "detect", str(tiny_model_2d), str(folder)]
            + ["--out", str(out), "--cluster", running.scheduler_address],
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        deadline = time.monotonic() + 120
        held: list = []
        done_before: list[Path] | None = None
        while not held and time.monotonic() < deadline and run.poll() is None:
            busy = {address: keys for address, keys in client.processing().items() if keys}
            if busy:
                victim, held = next(iter(busy.items()))
                done_before = list(out.glob("*.mrk.json")) if out.exists() else []
                os.kill(pids[victim], signal.SIGKILL)
            time.sleep(0.01)
        _, stderr = run.communicate(timeout=120)
    assert held and done_before == [], "the worker was killed while it held images, before any was written"
    assert run.returncode == 0, stderr[-2000:]
    plain = plain_run[0]
    for path in folder.glob("*.mha"):
        name = f"{path.name.split('.')[0]}.mrk.json"
        assert (out / name).read_bytes() == (plain / name).read_bytes()


def test_cluster_arguments_are_checked_in_one_line(tiny_model_2d, cohort, tmp_path):
    folder = str(cohort[0])
    out = str(tmp_path / "out")
    wrong = cli("detect", str(tiny_model_2d), folder, "--out", out, "--cluster", "8786")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        "error: --cluster 8786: expected a scheduler address (tcp://HOST:8786) or local:N"
    )
    resume = cli("detect", str(tiny_model_2d), folder, "--out", out, "--skip-existing")
    assert resume.returncode == 2 and "--skip-existing resumes a --cluster run" in resume.stderr
    # Without the extra installed, the message says how to install it.
    hidden = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['distributed'] = None; from SCNLandmarksLib.cli import main; "
            f"sys.exit(main(['detect', {str(tiny_model_2d)!r}, {folder!r}, '--out', {out!r}, '--cluster', 'local:2']))",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert hidden.returncode == 2
    assert hidden.stderr.strip() == (
        "error: --cluster needs Dask's distributed scheduler: pip install 'scn-landmarks[cluster]'"
    )
    assert not Path(out).exists()


def test_the_cohort_table_keeps_each_points_coverage_radius(tmp_path):
    """A calibrated model's coverage radii and their probability go into the cohort table and read
    back exactly (a resumed cohort's skipped images keep theirs)."""
    landmarks = LandmarkSet(
        ["A", "B"],
        np.array([[1.5, 2.25], [np.nan, np.nan]]),
        np.array([0.9, 0.05]),
        np.array([1.2, np.nan]),
        np.array([2.75, np.nan]),
        0.9,
    )
    image = BatchImage(tmp_path / "case.mha", "case")
    outcome = ImageOutcome(image, landmarks, ["detected", "missing"], np.array([False, False]), False)
    rows = cohort_rows(outcome)
    assert dict(zip(COHORT_COLUMNS, rows[0]))["coverage_radius"] == "2.75"
    assert dict(zip(COHORT_COLUMNS, rows[0]))["coverage"] == "0.9"
    read_back = _outcome_from_rows(image, rows).landmarks
    np.testing.assert_array_equal(read_back.coverage_radii, landmarks.coverage_radii)
    assert read_back.coverage == 0.9

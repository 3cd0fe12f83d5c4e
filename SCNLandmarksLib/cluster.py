"""Detection of a cohort on a Dask distributed cluster (`scn-landmarks detect ... --cluster ADDRESS`).

The cluster is a running scheduler (``tcp://host:8786``, its workers started with ``dask worker``) or
``local:N``, N worker processes on this machine. Every worker must see the model, the images and the
output folder at the same paths (a shared file system). Each worker process loads the model once and
keeps it; one task detects one image and writes its files with the code a plain ``detect`` uses
(`batch.write_outputs`), so the files are byte for byte the same. A worker lost mid-run costs only the
images it held: the scheduler gives them to another worker (a file is written atomically, so a retried
image never leaves half a file). An image that cannot be read is reported in summary.csv and the run
goes on.

Beside the per-image files and summary.csv, the cohort table ``cohort.csv`` (and ``cohort.parquet`` when
pyarrow is installed) holds every image's points, confidences, expected errors and flags. It grows
as images finish, which is what `skip_existing` resumes from: an image whose files all exist and whose
rows are complete is not detected again.

Dask is an optional dependency (``pip install 'scn-landmarks[cluster]'``), imported only here.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import numpy as np

from .batch import BatchImage, BatchRequest, ImageOutcome, check_outputs, write_outputs, write_summary
from .errors import ClusterError, DataError, ModelFileError
from .io.atomic import atomic_output, write_text_atomically
from .io.paths import refuse_existing
from .landmark_set import LandmarkSet

log = logging.getLogger(__name__)

COHORT_TABLE = "cohort.csv"
COHORT_PARQUET = "cohort.parquet"
COHORT_MODEL = "cohort-model.json"  # which model file (by content) the table's results come from
COHORT_COLUMNS = (
    "image",
    "landmark",
    "x",
    "y",
    "z",
    "unit",
    "confidence",
    "expected_error",
    "coverage_radius",
    "coverage",
    "flagged",
    "status",
    "mirrored",
)
# coverage_radius: the point's radius holding the true point with probability `coverage` (e.g. 0.9).
_FLOAT_COLUMNS = ("x", "y", "z", "confidence", "expected_error", "coverage_radius", "coverage")
_BOOLEAN_COLUMNS = ("flagged", "mirrored")
LOCAL_ADDRESS = re.compile(r"local:(\d+)")
WORKER_WAIT_S = 120.0  # how long a run waits for its first worker (local ones start in seconds)

# progress(outcome of the image just finished, images finished, images to detect)
CohortProgress = Callable[[ImageOutcome, int, int], None]


def import_distributed() -> Any:
    """The dask.distributed module, or a message naming the extra that installs it."""
    try:
        import distributed
    except ImportError:
        raise ClusterError(
            "--cluster needs Dask's distributed scheduler: pip install 'scn-landmarks[cluster]'"
        ) from None
    return distributed


# ----------------------------------------------------------------------------------------------------
# on the workers

# The model each worker process loaded, kept for its next images: {(file, its mtime and size, device,
# precision): Predictor}. The file's mtime and size are in the key because a remote cluster outlives
# runs, and a model file replaced between them must be loaded again.
_loaded: dict[tuple, Any] = {}


def _worker_predictor(model: str, device: str, precision: str, slots_by_host: dict[str, int]) -> Any:
    """This worker process's Predictor of `model`, loaded on its first image."""
    import torch

    from .inference import Predictor

    stat = os.stat(model)
    key = (model, stat.st_mtime_ns, stat.st_size, device, precision)
    if key not in _loaded:
        _loaded.clear()
        # Dask starts workers with one thread for native libraries; the images detected at once on
        # this machine (by every worker on it) share its cores instead.
        worker = import_distributed().get_worker()
        slots = slots_by_host.get(urlparse(worker.address).hostname or "", worker.state.nthreads)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, slots)))
        _loaded[key] = Predictor.from_file(model, device, precision)
    return _loaded[key]


def _detect_on_worker(
    image: BatchImage, model: str, request: BatchRequest, device: str, precision: str, slots_by_host: dict[str, int]
) -> ImageOutcome:
    """One task: detect the landmarks of one image and write its files, as a plain `detect` does.

    Raises:
        ModelFileError: the worker cannot load the model (the run stops: no image would succeed).
    """
    predictor = _worker_predictor(model, device, precision, slots_by_host)
    # Read as `detect` reads it: with the picture's stated spacing, refused in pixels for a model in mm.
    prediction = predictor.predict_file(
        image.path, request.heatmaps, read=lambda path, dimension: image.read(predictor.description)
    )
    if isinstance(prediction, DataError):
        return ImageOutcome(image, error=str(prediction))
    try:
        return write_outputs(image, prediction, request)
    except DataError as error:
        return ImageOutcome(image, error=str(error))


# ----------------------------------------------------------------------------------------------------
# the cohort table


def _number(value: float) -> str:
    """Shortest text that reads back to exactly the same float; '' for NaN."""
    return repr(float(value)) if math.isfinite(value) else ""


def _boolean(value: bool | None) -> str:
    return "" if value is None else str(bool(value)).lower()


def cohort_rows(outcome: ImageOutcome) -> list[list[str]]:
    """The image's rows of the cohort table, one per landmark (none for an image that failed)."""
    landmarks = outcome.landmarks
    if landmarks is None:
        return []
    rows = []
    for i, name in enumerate(landmarks.names):
        point = [_number(v) for v in landmarks.points_lps[i]] + [""] * (3 - landmarks.dimension)
        rows.append(
            [
                str(outcome.image.path),
                name,
                *point,
                outcome.image.unit,
                _number(landmarks.confidences[i]) if landmarks.confidences is not None else "",
                _number(landmarks.expected_errors[i]) if landmarks.expected_errors is not None else "",
                _number(landmarks.coverage_radii[i]) if landmarks.coverage_radii is not None else "",
                _number(landmarks.coverage) if landmarks.coverage_radii is not None and landmarks.coverage else "",
                _boolean(None if outcome.flagged is None else outcome.flagged[i]),
                outcome.status[i],
                _boolean(outcome.mirrored),
            ]
        )
    return rows


def _outcome_from_rows(image: BatchImage, rows: list[list[str]]) -> ImageOutcome:
    """An image's outcome as its rows of the cohort table recorded it (an image a resumed run skips)."""
    columns = {name: [row[i] for row in rows] for i, name in enumerate(COHORT_COLUMNS)}

    def floats(name: str) -> np.ndarray:
        return np.array([float(text) if text else math.nan for text in columns[name]])

    axes = ("x", "y", "z") if any(columns["z"]) else ("x", "y")
    expected = floats("expected_error") if any(columns["expected_error"]) else None
    flagged = np.array([text == "true" for text in columns["flagged"]]) if any(columns["flagged"]) else None
    radii = floats("coverage_radius") if any(columns["coverage_radius"]) else None
    landmarks = LandmarkSet(
        columns["landmark"],
        np.stack([floats(axis) for axis in axes], axis=1),
        floats("confidence"),
        expected,
        radii,
        None if radii is None else float(columns["coverage"][0]),
    )
    return ImageOutcome(image, landmarks, columns["status"], flagged, columns["mirrored"][0] == "true")


class CohortTable:
    """cohort.csv: appended as images finish (a resumed run reads it back), rewritten in input order
    at the end, and written as cohort.parquet too when pyarrow is installed."""

    def __init__(self, out: Path, landmark_count: int):
        self.path = out / COHORT_TABLE
        self.parquet_path = out / COHORT_PARQUET
        self.model_path = out / COHORT_MODEL
        self.landmark_count = landmark_count
        self._stream: TextIO | None = None

    def recorded(self) -> dict[str, list[list[str]]]:
        """{image: its rows} of every image with a row in the table (none without one)."""
        if not self.path.is_file():
            return {}
        text = self.path.read_text(encoding="utf-8")
        # A run stopped mid-write leaves a last line without its newline: that image is not finished.
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        rows = list(csv.reader(lines[1:]))
        if lines and next(csv.reader(lines[:1])) != list(COHORT_COLUMNS):
            raise DataError(f"{self.path}: not a cohort table of this version (its columns differ); remove it")
        by_image: dict[str, list[list[str]]] = {}
        for row in rows:
            if len(row) == len(COHORT_COLUMNS):
                by_image.setdefault(row[0], []).append(row)
        return by_image

    def check_model(self, model: Path, resuming: bool) -> str:
        """The model file's digest, which `record_model` writes beside the table; a resumed run must
        use the model (by content) of the run it resumes.

        Raises:
            DataError: resuming with another model file than the recorded run's.
        """
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        if resuming and self.model_path.is_file():
            recorded = json.loads(self.model_path.read_text(encoding="utf-8")).get("model_sha256")
            if recorded != digest:
                raise DataError(
                    f"{self.path}: the run recorded there used another model than {model}; nothing was "
                    "written (give --overwrite to detect every image again with this one)"
                )
        return digest

    def record_model(self, model: Path, digest: str) -> None:
        write_text_atomically(self.model_path, json.dumps({"model": str(model), "model_sha256": digest}) + "\n")

    @contextmanager
    def recording(self, kept: dict[str, list[list[str]]]) -> Iterator[None]:
        """Begin the run's table with the rows of the images it keeps; `append` adds the others."""
        write_text_atomically(self.path, _csv_text([row for rows in kept.values() for row in rows]))
        with open(self.path, "a", encoding="utf-8", newline="") as stream:
            self._stream = stream
            try:
                yield
            finally:
                self._stream = None

    def append(self, outcome: ImageOutcome) -> None:
        """Record a finished image: its rows in one write, flushed, so that a stop loses at most this one."""
        assert self._stream is not None, "append() records within recording()"
        rows = cohort_rows(outcome)
        if rows:
            self._stream.write(_csv_text(rows, header=False))
            self._stream.flush()

    def finish(self, images: list[BatchImage]) -> list[Path]:
        """Rewrite the table in input order (and as Parquet when pyarrow is installed); its files."""
        recorded = self.recorded()
        rows = [row for image in images for row in recorded.get(str(image.path), [])]
        write_text_atomically(self.path, _csv_text(rows))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return [self.path]
        columns: dict[str, list] = {name: [row[i] for row in rows] for i, name in enumerate(COHORT_COLUMNS)}
        for name in _FLOAT_COLUMNS:
            columns[name] = [float(text) if text else None for text in columns[name]]
        for name in _BOOLEAN_COLUMNS:
            columns[name] = [None if not text else text == "true" for text in columns[name]]
        with atomic_output(self.parquet_path, ".parquet") as temporary:
            pq.write_table(pa.table(columns), temporary)
        return [self.path, self.parquet_path]


def _csv_text(rows: list[list[str]], header: bool = True) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    if header:
        writer.writerow(COHORT_COLUMNS)
    writer.writerows(rows)
    return stream.getvalue()


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class CohortResult:
    """What a cohort run did.

    Attributes:
        outcomes: every image's, in input order (those skipped as already done included).
        skipped: images already done by an earlier run (`skip_existing`).
        workers: the cluster's workers when the run started.
        summary: summary.csv.
        tables: cohort.csv, and cohort.parquet when pyarrow is installed.
    """

    outcomes: list[ImageOutcome]
    skipped: int
    workers: int
    summary: Path
    tables: list[Path]

    @property
    def failed(self) -> int:
        return sum(1 for outcome in self.outcomes if outcome.error)


@contextmanager
def _connected(address: str, distributed: Any) -> Iterator[Any]:
    """A client of the cluster at `address` with its first workers joined; a local cluster is closed
    with it."""
    local = LOCAL_ADDRESS.fullmatch(address)
    if local is not None:
        import dask  # installed with distributed

        workers = int(local.group(1))
        if workers < 1:
            raise ClusterError(f"--cluster {address}: give at least one worker (local:1)")
        # Loopback only, on free ports (its status page too): a local cluster serves this machine, and
        # two runs may start at once. The cores are shared out as images in flight, one torch thread
        # each, as a plain detect does: one image on two threads ran 3x slower on a busy machine
        # (benchmarks/cluster.py, local:1 before this). Without Dask's
        # MALLOC_TRIM_THRESHOLD_ for its workers, which stops glibc from keeping large blocks: each
        # image's volumes were then mapped afresh (twice the page faults, 30 % more time per image).
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
            distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=max(1, len(os.sched_getaffinity(0)) // workers),
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            ) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
        ):
            client.wait_for_workers(workers, timeout=WORKER_WAIT_S)
            yield client
        return
    if urlparse(address).scheme not in ("tcp", "tls") or not urlparse(address).port:
        raise ClusterError(f"--cluster {address}: expected a scheduler address (tcp://HOST:8786) or local:N")
    try:
        client = distributed.Client(address, timeout="20s", set_as_default=False)
    except OSError as error:
        raise ClusterError(
            f"--cluster {address}: cannot reach the Dask scheduler ({error}); start one with `dask scheduler`"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise ClusterError(
                f"--cluster {address}: no worker joined the scheduler within {WORKER_WAIT_S:.0f} s "
                "(start them with `dask worker " + address + "`)"
            ) from None
        yield client


def _outcome(future: Any, image: BatchImage, distributed: Any) -> ImageOutcome:
    """A finished task's outcome; a task that raised becomes the image's error, and the cohort goes on.

    Raises:
        ClusterError: a worker cannot load the model (no image would succeed).
    """
    try:
        return future.result()
    except ModelFileError as error:
        raise ClusterError(f"a worker cannot load the model: {error}") from None
    except distributed.KilledWorker:
        # The scheduler gave the image to another worker each time one died holding it.
        return ImageOutcome(image, error=f"{image.path}: every worker that detected it died (out of memory?)")
    except Exception as error:  # one image's unforeseen failure must not stop a cohort of thousands
        log.exception("%s: detection failed", image.path)
        return ImageOutcome(image, error=f"{image.path}: detection failed ({type(error).__name__}: {error})")


def run_cohort(
    address: str,
    model: str | os.PathLike,
    images: list[BatchImage],
    request: BatchRequest,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: CohortProgress | None = None,
) -> CohortResult:
    """Detect the landmarks of `images` on a Dask cluster and write what a plain `detect` writes,
    plus the cohort table.

    Args:
        address: ``tcp://HOST:PORT`` of a running scheduler, or ``local:N`` for N local worker processes.
        model: the model file (.safetensors), at the same path on every worker.
        images: from `batch.batch_images`.
        overwrite: replace existing files; otherwise any would make the run refuse before it starts.
        skip_existing: resume: images whose files all exist and whose rows are in the cohort table are
            kept as they are; the others are detected again (their files replaced).
        progress: called after each image the run detects.

    Raises:
        ClusterError: the cluster cannot be reached, has no worker, or a worker cannot load the model.
        DataError: a file would be replaced (see check_outputs).
        ModelFileError: the model file cannot be used.
    """
    from .bundle import read_description

    distributed = import_distributed()
    model = Path(model).resolve()
    names = read_description(model).landmark_names
    # Workers have their own working folder (a remote one, its own machine): every path is absolute.
    request = dataclasses.replace(request, out=request.out.resolve())
    images = [dataclasses.replace(image, path=image.path.resolve()) for image in images]
    table = CohortTable(request.out, len(names))
    check_outputs(images, request, overwrite or skip_existing, [table.path, table.parquet_path, table.model_path])
    kept: dict[str, list[list[str]]] = {}
    if skip_existing:
        recorded = table.recorded()
        if not overwrite:
            # Landmark files (each image's last output) that no row of the table accounts for are not
            # this run's: a plain run's, or corrected by hand.
            refuse_existing([image.landmark_file(request) for image in images if str(image.path) not in recorded])
        kept = {
            str(image.path): recorded[str(image.path)]
            for image in images
            if len(recorded.get(str(image.path), [])) == len(names)
            and all(path.is_file() for path in image.outputs(request))
        }
    digest = table.check_model(model, skip_existing and not overwrite)
    todo = [image for image in images if str(image.path) not in kept]
    outcomes = {key: _outcome_from_rows(image, kept[key]) for image in images if (key := str(image.path)) in kept}

    with _connected(address, distributed) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        slots_by_host: dict[str, int] = {}
        for info in workers.values():
            slots_by_host[info["host"]] = slots_by_host.get(info["host"], 0) + info["nthreads"]
        futures = client.map(
            _detect_on_worker,
            todo,
            model=str(model),
            request=request,
            device=device,
            precision=precision,
            slots_by_host=slots_by_host,
            pure=False,
        )
        image_of = {future.key: image for future, image in zip(futures, todo)}
        table.record_model(model, digest)
        with table.recording(kept):
            for done, future in enumerate(distributed.as_completed(futures, loop=client.loop), start=1):
                outcome = _outcome(future, image_of[future.key], distributed)
                outcomes[str(outcome.image.path)] = outcome
                table.append(outcome)
                if progress is not None:
                    progress(outcome, done, len(todo))
    ordered = [outcomes[str(image.path)] for image in images]
    summary = write_summary(request, ordered)
    return CohortResult(ordered, len(kept), len(workers), summary, table.finish(images))

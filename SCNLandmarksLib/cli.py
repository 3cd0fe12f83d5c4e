"""Command line: `scn-landmarks train | finetune | detect | evaluate | calibrate | dataset | info`, plus
`demo` and `serve` from the Slicer module's Qt-free packages when they are installed.

Thin: parses arguments, calls the library, shows progress, turns user-facing errors into one
clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Cancelled, DataError, SCNLandmarksError
from .vocabulary import Precision

if TYPE_CHECKING:
    from .bundle import ModelDescription  # imports torch, which parsing the command line does not need

log = logging.getLogger("scn-landmarks")


class UsageError(Exception):
    """Command-line arguments that do not go together."""


LANDMARK_FORMATS = {"mrk.json": ".mrk.json", "fcsv": ".fcsv", "csv": ".csv"}


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TerminalProgressBar:
    """A one-line progress bar (loss, mean sigma, ETA) on a terminal, periodic lines otherwise."""

    def __init__(self, stream=sys.stderr, every_s: float = 10.0):
        self.stream = stream
        self.interactive = stream.isatty()
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, info: dict) -> None:
        done, total = info["iteration"], info["iterations"]
        width = 30
        filled = int(width * done / total)
        line = (
            f"{info['stage']} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {info['loss']:.4f} "
            f"sigma {info['mean_sigma']:.2f} ETA {_format_seconds(info['eta_s'])}"
        )
        validation = info.get("validation")
        if validation:
            line += (
                f" | validation mean {validation['mean_error']:.2f} median {validation['median_error']:.2f}"
                f" missed {int(validation['missed'])}"
            )
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if validation or done == total else ""))
            self.stream.flush()
        elif validation or done == total or now - self.last >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now


class JsonProgress:
    """Training progress as JSON lines on stdout (`--progress-json`), for programs that run training
    in another process (the Slicer module, the web app): ``{"event": "progress", "stage", "iteration",
    "iterations", "loss", "eta_s", ...}``, with ``"validation"`` (held-aside errors) when measured;
    at most one line per `every_s` otherwise. The command's last line is ``{"event": "result", ...}``."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.last = -math.inf

    def __call__(self, info: dict) -> None:
        now = time.monotonic()
        if info.get("validation") or info["iteration"] in (1, info["iterations"]) or now - self.last >= self.every_s:
            _print_json({"event": "progress", **info})
            self.last = now


def _print_json(values: dict) -> None:
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


def _progress(args: argparse.Namespace) -> Callable[[dict], None]:
    return JsonProgress() if args.progress_json else TerminalProgressBar()


def _result(args: argparse.Namespace, values: dict) -> None:
    """The command's last line: its result as JSON (tagged as an event with --progress-json)."""
    _print_json({"event": "result", **values} if args.progress_json else values)


@contextmanager
def _interruptible(stop_file: str | None = None) -> Iterator[Callable[[], bool]]:
    """A cancel callback for training: the first Ctrl-C, or `stop_file` appearing (how a program that
    started the command asks it to stop, on any platform and without a console), finishes the
    iteration, checkpoints and stops (resumable); a second Ctrl-C aborts."""
    interrupted: list[int] = []

    def on_interrupt(signum, frame) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\nstopping after this iteration (checkpoint kept; Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(interrupted) or (stop_file is not None and os.path.exists(stop_file))
    finally:
        signal.signal(signal.SIGINT, previous)


def _minutes_to_seconds(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60.0


def _refuse_a_trained_run(out: Path, args: argparse.Namespace) -> None:
    """A new run would replace the model and checkpoint of one already in `out` (hours of work)."""
    if args.resume or args.overwrite:
        return
    from .train import BEST_MODEL, CHECKPOINT

    found = [name for name in (BEST_MODEL, CHECKPOINT) if (out / name).is_file()]
    if found:
        raise DataError(
            f"{out} holds a trained run ({', '.join(found)}); nothing was written: give --resume to continue "
            "it, --overwrite to train anew there, or another output folder"
        )


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    if (args.config is None) == (args.dataset is None):
        raise UsageError("give either a configuration file or --dataset SPEC --out DIR")
    if args.config is not None:
        config = load_config(args.config)
        _refuse_a_trained_run(Path(config.output_dir), args)
    else:
        from .autoconfig import config_for_dataset
        from .inference import resolve_device

        if args.out is None:
            raise UsageError("--dataset needs --out DIR")
        _refuse_a_trained_run(Path(args.out), args)
        derived = Path(args.out) / "config.toml"
        if args.resume:
            # The configuration the run began with: deriving it again (from a speed measured anew)
            # would change its iterations and schedule under the checkpoint.
            if not derived.is_file():
                raise UsageError(f"{derived}: no configuration to resume (the run has not started in {args.out})")
            config = load_config(derived)
        else:
            config = config_for_dataset(
                args.dataset, args.out, args.minutes, resolve_device(args.device).type == "cuda"
            )
            print(
                f"configuration derived from the dataset: {derived} (edit it and rerun `scn-landmarks train` "
                "on it, with --overwrite to replace this run)",
                file=sys.stderr,
            )
    with _interruptible(args.stop_file) as cancel:
        result = train(
            config,
            resume=args.resume,
            device=args.device,
            progress=_progress(args),
            cancel=cancel,
            time_budget_s=_minutes_to_seconds(args.minutes),
        )
    _result(
        args,
        {
            "model": str(result.model_path),
            "iterations": result.iterations,
            "best_validation_mean_error": result.best_validation_error,
        },
    )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    with _interruptible(args.stop_file) as cancel:
        result = finetune(
            args.base_model,
            args.dataset,
            args.out,
            minutes=args.minutes,
            iterations=args.iterations,
            device=args.device,
            progress=_progress(args),
            cancel=cancel,
            overwrite=args.overwrite,
        )
    if result.cancelled:
        print("cancelled: the best model up to then is compared with the base", file=sys.stderr)
    print(result.verdict(), file=sys.stderr)
    _result(args, result.summary())
    return 0


def _detect(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import SimpleITK as sitk

    from .batch import BatchRequest, batch_images, check_outputs
    from .io.images import read_image

    images = batch_images(args.images, args.spacing)
    request = BatchRequest(Path(args.out), LANDMARK_FORMATS[args.format], args.heatmaps)
    if args.cluster is not None:
        return _detect_on_cluster(args, images, request)
    if args.skip_existing:
        raise UsageError("--skip-existing resumes a --cluster run (from its cohort table); use --cluster local:1")
    check_outputs(images, request, args.overwrite)
    # Importing torch (below) keeps one core busy for about a second: the first image is read on
    # another meanwhile (SimpleITK needs no torch and releases the GIL while it reads).
    reader = ThreadPoolExecutor(max_workers=1)
    first_image = reader.submit(read_image, images[0].path, None, images[0].spacing)
    reader.shutdown(wait=False)
    by_path = {image.path: image for image in images}

    def read(path: Path, dimension: int) -> sitk.Image:
        # The first image as read ahead; the model's dimension is its description's.
        return by_path[path].read(predictor.description, first_image.result() if path == images[0].path else None)

    from .batch import ImageOutcome, write_outputs, write_summary
    from .inference import Predictor

    predictor = Predictor.from_file(args.model, args.device, args.precision)
    _refuse_spacing_for_pixel_model(args, predictor.description)
    _say_calibration(predictor.calibration)
    request.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    started = time.perf_counter()
    results = predictor.predict_files([image.path for image in images], heatmaps=args.heatmaps, read=read)
    for number, (image, (_, prediction)) in enumerate(zip(images, results), start=1):
        if isinstance(prediction, SCNLandmarksError):
            outcome = ImageOutcome(image, error=str(prediction))
        else:
            outcome = write_outputs(image, prediction, request)
        outcomes.append(outcome)
        print(f"[{number}/{len(images)}] {outcome.describe(request)}", file=sys.stderr)
    summary = write_summary(request, outcomes)
    failed = sum(1 for outcome in outcomes if outcome.error)
    print(
        f"{len(images) - failed} of {len(images)} images in {time.perf_counter() - started:.2f} s; "
        f"review order in {summary}",
        file=sys.stderr,
    )
    return 2 if failed else 0


class CohortProgressBar:
    """A cluster run's progress: images done, images per minute and the ETA, on one line on a terminal,
    periodic lines otherwise; an image that failed gets its own line."""

    def __init__(self, request, stream=sys.stderr, every_s: float = 10.0):
        self.request = request
        self.stream = stream
        self.interactive = stream.isatty()
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = -math.inf
        self.failed = 0

    def __call__(self, outcome, done: int, total: int) -> None:
        now = time.monotonic()
        if outcome.error:
            self.failed += 1
            self.stream.write(("\r" if self.interactive else "") + f"{outcome.describe(self.request)}\n")
        per_minute = done / max(now - self.started, 1e-9) * 60.0
        width = 30
        filled = int(width * done / total)
        line = (
            f"detect [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images"
            f"{f', {self.failed} failed' if self.failed else ''}, {per_minute:.1f} images/min, "
            f"ETA {_format_seconds((total - done) / per_minute * 60.0)}"
        )
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
        elif done == total or now - self.last >= self.every_s:
            self.stream.write(line + "\n")
            self.last = now
        self.stream.flush()


def _say_calibration(calibration) -> None:
    """Tell what a model's points will lack: an uncalibrated model has no expected errors, a model
    calibrated before coverage radii existed no radius."""
    if calibration is None:
        print("the model is not calibrated: no expected errors", file=sys.stderr)
    elif calibration.radius_factors is None:
        print(
            "the model's calibration predates coverage radii: no coverage radius (scn-landmarks calibrate "
            "... --coverage-only adds one)",
            file=sys.stderr,
        )


def _refuse_spacing_for_pixel_model(args: argparse.Namespace, model: ModelDescription) -> None:
    # A model in pixels measures pictures in pixels: a stated spacing would rescale them under it.
    if args.spacing is not None and model.in_pixels:
        raise UsageError(
            f"{args.model} works in pixels (trained on pictures without spacing): detect without --spacing"
        )


def _detect_on_cluster(args: argparse.Namespace, images, request) -> int:
    from .bundle import read_description
    from .cluster import import_distributed, run_cohort

    # Dask's own news (workers starting, connections) is for debugging; its warnings still show. Set
    # after Dask's import, which sets up its logging.
    import_distributed()
    logging.getLogger("distributed").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    description = read_description(args.model)
    _refuse_spacing_for_pixel_model(args, description)
    _say_calibration(description.calibration)
    started = time.perf_counter()
    result = run_cohort(
        args.cluster,
        args.model,
        images,
        request,
        args.device,
        args.precision,
        args.overwrite,
        args.skip_existing,
        CohortProgressBar(request),
    )
    skipped = f" ({result.skipped} done before)" if result.skipped else ""
    print(
        f"{len(images) - result.failed} of {len(images)} images{skipped} in {time.perf_counter() - started:.2f} s "
        f"on {result.workers} worker{'s' if result.workers != 1 else ''}; review order in {result.summary}, "
        f"all points in {' and '.join(map(str, result.tables))}",
        file=sys.stderr,
    )
    return 2 if result.failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_model
    from .io.paths import refuse_existing

    # The report's own files: an earlier evaluation in the same folder is kept unless asked.
    refuse_existing([Path(args.out) / "metrics.json", Path(args.out) / "report.md"], args.overwrite)

    def progress(done: int, total: int, image_id: str) -> None:
        print(f"[{done}/{total}] {image_id}", file=sys.stderr)

    metrics_path = evaluate_model(
        args.model,
        args.dataset,
        args.split,
        Path(args.out),
        device=args.device,
        precision=args.precision,
        radii=tuple(args.radii) if args.radii else None,
        progress=progress,
    )
    overall = json.loads(metrics_path.read_text())["overall"]
    print(
        json.dumps({"metrics": str(metrics_path), "report": str(metrics_path.parent / "report.md"), "overall": overall})
    )
    return 0


def _dataset_check(args: argparse.Namespace) -> int:
    from .data.check import check_dataset

    def progress(done: int, total: int, image_id: str) -> None:
        if not args.json and (done == total or done % 25 == 0):
            print(f"[{done}/{total}] read {image_id}", file=sys.stderr)

    findings = check_dataset(args.spec, progress=progress)
    if args.json:
        print(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        for finding in findings:
            print(f"{finding.kind}: {finding}")
        print(f"{len(findings)} finding(s) in {args.spec}", file=sys.stderr)
    return 1 if findings else 0


def _calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from .bundle import save_description
    from .calibration import (
        add_coverage,
        calibrate,
        calibration_report,
        dataset_cases,
        default_thresholds,
        measure,
    )
    from .inference import Predictor
    from .io.paths import refuse_existing

    if not 0.0 < args.coverage < 1.0:
        raise UsageError(f"--coverage is a probability between 0 and 1, not {args.coverage}")
    out = Path(args.out)
    refuse_existing([out], args.overwrite)
    predictor = Predictor.from_file(args.model, args.device, args.precision)
    kept = predictor.calibration
    if args.coverage_only and kept is None:
        raise UsageError(f"{args.model} is not calibrated: --coverage-only adds a radius to a model's calibration")
    total, cases = dataset_cases(predictor, args.dataset, args.split)
    measured = measure(predictor, cases, lambda done, image_id: print(f"[{done}/{total}] {image_id}", file=sys.stderr))
    source = f"{args.dataset} split {args.split}"
    if args.coverage_only and kept is not None:
        calibration = add_coverage(kept, measured, args.coverage, args.folds, source)
        report = {"model": str(out), "coverage": calibration.fitted_on["coverage"]}
    else:
        thresholds = default_thresholds(predictor.description.unit, args.flag_above)
        calibration, comparison = calibrate(
            predictor, measured, tuple(args.evidence), thresholds, args.folds, source, args.coverage
        )
        report = calibration_report(out, calibration, comparison)
    save_description(args.model, out, dataclasses.replace(predictor.description, calibration=calibration))
    print(json.dumps(report, indent=1))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .bundle import read_description

    print(json.dumps(read_description(args.model).to_json(), indent=2))
    return 0


def _dataset_init(args: argparse.Namespace) -> int:
    from .data.dataset_init import init_dataset, read_names_file

    names = read_names_file(args.names) if args.names else None
    summary = init_dataset(
        args.images, args.landmarks, args.out, args.format, names, args.csv_coordinates, args.overwrite, args.spacing
    )
    print("\n".join(summary.lines()))
    return 0


def _dataset_merge(args: argparse.Namespace) -> int:
    from .data.dataset_init import merge_datasets

    merged = merge_datasets(args.specs, args.out, args.labels, args.overwrite)
    splits = sorted({entry.split or "(none)" for entry in merged.entries})
    print(
        f"wrote {merged.path}: {len(merged.entries)} images (splits: {', '.join(splits)}), "
        f"landmarks in {merged.landmarks_csv}"
    )
    return 0


PROGRESS_JSON_HELP = (
    'print progress as JSON lines on stdout ({"event": "progress", ...}; the last line '
    '{"event": "result", ...}), for programs that run training'
)


STOP_FILE_HELP = "stop cleanly, as on Ctrl-C, when this file appears (for programs that run training)"


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    _add_device_option(parser)
    parser.add_argument(
        "--precision",
        default=Precision.AUTO,
        choices=tuple(Precision),
        help="what the networks compute in; auto: bfloat16 on CPUs that multiply it in hardware, else float32",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scn-landmarks", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a configuration TOML, or from a dataset alone")
    train.add_argument("config", nargs="?", help="training configuration (.toml)")
    train.add_argument(
        "--dataset",
        help="instead of a configuration: a dataset spec or training folder; the "
        "configuration is derived from its images and written to DIR/config.toml",
    )
    train.add_argument("--out", help="output folder (with --dataset)")
    train.add_argument("--minutes", type=float, help="wall-clock budget; training then ends with the best model so far")
    train.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="train anew in an output folder that holds a trained run"
    )
    _add_device_option(train)
    train.add_argument("--progress-json", action="store_true", help=PROGRESS_JSON_HELP)
    train.add_argument("--stop-file", help=STOP_FILE_HELP)
    train.set_defaults(run=_train)

    finetune = commands.add_parser("finetune", help="fine-tune a model on corrected cases (nothing to configure)")
    finetune.add_argument("base_model", help="the model to start from (.safetensors)")
    finetune.add_argument("dataset", help="dataset spec (.toml) or a training folder ('Save as training pair')")
    finetune.add_argument("--out", required=True, help="output folder: model.safetensors, MODEL_CARD.md, training/")
    finetune.add_argument("--minutes", type=float, help="wall-clock budget; training then ends with the best model")
    finetune.add_argument("--iterations", type=int, help="iterations per stage (default: derived from the base)")
    _add_device_option(finetune)
    finetune.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    finetune.add_argument("--progress-json", action="store_true", help=PROGRESS_JSON_HELP)
    finetune.add_argument("--stop-file", help=STOP_FILE_HELP)
    finetune.set_defaults(run=_finetune)

    detect = commands.add_parser("detect", help="detect landmarks on images")
    detect.add_argument("model", help="model file (.safetensors)")
    detect.add_argument("images", nargs="+", help="image files or folders (of images, or one DICOM series)")
    detect.add_argument("--out", required=True, help="output folder (one landmark file per image)")
    detect.add_argument("--format", default="mrk.json", choices=tuple(LANDMARK_FORMATS))
    detect.add_argument("--heatmaps", action="store_true", help="also write heatmaps (.nrrd, input geometry)")
    detect.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    detect.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="detect on a Dask cluster: tcp://HOST:8786 (a running scheduler) or local:N (N worker processes "
        "here); also writes the cohort table (needs pip install 'scn-landmarks[cluster]')",
    )
    detect.add_argument(
        "--skip-existing",
        action="store_true",
        help="with --cluster: resume an interrupted run, keeping the images whose files are all written",
    )
    detect.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="mm per pixel (x y [z]) of the pictures (PNG, JPEG, BMP, TIFF), which carry no spacing: their "
        "positions are then in mm (needed for models trained in mm); other files keep their own",
    )
    _add_inference_options(detect)
    detect.set_defaults(run=_detect)

    evaluate = commands.add_parser("evaluate", help="evaluate a model on a dataset split")
    evaluate.add_argument("model")
    evaluate.add_argument("--dataset", required=True, help="dataset spec (.toml)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--out", required=True, help="output folder for metrics.json and report.md")
    evaluate.add_argument("--radii", type=float, nargs="+", help="success-detection radii (model unit)")
    _add_inference_options(evaluate)
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    evaluate.set_defaults(run=_evaluate)

    dataset = commands.add_parser("dataset", help="build and check dataset specs")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    check = dataset_commands.add_parser(
        "check",
        help="find duplicate images, points outside images, misplaced or swapped labels, "
        "inconsistent spacing (exit status 1 when anything is found)",
    )
    check.add_argument("spec", help="dataset spec (.toml)")
    check.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    check.set_defaults(run=_dataset_check)

    init = dataset_commands.add_parser("init", help="write a dataset spec pairing images with landmark files by stem")
    init.add_argument("--images", required=True, help="folder of images")
    init.add_argument(
        "--landmarks", required=True, help="folder of per-image landmark files, or one table (.csv) for all images"
    )
    # No argparse choices: the format names live with the readers, which are too heavy to import here.
    init.add_argument(
        "--format",
        default="auto",
        help="auto (from suffix and content), mrk.json, fcsv, csv, labelme, isbi or wide-csv",
    )
    init.add_argument(
        "--names", help="text file of landmark names, one a line, in model order (default: the names in the files)"
    )
    init.add_argument(
        "--csv-coordinates",
        choices=("index", "physical"),
        help="a table's coordinates (default: index for wide-csv, physical for csv)",
    )
    init.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="mm per pixel (x y [z]) of the pictures (PNG, JPEG, BMP, TIFF), written as the spec's spacing: "
        "their positions and pixel-coordinate landmarks are then in mm",
    )
    init.add_argument("--out", required=True, help="dataset spec to write (.toml)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    init.set_defaults(run=_dataset_init)

    merge = dataset_commands.add_parser(
        "merge", help="write one dataset spec holding the images of several (e.g. one per X-ray device)"
    )
    merge.add_argument("specs", nargs="+", help="dataset specs (.toml) to merge")
    merge.add_argument("--labels", nargs="+", help="prefix of each source's ids (default: each spec's folder name)")
    merge.add_argument("--out", required=True, help="dataset spec to write (.toml); its landmark table goes beside it")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out and its table")
    merge.set_defaults(run=_dataset_merge)

    calibrate = commands.add_parser(
        "calibrate", help="fit a model's expected error per landmark on a dataset split and write the model with it"
    )
    calibrate.add_argument("model")
    calibrate.add_argument("dataset", help="dataset spec (.toml)")
    calibrate.add_argument("--split", default="validation")
    calibrate.add_argument("--out", required=True, help="calibrated model file to write")
    calibrate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    calibrate.add_argument(
        "--evidence",
        nargs="+",
        default=["peak", "width", "refinement_shift"],
        help="evidence measures to use: peak, width, refinement_shift, shift_spread (costs "
        "two more network passes per detection), view_spread (models with several refinement views)",
    )
    calibrate.add_argument(
        "--flag-above",
        type=float,
        nargs="+",
        help="error thresholds (model unit) whose flagging AUROC is reported; default 3 mm",
    )
    calibrate.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds (by image) for the held-out figures"
    )
    calibrate.add_argument(
        "--coverage",
        type=float,
        default=0.9,
        help="probability that a point's coverage radius holds the true point (default 0.9; per landmark, "
        "it needs at least 9 images for 0.9)",
    )
    calibrate.add_argument(
        "--coverage-only",
        action="store_true",
        help="fit only the coverage radius, keeping the model's expected errors (e.g. fitted on fold models' "
        "images, or on other data)",
    )
    _add_inference_options(calibrate)
    calibrate.set_defaults(run=_calibrate)

    info = commands.add_parser("info", help="print a model file's metadata")
    info.add_argument("model")
    info.set_defaults(run=_info)

    # Installed front-ends (e.g. `serve` from the Slicer module's web app) add their own commands.
    for entry in importlib.metadata.entry_points(group="scn_landmarks.commands"):
        try:
            entry.load()(commands)
        except (ImportError, AttributeError) as error:  # a plugin of another installed version
            log.debug("command plugin %s not available: %s", entry.name, error)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except Cancelled as cancelled:
        print(f"cancelled: {cancelled}", file=sys.stderr)
        return 130
    except (SCNLandmarksError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

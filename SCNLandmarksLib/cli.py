"""Command line: `scn-landmarks train | finetune | detect | evaluate | info | demo`.

Thin: parses arguments, calls the library, shows progress, turns user-facing errors into one
clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Cancelled, SCNLandmarksError
from .vocabulary import LandmarkStatus

log = logging.getLogger("scn-landmarks")

class UsageError(Exception):
    """Command-line arguments that do not go together."""


LANDMARK_FORMATS = {"mrk.json": ".mrk.json", "fcsv": ".fcsv", "csv": ".csv"}


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
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
        line = (f"{info['stage']} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {info['loss']:.4f} "
                f"sigma {info['mean_sigma']:.2f} ETA {_format_seconds(info['eta_s'])}")
        validation = info.get("validation")
        if validation:
            line += (f" | validation mean {validation['mean_error']:.2f} median {validation['median_error']:.2f}"
                     f" missed {int(validation['missed'])}")
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if validation or done == total else ""))
            self.stream.flush()
        elif validation or done == total or now - self.last >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """A cancel callback for training: the first Ctrl-C finishes the iteration, checkpoints and
    stops (resumable); a second one aborts."""
    interrupted = []

    def on_interrupt(signum, frame) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\nstopping after this iteration (checkpoint kept; Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)


def _minutes_to_seconds(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60.0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    if (args.config is None) == (args.dataset is None):
        raise UsageError("give either a configuration file or --dataset SPEC --out DIR")
    if args.config is not None:
        config = load_config(args.config)
    else:
        from .autoconfig import config_for_dataset
        from .inference import resolve_device

        if args.out is None:
            raise UsageError("--dataset needs --out DIR")
        config = config_for_dataset(args.dataset, args.out, args.minutes, resolve_device(args.device).type == "cuda")
        print(f"configuration derived from the dataset: {Path(config.output_dir) / 'config.toml'} "
              "(edit it and rerun with `scn-landmarks train` on it)", file=sys.stderr)
    with _interruptible() as cancel:
        result = train(config, resume=args.resume, device=args.device, progress=TrainingProgress(), cancel=cancel,
                       time_budget_s=_minutes_to_seconds(args.minutes))
    print(json.dumps({"model": str(result.model_path), "iterations": result.iterations,
                      "best_validation_mean_error": result.best_validation_error}))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    with _interruptible() as cancel:
        result = finetune(args.base_model, args.dataset, args.out, minutes=args.minutes, iterations=args.iterations,
                          device=args.device, progress=TrainingProgress(), cancel=cancel)
    unit = result.unit
    if result.outcome == "kept base":
        print(f"the new model is not better on the {len(result.held_aside)} held-aside cases "
              f"({result.new.mean_error:.2f} {unit} against the base's {result.base.mean_error:.2f} {unit}): "
              f"keeping the base model as {result.model_path}", file=sys.stderr)
    elif result.outcome == "improved":
        print(f"the new model is better on the {len(result.held_aside)} held-aside cases "
              f"({result.new.mean_error:.2f} {unit} against the base's {result.base.mean_error:.2f} {unit}): "
              f"{result.model_path}", file=sys.stderr)
    elif result.outcome == "not validated":
        print(f"not validated: fewer than 5 cases, all used for training: {result.model_path}", file=sys.stderr)
    else:
        print(f"new landmarks: the base cannot be compared on them: {result.model_path}", file=sys.stderr)
    print(json.dumps(result.summary()))
    return 0


def _detect(args: argparse.Namespace) -> int:
    from .inference import Predictor
    from .io.images import image_inputs, write_image
    from .io.landmarks import write_landmarks

    predictor = Predictor.from_file(args.model, args.device)
    images = image_inputs(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = LANDMARK_FORMATS[args.format]
    failed = 0
    started = time.perf_counter()
    results = predictor.predict_files(images, heatmaps=args.heatmaps)
    for number, (image_path, prediction) in enumerate(results, start=1):
        if isinstance(prediction, SCNLandmarksError):
            failed += 1
            print(f"[{number}/{len(images)}] error: {prediction}", file=sys.stderr)
            continue
        stem = image_path.name.split(".")[0]
        target = out / f"{stem}{suffix}"
        write_landmarks(prediction.landmarks, target, prediction.status)
        for kind in prediction.heatmap_kinds:
            write_image(prediction.heatmap(kind), out / f"{stem}_heatmap_{kind}.nrrd")
        found = sum(s != LandmarkStatus.MISSING for s in prediction.status)
        mirrored = " (found on the mirror image)" if prediction.mirrored else ""
        print(f"[{number}/{len(images)}] {image_path}: {found}/{len(prediction.status)} landmarks{mirrored} "
              f"-> {target}", file=sys.stderr)
    print(f"{len(images) - failed} of {len(images)} images in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return 2 if failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_model

    def progress(done: int, total: int, image_id: str) -> None:
        print(f"[{done}/{total}] {image_id}", file=sys.stderr)

    metrics_path = evaluate_model(args.model, args.dataset, args.split, Path(args.out), device=args.device,
                                  radii=tuple(args.radii) if args.radii else None, progress=progress)
    overall = json.loads(metrics_path.read_text())["overall"]
    print(json.dumps({"metrics": str(metrics_path), "report": str(metrics_path.parent / "report.md"),
                      "overall": overall}))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .bundle import read_description

    print(json.dumps(read_description(args.model).to_json(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scn-landmarks", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a configuration TOML, or from a dataset alone")
    train.add_argument("config", nargs="?", help="training configuration (.toml)")
    train.add_argument("--dataset", help="instead of a configuration: a dataset spec or training folder; the "
                       "configuration is derived from its images and written to DIR/config.toml")
    train.add_argument("--out", help="output folder (with --dataset)")
    train.add_argument("--minutes", type=float, help="wall-clock budget; training then ends with the best model so far")
    train.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.set_defaults(run=_train)

    finetune = commands.add_parser("finetune", help="fine-tune a model on corrected cases (nothing to configure)")
    finetune.add_argument("base_model", help="the model to start from (.safetensors)")
    finetune.add_argument("dataset", help="dataset spec (.toml) or a training folder ('Save as training pair')")
    finetune.add_argument("--out", required=True, help="output folder: model.safetensors, MODEL_CARD.md, training/")
    finetune.add_argument("--minutes", type=float, help="wall-clock budget; training then ends with the best model")
    finetune.add_argument("--iterations", type=int, help="iterations per stage (default: derived from the base)")
    finetune.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    finetune.set_defaults(run=_finetune)

    detect = commands.add_parser("detect", help="detect landmarks on images")
    detect.add_argument("model", help="model file (.safetensors)")
    detect.add_argument("images", nargs="+", help="image files or folders (of images, or one DICOM series)")
    detect.add_argument("--out", required=True, help="output folder (one landmark file per image)")
    detect.add_argument("--format", default="mrk.json", choices=tuple(LANDMARK_FORMATS))
    detect.add_argument("--heatmaps", action="store_true", help="also write heatmaps (.nrrd, input geometry)")
    detect.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    detect.set_defaults(run=_detect)

    evaluate = commands.add_parser("evaluate", help="evaluate a model on a dataset split")
    evaluate.add_argument("model")
    evaluate.add_argument("--dataset", required=True, help="dataset spec (.toml)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--out", required=True, help="output folder for metrics.json and report.md")
    evaluate.add_argument("--radii", type=float, nargs="+", help="success-detection radii (model unit)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.set_defaults(run=_evaluate)

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

"""Landmark localisation metrics (point error, success detection rates, outliers) and reports.

Conventions:
  * The point error of a landmark is the Euclidean distance between prediction and truth, in the
    unit of the points (physical mm for LandmarkSets, or pixels when the caller passes pixel
    coordinates and unit="px").
  * Only landmarks whose truth is present are evaluated. A present truth whose prediction is
    missing (NaN) is "missed": it has no error, but it counts in the SDR denominators and fails
    every radius. A missing truth is excluded altogether.
  * SDR at radius r = (#errors <= r) / (#detected + #missed), a fraction in [0, 1].
  * Outliers = detected landmarks with error > outlier_radius (missed ones are counted separately).
  * sd is the population standard deviation (numpy's default, ddof=0).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import InferenceConfig
from .errors import DataError
from .io.atomic import safe_filename, write_text_atomically
from .landmark_set import LandmarkSet

DEFAULT_RADII_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
WORST_IMAGES_SHOWN = 10


@dataclass
class Statistics:
    """Error statistics over a group of evaluated landmarks (one landmark, or all).

    count: detected landmarks (truth and prediction present); missed: truth present, prediction
    missing; mean/sd/median/max over the detected errors (NaN when count == 0); sdr: radius ->
    fraction of the count + missed landmarks within the radius (NaN when there are none);
    outliers: detected errors > the outlier radius.
    """

    count: int
    missed: int
    mean: float
    sd: float
    median: float
    max: float
    sdr: dict[float, float]
    outliers: int

    @property
    def total(self) -> int:
        return self.count + self.missed

    @classmethod
    def of(cls, errors: np.ndarray, missed: int, radii: tuple[float, ...], outlier_radius: float) -> Statistics:
        e = np.asarray(errors, dtype=np.float64).ravel()
        e = e[np.isfinite(e)]
        total = e.size + int(missed)
        nan = float("nan")
        return cls(
            count=int(e.size),
            missed=int(missed),
            mean=float(e.mean()) if e.size else nan,
            sd=float(e.std()) if e.size else nan,
            median=float(np.median(e)) if e.size else nan,
            max=float(e.max()) if e.size else nan,
            sdr={float(r): (float(np.count_nonzero(e <= r)) / total if total else nan) for r in radii},
            outliers=int(np.count_nonzero(e > outlier_radius)),
        )

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "missed": self.missed,
            "mean": self.mean,
            "sd": self.sd,
            "median": self.median,
            "max": self.max,
            "sdr": {_radius_key(r): v for r, v in self.sdr.items()},
            "outliers": self.outliers,
        }


@dataclass
class ImageRow:
    """One image of the per-image table: errors by landmark name (NaN = not evaluated or missed)."""

    image_id: str
    count: int
    missed: list[str]
    mean: float
    max: float
    errors: dict[str, float]

    def to_json(self) -> dict:
        return {
            "image": self.image_id,
            "count": self.count,
            "missed": list(self.missed),
            "mean": self.mean,
            "max": self.max,
            "errors": dict(self.errors),
        }


@dataclass
class EvaluationResult:
    """Metrics of a set of predictions against ground truth.

    errors: (n_images, n_landmarks) point errors, NaN where not evaluated or missed;
    missed: (n_images, n_landmarks) bool, truth present but prediction missing.
    """

    unit: str
    radii: tuple[float, ...]
    outlier_radius: float
    landmark_names: list[str]
    image_ids: list[str]
    errors: np.ndarray
    missed: np.ndarray
    overall: Statistics
    per_landmark: dict[str, Statistics]
    per_image: list[ImageRow]
    images_without_prediction: list[str] = field(default_factory=list)
    images_without_truth: list[str] = field(default_factory=list)
    # Other ways of running the same model on the same images, e.g. coarse-to-fine against the coarse
    # SCN alone: {"mode", "mean", "median", "max", "missed", "sdr", "seconds_per_image"} rows.
    inference_modes: list[dict] = field(default_factory=list)
    # A calibrated model's expected errors against the measured ones (calibration.flagging_scores,
    # with "per_landmark" means and the (images, N) "expected" matrix); {} when not calibrated.
    expected_error: dict = field(default_factory=dict)

    def worst_images(self, n: int = WORST_IMAGES_SHOWN) -> list[ImageRow]:
        """The n worst images: most missed landmarks first, then highest mean error (no detections first)."""

        def key(row: ImageRow):
            mean = math.inf if not np.isfinite(row.mean) else row.mean
            return (-len(row.missed), -mean)

        return sorted(self.per_image, key=key)[:n]

    def to_json(self) -> dict:
        """A JSON-serialisable dict; NaN values become None (null)."""
        return _nan_to_none(
            {
                "unit": self.unit,
                "radii": list(self.radii),
                "outlier_radius": self.outlier_radius,
                "landmark_names": list(self.landmark_names),
                "overall": self.overall.to_json(),
                "per_landmark": {n: self.per_landmark[n].to_json() for n in self.landmark_names},
                "per_image": [row.to_json() for row in self.per_image],
                "images_without_prediction": list(self.images_without_prediction),
                "images_without_truth": list(self.images_without_truth),
                "inference_modes": list(self.inference_modes),
                "expected_error": self.expected_error,
            }
        )

    @classmethod
    def from_json(cls, data: dict) -> EvaluationResult:
        """Rebuild a result from `to_json()` output (statistics are recomputed from the errors)."""
        names = list(data["landmark_names"])
        rows = data["per_image"]
        errors = np.full((len(rows), len(names)), np.nan)
        missed = np.zeros((len(rows), len(names)), dtype=bool)
        for i, row in enumerate(rows):
            for j, n in enumerate(names):
                v = row["errors"].get(n)
                errors[i, j] = np.nan if v is None else float(v)
                missed[i, j] = n in row["missed"]
        result = _build(
            data["unit"],
            tuple(float(r) for r in data["radii"]),
            float(data["outlier_radius"]),
            names,
            [row["image"] for row in rows],
            errors,
            missed,
            list(data.get("images_without_prediction", [])),
            list(data.get("images_without_truth", [])),
        )
        result.inference_modes = list(data.get("inference_modes", []))
        result.expected_error = dict(data.get("expected_error") or {})
        return result

    def mode_row(self, mode: str, seconds_per_image: float) -> dict:
        """This result's summary as an `inference_modes` row."""
        o = self.overall
        return {
            "mode": mode,
            "mean": o.mean,
            "median": o.median,
            "max": o.max,
            "missed": o.missed,
            "sdr": {_radius_key(r): v for r, v in o.sdr.items()},
            "seconds_per_image": seconds_per_image,
        }


def evaluate(
    predictions: dict[str, LandmarkSet],
    truths: dict[str, LandmarkSet],
    unit: str = "mm",
    radii: tuple[float, ...] | None = None,
    outlier_radius: float | None = None,
) -> EvaluationResult:
    """Compare predicted with true landmarks, image by image and name by name.

    Args:
        predictions: image id -> predicted landmarks.
        truths: image id -> ground truth. Every image with a truth is evaluated, in this dict's
            order; one without a prediction has all its present landmarks missed (and is listed in
            `images_without_prediction`). Predictions without a truth are ignored (listed in
            `images_without_truth`).
        unit: "mm" or "px" (a label: the points must already be in that unit).
        radii: SDR radii; default (2, 2.5, 3, 4) for "mm"; required for "px".
        outlier_radius: errors above it are outliers; default the largest radius.

    Raises:
        DataError: a prediction holds a landmark name no truth has, dimensions differ, or no
            image is common to both dicts.
        ValueError: bad unit or radii.
    """
    if unit not in ("mm", "px"):
        raise ValueError(f"unit must be 'mm' or 'px', got {unit!r}")
    if radii is None:
        if unit == "px":
            raise ValueError("radii must be given for unit='px' (the default radii are in mm)")
        radii = DEFAULT_RADII_MM
    radii = tuple(sorted(float(r) for r in radii))
    if not radii or any(not np.isfinite(r) or r <= 0 for r in radii):
        raise ValueError(f"radii must be positive and finite, got {radii}")
    outlier_radius = radii[-1] if outlier_radius is None else float(outlier_radius)
    if not truths:
        raise DataError("no ground truth to evaluate against")
    if predictions and not set(predictions) & set(truths):
        raise DataError(
            f"no image id is common to predictions ({sorted(predictions)[:5]}...) and truths ({sorted(truths)[:5]}...)"
        )

    names: list[str] = []
    for t in truths.values():
        names.extend(n for n in t.names if n not in names)
    dims = {t.dimension for t in truths.values()} | {p.dimension for p in predictions.values()}
    if len(dims) > 1:
        raise DataError(f"landmark sets mix dimensions {sorted(dims)}")

    image_ids = [str(k) for k in truths]
    errors = np.full((len(image_ids), len(names)), np.nan)
    missed = np.zeros((len(image_ids), len(names)), dtype=bool)
    for i, image_id in enumerate(truths):
        truth = truths[image_id].reordered(names)
        if image_id in predictions:
            unknown = [n for n in predictions[image_id].names if n not in names]
            if unknown:
                raise DataError(
                    f"image {image_id!r}: predicted landmarks {unknown} are not in the ground truth names {names}"
                )
            pred = predictions[image_id].reordered(names)
        else:
            pred = LandmarkSet(names, np.full_like(truth.points_lps, np.nan))
        evaluated = truth.present
        detected = evaluated & pred.present
        errors[i, detected] = np.linalg.norm(pred.points_lps[detected] - truth.points_lps[detected], axis=1)
        missed[i] = evaluated & ~pred.present
    return _build(
        unit,
        radii,
        outlier_radius,
        names,
        image_ids,
        errors,
        missed,
        [str(k) for k in truths if k not in predictions],
        [str(k) for k in predictions if k not in truths],
    )


def _build(
    unit, radii, outlier_radius, names, image_ids, errors, missed, without_prediction, without_truth
) -> EvaluationResult:
    per_landmark = {
        n: Statistics.of(errors[:, j], int(missed[:, j].sum()), radii, outlier_radius) for j, n in enumerate(names)
    }
    overall = Statistics.of(errors, int(missed.sum()), radii, outlier_radius)
    rows = []
    for i, image_id in enumerate(image_ids):
        e = errors[i][np.isfinite(errors[i])]
        rows.append(
            ImageRow(
                image_id,
                int(e.size),
                [n for j, n in enumerate(names) if missed[i, j]],
                float(e.mean()) if e.size else float("nan"),
                float(e.max()) if e.size else float("nan"),
                {n: float(errors[i, j]) for j, n in enumerate(names)},
            )
        )
    return EvaluationResult(
        unit,
        tuple(radii),
        float(outlier_radius),
        list(names),
        list(image_ids),
        errors,
        missed,
        overall,
        per_landmark,
        rows,
        list(without_prediction),
        list(without_truth),
    )


# --- JSON --------------------------------------------------------------------------------------


def _radius_key(r: float) -> str:
    return f"{r:g}"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def write_metrics(result: EvaluationResult, path: str | Path) -> Path:
    """Write `result.to_json()` atomically; `path` is the file, or a folder to hold metrics.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    write_text_atomically(path, json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    return path


# --- Markdown report ----------------------------------------------------------------------------


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100.0 * v:.1f}%"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def write_plots(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    """Box plot of errors per landmark and the cumulative error curve as PNGs.

    Returns [] without writing anything if matplotlib is not importable (as inside Slicer).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = result.landmark_names

    # Not pyplot: no global backend state is touched.
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    data = [result.errors[:, j][np.isfinite(result.errors[:, j])] for j in range(len(names))]
    positions = [j + 1 for j, d in enumerate(data) if d.size]
    if positions:
        ax.boxplot([d for d in data if d.size], positions=positions, widths=0.6, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(0.3, len(names) + 0.7)
    ax.set_ylabel(f"point error ({result.unit})")
    ax.set_title("Point error per landmark")
    for r in result.radii:
        ax.axhline(r, color="0.7", lw=0.8, ls="--")
    fig.tight_layout()
    paths.append(out_dir / "errors_per_landmark.png")
    fig.savefig(paths[-1], dpi=100)

    fig = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    e = np.sort(result.errors[np.isfinite(result.errors)])
    total = result.overall.total
    if total:
        upper = max(float(e.max()) if e.size else 0.0, result.radii[-1]) * 1.05
        x = np.concatenate([[0.0], e, [upper]])
        y = np.concatenate([[0.0], np.arange(1, e.size + 1) / total, [e.size / total]]) * 100.0
        ax.step(x, y, where="post")
        ax.set_xlim(0.0, upper)
    for r in result.radii:
        ax.axvline(r, color="0.7", lw=0.8, ls="--")
    ax.set_ylim(0.0, 100.0)
    ax.set_xlabel(f"radius ({result.unit})")
    ax.set_ylabel("landmarks within radius (%)")
    ax.set_title("Cumulative error distribution (missed count as failures)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "cumulative_error.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


def write_report(
    result: EvaluationResult,
    out_dir: str | Path,
    overlays: list[tuple[str, Any, LandmarkSet, LandmarkSet]] | None = None,
    inference: InferenceConfig = InferenceConfig(),
) -> Path:
    """Write out_dir/report.md (summary, per-landmark, SDR and worst-image tables), plus plots when
    matplotlib is available and overlays of the given cases.

    Args:
        overlays: (image id, SimpleITK image, prediction, truth) of the cases to draw, e.g. the
            images of `result.worst_images()`; each is rendered to overlays/<id>.png. A case that
            fails to render is noted in the report instead of aborting it.
        inference: the model's confidence thresholds, which the overlay colors follow.

    Returns:
        The path of report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    u = result.unit
    o = result.overall
    radii = result.radii
    lines = ["# Landmark evaluation report", ""]

    lines += ["## Summary", ""]
    summary = [
        ["Images", str(len(result.image_ids))],
        ["Landmarks per image", str(len(result.landmark_names))],
        ["Evaluated landmarks (truth present)", str(o.total)],
        ["Detected", str(o.count)],
        ["Missed (no prediction)", str(o.missed)],
        [f"Mean ± sd error ({u})", f"{_fmt(o.mean)} ± {_fmt(o.sd)}"],
        [f"Median error ({u})", _fmt(o.median)],
        [f"Max error ({u})", _fmt(o.max)],
        [f"Outliers (> {result.outlier_radius:g} {u})", str(o.outliers)],
    ] + [[f"SDR ≤ {r:g} {u}", _pct(o.sdr[r])] for r in radii]
    lines += _table(["Metric", "Value"], summary)
    if result.images_without_prediction:
        lines += [
            f"Images without prediction (all landmarks missed): {', '.join(result.images_without_prediction)}",
            "",
        ]
    if result.images_without_truth:
        lines += [f"Predictions without ground truth (ignored): {', '.join(result.images_without_truth)}", ""]

    if result.inference_modes:
        lines += [
            "## Inference modes",
            "",
            "The same model on the same images, run with and without its refinement stage "
            "(time: detection per image, image already read).",
            "",
        ]
        rows = [
            [m["mode"], _fmt(m["mean"]), _fmt(m["median"]), _fmt(m["max"]), str(m["missed"])]
            + [_pct(m["sdr"][_radius_key(r)]) for r in radii]
            + [_fmt(m["seconds_per_image"], 3)]
            for m in result.inference_modes
        ]
        lines += _table(
            ["Mode", f"mean ({u})", f"median ({u})", f"max ({u})", "missed"]
            + [f"SDR ≤ {r:g} {u}" for r in radii]
            + ["s / image"],
            rows,
        )

    if result.expected_error:
        lines += _expected_error_section(result, out_dir)

    lines += ["## Per-landmark errors", ""]
    rows = []
    for n in result.landmark_names:
        s = result.per_landmark[n]
        rows.append(
            [n, str(s.count), str(s.missed), _fmt(s.mean), _fmt(s.sd), _fmt(s.median), _fmt(s.max), str(s.outliers)]
        )
    rows.append(
        ["**all**", str(o.count), str(o.missed), _fmt(o.mean), _fmt(o.sd), _fmt(o.median), _fmt(o.max), str(o.outliers)]
    )
    lines += _table(
        [
            "Landmark",
            "n",
            "missed",
            f"mean ({u})",
            f"sd ({u})",
            f"median ({u})",
            f"max ({u})",
            f"outliers > {result.outlier_radius:g}",
        ],
        rows,
    )

    lines += [
        "## Success detection rates",
        "",
        "Fraction of the evaluated landmarks (missed ones count as failures) within each radius.",
        "",
    ]
    rows = [[n] + [_pct(result.per_landmark[n].sdr[r]) for r in radii] for n in result.landmark_names]
    rows.append(["**all**"] + [_pct(o.sdr[r]) for r in radii])
    lines += _table(["Landmark"] + [f"≤ {r:g} {u}" for r in radii], rows)

    lines += ["## Worst images", ""]
    rows = []
    for row in result.worst_images():
        finite = {n: e for n, e in row.errors.items() if np.isfinite(e)}
        worst = max(finite, key=lambda name: finite[name]) if finite else ""
        rows.append([row.image_id, _fmt(row.mean), _fmt(row.max), worst, str(row.count), ", ".join(row.missed) or "-"])
    lines += _table(["Image", f"mean ({u})", f"max ({u})", "worst landmark", "detected", "missed"], rows)

    lines += ["## Plots", ""]
    plots = write_plots(result, out_dir)
    if plots:
        for p in plots:
            lines += [f"![{p.stem.replace('_', ' ')}]({p.name})", ""]
    else:
        lines += ["matplotlib is not available; plots skipped.", ""]

    if overlays:
        from .overlay import render_landmarks_png

        lines += [
            "## Worst cases",
            "",
            f"Predictions as filled discs (green: detected, orange: low confidence, below "
            f"{inference.low_confidence_below:g}; red: below the missing threshold "
            f"{inference.missing_below:g}; magenta: unknown), ground truth as cyan rings joined by a "
            "white line.",
            "",
        ]
        used: set[str] = set()
        for image_id, image, prediction, truth in overlays:
            stem = safe_filename(str(image_id), "image")
            while stem in used:
                stem += "_"
            used.add(stem)
            rel = f"overlays/{stem}.png"
            try:
                render_landmarks_png(image, out_dir / rel, prediction, truth, inference=inference)
            except Exception as exc:  # a report with a noted failure beats no report
                lines += [f"### {image_id}", "", f"Overlay failed: {type(exc).__name__}: {exc}", ""]
                continue
            lines += [f"### {image_id}", "", f"![{image_id}]({rel})", ""]

    path = out_dir / "report.md"
    write_text_atomically(path, "\n".join(lines))
    return path


def _expected_error_section(result: EvaluationResult, out_dir: Path) -> list[str]:
    """Report lines: how well the calibrated expected errors flag bad points, and the calibration plot."""
    u, scores = result.unit, result.expected_error
    lines = [
        "## Expected error",
        "",
        "How well ranking points by the model's expected error flags those whose measured error exceeds "
        f"a threshold (AUROC; 0.5 = chance), and mean expected against mean measured error ({scores['points']} "
        "points).",
        "",
    ]
    lines += _table(
        ["Flag points", "points beyond", "AUROC"],
        [[label, str(v["points_beyond"]), _fmt(v["auroc"], 3)] for label, v in scores["auroc"].items()],
    )
    rows = [[n, _fmt(v["expected"]), _fmt(v["measured"])] for n, v in scores["per_landmark"].items()]
    rows.append(["**all**", _fmt(scores["mean_expected"]), _fmt(scores["mean_measured"])])
    lines += _table(["Landmark", f"mean expected ({u})", f"mean measured ({u})"], rows)
    coverage = scores.get("coverage")
    if coverage:
        lines += [
            f"Coverage radius (the model's {100 * coverage['target']:g} %, per landmark): it held the true "
            f"point for {_pct(coverage['coverage'])} of {coverage['points']} points; the worst landmark, "
            f"{coverage['worst_landmark']}, {_pct(coverage['worst_coverage'])}.",
            "",
        ]
        lines += _table(["Landmark", "coverage"], [[n, _pct(v)] for n, v in coverage["per_landmark"].items()])
    plot = _calibration_plot(np.asarray(scores["expected"], dtype=np.float64), result.errors, u, out_dir)
    lines += [f"![calibration]({plot.name})", ""] if plot else ["matplotlib is not available; plot skipped.", ""]
    return lines


def _calibration_plot(expected: np.ndarray, errors: np.ndarray, unit: str, out_dir: Path) -> Path | None:
    """Measured against expected error: every point, and the mean measured error per expected-error decile."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    both = np.isfinite(expected) & np.isfinite(errors)
    x, y = expected[both], errors[both]
    fig = Figure(figsize=(5.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.scatter(x, y, s=8, alpha=0.4, label="points")
    if x.size:
        bins = np.array_split(np.argsort(x), min(10, x.size))
        ax.plot(
            [x[b].mean() for b in bins],
            [y[b].mean() for b in bins],
            "o-",
            color="C3",
            label="mean per expected-error decile",
        )
        upper = float(max(x.max(), np.percentile(y, 99))) * 1.05
        ax.plot([0, upper], [0, upper], color="0.5", ls="--", lw=0.8, label="expected = measured")
        ax.set_xlim(0, upper)
        ax.set_ylim(0, upper)
    ax.set_xlabel(f"expected error ({unit})")
    ax.set_ylabel(f"measured error ({unit})")
    ax.set_title("Calibration of the expected error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "calibration.png"
    fig.savefig(path, dpi=100)
    return path


DEFAULT_RADII_PX: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)


def evaluate_model(
    model_path: str | Path,
    dataset: str | Path,
    split: str,
    out_dir: str | Path,
    device: str = "auto",
    radii: tuple[float, ...] | None = None,
    progress: Any = None,
    precision: str = "auto",
) -> Path:
    """Run a model on one split of a dataset spec and write metrics.json, report.md, plots, overlays.

    Args:
        radii: success-detection radii in the model's unit; default 2/2.5/3/4 mm, or 5/10/20/40 px
            for models trained on images without spacing.
        progress: optional callable(done, total, image_id).
        precision: what the networks compute in (see inference.resolve_precision).
    Returns:
        The path of metrics.json.
    """
    from .data.spec import load_dataset_spec
    from .inference import Predictor

    predictor = Predictor.from_file(model_path, device, precision)
    spec = load_dataset_spec(dataset)
    entries = spec.split(split)
    names = predictor.landmark_names
    if list(spec.landmark_names) != names:
        raise DataError(f"{spec.path}: landmark names {list(spec.landmark_names)} differ from the model's {names}")
    spec.check_model_unit(entries, predictor.description)
    truths = spec.load_landmarks(entries)
    modes = [True, False] if predictor.refinement is not None else [True]
    images: dict[str, Any] = {}
    predictions: dict[bool, dict[str, LandmarkSet]] = {refine: {} for refine in modes}
    seconds: dict[bool, float] = {refine: 0.0 for refine in modes}
    for number, entry in enumerate(entries, start=1):
        images[entry.id] = entry.read(predictor.dimension)
        for refine in modes:
            started = time.perf_counter()
            prediction = predictor.predict(images[entry.id], source=str(entry.image), refine=refine)
            seconds[refine] += time.perf_counter() - started
            predictions[refine][entry.id] = prediction.landmarks
        if progress is not None:
            progress(number, len(entries), entry.id)
    unit = predictor.description.unit
    radii = radii or (DEFAULT_RADII_PX if predictor.description.in_pixels else DEFAULT_RADII_MM)
    result = evaluate(predictions[True], truths, unit=unit, radii=radii)
    if predictor.refinement is not None:
        single = evaluate(predictions[False], truths, unit=unit, radii=radii)
        result.inference_modes = [
            result.mode_row("coarse-to-fine (as detect runs it)", seconds[True] / len(entries)),
            single.mode_row("single resolution (coarse SCN alone)", seconds[False] / len(entries)),
        ]
    calibration = predictor.calibration
    if calibration is not None:
        from .calibration import calibrated_means, coverage_figures, default_thresholds, flagging_scores

        thresholds = calibration.fitted_on.get("thresholds") or default_thresholds(
            unit, None if unit == "mm" else [radii[-1]]
        )
        ordered = [
            predictions[True][i].reordered(result.landmark_names) if i in predictions[True] else None
            for i in result.image_ids
        ]
        missing = np.full(len(names), np.nan)
        expected = np.array([missing if o is None else o.expected_errors for o in ordered])
        result.expected_error = {
            **flagging_scores(expected, result.errors, thresholds),
            "per_landmark": calibrated_means(result.landmark_names, expected, result.errors),
            "expected": expected.tolist(),
        }
        if calibration.radius_factors is not None:
            held = np.array([missing if o is None else o.coverage_radii for o in ordered])
            figures = coverage_figures(result.landmark_names, result.errors, held)
            result.expected_error["coverage"] = {"target": calibration.coverage, **figures}
    out_dir = Path(out_dir)
    metrics = write_metrics(result, out_dir / "metrics.json")
    worst = [
        (row.image_id, images[row.image_id], predictions[True][row.image_id], truths[row.image_id])
        for row in result.worst_images()
    ]
    write_report(result, out_dir, overlays=worst, inference=predictor.inference)
    return metrics

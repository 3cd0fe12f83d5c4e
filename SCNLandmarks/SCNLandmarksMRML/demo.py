"""`scn-landmarks demo`, the README's main job: detect landmarks on an image exactly as the Slicer
module does, headless. Registered with the library's CLI through the `scn_landmarks.commands` entry
point (as `serve` is), so the library itself never imports Slicer::

    scn-landmarks demo --out demo-output
    scn-landmarks demo --out DIR --model MODEL.safetensors --image IMAGE

Defaults: the first model of the catalogue (`Resources/Models/models.json`) that names a sample image,
on that sample (the bundled brain AFIDs model on the bundled MNI152NLin2009cAsym T1w template).
Nothing is downloaded. The steps are the module's own: a headless MRML scene, the image loaded
through Slicer's volume storage node, `SCNLandmarksLogic.detectLandmarks` (progress on stderr), the
landmarks exported by Slicer's markups storage nodes, the final heatmap (maximum over landmarks)
shown as the foreground layer and slice views rendered offscreen with `renderOverlayPng`.

Writes into --out:

* ``<image>.mrk.json``, ``<image>.fcsv``, ``<image>.csv``: the landmarks (LPS, with confidences);
* ``<image>_axial.png``, ``<image>_coronal.png``, ``<image>_sagittal.png`` (3D: slices through the
  landmarks' center) or ``<image>_overlay.png`` (2D): image, heatmap in heat colors, points;
* ``summary.json`` and ``summary.md``: per landmark name, RAS and LPS position, confidence, status
  and, for a calibrated model, expected error and whether it is flagged; the points to review first;
  model, device and times.

Exit status: 0 done, 2 bad input (a one-line message on stderr), 130 interrupted (the CLI's own).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from SCNLandmarksLib.errors import DataError

VIEWS_3D = ("Axial", "Coronal", "Sagittal")
# RAS normal of each slice view (the picture's slice is then turned to the volume's nearest voxel plane).
ANATOMICAL_NORMALS = {"Axial": (0, 0, 1), "Coronal": (0, 1, 0), "Sagittal": (1, 0, 0)}
HEATMAP_OPACITY = 0.35
# In the pictures, heatmap values below this fraction of the maximum are transparent.
HEATMAP_SHOWN_ABOVE = 0.15
PICTURE_SIZE_PX = 600
AC_PC = ("AC", "PC")


def register(commands) -> None:
    """Add the `demo` subcommand to the CLI's subparsers."""
    demo = commands.add_parser(
        "demo",
        help="run a model on an image through the Slicer module's logic (headless) and write the "
        "landmarks, overlay pictures and a summary; default: the bundled model on the bundled sample",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    demo.add_argument("--model", type=Path, help="model file (.safetensors); default: the catalogue's sample model")
    demo.add_argument("--image", type=Path, help="image or volume file; default: the catalogue model's sample")
    demo.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs (default: auto = CUDA GPU if there is one, else CPU)",
    )
    demo.set_defaults(run=_demo)


def _checkFile(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    return path


def resolveInputs(arguments) -> tuple[Path, Path, object]:
    """(model path, image path, catalogue entry of the model or None), checked to exist."""
    if arguments.model is not None:
        _checkFile(arguments.model, "model file")
    if arguments.image is not None:
        _checkFile(arguments.image, "image file")
    from SCNLandmarksMRML import catalogue

    default = catalogue.sampleModel()
    if arguments.model is not None:
        model = arguments.model
        entry = catalogue.entryForModel(model)
    else:
        if default is None:
            raise DataError("the model catalogue names no model with a sample image; pass --model FILE")
        if not default.available:
            raise DataError(
                f"the bundled model '{default.name}' is missing ({default.path}); "
                "pass --model FILE to use another model file"
            )
        model, entry = default.path, default
    if arguments.image is not None:
        image = arguments.image
    else:
        sampleEntry = entry if entry is not None and entry.sample is not None else default
        if sampleEntry is None or sampleEntry.sample is None:
            raise DataError("no sample image in the model catalogue; pass --image FILE")
        image = _checkFile(sampleEntry.sample, "bundled sample image")
    return model, image, entry


class ProgressPrinter:
    """Prints each new stage of a long job to stderr as '[ 42%] message'."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.last = None

    def __call__(self, fraction: float, message: str) -> None:
        if message == "done" and fraction < 1.0:
            return  # a stage finished (e.g. the network), not the whole detection
        if message != self.last:
            self.last = message
            print(f"[{100 * float(fraction):3.0f}%] {message}", file=self.stream, flush=True)


def _vector(values) -> list | None:
    values = [float(v) for v in values]
    return None if not all(math.isfinite(v) for v in values) else [round(v, 4) for v in values]


def landmarkTable(result) -> list[dict]:
    """Per landmark: name, RAS and LPS position (mm; None when missing), confidence, status, expected
    error (the model's unit; None when unknown) and flagged (expected to be worse than the landmark
    usually is; None for a model without calibration)."""
    prediction = result.prediction
    count = len(result.landmarkNames)
    expected = prediction.landmarks.expected_errors
    expected = [math.nan] * count if expected is None else [float(e) for e in expected]
    flagged = [None] * count if prediction.flagged is None else [bool(f) for f in prediction.flagged]
    rows = []
    for name, ras, confidence, status, expectedError, flag in zip(
        result.landmarkNames, result.pointsRas, result.confidences, result.statuses, expected, flagged
    ):
        rasList = _vector(ras)
        lpsList = None if rasList is None else [round(-rasList[0], 4), round(-rasList[1], 4), rasList[2]]
        rows.append(
            {
                "name": name,
                "ras": rasList,
                "lps": lpsList,
                "confidence": None if not math.isfinite(float(confidence)) else round(float(confidence), 4),
                "status": status,
                "expectedError": round(expectedError, 4) if math.isfinite(expectedError) else None,
                "flagged": flag,
            }
        )
    return rows


def reviewFirst(rows: list[dict]) -> list[str]:
    """The flagged landmarks, largest expected error first (what a person should check first)."""
    from SCNLandmarksMRML.review import review_order

    order = review_order(
        [math.nan if r["expectedError"] is None else r["expectedError"] for r in rows],
        flagged=[bool(r["flagged"]) for r in rows],
    )
    return [rows[i]["name"] for i in order if rows[i]["flagged"]]


def styleForPictures(heatmapNode) -> None:
    """For still pictures, color only the heatmap's peaks, so the anatomy stays visible around them
    (the module's slice views show more of the heatmap, for exploring it)."""
    display = heatmapNode.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    display.SetLowerThreshold(low + HEATMAP_SHOWN_ABOVE * (high - low))


def sliceThrough(volume, view: str, center, names, pointsRas) -> tuple[object, str | None]:
    """The point a 3D picture's slice passes through, and the landmark it is at.

    The slice goes through the landmarks' center, moved along the slice normal (at most to the
    nearest landmark) so that at least one landmark lies in it and is drawn with its label.
    """
    import numpy as np

    from SCNLandmarksMRML.volumes import ijkToRasArray

    if center is None:
        return None, None
    axes = ijkToRasArray(volume)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    anatomical = np.array(ANATOMICAL_NORMALS[view], dtype=float)
    normal = axes[:, int(np.argmax(np.abs(anatomical @ axes)))]  # the slice follows the voxel grid
    found = [i for i, p in enumerate(pointsRas) if np.all(np.isfinite(p))]
    nearest = min(found, key=lambda i: abs(float(np.dot(pointsRas[i] - center, normal))))
    return center + normal * float(np.dot(pointsRas[nearest] - center, normal)), names[nearest]


def renderPictures(logic, result, heatmapNode, outDir: Path, stem: str) -> list[tuple[Path, str, str | None]]:
    """Overlay pictures: 3D - axial, coronal and sagittal slices through the landmarks' center (see
    `sliceThrough`), with every landmark also marked where it projects onto the slice; 2D - one.

    Returns:
        (picture, view, landmark the slice passes through or None) per picture.
    """
    import numpy as np

    from SCNLandmarksMRML.volumes import volumeDimension

    styleForPictures(heatmapNode)
    volume = result.volumeNode
    found = result.pointsRas[np.all(np.isfinite(result.pointsRas), axis=1)]
    center = found.mean(axis=0) if len(found) else None
    dimension = volumeDimension(volume)
    pictures = []
    for view in VIEWS_3D if dimension == 3 else ("Axial",):
        through, landmark = (
            sliceThrough(volume, view, center, result.landmarkNames, result.pointsRas)
            if dimension == 3
            else (None, None)
        )
        name = f"{stem}_{view.lower()}.png" if dimension == 3 else f"{stem}_overlay.png"
        rendered = logic.renderOverlayPng(
            outDir / name,
            volume,
            heatmapNode,
            result.markupsNode,
            opacity=HEATMAP_OPACITY,
            orientation=view,
            centerRas=through,
            sizePx=PICTURE_SIZE_PX,
            offSlicePoints=dimension == 3,
        )
        pictures.append((Path(rendered.path), view if dimension == 3 else "image", landmark))
    return pictures


def _format(vector) -> str:
    return "-" if vector is None else ", ".join(f"{v:.1f}" for v in vector)


def writeSummaries(outDir: Path, summary: dict) -> tuple[Path, Path]:
    jsonPath = outDir / "summary.json"
    jsonPath.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# SCNLandmarks demo: {Path(summary['image']['path']).name}",
        "",
        f"- **Model:** {summary['model']['name']} (`{summary['model']['path']}`)",
        (
            f"- **Image:** `{summary['image']['path']}` ({summary['image']['dimension']}D, "
            f"{' x '.join(map(str, summary['image']['size']))} voxels, "
            f"spacing {' x '.join(f'{s:g}' for s in summary['image']['spacing'])} mm)"
        ),
        f"- **Device:** {summary['device']}",
        f"- **Result:** {summary['result']}",
        f"- **Time:** {summary['totalSeconds']:.1f} s in all (detection {summary['detectionSeconds']:.1f} s)",
    ]
    if summary.get("acPcDistanceMm") is not None:
        lines.append(f"- **AC-PC distance:** {summary['acPcDistanceMm']:.1f} mm")
    unit = summary["model"]["unit"]
    if not summary["model"]["calibrated"]:
        lines.append("- **Review first:** the model is not calibrated (no expected errors): check every point")
    elif summary["reviewFirst"]:
        worse = ", ".join(summary["reviewFirst"])
        lines.append(f"- **Review first** (expected to be worse than the landmark usually is): {worse}")
    else:
        lines.append("- **Review first:** no point is expected to be worse than its landmark usually is")
    lines += [
        "",
        "Positions in mm: RAS (Slicer's world frame) and LPS (DICOM/ITK, as in the .mrk.json file).",
        "",
        f"| # | landmark | RAS (mm) | LPS (mm) | confidence | expected error ({unit}) | status |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for i, row in enumerate(summary["landmarks"], start=1):
        confidence = "-" if row["confidence"] is None else f"{row['confidence']:.2f}"
        expected = "-" if row["expectedError"] is None else f"{row['expectedError']:.2f}"
        status = f"{row['status']}, flagged" if row["flagged"] else row["status"]
        lines.append(
            f"| {i} | {row['name']} | {_format(row['ras'])} | {_format(row['lps'])} | {confidence} | {expected} "
            f"| {status} |"
        )
    threeD = summary["image"]["dimension"] == 3
    lines += [
        "",
        "## Pictures",
        "",
        "The image with the network's final heatmap (maximum over all landmarks; values under "
        f"{HEATMAP_SHOWN_ABOVE:.0%} of the maximum left out) in heat colors, and the landmarks with their names: "
        "green = detected, orange = low confidence."
        + (
            " Each slice passes through the landmarks' center, moved along its normal to the nearest landmark; "
            "only landmarks in the slice are drawn with names, and small light-blue dots mark where every "
            "landmark projects onto the slice. Slicer's radiological convention: the patient's right is on "
            "the left of axial and coronal pictures."
            if threeD
            else ""
        ),
        "",
    ]
    for picture in summary["files"]["pictures"]:
        where = summary["pictureSlices"][picture]
        caption = (
            f"{where['view']} slice through {where['throughLandmark']}"
            if threeD and where["throughLandmark"]
            else f"{where['view']}"
        )
        lines += [f"**{caption}**", "", f"![{caption}]({picture})", ""]
    lines += ["## Files", ""] + [f"- `{name}`" for name in summary["files"]["landmarks"]] + [""]
    markdownPath = outDir / "summary.md"
    markdownPath.write_text("\n".join(lines), encoding="utf-8")
    return jsonPath, markdownPath


def run(arguments) -> dict:
    """The whole demo; returns the summary. Raises SCNLandmarksError (e.g. DataError) on bad input."""
    started = time.perf_counter()
    outDir = arguments.out
    if outDir.exists() and not outDir.is_dir():
        raise DataError(f"{outDir}: the output folder is a file")
    model, image, entry = resolveInputs(arguments)

    import numpy as np

    import SCNLandmarksMRML
    from SCNLandmarksLib.io.paths import image_stem
    from SCNLandmarksLib.vocabulary import LandmarkStatus
    from SCNLandmarksMRML import rendering
    from SCNLandmarksMRML.volumes import volumeDimension

    try:
        outDir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{outDir}: cannot create the output folder ({error.strerror})") from None

    import vtk

    # VTK/MRML warnings meant for developers (e.g. "the fcsv format is deprecated", no X display
    # before falling back to EGL) would only confuse here; errors are still shown.
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    progress = ProgressPrinter()
    headless = SCNLandmarksMRML.createHeadlessScene()
    scene = headless.scene
    try:
        logic = SCNLandmarksMRML.SCNLandmarksLogic(scene, headless.applicationLogic)
        print(f"Model: {model}", file=sys.stderr)
        predictor = logic.loadPredictor(model, arguments.device)
        print(f"Image: {image}", file=sys.stderr)
        # Quiet while loading: slicer-core's ITK has no PNG/JPEG/TIFF readers, so its storage node logs
        # errors before `loadVolumeFile` reads such files with SimpleITK (real failures raise DataError).
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        try:
            volume = SCNLandmarksMRML.loadVolumeFile(scene, image)
        finally:
            vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
        result = logic.detectLandmarks(volume, model, arguments.device, progress=progress)  # logs its summary

        stem = image_stem(image) or "image"
        exported = [
            logic.exportLandmarks(result.markupsNode, outDir / f"{stem}.{suffix}")
            for suffix in ("mrk.json", "fcsv", "csv")
        ]

        print(
            "rendering overlay pictures"
            + ("" if rendering.offscreenRenderingAvailable() else " (no offscreen OpenGL: points drawn with numpy)"),
            file=sys.stderr,
        )
        heatmapNode = logic.showHeatmap(result.markupsNode, "final", None, HEATMAP_OPACITY)
        pictures = renderPictures(logic, result, heatmapNode, outDir, stem)

        rows = landmarkTable(result)
        names = result.landmarkNames
        acPc = None
        if all(n in names for n in AC_PC):
            ac, pc = (result.pointsRas[names.index(n)] for n in AC_PC)
            distance = float(np.linalg.norm(ac - pc))
            acPc = round(distance, 3) if math.isfinite(distance) else None
        imageData = volume.GetImageData()
        dimension = volumeDimension(volume)
        summary = {
            "model": {
                "name": entry.name if entry is not None else Path(model).name,
                "path": str(Path(model).resolve()),
                "card": str(entry.card) if entry is not None and entry.card is not None else None,
                "dimension": int(predictor.dimension),
                "landmarks": len(names),
                "unit": predictor.description.unit,
                "calibrated": predictor.calibration is not None,
            },
            "image": {
                "path": str(Path(image).resolve()),
                "dimension": dimension,
                "size": list(imageData.GetDimensions()[:dimension]),
                "spacing": [round(float(s), 6) for s in volume.GetSpacing()[:dimension]],
            },
            "device": result.device,
            "result": result.summary,
            "counts": {
                status: result.statuses.count(status) for status in LandmarkStatus if result.statuses.count(status)
            },
            "detectionSeconds": round(result.seconds, 3),
            "totalSeconds": None,
            "acPcDistanceMm": acPc,
            "landmarks": rows,
            "reviewFirst": reviewFirst(rows),
            "outputFolder": str(outDir.resolve()),
            "pictureSlices": {p.name: {"view": view, "throughLandmark": landmark} for p, view, landmark in pictures},
            # File names in the output folder.
            "files": {
                "landmarks": [p.name for p in exported],
                "pictures": [p.name for p, _, _ in pictures],
                "summaries": ["summary.json", "summary.md"],
            },
        }
        summary["totalSeconds"] = round(time.perf_counter() - started, 3)
        writeSummaries(outDir, summary)
        return summary
    finally:
        scene.Clear(1)


def _demo(arguments) -> int:
    summary = run(arguments)
    out = arguments.out
    print(f"{summary['result']} Model: {summary['model']['name']}.")
    if summary["acPcDistanceMm"] is not None:
        print(f"AC-PC distance: {summary['acPcDistanceMm']:.1f} mm")
    print(f"Wrote to {out.resolve()}{os.sep}:")
    for group in ("landmarks", "pictures", "summaries"):
        for name in summary["files"][group]:
            print(f"  {name}")
    return 0

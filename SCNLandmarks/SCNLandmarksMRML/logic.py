"""SCNLandmarksLogic: landmark detection on MRML nodes - volume in, markups and heatmaps out.

Works wherever `slicer` holds MRML (the Slicer application, or slicer-core without any GUI); it
imports no Qt, opens no dialogs and never installs anything. Long work reports through
``progress(fraction, message)`` and stops when ``cancel()`` returns True; problems are raised as
`SCNLandmarksLib.errors.DataError` / `ModelFileError` (and `Cancelled`) with messages meant for
users, and leave the scene as it was.

The library (`SCNLandmarksLib`, which needs torch) is imported only when a model is loaded, so the
module can start, and say what is missing, in a Slicer without PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

from SCNLandmarksLib.data.spec import DatasetSpec, ImageEntry, load_dataset_spec
from SCNLandmarksLib.errors import Cancelled, DataError, ModelFileError
from SCNLandmarksLib.geometry import ras_to_lps
from SCNLandmarksLib.io.atomic import atomic_output, safe_filename
from SCNLandmarksLib.io.paths import format_suffix, image_stem
from SCNLandmarksLib.landmark_set import LandmarkSet
from SCNLandmarksLib.vocabulary import Cancel, HeatmapKind, LandmarkStatus, Progress

from . import annotate, catalogue, dependencies, overlays, rendering
from . import markups as landmarkMarkups
from .volumes import (
    VolumeImage,
    checkScalarVolume,
    ijkToRasArray,
    imageFromVolumeNode,
    isAxialSlice,
    pictureOfVolume,
    volumeDimension,
)

logger = logging.getLogger(__name__)

TRAINING_SPEC_NAME = "dataset.toml"


@dataclass
class DetectionResult:
    """One detection run.

    Attributes:
        markupsNode: the point list (one control point per landmark, labelled with its name).
        volumeNode: the input volume.
        landmarkNames: model landmark names (markups order).
        pointsRas: (N, 3) predicted RAS positions in the volume's frame, NaN where missing.
        confidences: (N,) confidences in [0, 1].
        statuses: N statuses: detected, low confidence or missing.
        seconds: wall time of the whole run.
        device: the device used, e.g. "cpu" or "cuda:0 (NVIDIA ...)".
        modelPath: the model file.
        prediction: the library's Prediction (heatmaps, when kept).
    """

    markupsNode: object
    volumeNode: object
    landmarkNames: list[str]
    pointsRas: np.ndarray
    confidences: np.ndarray
    statuses: list[LandmarkStatus]
    seconds: float
    device: str
    modelPath: str
    prediction: object = field(default=None, repr=False)

    @property
    def summary(self) -> str:
        """One line for the status text: counts, time taken and device."""
        counts = {s: self.statuses.count(s) for s in LandmarkStatus}
        found = counts[LandmarkStatus.DETECTED] + counts[LandmarkStatus.LOW_CONFIDENCE]
        text = f"{found} of {len(self.statuses)} landmarks found"
        details = [f"{counts[s]} {s}" for s in (LandmarkStatus.LOW_CONFIDENCE, LandmarkStatus.MISSING) if counts[s]]
        if details:
            text += f" ({', '.join(details)})"
        text = f"{text} in {self.seconds:.1f} s on {self.device}."
        if getattr(self.prediction, "mirrored", False):
            text += " The image is mirrored for this model: the landmarks were found on its mirror image."
        return text


@dataclass
class DetectionJob:
    """A detection between its steps (see `SCNLandmarksLogic.detectLandmarks`)."""

    volumeNode: object
    predictor: object
    volumeImage: VolumeImage | None
    progress: Progress
    cancel: Cancel | None
    keepHeatmaps: bool
    started: float
    modelPath: str = ""
    prediction: object = None
    # Read on the main thread: the worker must not touch MRML nodes (not even GetName).
    volumeName: str = ""

    def report(self, fraction: float, message: str) -> None:
        self.progress(fraction, message)

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("Landmark detection cancelled; nothing was changed.")


def _scaled(progress: Progress | None, start: float, stop: float) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (stop - start) * float(fraction), message)


class SCNLandmarksLogic:
    """Detect landmarks on volume nodes, review them as markups and heatmaps, export corrections.

    Args:
        scene: the MRML scene to work in; default `slicer.mrmlScene` (the application's scene).
        applicationLogic: the vtkMRMLApplicationLogic (default the application's, if any); only
            offscreen pictures drawn with Slicer's markups renderer need it.
    """

    def __init__(self, scene=None, applicationLogic=None):
        super().__init__()
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if applicationLogic is None and getattr(slicer, "app", None) is not None:
            applicationLogic = slicer.app.applicationLogic()
        self.applicationLogic = applicationLogic
        self._predictors: dict[tuple, object] = {}
        # markups node ID -> (Prediction, VolumeImage): heatmaps live in memory for this session.
        self._predictions: dict[str, tuple[object, VolumeImage]] = {}
        self._statusObserver = landmarkMarkups.StatusObserver()

    # ------------------------------------------------------------------------------------------
    # environment

    @staticmethod
    def dependencyStatus() -> dependencies.DependencyStatus:
        """Whether torch (and the library's other needs) are importable; see `dependencies`."""
        return dependencies.dependencyStatus()

    @staticmethod
    def deviceChoices(facts: dependencies.DeviceFacts | None = None) -> list[dependencies.DeviceChoice]:
        """Auto / GPU / CPU, labelled with what this computer has (`facts` from a
        `dependencies.TorchProbe`; default what is known without importing torch)."""
        return dependencies.deviceChoices(facts)

    @staticmethod
    def availableModels() -> list[catalogue.ModelEntry]:
        """Models of the catalogue `Resources/Models/models.json` whose file ships with this installation."""
        return catalogue.availableModels()

    @staticmethod
    def catalogueModels() -> list[catalogue.ModelEntry]:
        """Every model of the catalogue, including any whose file is absent (`entry.available` False)."""
        return catalogue.catalogueModels()

    @staticmethod
    def heatmapKinds() -> dict[str, str]:
        """{kind: label} of the heatmaps a prediction offers."""
        return {kind: kind.label() for kind in HeatmapKind}

    # ------------------------------------------------------------------------------------------
    # models

    @staticmethod
    def modelInfo(modelPath) -> str:
        """One line about a model file (dimension, landmarks), or why it cannot be used."""
        if not modelPath or not Path(modelPath).is_file():
            return "No model file selected." if not modelPath else f"{modelPath}: model file not found"
        try:
            dependencies.loadTorch()  # the model file reader needs torch; a broken one is reported
            from SCNLandmarksLib.bundle import read_description
        except dependencies.TorchUnavailable as error:
            return str(error)
        except ImportError as error:
            return dependencies.missingModuleMessage(error)
        try:
            description = read_description(modelPath)
        except ModelFileError as error:
            return str(error)
        names = description.landmark_names
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f"{description.dimension}D model, {len(names)} landmarks: {shown}"

    @staticmethod
    def modelFile(modelPath) -> Path:
        """The model file as a Path, checked to exist (nothing is read).

        Raises:
            ModelFileError: no model chosen, or no such file.
        """
        if not modelPath or not str(modelPath).strip():
            raise ModelFileError("No model selected: choose a model from the list or load a model file.")
        path = Path(modelPath)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        return path

    def checkDetectionInputs(self, volumeNode, modelPath) -> None:
        """The quick checks before a detection, without loading anything: a scene, a scalar volume,
        a model file that exists.

        Raises:
            DataError: no scene, or a volume that cannot be used (see `checkScalarVolume`).
            ModelFileError: no model file.
        """
        if self.scene is None:
            raise DataError("No MRML scene to work in.")
        checkScalarVolume(volumeNode)
        self.modelFile(modelPath)

    def loadPredictor(self, modelPath, device: str = "auto"):
        """Load (once; cached by file, modification time and device) a model file as a Predictor.

        Raises:
            ModelFileError: missing, truncated or foreign model file.
            DataError: e.g. "cuda" requested without a GPU.
            dependencies.TorchUnavailable: torch is missing or cannot be loaded.
        """
        path = self.modelFile(modelPath)
        dependencies.loadTorch()
        from SCNLandmarksLib.inference import Predictor

        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device)
        if key not in self._predictors:
            self._predictors.clear()  # one model in memory at a time (GPU memory)
            self._predictors[key] = Predictor.from_file(path, device=device)
        return self._predictors[key]

    # ------------------------------------------------------------------------------------------
    # detection

    def volumeImage(self, volumeNode, predictor) -> VolumeImage:
        """The volume as the predictor's SimpleITK image (checked: scalar, dimension of the model)."""
        return imageFromVolumeNode(volumeNode, predictor.dimension, pixelUnits=predictor.description.in_pixels)

    def detectLandmarks(
        self,
        volumeNode,
        model,
        device: str = "auto",
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        markupsNode=None,
        keepHeatmaps: bool = True,
    ) -> DetectionResult:
        """Detect the model's landmarks on a volume node and put them in a markups point list.

        The three steps (`prepareDetection`, `runDetection`, `finishDetection`) are public too, for
        front-ends that run the model off the main thread.

        Args:
            volumeNode: scalar 2D (one slice) or 3D volume; its IJKToRAS geometry is honoured.
            model: model file path, or a loaded Predictor.
            device: "auto", "cuda" or "cpu" (when `model` is a path).
            progress: called with (fraction in [0, 1], message).
            cancel: polled between stages; True stops with `Cancelled`.
            markupsNode: an existing point list to refill (e.g. a previous result); default a new node.
            keepHeatmaps: keep heatmaps in memory for `showHeatmap`.

        Returns:
            DetectionResult (its markupsNode carries names, confidences and statuses).

        Raises:
            DataError: no/bad volume (RGB, vector, 4D frame) or a model of the other dimension.
            ModelFileError: bad model file.
            Cancelled: `cancel()` returned True. In every case the scene is left unchanged.
        """
        job = self.prepareDetection(volumeNode, model, device, progress, cancel, keepHeatmaps)
        self.runDetection(job)
        return self.finishDetection(job, markupsNode)

    def prepareDetection(
        self,
        volumeNode,
        model,
        device: str = "auto",
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        keepHeatmaps: bool = True,
    ) -> DetectionJob:
        """Step 1 (main thread): check the volume, load the model, copy the volume's image.

        Arguments and errors as `detectLandmarks`; the scene is not changed.
        """
        start = time.perf_counter()
        if self.scene is None:
            raise DataError("No MRML scene to work in.")
        checkScalarVolume(volumeNode)
        job = DetectionJob(
            volumeNode,
            None,
            None,
            progress or (lambda fraction, message: None),
            cancel,
            keepHeatmaps,
            start,
            volumeName=volumeNode.GetName() or "",
        )
        job.report(0.0, "loading model")
        job.check()
        if isinstance(model, (str, Path)):
            job.modelPath = str(model)
            job.predictor = self.loadPredictor(model, device)
        else:
            job.predictor = model
            job.modelPath = str(getattr(model, "path", "") or "")
        job.check()
        job.report(0.05, "reading volume")
        job.volumeImage = self.volumeImage(volumeNode, job.predictor)
        return job

    @staticmethod
    def runDetection(job: DetectionJob) -> None:
        """Step 2 (any thread): run the model on the copied image. Touches no MRML node.

        Raises:
            Cancelled: the job's `cancel()` returned True.
        """
        try:
            job.prediction = job.predictor.predict(
                job.volumeImage.image,
                heatmaps=job.keepHeatmaps,
                progress=_scaled(job.progress, 0.1, 0.95),
                cancel=job.cancel,
                source=f"volume '{job.volumeName}'",
            )
        except Cancelled:
            raise Cancelled("Landmark detection cancelled; nothing was changed.") from None
        job.check()

    def finishDetection(self, job: DetectionJob, markupsNode=None) -> DetectionResult:
        """Step 3 (main thread): put the predicted landmarks in a (new or given) point list."""
        job.report(0.95, "creating landmarks")
        volumeNode, prediction = job.volumeNode, job.prediction
        landmarks = prediction.landmarks
        pointsRas = job.volumeImage.pointsToRas(landmarks.points_lps)
        confidences = (
            np.asarray(landmarks.confidences, dtype=np.float64)
            if landmarks.confidences is not None
            else np.full(len(landmarks.names), np.nan)
        )
        statuses = list(prediction.status)

        name = self.scene.GenerateUniqueName(f"{volumeNode.GetName()} landmarks") if markupsNode is None else None
        markupsNode = landmarkMarkups.createLandmarksNode(
            self.scene,
            name,
            list(landmarks.names),
            pointsRas,
            confidences,
            statuses,
            volumeNode=volumeNode,
            modelPath=job.modelPath,
            markupsNode=markupsNode,
            expectedErrors=landmarks.expected_errors,
            flagged=prediction.flagged,
            unit=job.predictor.description.unit,
            coverageRadii=landmarks.coverage_radii,
            coverage=landmarks.coverage,
        )
        if job.keepHeatmaps:
            self._predictions[markupsNode.GetID()] = (prediction, job.volumeImage)
        self._statusObserver.observe(markupsNode)
        seconds = time.perf_counter() - job.started
        device = dependencies.describeDevice(job.predictor.device)
        job.report(1.0, "done")
        result = DetectionResult(
            markupsNode,
            volumeNode,
            list(landmarks.names),
            pointsRas,
            confidences,
            statuses,
            seconds,
            device,
            job.modelPath,
            prediction,
        )
        logger.info("%s", result.summary)
        return result

    # ------------------------------------------------------------------------------------------
    # review and correction

    def landmarkRows(self, markupsNode) -> list[landmarkMarkups.LandmarkRow]:
        """Name, confidence, current status and position of each landmark (for the results table)."""
        return landmarkMarkups.landmarkRows(markupsNode)

    def updatePointStatuses(self, markupsNode) -> list[landmarkMarkups.LandmarkRow]:
        """Recompute statuses (e.g. after points were moved by a script) and refresh descriptions."""
        return landmarkMarkups.updatePointStatuses(markupsNode)

    def observeCorrections(self, markupsNode) -> None:
        """Keep the point descriptions current while the user moves points (also done on detection)."""
        if landmarkMarkups.isLandmarksNode(markupsNode):
            self._statusObserver.observe(markupsNode)

    def resetPoint(self, markupsNode, landmark: int | str) -> landmarkMarkups.LandmarkRow:
        """Restore the predicted position of one landmark (index in model order, or name)."""
        return landmarkMarkups.resetPoint(markupsNode, landmark)

    @staticmethod
    def shortLandmarkNames(markupsNode) -> dict[str, str] | None:
        """Landmark name -> abbreviation, as the detection's model provides them (its catalogue entry),
        or None when it provides none (nothing is made up: the table and exports keep full names)."""
        info = landmarkMarkups.readPredictionInfo(markupsNode)
        entry = catalogue.entryForModel(info.get("model")) if info else None
        return dict(entry.shortNames) if entry and entry.shortNames else None

    def showShortLabels(self, markupsNode, short: bool) -> bool:
        """Label the points on the views with the model's abbreviations (True) or full names (False).

        Returns:
            True when the labels are now short; False when the model provides no short names.
        """
        names = self.shortLandmarkNames(markupsNode) if short else None
        landmarkMarkups.setPointLabels(markupsNode, names)
        return names is not None

    def centerViewsOnLandmark(self, markupsNode, landmark: int | str) -> np.ndarray | None:
        """Center all slice views on a landmark's current (else predicted) position.

        Returns:
            The world RAS point the views were centered on, or None if the landmark has no position.
        """
        rows = self.landmarkRows(markupsNode)
        row = next((r for r in rows if r.name == landmark), None) if isinstance(landmark, str) else rows[landmark]
        if row is None:
            raise ValueError(f"no landmark {landmark!r} in '{markupsNode.GetName()}'")
        point = row.positionRas if row.positionRas is not None else row.predictedRas
        if point is None:
            return None
        world = overlays.worldFromLocal(markupsNode, point)
        overlays.centerSliceViews(self.scene, world)
        return world

    # ------------------------------------------------------------------------------------------
    # heatmap overlays

    def hasHeatmaps(self, markupsNode) -> bool:
        """True when heatmaps of this detection are in memory (detections of this session)."""
        return markupsNode is not None and markupsNode.GetID() in self._predictions

    def heatmapProblem(self, markupsNode) -> str:
        """Why no heatmap can be shown for this point list ("" when one can), for the user."""
        if markupsNode is None:
            return "No detection to show heatmaps of: detect landmarks first (Detection section)."
        if not self.hasHeatmaps(markupsNode):
            return (
                f"No heatmaps for '{markupsNode.GetName()}': heatmaps are kept in memory for detections made "
                "in this session only. Run the detection again to see them."
            )
        volumeNode = markupsNode.GetNodeReference(landmarkMarkups.VOLUME_REFERENCE_ROLE)
        if volumeNode is None or volumeNode.GetImageData() is None:
            return f"The image '{markupsNode.GetName()}' was detected on is gone: its heatmaps cannot be shown."
        if tuple(volumeNode.GetImageData().GetDimensions()) != self._predictions[markupsNode.GetID()][1].size:
            return (
                f"The voxels of '{volumeNode.GetName()}' changed since '{markupsNode.GetName()}' was detected: "
                "run the detection again to see its heatmaps."
            )
        return ""

    def heatmapNode(self, markupsNode):
        """The heatmap volume node of a detection, if one was shown."""
        return markupsNode.GetNodeReference(landmarkMarkups.HEATMAP_REFERENCE_ROLE) if markupsNode else None

    def showHeatmap(
        self,
        markupsNode,
        kind: str = "final",
        landmark: int | str | None = None,
        opacity: float = 0.5,
        scaledPerLandmark: bool = False,
    ):
        """Show a heatmap of a detection as the foreground of every slice view.

        Args:
            markupsNode: a detection's point list.
            kind: "final", "local" (local appearance) or "spatial" (spatial configuration).
            landmark: landmark index or name; None shows the maximum over all landmarks.
            opacity: foreground opacity in [0, 1].
            scaledPerLandmark: with `landmark` None, each landmark's heatmap scaled to its own
                maximum before the maximum over landmarks (every landmark visible).

        Returns:
            The heatmap vtkMRMLScalarVolumeNode: the input volume's exact grid and IJKToRAS, heat
            color map, low values transparent. One node per detection, refilled on each call.

        Raises:
            DataError: no heatmaps in memory for this node, or an unknown kind/landmark.
        """
        if kind not in list(HeatmapKind):
            raise DataError(f"Unknown heatmap kind '{kind}'; choose one of {', '.join(HeatmapKind)}.")
        problem = self.heatmapProblem(markupsNode)
        if problem:
            raise DataError(problem)
        prediction, volumeImage = self._predictions[markupsNode.GetID()]
        names = list(prediction.landmarks.names)
        index = landmark
        if isinstance(landmark, str):
            if landmark not in names:
                raise DataError(f"No landmark named '{landmark}'; the model has {', '.join(names)}.")
            index = names.index(landmark)
        if index is not None and not 0 <= int(index) < len(names):
            raise DataError(f"Landmark index {index} is out of range (0..{len(names) - 1}).")
        try:
            heatmap = prediction.heatmap(
                kind, None if index is None else int(index), scaled_per_landmark=scaledPerLandmark
            )
        except ValueError as error:
            raise DataError(str(error)) from None
        array = volumeImage.volumeArray(heatmap)
        volumeNode = markupsNode.GetNodeReference(landmarkMarkups.VOLUME_REFERENCE_ROLE)
        what = (
            names[int(index)]
            if index is not None
            else ("all landmarks (each scaled to its peak)" if scaledPerLandmark else "all landmarks (max)")
        )
        name = f"{markupsNode.GetName()} heatmap: {kind}, {what}"
        heatmapNode = overlays.updateHeatmapNode(self.scene, self.heatmapNode(markupsNode), array, volumeNode, name)
        heatmapNode.SetAttribute(overlays.HEATMAP_KIND_ATTRIBUTE, kind)
        heatmapNode.SetAttribute(overlays.HEATMAP_LANDMARK_ATTRIBUTE, "" if index is None else names[int(index)])
        markupsNode.SetNodeReferenceID(landmarkMarkups.HEATMAP_REFERENCE_ROLE, heatmapNode.GetID())
        overlays.showInSliceViews(self.scene, volumeNode, heatmapNode, opacity)
        return heatmapNode

    def setHeatmapOpacity(self, markupsNode, opacity: float) -> None:
        """Change the foreground opacity of the slice views showing this detection's heatmap."""
        overlays.setForegroundOpacity(self.scene, self.heatmapNode(markupsNode), opacity)

    def hideHeatmap(self, markupsNode) -> None:
        """Take this detection's heatmap out of the slice views (the node stays)."""
        overlays.hideFromSliceViews(self.scene, self.heatmapNode(markupsNode))

    def forgetDetection(self, markupsNode) -> None:
        """Drop the in-memory heatmaps and observers of a detection (e.g. its node is being removed),
        and its heatmap from the scene: nothing could show or hide it any more."""
        if markupsNode is None:
            return
        heatmapNode = self.heatmapNode(markupsNode)
        if heatmapNode is not None and self.scene.IsNodePresent(heatmapNode):
            overlays.hideFromSliceViews(self.scene, heatmapNode)
            landmarkMarkups.removeNode(self.scene, heatmapNode)
        self._predictions.pop(markupsNode.GetID(), None)
        self._statusObserver.unobserve(markupsNode)

    # ------------------------------------------------------------------------------------------
    # export

    def landmarkSet(
        self, markupsNode, picture: VolumeImage | None = None
    ) -> tuple[LandmarkSet, list[LandmarkStatus], str]:
        """Current (corrected) positions as a library LandmarkSet in LPS, as `scn-landmarks detect`
        writes them for the volume's file, with the detection's confidences, expected errors and
        coverage radii, the statuses, and the unit ("mm", or "px" for a picture, unit spacing,
        detected by a model in pixels).

        A single slice in the axial plane gives 2D points (LPS x and y); one in another plane keeps
        its 3D points, since no two LPS axes describe it. A model in pixels detects in the volume's
        pixels: on a volume with another spacing its expected errors are scaled to mm with the points.

        Args:
            picture: the volume as a picture (`pictureOfVolume`): the points in its pixels instead.
        """
        rows = self.landmarkRows(markupsNode)
        if not rows:
            raise DataError(f"'{markupsNode.GetName()}' holds no detected landmarks.")
        pointsRas = np.array([r.positionRas if r.positionRas is not None else [np.nan] * 3 for r in rows])
        volumeNode = markupsNode.GetNodeReference(landmarkMarkups.VOLUME_REFERENCE_ROLE)
        scale = 1.0
        if picture is not None:
            points, unit = picture.rasToPoints(pointsRas), "px"
        else:
            points = ras_to_lps(pointsRas)
            if volumeNode is not None and volumeDimension(volumeNode) == 2 and isAxialSlice(volumeNode):
                points = points[:, :2]
            unit = landmarkMarkups.predictionUnit(markupsNode) or "mm"
            if unit == "px" and volumeNode is not None:
                spacing = np.linalg.norm(ijkToRasArray(volumeNode)[:3, :2], axis=0)
                if not np.allclose(spacing, 1.0):
                    unit, scale = "mm", float(np.mean(spacing))
        expected = scale * np.array([r.expectedError for r in rows], dtype=np.float64)
        radii = scale * np.array([r.coverageRadius for r in rows], dtype=np.float64)
        coverage = landmarkMarkups.predictionCoverage(markupsNode)
        landmarks = LandmarkSet(
            [r.name for r in rows],
            points,
            np.array([r.confidence for r in rows], dtype=np.float64),
            expected if np.isfinite(expected).any() else None,
            radii if coverage is not None else None,
            coverage,
        )
        return landmarks, [r.status for r in rows], unit

    @staticmethod
    def existingFiles(paths) -> list[Path]:
        """Those of `paths` that exist already (the files a write would replace)."""
        return [Path(path) for path in paths if Path(path).exists()]

    @staticmethod
    def overwriteQuestion(paths) -> str:
        """The question to ask before writing `paths`, or "" when none of them exists yet."""
        existing = SCNLandmarksLogic.existingFiles(paths)
        if not existing:
            return ""
        listed = "\n".join(f"  {path}" for path in existing)
        return (
            f"{'This file exists' if len(existing) == 1 else 'These files exist'}:\n{listed}\n\nReplace "
            f"{'it' if len(existing) == 1 else 'them'}?"
        )

    @staticmethod
    def _refuseOverwrite(paths, overwrite: bool) -> None:
        existing = SCNLandmarksLogic.existingFiles(paths)
        if existing and not overwrite:
            raise DataError(
                f"Not replacing {', '.join(str(p) for p in existing)}: the file exists. Choose another "
                "name or folder, or agree to replace it."
            )

    def exportLandmarks(self, markupsNode, path, overwrite: bool = True, picture: VolumeImage | None = None) -> Path:
        """Write the current (corrected) points of a point list.

        The suffix chooses the format: ``.mrk.json`` (Slicer markups JSON, LPS, with labels, status
        descriptions and the confidence and expected error measurements), ``.fcsv`` (Slicer's legacy
        fiducial CSV) or ``.csv`` (the library's table ``landmark,x,y[,z],confidence[,expected_error],status``
        in LPS). A detection's points are written as ``scn-landmarks detect`` writes them (the
        library's writer: see `landmarkSet`);
        any other point list (an annotation) by Slicer's storage nodes (.mrk.json, .fcsv).

        Points are written under their full landmark names, whatever labels the views show.

        Args:
            overwrite: False refuses to replace an existing file (the caller asks the user first).
            picture: a detection's points in the pixels of this picture of its volume instead (see
                `landmarkSet`; training cases of a model in pixels).

        Returns:
            The written path.

        Raises:
            DataError: unknown suffix, nothing to export, an existing file with `overwrite` False, or
                the file cannot be written.
        """
        if markupsNode is None:
            raise DataError("No landmarks to export: run a detection (or choose a point list) first.")
        path = Path(path)
        lower = path.name.lower()
        if not lower.endswith((".mrk.json", ".json", ".fcsv", ".csv")):
            raise DataError(f"{path}: unknown landmark format; use .mrk.json, .fcsv or .csv")
        self._refuseOverwrite([path], overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        if landmarkMarkups.isLandmarksNode(markupsNode):
            # A detection: as `scn-landmarks detect` writes it (expected errors, the image's unit).
            from SCNLandmarksLib.io.landmarks import write_landmarks

            landmarkMarkups.updatePointStatuses(markupsNode)
            landmarks, statuses, unit = self.landmarkSet(markupsNode, picture)
            write_landmarks(landmarks, path, statuses, unit)
            return path
        if lower.endswith(".csv"):
            raise DataError(f"{path}: a point list that is not a detection is exported as .mrk.json or .fcsv")
        if lower.endswith(".mrk.json") or lower.endswith(".json"):
            storageNode = slicer.vtkMRMLMarkupsJsonStorageNode()
        elif lower.endswith(".fcsv"):
            storageNode = slicer.vtkMRMLMarkupsFiducialStorageNode()
        else:
            raise DataError(f"{path}: unknown landmark format; use .mrk.json, .fcsv or .csv")
        storageNode.SetFileName(str(path))
        with landmarkMarkups.fullNameLabels(markupsNode):
            written = storageNode.WriteData(markupsNode)
        if not written:
            raise DataError(f"{path}: Slicer could not write the landmarks")
        return path

    @staticmethod
    def savedAsPicture(volumeNode, markupsNode) -> bool:
        """Whether a training case of these is saved as a picture: a 2D detection by a model in pixels,
        which is fine-tuned in pixels, the unit it learned in (a NRRD's spacing would make them mm)."""
        return (
            volumeNode is not None
            and markupsNode is not None
            and volumeDimension(volumeNode) == 2
            and landmarkMarkups.predictionUnit(markupsNode) == "px"
        )

    @staticmethod
    def trainingPairPaths(volumeNode, folder, caseId: str | None = None, picture: bool = False) -> tuple[Path, Path]:
        """The (image, landmarks) files `saveTrainingPair` would write for this volume and folder
        (`picture`: see `savedAsPicture`)."""
        caseId = safe_filename(caseId or (volumeNode.GetName() if volumeNode is not None else "") or "case", "case")
        folder = Path(folder)
        return folder / f"{caseId}{'.tif' if picture else '.nrrd'}", folder / f"{caseId}.mrk.json"

    def saveTrainingPair(
        self,
        volumeNode,
        markupsNode,
        folder,
        caseId: str | None = None,
        split: str | None = None,
        overwrite: bool = True,
    ) -> tuple[Path, Path]:
        """Save a volume and its corrected landmarks as one more training case of a dataset folder.

        Writes ``<folder>/<caseId>.nrrd`` (Slicer's NRRD writer, geometry as in Slicer) and
        ``<folder>/<caseId>.mrk.json`` (Slicer's markups JSON, LPS), or for a detection by a model in
        pixels ``<caseId>.tif`` and its points in pixels (`savedAsPicture`), and adds or replaces the case
        in ``<folder>/dataset.toml``, the library's dataset spec, so ``scn-landmarks train`` can
        use the folder as is.

        Args:
            volumeNode: the image (scalar 2D or 3D volume).
            markupsNode: its corrected landmarks (a detection's point list, an annotation, see
                `annotate`, whose landmarks must all be placed or skipped, or any point list whose
                labels are the landmark names). Skipped points are saved as missing.
            folder: the dataset folder (created).
            caseId: file stem and case id; default the volume name.
            split: the case's split ("train" or "validation"); default: keep the split of a case
                being replaced, else "train".
            overwrite: False refuses to replace the case's existing files (see `trainingPairPaths`).

        Returns:
            (image path, landmarks path).

        Raises:
            DataError: bad volume or landmarks, a dataset folder made for another dimension or other
                landmark names, existing case files with `overwrite` False, or files that cannot be
                written.
        """
        checkScalarVolume(volumeNode)
        if markupsNode is None:
            raise DataError("No landmarks to save: run a detection (or choose a point list) first.")
        if annotate.isAnnotationNode(markupsNode):
            annotate.checkComplete(markupsNode)
        rows = self.landmarkRows(markupsNode)
        if rows:
            names = [r.name for r in rows]
        else:
            names = [markupsNode.GetNthControlPointLabel(i) for i in range(markupsNode.GetNumberOfControlPoints())]
        if not names:
            raise DataError(f"'{markupsNode.GetName()}' holds no landmarks.")
        folder = Path(folder)
        picture = self.savedAsPicture(volumeNode, markupsNode)
        imagePath, landmarksPath = self.trainingPairPaths(volumeNode, folder, caseId, picture)
        self._refuseOverwrite([imagePath, landmarksPath], overwrite)
        caseId = image_stem(imagePath)
        dimension = volumeDimension(volumeNode)
        spec = self.trainingSpec(folder, dimension, names)
        folder.mkdir(parents=True, exist_ok=True)

        # Both files are written beside their places first and renamed there only once both are
        # written: a failure never pairs a new image with a replaced case's old points.
        with (
            atomic_output(imagePath, format_suffix(imagePath)) as imageTemporary,
            atomic_output(landmarksPath, format_suffix(landmarksPath)) as landmarksTemporary,
        ):
            pixels = pictureOfVolume(volumeNode) if picture else None
            if pixels is not None:
                from SCNLandmarksLib.io.images import write_image

                write_image(pixels.image, imageTemporary)
            else:
                storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
                storageNode.SetFileName(str(imageTemporary))
                storageNode.SetUseCompression(True)
                if not storageNode.WriteData(volumeNode):
                    raise DataError(f"{imagePath}: Slicer could not write the volume")
            self.exportLandmarks(markupsNode, landmarksTemporary, picture=pixels)

        previous = next((entry for entry in spec.entries if entry.id == caseId), None)
        split = split or (previous.split if previous else None) or "train"
        entries = [entry for entry in spec.entries if entry.id != caseId]
        entries.append(ImageEntry(caseId, imagePath, landmarksPath, split))
        dataclasses.replace(spec, entries=tuple(entries)).write(
            "Training cases saved by the SCNLandmarks module (see SCNLandmarksLib.data.spec)."
        )
        return imagePath, landmarksPath

    @staticmethod
    def trainingSpec(folder, dimension: int, names: list[str]) -> DatasetSpec:
        """The dataset spec of a training folder (`TRAINING_SPEC_NAME`; an empty one for a new folder),
        checked to hold cases of this dimension and these landmarks.

        Raises:
            DataError: the spec cannot be read (naming it), or holds other cases (choose another folder).
        """
        specPath = Path(folder) / TRAINING_SPEC_NAME
        if not specPath.is_file():
            return DatasetSpec(specPath, dimension, tuple(names), ())
        spec = load_dataset_spec(specPath)
        if spec.dimension != dimension:
            raise DataError(
                f"{specPath}: this folder holds {spec.dimension}D cases; the volume is {dimension}D. "
                "Choose another folder."
            )
        if list(spec.landmark_names) != list(names):
            raise DataError(
                f"{specPath}: this folder's cases have the landmarks {list(spec.landmark_names)}, not {names}. "
                "Choose another folder."
            )
        return spec

    # ------------------------------------------------------------------------------------------
    # pictures

    def renderOverlayPng(
        self, path, volumeNode, heatmapNode=None, markupsNode=None, **options
    ) -> rendering.RenderedSlice:
        """Render a slice view (image, heatmap foreground, landmarks) offscreen to a PNG.

        See `rendering.renderOverlayPng` for the options (opacity, orientation, centerRas, sizePx,
        method, ...). Points are drawn by Slicer's markups renderer when offscreen OpenGL is
        available, else with numpy. The scene is left unchanged.
        """
        options.setdefault("applicationLogic", self.applicationLogic)
        return rendering.renderOverlayPng(self.scene, path, volumeNode, heatmapNode, markupsNode, **options)

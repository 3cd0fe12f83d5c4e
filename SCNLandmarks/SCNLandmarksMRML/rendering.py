"""Offscreen slice-view pictures: Slicer's own slice compositing and markups rendering, as PNG.

A private vtkMRMLSliceLogic reslices and blends the layers exactly as a slice view does
(background image with its window/level, heatmap foreground in its color map, thresholded and at
the chosen opacity) - a VTK pipeline that needs no window. The points are then drawn one of two
ways:

* "vtk": the composited image and Slicer's markups displayable manager (the code that draws
  point lists in slice views: glyphs in the display node's colors, labels; low-confidence points
  get a halo in their status color) render into an offscreen VTK window. Needs OpenGL offscreen
  (EGL or OSMesa; slicer-core has it where Mesa EGL is installed) and the application logic with
  the Markups module logic.
* "numpy": markers drawn on the composited image with numpy (no OpenGL at all): a filled disc in
  the status color for points in the slice (within half a voxel), a ring for points elsewhere.

"auto" uses "vtk" when it can, else "numpy". The private slice and composite nodes (and anything
else the renderer adds) are removed afterwards, so the scene is left as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from SCNLandmarksLib.vocabulary import STATUS_COLORS, LandmarkStatus

from . import markups as landmarkMarkups
from .overlays import worldFromLocal
from .volumes import matrixToArray, volumeCornersRas

logger = logging.getLogger(__name__)

OFFSCREEN_VIEW_NAME = "SCNLandmarksOffscreen"

OUTLINE = (0, 0, 0)
# Projections of points off the slice ("offSlicePoints"), RGB in [0, 1]: light cyan.
PROJECTION_COLOR = (0.55, 0.85, 1.0)


@dataclass
class RenderedSlice:
    """What `renderOverlayPng` drew.

    Attributes:
        path: the PNG written.
        rgb: (rows, columns, 3) uint8 picture, row 0 at the top.
        markers: per placed point: (label, (column, row) pixel, distance to the slice in mm).
        xyToRas: (4, 4) matrix from slice-view pixel (x right, y up from the bottom row) to RAS.
        method: "vtk" or "numpy", how the points were drawn.
    """

    path: Path
    rgb: np.ndarray
    markers: list = field(default_factory=list)
    xyToRas: np.ndarray | None = None
    method: str = "numpy"

    def pixelOf(self, pointRas) -> tuple[float, float]:
        """(column, row) of a RAS point in `rgb` (row 0 at the top)."""
        xy = np.linalg.inv(self.xyToRas) @ np.append(np.asarray(pointRas, dtype=np.float64), 1.0)
        return float(xy[0]), float(self.rgb.shape[0] - 1 - xy[1])


def _drawDisc(rgb: np.ndarray, column: float, row: float, radius: float, color, filled: bool) -> None:
    rows, columns = np.ogrid[: rgb.shape[0], : rgb.shape[1]]
    distance = np.sqrt((columns - column) ** 2 + (rows - row) ** 2)
    outline = (distance <= radius + 1.5) & (distance > radius - (radius if filled else 2.5))
    rgb[outline] = OUTLINE
    inside = distance <= radius if filled else (distance <= radius) & (distance > radius - 1.5)
    rgb[inside] = color


def _markupsPoints(markupsNode):
    """(label, world RAS, color) for every placed control point of a markups node."""
    rows = {row.index: row for row in landmarkMarkups.landmarkRows(markupsNode)}
    display = markupsNode.GetDisplayNode()
    defaultColor = tuple(int(255 * c) for c in display.GetColor()) if display is not None else (255, 255, 0)
    points = []
    for index in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue
        world = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(index, world)
        row = rows.get(index)
        color = STATUS_COLORS.get(row.status, defaultColor) if row is not None else defaultColor
        points.append((markupsNode.GetNthControlPointLabel(index), np.asarray(world), color))
    return points


def _markerCopy(scene, markupsNode, suffix: str, indices, color, scale: float):
    """A temporary, locked, unlabelled copy of some placed points of `markupsNode`, drawn in `color`
    with `scale` times its glyphs."""
    copy = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", OFFSCREEN_VIEW_NAME + suffix)
    copy.SetAndObserveTransformNodeID(markupsNode.GetTransformNodeID())
    for index in indices:
        copy.AddControlPoint(vtk.vtkVector3d(*markupsNode.GetNthControlPointPositionVector(index)), "")
    copy.SetLocked(True)
    copy.CreateDefaultDisplayNodes()
    display = copy.GetDisplayNode()
    display.SetPointLabelsVisibility(False)
    display.SetPropertiesLabelVisibility(False)
    display.SetColor(*color)
    display.SetSelectedColor(*color)
    source = markupsNode.GetDisplayNode()
    if source is not None:
        display.SetGlyphScale(scale * source.GetGlyphScale())
        display.SetGlyphSize(scale * source.GetGlyphSize())
        display.SetUseGlyphScale(source.GetUseGlyphScale())
    return copy


def _placedIndices(markupsNode) -> list[int]:
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    return [
        index
        for index in range(markupsNode.GetNumberOfControlPoints())
        if markupsNode.GetNthControlPointPositionStatus(index) == defined
    ]


def _addOffSliceProjections(scene, markupsNode):
    """Every point shows in the slice view as a small faded marker where it projects onto the slice
    (Slicer's slice projection of an unlabelled copy), while `markupsNode` itself draws (and labels)
    the points that lie in the slice."""
    copy = _markerCopy(scene, markupsNode, "Projections", _placedIndices(markupsNode), PROJECTION_COLOR, 0.6)
    display = copy.GetDisplayNode()
    display.SetSliceProjection(True)
    display.SetSliceProjectionUseFiducialColor(False)
    display.SetSliceProjectionOutlinedBehindSlicePlane(False)
    display.SetSliceProjectionColor(*PROJECTION_COLOR)
    display.SetSliceProjectionOpacity(0.9)
    return copy


def _addLowConfidenceHalos(scene, markupsNode):
    """Low-confidence points in their status color, a little larger than the points they surround: a
    markups point has no color of its own, and the pictures keep the table's colors."""
    placed = set(_placedIndices(markupsNode))
    low = [
        row.index
        for row in landmarkMarkups.landmarkRows(markupsNode)
        if row.status == LandmarkStatus.LOW_CONFIDENCE and row.index in placed
    ]
    color = tuple(c / 255.0 for c in STATUS_COLORS[LandmarkStatus.LOW_CONFIDENCE])
    return _markerCopy(scene, markupsNode, "LowConfidence", low, color, 1.4) if low else None


def offscreenRenderingAvailable() -> bool:
    """True when VTK can open an offscreen OpenGL context here (EGL, OSMesa or a display)."""
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(True)
        return bool(window.SupportsOpenGL())
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False


def _renderWithMarkupsDisplayableManager(
    sliceLogic, sliceNode, applicationLogic, width: int, height: int, withMarkups: bool
) -> np.ndarray:
    """Composited slice image (+ Slicer's markups rendering) from an offscreen window, (rows, cols, 3)."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputConnection(sliceLogic.GetImageDataConnection())
    renderer.AddActor(actor)
    # One world unit per display pixel, pixel centers at integers: the slice view's XY frame.
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    camera.SetFocalPoint(cx, cy, 0.0)
    camera.SetPosition(cx, cy, 1000.0)
    camera.SetViewUp(0.0, 1.0, 0.0)
    camera.SetParallelScale(height / 2.0)
    renderer.ResetCameraClippingRange()
    group = None
    if withMarkups:
        group = slicer.vtkMRMLDisplayableManagerGroup()
        manager = slicer.vtkMRMLMarkupsDisplayableManager()
        manager.SetMRMLApplicationLogic(applicationLogic)
        group.SetRenderer(renderer)
        group.AddDisplayableManager(manager)
        group.SetMRMLDisplayableNode(sliceNode)
    try:
        window.Render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(window)
        grabber.SetInputBufferTypeToRGB()
        grabber.ReadFrontBufferOff()
        grabber.Update()
        image = grabber.GetOutput()
        columns, rows, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3]).astype(np.uint8)
    finally:
        if group is not None:
            group.SetMRMLDisplayableNode(None)
        window.Finalize()


def renderOverlayPng(
    scene,
    path,
    volumeNode,
    heatmapNode=None,
    markupsNode=None,
    opacity: float = 0.5,
    orientation: str = "Axial",
    alignToVolume: bool = True,
    centerRas=None,
    sizePx: int = 512,
    pointRadiusPx: float = 5.0,
    slabMm: float | None = None,
    method: str = "auto",
    applicationLogic=None,
    offSlicePoints: bool = False,
) -> RenderedSlice:
    """Render one slice view offscreen - image, heatmap foreground, markups - to a PNG.

    Args:
        scene: the MRML scene holding the nodes.
        path: PNG file to write (parent folders are created).
        volumeNode: background volume.
        heatmapNode: optional foreground volume (e.g. from `SCNLandmarksLogic.showHeatmap`), drawn
            with its display node's color map and threshold.
        markupsNode: optional point list to draw.
        opacity: foreground opacity in [0, 1].
        orientation: "Axial", "Sagittal" or "Coronal".
        alignToVolume: rotate the slice to the volume's own voxel plane (as Slicer does for
            oblique volumes on demand), so oblique volumes are cut along their voxel grid.
        centerRas: RAS point the slice passes through (default: the volume center).
        sizePx: pixels along the longer side of the picture.
        pointRadiusPx: marker radius ("numpy" method).
        slabMm: "numpy" method: points closer than this to the slice are drawn filled, others as
            rings (default: half the volume's largest voxel spacing).
        method: "auto", "vtk" or "numpy" (see the module docstring).
        applicationLogic: vtkMRMLApplicationLogic with the Markups module logic, needed by "vtk".
        offSlicePoints: "vtk" method: also mark the points that are off the slice, unlabelled and
            faded, where they project onto it (a slice view shows only the points in its slice; a
            still picture may need them all). The "numpy" method always draws them, as rings.

    Returns:
        RenderedSlice with the path, the picture, where each point falls and the method used.
    """
    if method not in ("auto", "vtk", "numpy"):
        raise ValueError(f"method must be 'auto', 'vtk' or 'numpy', got {method!r}")
    canUseVtk = applicationLogic is not None and (
        markupsNode is None or applicationLogic.GetModuleLogic("Markups") is not None
    )
    if method == "vtk" and not canUseVtk:
        raise ValueError("the 'vtk' method needs the application logic with the Markups module logic")
    useVtk = method == "vtk" or (method == "auto" and canUseVtk and offscreenRenderingAvailable())

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    sliceLogic = slicer.vtkMRMLSliceLogic()
    if applicationLogic is not None:
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
    sliceLogic.SetMRMLScene(scene)
    try:
        sliceNode = sliceLogic.AddSliceNode(OFFSCREEN_VIEW_NAME)
        composite = sliceLogic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(volumeNode.GetID())
        composite.SetForegroundVolumeID(heatmapNode.GetID() if heatmapNode is not None else None)
        composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))
        composite.SetLabelVolumeID(None)
        width, height = _fitSlice(sliceLogic, sliceNode, volumeNode, orientation, alignToVolume, centerRas, sizePx)
        xyToRas = matrixToArray(sliceNode.GetXYToRAS())
        sliceToRas = matrixToArray(sliceNode.GetSliceToRAS())
        rgb = None
        if useVtk:
            if markupsNode is not None:
                _addLowConfidenceHalos(scene, markupsNode)
                if offSlicePoints:
                    _addOffSliceProjections(scene, markupsNode)
            try:
                rgb = _renderWithMarkupsDisplayableManager(
                    sliceLogic, sliceNode, applicationLogic, width, height, markupsNode is not None
                )
            except Exception as error:  # noqa: BLE001 - fall back to drawing with numpy
                if method == "vtk":
                    raise
                logger.warning("offscreen VTK rendering failed (%s); drawing points with numpy", error)
                useVtk = False
        if rgb is None:
            rgb = _compositedLayers(sliceLogic)
    finally:
        sliceLogic.SetMRMLScene(None)
        for i in reversed(range(scene.GetNumberOfNodes())):
            node = scene.GetNthNode(i)
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)

    rendered = RenderedSlice(path, rgb, [], xyToRas, "vtk" if useVtk else "numpy")
    if markupsNode is not None:
        slab = 0.5 * float(np.max(volumeNode.GetSpacing())) if slabMm is None else slabMm
        _placeMarkers(rendered, markupsNode, sliceToRas, slab, None if useVtk else pointRadiusPx)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    return rendered


def _fitSlice(
    sliceLogic, sliceNode, volumeNode, orientation: str, alignToVolume: bool, centerRas, sizePx: int
) -> tuple[int, int]:
    """Orient the slice, size the picture to the volume's extent in that plane (longer side `sizePx`)
    and move the slice through `centerRas` (default the volume's center); returns (width, height)."""
    sliceNode.SetOrientation(orientation)
    if alignToVolume:
        sliceNode.RotateToVolumePlane(volumeNode)
    corners = np.array([worldFromLocal(volumeNode, c) for c in volumeCornersRas(volumeNode)])
    sliceToRas = matrixToArray(sliceNode.GetSliceToRAS())
    # One voxel more than the corner centers span, so the edge voxels are shown whole.
    extent = [np.ptp(corners @ sliceToRas[:3, axis]) + float(np.min(volumeNode.GetSpacing())) for axis in (0, 1)]
    longer = max(extent)
    width = max(8, int(round(sizePx * extent[0] / longer)))
    height = max(8, int(round(sizePx * extent[1] / longer)))
    sliceNode.SetDimensions(width, height, 1)
    sliceLogic.FitSliceToAll(width, height)
    center = corners.mean(axis=0) if centerRas is None else np.asarray(centerRas, dtype=np.float64)
    sliceNode.JumpSliceByOffsetting(*[float(v) for v in center])
    return width, height


def _compositedLayers(sliceLogic) -> np.ndarray:
    """(rows, columns, 3) uint8: the slice logic's blend of background and foreground, top row first."""
    connection = sliceLogic.GetImageDataConnection()
    producer = connection.GetProducer()
    producer.Update()
    imageData = producer.GetOutputDataObject(connection.GetIndex())
    columns, rows, _ = imageData.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(rows, columns, -1)
    return np.ascontiguousarray(rgba[::-1, :, :3]).astype(np.uint8)


def _placeMarkers(
    rendered: RenderedSlice, markupsNode, sliceToRas: np.ndarray, slabMm: float, drawRadiusPx: float | None
) -> None:
    """Record where each point falls in the picture and how far it is from the slice; with
    `drawRadiusPx`, also draw it (filled within `slabMm` of the slice, a ring otherwise)."""
    normal = sliceToRas[:3, 2] / np.linalg.norm(sliceToRas[:3, 2])
    planePoint = sliceToRas[:3, 3]
    for label, world, color in _markupsPoints(markupsNode):
        column, row = rendered.pixelOf(world)
        distance = float(np.dot(world - planePoint, normal))
        if drawRadiusPx is not None:
            _drawDisc(rendered.rgb, column, row, drawRadiusPx, color, filled=abs(distance) <= slabMm)
        rendered.markers.append((label, (column, row), distance))

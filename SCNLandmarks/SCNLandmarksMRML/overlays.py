"""Heatmap overlays: a scalar volume on the input volume's exact grid, shown as the foreground layer.

The heatmap node copies the input's IJKToRAS matrix and voxel grid (the library resamples every
heatmap to the input image's geometry), so it overlays the image voxel for voxel in 2D and 3D.
It is shown in a heat color map, with near-zero values transparent, in every slice view (every
vtkMRMLSliceCompositeNode of the scene, with the input volume as background).
"""

from __future__ import annotations

import logging

import numpy as np
import slicer
import vtk

from .volumes import ijkToRasArray, setVolumeArray

logger = logging.getLogger(__name__)

# Heat color maps by preference; the first that exists in the scene is used. Slicer's file-based
# colors (Inferno) exist in the application; PET-Heat is built in (also in slicer-core).
HEAT_COLOR_NAMES = ("Inferno", "PET-Heat")
FALLBACK_COLOR_NAME = "SCNLandmarksHeat"
# Values below this fraction of the heatmap's maximum are transparent in the slice views.
TRANSPARENT_BELOW = 0.05

HEATMAP_KIND_ATTRIBUTE = "SCNLandmarks.HeatmapKind"
HEATMAP_LANDMARK_ATTRIBUTE = "SCNLandmarks.HeatmapLandmark"


def isHeatmapNode(node) -> bool:
    """True for heatmap volumes made by `updateHeatmapNode`, already when the scene announces them."""
    return node is not None and node.GetAttribute(HEATMAP_KIND_ATTRIBUTE) is not None


def heatmapNodeIDs(scene) -> list[str]:
    """IDs of the scene's heatmap volumes (to keep them out of the input volume selector)."""
    return [node.GetID() for node in _nodesByClass(scene, "vtkMRMLScalarVolumeNode") if isHeatmapNode(node)]


def _nodesByClass(scene, className: str) -> list:
    nodes = scene.GetNodesByClass(className)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def heatColorNodeId(scene) -> str:
    """ID of a heat color node of the scene (Inferno, else PET-Heat, else one made here)."""
    for name in HEAT_COLOR_NAMES:
        nodes = scene.GetNodesByName(name)
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.IsA("vtkMRMLColorNode"):
                return node.GetID()
    existing = scene.GetSingletonNode(FALLBACK_COLOR_NAME, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing.GetID()
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(FALLBACK_COLOR_NAME)
    table.SetSingletonTag(FALLBACK_COLOR_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    table.SetHideFromEditors(False)
    # black -> red -> yellow -> white
    for i in range(256):
        t = i / 255.0
        table.SetColor(i, f"{i}", min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2)), 1.0)
    scene.AddNode(table)
    return table.GetID()


def updateHeatmapNode(scene, heatmapNode, array: np.ndarray, volumeNode, name: str):
    """Create or refill the heatmap volume node with `array` (shape (k, j, i)) on `volumeNode`'s grid.

    Args:
        scene: the MRML scene.
        heatmapNode: an existing vtkMRMLScalarVolumeNode to refill, or None to create one.
        array: float heatmap voxels on the input volume's grid.
        volumeNode: the input volume (geometry and parent transform are copied).
        name: node name.

    Returns:
        The heatmap vtkMRMLScalarVolumeNode, displayed in a heat color map.
    """
    array = np.asarray(array, dtype=np.float32)
    expected = volumeNode.GetImageData().GetDimensions()[::-1]
    if array.shape != tuple(expected):
        raise ValueError(f"heatmap of shape {array.shape} is not on the input grid {tuple(expected)}")
    if heatmapNode is None:
        heatmapNode = slicer.vtkMRMLScalarVolumeNode()
        heatmapNode.SetName(name)
        # Marked before it is added, so that observers of the scene's NodeAddedEvent know it.
        heatmapNode.SetAttribute(HEATMAP_KIND_ATTRIBUTE, "")
        scene.AddNode(heatmapNode)
    else:
        heatmapNode.SetName(name)
    setVolumeArray(heatmapNode, array, ijkToRasArray(volumeNode))
    heatmapNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    if heatmapNode.GetDisplayNode() is None:
        heatmapNode.CreateDefaultDisplayNodes()
    display = heatmapNode.GetDisplayNode()
    maximum = float(array.max()) if array.size and float(array.max()) > 0 else 1.0
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(heatColorNodeId(scene))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, maximum)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(TRANSPARENT_BELOW * maximum)
    display.SetUpperThreshold(max(maximum, 1.0) * 1e6)
    display.SetInterpolate(True)
    display.EndModify(wasModifying)
    return heatmapNode


def sliceCompositeNodes(scene) -> list:
    """All slice composite nodes of the scene (one per slice view)."""
    return _nodesByClass(scene, "vtkMRMLSliceCompositeNode")


def showInSliceViews(scene, volumeNode, heatmapNode, opacity: float) -> int:
    """Show `volumeNode` as background and `heatmapNode` as foreground at `opacity` in every slice view.

    Returns:
        The number of slice views updated (0 when the scene has none, e.g. headless without views).
    """
    composites = sliceCompositeNodes(scene)
    for composite in composites:
        wasModifying = composite.StartModify()
        composite.SetBackgroundVolumeID(volumeNode.GetID() if volumeNode is not None else None)
        composite.SetForegroundVolumeID(heatmapNode.GetID() if heatmapNode is not None else None)
        composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))
        composite.EndModify(wasModifying)
    return len(composites)


def setForegroundOpacity(scene, heatmapNode, opacity: float) -> int:
    """Set the foreground opacity of the slice views that show `heatmapNode`; returns how many."""
    count = 0
    for composite in sliceCompositeNodes(scene):
        if heatmapNode is not None and composite.GetForegroundVolumeID() == heatmapNode.GetID():
            composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))
            count += 1
    return count


def hideFromSliceViews(scene, heatmapNode) -> None:
    """Remove `heatmapNode` from the foreground of every slice view showing it."""
    for composite in sliceCompositeNodes(scene):
        if heatmapNode is not None and composite.GetForegroundVolumeID() == heatmapNode.GetID():
            composite.SetForegroundVolumeID(None)


def centerSliceViews(scene, pointRas) -> None:
    """Center every slice view on a RAS (world) point."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        scene, float(pointRas[0]), float(pointRas[1]), float(pointRas[2]), slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )


def worldFromLocal(node, pointRas) -> np.ndarray:
    """A point in `node`'s local frame -> world RAS (through its parent transforms)."""
    transformNode = node.GetParentTransformNode() if node is not None else None
    point = [float(v) for v in pointRas]
    if transformNode is None:
        return np.asarray(point)
    transform = vtk.vtkGeneralTransform()
    transformNode.GetTransformToWorld(transform)
    return np.asarray(transform.TransformPoint(point))

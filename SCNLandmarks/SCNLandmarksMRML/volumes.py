"""Volume nodes <-> SimpleITK images, honouring the node's IJKToRAS matrix exactly.

Slicer stores every volume in RAS with its geometry in the node (IJKToRAS), not in the vtkImageData
(whose origin is 0 and spacing 1). The library works in ITK/LPS. A 2D image (PNG X-ray) is, in
Slicer, a 3D volume of W x H x 1 voxels; a 2D model gets it as a 2D SimpleITK image.

Points come back through voxel indices: a physical point of the SimpleITK image is turned into its
continuous (i, j[, k]) index and then through the node's IJKToRAS matrix, so the mapping is exact
whatever the in-plane frame chosen for a 2D image or the spacing convention of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.geometry import ImageGeometry, in_axial_plane
from SCNLandmarksLib.io.images import is_grey

logger = logging.getLogger(__name__)

# diag(-1, -1, 1): RAS <-> LPS for directions and points (its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class ColourImageError(DataError):
    """A real colour image (red, green and blue differ): detection needs a grey one. Each face says how
    to make one in its own terms."""


def matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """(4, 4) float64 copy of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """vtkMatrix4x4 from a (4, 4) array."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRasArray(volumeNode) -> np.ndarray:
    """(4, 4) IJKToRAS matrix of a volume node (its local frame, without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def _volumeName(volumeNode) -> str:
    return volumeNode.GetName() or volumeNode.GetID() or "volume"


def sequenceOfProxy(volumeNode):
    """The sequence browser showing `volumeNode` as one frame of a 4D sequence, or None."""
    scene = volumeNode.GetScene()
    if scene is None or not volumeNode.GetID():
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        if browser.IsProxyNodeID(volumeNode.GetID()):
            return browser
    return None


def checkScalarVolume(volumeNode) -> None:
    """Raise DataError unless `volumeNode` is a grey 2D or 3D volume with voxels.

    Grey is one component per voxel, or a grey picture stored as RGB(A) (`is_grey`: X-rays saved as
    colour PNG or JPEG), whose red channel is then used. Rejected, each with a message saying what to
    do: no volume, no image data, real colour images (ColourImageError), vector or 4D-as-vector
    volumes, and a volume that is the current frame of a 4D sequence.
    """
    if volumeNode is None:
        raise DataError("No input volume: select a volume (load a 2D image or a 3D volume first).")
    name = _volumeName(volumeNode)
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise DataError(f"'{name}' is a {volumeNode.GetClassName()}, not a scalar volume.")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0 or imageData.GetPointData().GetScalars() is None:
        raise DataError(f"Volume '{name}' has no image data.")
    components = imageData.GetNumberOfScalarComponents()
    if components in (3, 4) and not is_grey(_voxelValues(imageData)):
        raise ColourImageError(
            f"Volume '{name}' is a colour image (red, green and blue differ); landmark detection needs a "
            "grayscale 2D or 3D volume. Convert it first, e.g. with the 'Vector to Scalar Volume' module."
        )
    if components not in (1, 3, 4):
        raise DataError(
            f"Volume '{name}' is a vector or 4D volume ({components} values per voxel); landmark detection "
            "needs a single-channel (grayscale) 2D or 3D volume. Convert it first, e.g. with the "
            "'Vector to Scalar Volume' module."
        )
    browser = sequenceOfProxy(volumeNode)
    if browser is not None:
        raise DataError(
            f"Volume '{name}' is the current frame of the 4D sequence shown by '{browser.GetName()}'; "
            "landmark detection runs on one 2D or 3D volume. Clone the frame you want (Sequences module, "
            "or right-click > Clone in the Data module) and detect on the copy."
        )


def _voxelValues(imageData) -> np.ndarray:
    """(voxels, components) view of a vtkImageData's scalars."""
    scalars = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    return scalars.reshape(len(scalars), -1)


def volumeDimension(volumeNode) -> int:
    """2 for a single-slice volume (W x H x 1, how Slicer loads 2D images), else 3."""
    return 2 if volumeNode.GetImageData().GetDimensions()[2] == 1 else 3


@dataclass(frozen=True)
class VolumeImage:
    """A volume node's voxels as the SimpleITK image a predictor sees, and the way back to RAS.

    Attributes:
        image: 2D or 3D SimpleITK image; its physical frame is LPS (3D, or 2D in the axial plane) or a
            pixel frame (2D slices not in the axial plane, or models measured in pixels).
        ijkToRas: (4, 4) IJKToRAS matrix of the volume node (local frame).
        size: voxels per axis of the volume node, (i, j, k).
    """

    image: sitk.Image
    ijkToRas: np.ndarray
    size: tuple[int, int, int]

    @property
    def dimension(self) -> int:
        return self.image.GetDimension()

    def pointsToRas(self, points: np.ndarray) -> np.ndarray:
        """Physical points of `image`, shape (N, d) -> RAS points of the volume, shape (N, 3); NaN kept."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dimension)
        index = ImageGeometry.of(self.image).physical_to_index(points)
        if self.dimension == 2:
            index = np.concatenate([index, np.zeros((len(index), 1))], axis=1)
        return index @ self.ijkToRas[:3, :3].T + self.ijkToRas[:3, 3]

    def rasToPoints(self, ras: np.ndarray) -> np.ndarray:
        """RAS points of the volume, shape (N, 3) -> physical points of `image`, shape (N, d); NaN kept."""
        ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        rasToIjk = np.linalg.inv(self.ijkToRas)
        index = ras @ rasToIjk[:3, :3].T + rasToIjk[:3, 3]
        return ImageGeometry.of(self.image).index_to_physical(index[:, : self.dimension])

    def volumeArray(self, image: sitk.Image) -> np.ndarray:
        """Voxels of an image on `image`'s grid (e.g. a heatmap), shaped (k, j, i) like the volume node."""
        if tuple(image.GetSize()) != tuple(self.image.GetSize()):
            raise DataError(f"image of size {image.GetSize()} is not on the input grid {self.image.GetSize()}")
        array = sitk.GetArrayFromImage(image)
        return array.reshape(self.size[::-1])


def imageFromVolumeNode(volumeNode, dimension: int | None = None, pixelUnits: bool = False) -> VolumeImage:
    """The voxels of a scalar volume node as a SimpleITK image in LPS, ready for a predictor.

    Args:
        volumeNode: vtkMRMLScalarVolumeNode (checked with `checkScalarVolume`).
        dimension: the model's dimension (2 or 3), or None to follow the volume (one slice -> 2D).
        pixelUnits: give the image unit spacing (models measured in pixels, e.g. trained on PNGs,
            whatever physical spacing a file header announces). Points still map back exactly.

    Returns:
        VolumeImage holding the image and the mapping back to the node's RAS frame.

    Raises:
        DataError: bad volume (see `checkScalarVolume`), or its dimension differs from `dimension`.
    """
    checkScalarVolume(volumeNode)
    name = _volumeName(volumeNode)
    imageData = volumeNode.GetImageData()
    nx, ny, nz = imageData.GetDimensions()
    volumeDim = volumeDimension(volumeNode)
    if dimension is None:
        dimension = volumeDim
    if dimension == 3 and volumeDim == 2:
        raise DataError(
            f"The model detects landmarks in 3D volumes, but '{name}' is a single 2D slice "
            f"({nx} x {ny} pixels); choose a 2D model."
        )
    if dimension == 2 and volumeDim == 3:
        raise DataError(
            f"The model detects landmarks in 2D images, but '{name}' is a 3D volume "
            f"({nx} x {ny} x {nz} voxels); choose a 3D model."
        )

    # One channel: the voxels, or the red of a grey picture stored as RGB (checked above).
    array = _voxelValues(imageData)[:, 0].reshape(nz, ny, nx).copy()
    ijkToRas = ijkToRasArray(volumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"Volume '{name}' has a degenerate IJKToRAS matrix (zero spacing).")
    directionLps = _directionLps(ijkToRas)
    originLps = LPS_FROM_RAS @ ijkToRas[:3, 3]
    if pixelUnits:
        spacing = np.ones(3)

    if dimension == 3:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing.tolist())
        image.SetOrigin(originLps.tolist())
        image.SetDirection(directionLps.ravel().tolist())
    else:
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing(spacing[:2].tolist())
        if in_axial_plane(directionLps):
            image.SetOrigin(originLps[:2].tolist())
            image.SetDirection(directionLps[:2, :2].ravel().tolist())
        else:
            # The slice is not in the axial plane (e.g. one coronal slice): describe it in its own
            # pixel frame; points still map back exactly through the indices.
            logger.info("'%s' is a single slice outside the axial plane: detected in its own plane", name)
            image.SetOrigin((0.0, 0.0))
            image.SetDirection((1.0, 0.0, 0.0, 1.0))
    return VolumeImage(image, ijkToRas, (nx, ny, nz))


def pictureOfVolume(volumeNode) -> VolumeImage:
    """A 2D volume as the picture a model in pixels sees it: unit spacing, origin 0, identity
    direction, as the library reads such an image saved as a picture (positions are pixels)."""
    volumeImage = imageFromVolumeNode(volumeNode, 2, pixelUnits=True)
    volumeImage.image.SetOrigin((0.0, 0.0))
    volumeImage.image.SetDirection((1.0, 0.0, 0.0, 1.0))
    return volumeImage


def _directionLps(ijkToRas: np.ndarray) -> np.ndarray:
    """The LPS directions of the voxel axes (columns, unit length)."""
    return LPS_FROM_RAS @ (ijkToRas[:3, :3] / np.linalg.norm(ijkToRas[:3, :3], axis=0))


def isAxialSlice(volumeNode) -> bool:
    """Whether a single-slice volume lies in the axial plane: its 2D positions are LPS x and y."""
    return in_axial_plane(_directionLps(ijkToRasArray(volumeNode)))


def setVolumeArray(volumeNode, array: np.ndarray, ijkToRas: np.ndarray) -> None:
    """Give `volumeNode` the voxels `array` (shape (k, j, i)) and the geometry `ijkToRas` (copied)."""
    array = np.ascontiguousarray(array)
    nz, ny, nx = array.shape
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(nx, ny, nz)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    imageData.GetPointData().SetScalars(scalars)
    volumeNode.SetIJKToRASMatrix(arrayToMatrix(ijkToRas))
    volumeNode.SetAndObserveImageData(imageData)


def volumeNodeFromImage(scene, image: sitk.Image, name: str, nodeClass: str | None = None):
    """Add a volume node holding a SimpleITK image (2D images become one-slice volumes), LPS -> RAS.

    This is how Slicer itself turns an ITK image into a volume node: IJKToRAS = diag(-1, -1, 1) x
    direction x spacing, origin flipped likewise. Multi-component images become vector volumes.
    """
    components = image.GetNumberOfComponentsPerPixel()
    if nodeClass is None:
        nodeClass = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"
    array = sitk.GetArrayFromImage(image)
    dimension = image.GetDimension()
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    spacing[:dimension] = image.GetSpacing()
    origin[:dimension] = image.GetOrigin()
    direction[:dimension, :dimension] = np.asarray(image.GetDirection()).reshape(dimension, dimension)
    if dimension == 2:
        array = array[np.newaxis]
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(spacing)
    ijkToRas[:3, 3] = LPS_FROM_RAS @ origin
    node = scene.AddNewNodeByClass(nodeClass, name)
    if components > 1:
        nz, ny, nx = array.shape[:3]
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(nx, ny, nz)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1, components), deep=True)
        imageData.GetPointData().SetScalars(scalars)
        node.SetIJKToRASMatrix(arrayToMatrix(ijkToRas))
        node.SetAndObserveImageData(imageData)
    else:
        setVolumeArray(node, array, ijkToRas)
    return node


def volumeCornersRas(volumeNode) -> np.ndarray:
    """(8, 3) RAS positions of the outermost voxel centers of a volume node (local frame)."""
    nx, ny, nz = volumeNode.GetImageData().GetDimensions()
    corners = np.array([[i, j, k, 1.0] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)])
    return (corners @ ijkToRasArray(volumeNode).T)[:, :3]

"""Physical-space geometry: index <-> physical (LPS) mappings, LPS <-> RAS, network grids.

Conventions used throughout the library:
  * Physical points are ITK/LPS millimetres (or pixels when an image has no spacing), shape (..., d).
  * Indices are continuous ITK indices in (x, y[, z]) order; voxel centers sit at integers.
  * numpy/torch image arrays are ordered (z, y, x) as SimpleITK returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# Images whose axes are within this of the physical axes get network grids of their axis-aligned box's
# parity (see covering_grid): more than a pose normalised image keeps of its tilt (pose.py).
NEARLY_ALIGNED_DEG = 3.0


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Flip the first two axes (L<->R, P<->A); the mapping is its own inverse. Shape (..., d)."""
    points = np.array(points, dtype=np.float64, copy=True)
    points[..., :2] *= -1.0
    return points


ras_to_lps = lps_to_ras


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image's voxels lie in physical space.

    Attributes:
        size: voxels per axis, (x, y[, z]).
        spacing: mm per voxel, (x, y[, z]).
        origin: physical position of voxel index 0, LPS.
        direction: (d, d) matrix whose columns are the physical directions of the index axes.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major d*d, as SimpleITK stores it

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def direction_matrix(self) -> np.ndarray:
        d = self.dimension
        return np.asarray(self.direction, dtype=np.float64).reshape(d, d)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """(d+1, d+1) homogeneous matrix taking a continuous index to a physical point."""
        d = self.dimension
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    @classmethod
    def of(cls, image: sitk.Image) -> ImageGeometry:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(image.GetSpacing()),
            tuple(image.GetOrigin()),
            tuple(image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry's spacing, origin and direction on `image` (same size) and return it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Continuous (x, y[, z]) indices, shape (..., d) -> physical LPS points, shape (..., d)."""
        m = self.index_to_physical_matrix
        d = self.dimension
        return np.asarray(index, dtype=np.float64) @ m[:d, :d].T + m[:d, d]

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Physical LPS points, shape (..., d) -> continuous (x, y[, z]) indices, shape (..., d)."""
        m = np.linalg.inv(self.index_to_physical_matrix)
        d = self.dimension
        return np.asarray(points, dtype=np.float64) @ m[:d, :d].T + m[:d, d]

    def corners_physical(self) -> np.ndarray:
        """(2**d, d) physical positions of the outermost voxel centers."""
        d = self.dimension
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in self.size], indexing="ij")).reshape(d, -1).T
        return self.index_to_physical(corners)

    def center_physical(self) -> np.ndarray:
        """(d,) physical center of the bounding box of the voxel centers."""
        corners = self.corners_physical()
        return (corners.min(axis=0) + corners.max(axis=0)) / 2.0

    def mirrored(self, axis: int, center_lps: np.ndarray) -> ImageGeometry:
        """The same voxels reflected through the plane normal to physical `axis` at `center_lps`.

        An image given this geometry shows its content as a mirror image, without resampling;
        applying the same mirror twice gives this geometry back.
        """
        reflection = np.ones(self.dimension)
        reflection[axis] = -1.0
        origin = mirror_points(np.asarray(self.origin), axis, center_lps)
        direction = reflection[:, None] * self.direction_matrix
        return ImageGeometry(
            self.size, self.spacing, tuple(float(o) for o in origin), tuple(float(v) for v in direction.ravel())
        )

    def nearest_axis_aligned(self) -> ImageGeometry | None:
        """This geometry turned about its center onto the nearest axes (direction a signed permutation),
        or None when that takes a turn of more than NEARLY_ALIGNED_DEG (or of nothing)."""
        direction = self.direction_matrix
        nearest = np.zeros_like(direction)
        columns = np.argmax(np.abs(direction), axis=0)
        if len(set(columns.tolist())) != self.dimension:
            return None
        nearest[columns, np.arange(self.dimension)] = np.sign(direction[columns, np.arange(self.dimension)])
        turn = nearest @ direction.T
        cosine = (np.trace(turn) - (self.dimension - 2)) / 2.0  # the turn's angle, in 2D and 3D
        if np.allclose(turn, np.eye(self.dimension)) or cosine < np.cos(np.radians(NEARLY_ALIGNED_DEG)):
            return None
        center = self.center_physical()
        origin = center + turn @ (np.asarray(self.origin) - center)
        return ImageGeometry(
            self.size, self.spacing, tuple(float(o) for o in origin), tuple(float(v) for v in nearest.ravel())
        )

    def contains(self, points: np.ndarray, margin_voxels: float = 0.5) -> np.ndarray:
        """(...,) bool: whether physical points fall inside the image (voxel extent plus margin)."""
        index = self.physical_to_index(points)
        upper = np.asarray(self.size, dtype=np.float64) - 1.0 + margin_voxels
        return np.all((index >= -margin_voxels) & (index <= upper), axis=-1)


def in_axial_plane(direction: np.ndarray, tolerance: float = 1e-6) -> bool:
    """Whether a single slice with this (3, 3) direction (columns: the voxel axes in LPS) lies in the
    axial plane, so that LPS x and y describe its points (2D positions are then LPS x and y)."""
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    in_plane = direction[:2, :2]
    return bool(
        np.all(np.abs(direction[2, :2]) < tolerance) and np.allclose(in_plane.T @ in_plane, np.eye(2), atol=tolerance)
    )


def mirror_points(points: np.ndarray, axis: int, center_lps: np.ndarray) -> np.ndarray:
    """Physical points (..., d) reflected through the plane normal to `axis` at `center_lps` (NaN stays NaN)."""
    points = np.array(points, dtype=np.float64, copy=True)
    points[..., axis] = 2.0 * float(center_lps[axis]) - points[..., axis]
    return points


def axis_aligned_grid(center_lps: np.ndarray, size: tuple[int, ...], spacing: tuple[float, ...]) -> ImageGeometry:
    """A grid with identity direction (axes along physical x, y[, z]) centered on `center_lps`.

    Networks always see images on such grids, so a model's notion of "up" is physical, whatever
    order or orientation the scanner stored the voxels in.
    """
    d = len(size)
    half_extent = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(center_lps, dtype=np.float64) - half_extent
    return ImageGeometry(
        tuple(int(s) for s in size),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(np.eye(d).ravel().tolist()),
    )


def covering_grid(geometry: ImageGeometry, spacing: tuple[float, ...], multiple_of: int = 1) -> ImageGeometry:
    """The axis-aligned grid of the given spacing that covers the whole image's physical extent.

    The size is rounded up to a multiple of `multiple_of` and the grid stays centered on the image.
    An image within `NEARLY_ALIGNED_DEG` of the axes gets the grid of its box turned onto the axes
    (its outermost corners may poke out of it by less than a cell's width): covering them too
    would add a cell or two as the image turns by a fraction of a degree, which changes the
    network's pooling phase and moved the brain model's points by 0.4 mm on average.
    """
    aligned = geometry.nearest_axis_aligned() or geometry
    corners = aligned.corners_physical()
    size = np.ceil((corners.max(axis=0) - corners.min(axis=0)) / np.asarray(spacing) - 1e-6).astype(int) + 1
    size = ((size + multiple_of - 1) // multiple_of) * multiple_of
    return axis_aligned_grid(geometry.center_physical(), tuple(int(s) for s in size), spacing)

"""Reading and writing images and landmark files (SimpleITK images; LPS landmark sets)."""

from SCNLandmarksLib.io.images import as_scalar_image, read_image, spacing_unit, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks, read_landmarks_csv, write_landmarks, write_landmarks_csv

__all__ = [
    "as_scalar_image",
    "read_image",
    "spacing_unit",
    "write_image",
    "read_landmarks",
    "read_landmarks_csv",
    "write_landmarks",
    "write_landmarks_csv",
]

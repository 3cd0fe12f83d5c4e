"""Reading and writing images and landmark files (SimpleITK images; LPS landmark sets)."""

from SCNLandmarksLib.io.images import GREY_TOLERANCE, as_scalar_image, is_grey, read_image, spacing_unit, write_image
from SCNLandmarksLib.io.landmarks import read_landmarks, read_landmarks_csv, write_landmarks, write_landmarks_csv

__all__ = [
    "GREY_TOLERANCE",
    "as_scalar_image",
    "is_grey",
    "read_image",
    "spacing_unit",
    "write_image",
    "read_landmarks",
    "read_landmarks_csv",
    "write_landmarks",
    "write_landmarks_csv",
]

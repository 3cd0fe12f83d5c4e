"""BIDS datasets as input: their T1-weighted images, and a derivatives tree for the results.

A BIDS dataset keeps each subject's anatomy in ``sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]``;
its landmarks go to the same place below the output folder, which becomes a BIDS derivatives
dataset (``dataset_description.json`` with ``DatasetType`` "derivative").
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.io.paths import image_stem

BIDS_DESCRIPTION = "dataset_description.json"
T1W_PATTERNS = (
    "sub-*/anat/*_T1w.nii.gz",
    "sub-*/ses-*/anat/*_T1w.nii.gz",
    "sub-*/anat/*_T1w.nii",
    "sub-*/ses-*/anat/*_T1w.nii",
)
BIDS_VERSION = "1.10.0"


def is_bids_dataset(folder: Path) -> bool:
    """Whether `folder` is a BIDS dataset: it has a dataset_description.json or subject folders."""
    return (folder / BIDS_DESCRIPTION).is_file() or any(
        path.is_dir() and path.name.startswith("sub-") for path in folder.iterdir()
    )


def bids_t1w_images(root: Path) -> list[tuple[Path, str]]:
    """The dataset's T1-weighted images, sorted, each with its place in a derivatives tree (its path
    below `root` without suffix, '/'-separated: 'sub-01/ses-1/anat/sub-01_ses-1_T1w').

    Raises:
        DataError: the dataset holds no T1-weighted image.
    """
    images = sorted({path for pattern in T1W_PATTERNS for path in root.glob(pattern) if path.is_file()})
    if not images:
        raise DataError(f"{root}: a BIDS dataset without T1-weighted images (sub-*/[ses-*/]anat/*_T1w.nii.gz)")
    return [(image, image.relative_to(root).parent.joinpath(image_stem(image)).as_posix()) for image in images]


def derivative_description(sources: list[Path]) -> dict:
    """The dataset_description.json of a derivatives dataset made from the BIDS datasets `sources`."""
    try:
        version = importlib.metadata.version("scn-landmarks")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    return {
        "Name": "SCNLandmarks anatomical landmarks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "scn-landmarks", "Version": version}],
        "SourceDatasets": [{"URL": source.resolve().as_uri()} for source in sources],
    }

"""Exceptions with messages meant for users: each names the file and the problem."""


class SCNLandmarksError(Exception):
    """Base class of the library's user-facing errors."""


class DataError(SCNLandmarksError, ValueError):
    """An image, landmark file or dataset spec that cannot be used (names the file and why)."""


class ModelFileError(SCNLandmarksError, ValueError):
    """A model file that is missing, truncated, foreign or incompatible."""


class TrainingError(SCNLandmarksError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class ClusterError(SCNLandmarksError, RuntimeError):
    """A compute cluster that cannot be reached or used (names its address and the problem)."""


class Cancelled(SCNLandmarksError):
    """The user cancelled a long-running operation; nothing was written."""

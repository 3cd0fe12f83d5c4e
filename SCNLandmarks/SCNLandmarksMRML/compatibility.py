"""Which Slicer (and so which Python) the module supports, and the message for any other.

The module file imports this before anything else of the package, so this file and the package's
``__init__`` keep to Python 3.9 syntax and standard library: an older Slicer (5.8 and earlier ship
Python 3.9) must get to the point of saying why the module cannot run instead of failing silently.
"""

import sys

# Slicer 5.10 is the first release on Python 3.12; the library uses 3.11+ (tomllib).
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)


def versionText(version) -> str:
    return ".".join(str(part) for part in version)


def compatibilityProblem(slicerVersion, pythonVersion=None) -> str:
    """Why the module cannot run in this Slicer, or "" when it can.

    Args:
        slicerVersion: (major, minor[, patch]) of the running Slicer.
        pythonVersion: (major, minor[, ...]) of its Python; default the running interpreter's.
    """
    pythonVersion = tuple(pythonVersion if pythonVersion is not None else sys.version_info[:3])
    slicerVersion = tuple(int(part) for part in slicerVersion)
    if slicerVersion[:2] >= MINIMUM_SLICER and pythonVersion[:2] >= MINIMUM_PYTHON:
        return ""
    return (
        f"SCN Landmarks needs 3D Slicer {versionText(MINIMUM_SLICER)} or later "
        f"(Python {versionText(MINIMUM_PYTHON)}); this is Slicer {versionText(slicerVersion)} "
        f"with Python {versionText(pythonVersion[:3])}. Install Slicer {versionText(MINIMUM_SLICER)} or later "
        "from download.slicer.org, then install the SCNLandmarks extension there."
    )

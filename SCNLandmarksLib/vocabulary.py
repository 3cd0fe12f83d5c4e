"""Terms shared by the library and its front-ends: landmark statuses and their colors, heatmap
kinds, compute precisions, and the callbacks of long work.

Torch-free, so front-ends (the Slicer module, the web app) use them before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

# Long work reports progress(fraction done in [0, 1], message) and stops when cancel() returns True.
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


class LandmarkStatus(StrEnum):
    """What is known about one landmark; the value is the text written to files and shown to people."""

    DETECTED = "detected"
    LOW_CONFIDENCE = "low confidence"
    MISSING = "missing"
    MOVED = "moved by user"  # a person placed the point; the model's confidence no longer applies


# RGB 0-255 of a point of each status, in every picture and view.
STATUS_COLORS: dict[LandmarkStatus, tuple[int, int, int]] = {
    LandmarkStatus.DETECTED: (60, 230, 60),
    LandmarkStatus.LOW_CONFIDENCE: (255, 115, 0),
    LandmarkStatus.MISSING: (255, 40, 40),
    LandmarkStatus.MOVED: (0, 200, 255),
}


class HeatmapKind(StrEnum):
    """The heatmaps an SCN produces (Payer et al. 2019): the final one is the product of the others."""

    FINAL = "final"
    LOCAL = "local"
    SPATIAL = "spatial"

    def label(self) -> str:
        """What to call this kind in a list (Slicer's parameter-node combo boxes call `label()`)."""
        return {"final": "final (SCN output)", "local": "local appearance", "spatial": "spatial configuration"}[
            self.value
        ]


class Precision(StrEnum):
    """What the networks compute in at inference (see inference.resolve_precision)."""

    AUTO = "auto"  # bfloat16 where the CPU multiplies it in hardware, else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

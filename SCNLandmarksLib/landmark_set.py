"""The landmark set: named points in physical LPS space, the one currency of the library."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LandmarkSet:
    """Named landmarks of one image.

    Attributes:
        names: landmark names, in model/dataset order.
        points_lps: (N, d) float64 physical positions in mm (ITK/LPS convention, d = 2 or 3);
            a row of NaN marks a missing landmark.
        confidences: optional (N,) values in [0, 1] (prediction confidence); NaN where unknown.
        expected_errors: optional (N,) expected point error in the points' unit (from a calibrated
            model); NaN where unknown.
        coverage_radii: optional (N,) distance from each point, in the points' unit, within which the
            true point lies with probability `coverage`; NaN where unknown.
        coverage: the probability the coverage radii are for (e.g. 0.9); given with them.
    """

    names: list[str]
    points_lps: np.ndarray
    confidences: np.ndarray | None = field(default=None)
    expected_errors: np.ndarray | None = field(default=None)
    coverage_radii: np.ndarray | None = field(default=None)
    coverage: float | None = field(default=None)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.points_lps = np.asarray(self.points_lps, dtype=np.float64)
        if self.points_lps.ndim != 2 or self.points_lps.shape[0] != len(self.names):
            raise ValueError(
                f"points_lps must have shape (N, d) with N = {len(self.names)} names, got {self.points_lps.shape}"
            )
        if self.points_lps.shape[1] not in (2, 3):
            raise ValueError(f"landmarks must be 2D or 3D, got dimension {self.points_lps.shape[1]}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"landmark names must be unique: {self.names}")
        if self.confidences is not None:
            self.confidences = np.asarray(self.confidences, dtype=np.float64).reshape(len(self.names))
        if self.expected_errors is not None:
            self.expected_errors = np.asarray(self.expected_errors, dtype=np.float64).reshape(len(self.names))
        if self.coverage_radii is not None:
            if self.coverage is None or not 0.0 < self.coverage < 1.0:
                raise ValueError(f"coverage radii need the probability they hold the point with, got {self.coverage}")
            self.coverage_radii = np.asarray(self.coverage_radii, dtype=np.float64).reshape(len(self.names))

    @property
    def dimension(self) -> int:
        return int(self.points_lps.shape[1])

    @property
    def present(self) -> np.ndarray:
        """(N,) bool: True where the landmark has a position."""
        return np.all(np.isfinite(self.points_lps), axis=1)

    def reordered(self, names: list[str]) -> LandmarkSet:
        """Return the set in the order of `names`; names absent here become missing (NaN).

        Raises:
            ValueError: if this set holds a name that is not in `names`.
        """
        unknown = [n for n in self.names if n not in names]
        if unknown:
            raise ValueError(f"unknown landmark names {unknown}; expected names from {names}")
        index = {n: i for i, n in enumerate(self.names)}
        points = np.full((len(names), self.dimension), np.nan)
        per_point = {
            "confidences": self.confidences,
            "expected_errors": self.expected_errors,
            "coverage_radii": self.coverage_radii,
        }
        present = [j for j, n in enumerate(names) if n in index]
        sources = [index[names[j]] for j in present]
        points[present] = self.points_lps[sources]
        reordered: dict[str, np.ndarray | None] = {}
        for key, values in per_point.items():
            column = None
            if values is not None:
                column = np.full(len(names), np.nan)
                column[present] = values[sources]
            reordered[key] = column
        return LandmarkSet(names, points, **reordered, coverage=self.coverage)

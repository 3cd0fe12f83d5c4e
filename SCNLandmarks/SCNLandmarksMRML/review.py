"""Review first: the order in which a person should check detected points (Qt-free, so the Slicer
widget and the web app share it).

Points are walked from the largest expected error down; a point a person already placed, or one
without a position, needs no review.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from SCNLandmarksLib.vocabulary import LandmarkStatus

NOT_TO_REVIEW = (LandmarkStatus.MISSING, LandmarkStatus.MOVED)


def review_order(
    expected_errors: Sequence[float] | np.ndarray | None, statuses: Sequence[str] | None = None
) -> list[int]:
    """Indices of the points to review, largest expected error first (ties in landmark order).

    Args:
        expected_errors: (N,) expected error per point (NaN: unknown, reviewed last); None for a
            model without calibration: then landmark order.
        statuses: optional status per point; missing and moved points are left out.
    """
    if expected_errors is None:
        return [i for i, s in enumerate(statuses or []) if s not in NOT_TO_REVIEW]
    errors = np.asarray(expected_errors, dtype=np.float64)
    keep = [i for i in range(len(errors)) if statuses is None or statuses[i] not in NOT_TO_REVIEW]
    return sorted(keep, key=lambda i: (not np.isfinite(errors[i]), -errors[i] if np.isfinite(errors[i]) else 0.0, i))


def next_to_review(
    expected_errors: Sequence[float] | np.ndarray | None, statuses: Sequence[str] | None, current: int | None
) -> int | None:
    """The point to review after `current` (None: the first one); None when there is none left.

    The walk follows the order of all points (expected errors do not change under corrections), so
    a `current` the reviewer has just moved, and which therefore needs no review any more, still
    marks where the walk is: the next point is the one after it, not the first again.
    """
    order = review_order(expected_errors, statuses)
    if not order:
        return None
    if current is None:
        return order[0]
    count = len(statuses) if statuses is not None else len(expected_errors)  # (one of them is given here)
    walk = review_order(expected_errors, [LandmarkStatus.DETECTED] * count)  # every point, in review order
    if current not in walk:
        return order[0]
    return next((i for i in walk[walk.index(current) + 1 :] if i in order), None)

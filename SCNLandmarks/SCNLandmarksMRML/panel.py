"""What the module panel shows, decided without Qt: the model selector's entries, the results
table's cells and how to update them in place. The widget only copies these into its Qt widgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from SCNLandmarksLib.vocabulary import LandmarkStatus

from . import catalogue
from .markups import LandmarkRow

LOAD_MODEL_FILE = "__load_model_file__"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector: label, data (a model path, or `LOAD_MODEL_FILE`), tooltip."""

    label: str
    data: str
    enabled: bool = True
    tooltip: str = ""


def _samePath(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def modelChoices(
    entries: list[catalogue.ModelEntry], currentPath: str = "", loadedPaths: list[str] = ()
) -> tuple[list[ModelChoice], int]:
    """The selector's entries and the index to show, so that it always shows the model that will run.

    Args:
        entries: catalogue models, shipped and the user's own (`catalogue.allModels`; absent ones are
            listed disabled, saying why; the user's are marked as theirs).
        currentPath: the parameter node's model path ("" = none chosen yet).
        loadedPaths: model files the user loaded in this session.

    Returns:
        (choices, index): a model path that is neither in the catalogue nor loaded (e.g. from a saved
        scene) is added as its own entry (marked when the file is not there); with no current path,
        index is that of the first usable catalogue model (-1 when there is none: the caller sets
        the parameter from `choices[index]`).
    """
    choices = []
    for entry in entries:
        label = entry.name if entry.available else f"{entry.name} (not installed)"
        if entry.userModel:
            label += " (your model)"
        tooltip = (entry.description or str(entry.path)) if entry.available else entry.unavailableReason
        choices.append(ModelChoice(label, str(entry.path), entry.available, tooltip))
    for path in loadedPaths:
        if not any(_samePath(path, choice.data) for choice in choices):
            choices.append(ModelChoice(Path(path).name, str(path), True, str(path)))
    if currentPath and not any(_samePath(currentPath, choice.data) for choice in choices):
        present = Path(currentPath).is_file()
        label = Path(currentPath).name + ("" if present else " (file not found)")
        tooltip = (
            str(currentPath)
            if present
            else f"The model file {currentPath} (saved with the scene) is not on this computer: load it again."
        )
        choices.append(ModelChoice(label, str(currentPath), True, tooltip))
    choices.append(
        ModelChoice("Load model file...", LOAD_MODEL_FILE, True, "Use a model file (.safetensors) from this computer.")
    )
    if currentPath:
        index = next(
            i
            for i, choice in enumerate(choices)
            if choice.data != LOAD_MODEL_FILE and _samePath(currentPath, choice.data)
        )
    else:
        index = next((i for i, choice in enumerate(choices) if choice.enabled and choice.data != LOAD_MODEL_FILE), -1)
    return choices, index


# ------------------------------------------------------------------------------------------------
# results table

STATUS_COLORS = {
    LandmarkStatus.LOW_CONFIDENCE: (255, 190, 130),
    LandmarkStatus.MISSING: (225, 225, 225),
    LandmarkStatus.MOVED: (170, 220, 255),
}
# A point whose expected error is above its landmark's usual error, not corrected yet: review it first.
FLAGGED_COLOR = (255, 150, 150)
FLAGGED_MARK = "! "


@dataclass(frozen=True)
class TableRow:
    """The cells of one landmark in the results table (full names: the table never abbreviates)."""

    texts: tuple[str, ...]
    color: tuple[int, int, int] | None


def isCalibrated(rows: list[LandmarkRow]) -> bool:
    """True when the detection's model gave expected errors (a calibrated model)."""
    return any(math.isfinite(row.expectedError) for row in rows)


def tableHeaders(rows: list[LandmarkRow], coverage: float | None = None) -> tuple[str, ...]:
    """Column titles: the second column is the expected error for a calibrated model, else the
    confidence; with coverage radii (`coverage`, e.g. 0.9) a radius column follows it."""
    radius = () if coverage is None else (f"{100 * coverage:g} % radius",)
    return ("Landmark", "Expected error" if isCalibrated(rows) else "Confidence", *radius, "Status")


def tableRows(rows: list[LandmarkRow], unit: str = "", coverage: float | None = None) -> list[TableRow]:
    """Name, expected error (calibrated model; in `unit`) or confidence, the coverage radius (when
    `coverage` is given) and status of each landmark, and the row's color by status. Points above
    their landmark's usual error and not corrected yet are marked ("! ") and colored."""
    calibrated = isCalibrated(rows)
    table = []
    for row in rows:
        flagged = row.reviewFirst
        if calibrated:
            value = "" if math.isnan(row.expectedError) else f"{row.expectedError:.2f} {unit}".rstrip()
            value = FLAGGED_MARK + value if flagged else value
        else:
            value = "" if math.isnan(row.confidence) else f"{row.confidence:.2f}"
        radius = "" if math.isnan(row.coverageRadius) else f"{row.coverageRadius:.2f} {unit}".rstrip()
        texts = (row.name, value, *(() if coverage is None else (radius,)), row.status)
        table.append(TableRow(texts, FLAGGED_COLOR if flagged else STATUS_COLORS.get(row.status)))
    return table


class TableItem(Protocol):
    def text(self) -> str: ...
    def setText(self, text: str) -> None: ...


class Table(Protocol):
    """The part of a QTableWidget the update needs."""

    def rowCount(self) -> int: ...
    def setRowCount(self, count: int) -> None: ...
    def item(self, row: int, column: int) -> TableItem | None: ...
    def setItem(self, row: int, column: int, item: TableItem) -> None: ...


def updateTable(
    table: Table,
    rows: list[TableRow],
    newItem: Callable[[], TableItem],
    setColor: Callable[[TableItem, tuple[int, int, int] | None], None],
    colors: dict[tuple[int, int], tuple[int, int, int] | None],
) -> int:
    """Make the table show `rows`, changing only what differs.

    An item the table already holds is updated in place (handing it to `setItem` again is what
    made Qt warn on every point move); new items are made only for new cells. `colors` remembers
    each cell's color between calls, so unchanged colors are not set again.

    Returns:
        The number of cells changed (0 when the table already showed `rows`).
    """
    changed = 0
    if table.rowCount() != len(rows):
        table.setRowCount(len(rows))
        for cell in [cell for cell in colors if cell[0] >= len(rows)]:
            del colors[cell]
    for r, row in enumerate(rows):
        for c, text in enumerate(row.texts):
            item = table.item(r, c)
            fresh = item is None
            if fresh:
                item = newItem()
            if fresh or item.text() != text:
                item.setText(text)
                changed += 1
            if fresh or colors.get((r, c), "unset") != row.color:
                setColor(item, row.color)
                colors[(r, c)] = row.color
            if fresh:
                table.setItem(r, c, item)
    return changed


def trainingFolderText(folder) -> str:
    """The training-folder field's text: empty when no folder was chosen (never ".")."""
    text = str(folder) if folder is not None else ""
    return "" if text in ("", ".") else text

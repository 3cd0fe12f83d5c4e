"""Fine-tuning for the web page: `scn-landmarks finetune` in a subprocess, its progress read from its output.

The page only needs start, progress, cancel and the result; that is all this module offers, so the
module's shared training runner can take its place. The training runs in its own process (the
session's event loop only reads its output): the page keeps answering, and a Cancel is the
command's own Ctrl-C (it finishes the iteration, keeps a checkpoint and stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from SCNLandmarksLib.errors import Cancelled, TrainingError

logger = logging.getLogger(__name__)

# `scn-landmarks train/finetune` progress lines (SCNLandmarksLib.cli.TrainingProgress, not on a terminal).
PROGRESS_LINE = re.compile(
    r"^(?P<stage>\S+) \[[#.]*\] (?P<done>\d+)/(?P<total>\d+) "
    r"loss (?P<loss>\S+) .*ETA (?P<eta>\S+)"
)
CANCEL_GRACE_S = 120  # after a Cancel, the time the command gets to end its iteration before it is ended
CANCELLED = "Fine-tuning cancelled: no new model."
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class FinetuneOutcome:
    """A finished fine-tuning.

    Attributes:
        modelPath: the model to use (the new one, or a copy of the base when the new one was not better).
        summary: the command's JSON summary (SCNLandmarksLib.finetune.FinetuneResult.summary): the
            outcome, "improved", "kept base", "not validated" or "new landmarks", and the errors of
            both models on the held-aside cases.
    """

    modelPath: Path
    summary: dict[str, Any]

    @property
    def sentence(self) -> str:
        """What happened, for the page (no server paths)."""
        summary, unit = self.summary, self.summary["unit"]
        held, outcome = summary["held_aside"], summary["outcome"]
        if outcome in ("improved", "kept base"):
            figures = (
                f"{summary['new_mean_error']:.2f} {unit} mean error against the base's "
                f"{summary['base_mean_error']:.2f} {unit}"
            )
            if outcome == "improved":
                return f"The new model is better on the {held} cases held aside ({figures})."
            return f"The new model is not better on the {held} cases held aside ({figures}): the base is kept."
        if outcome == "not validated":
            return (
                f"Not validated: with fewer than 5 cases all {summary['training_cases']} trained the model and "
                "none was left to check it on."
            )
        return "The model finds other landmarks than its base: it cannot be compared with it."


class FinetuneJob:
    """One `scn-landmarks finetune BASE DATASET --out OUT` run.

    Args:
        baseModel: the model to start from.
        dataset: a training folder ("Save as training pair") or a dataset spec.
        out: the new model's folder (must not hold a model yet: the command refuses to replace one).
        minutes: wall-clock budget of the training.
        device: "auto", "cpu" or "cuda".
        iterations: iterations per stage (default: derived from the base).
    """

    def __init__(
        self,
        baseModel: Path,
        dataset: Path,
        out: Path,
        minutes: float,
        device: str = "auto",
        iterations: int | None = None,
    ):
        self.command = [
            sys.executable,
            "-m",
            "SCNLandmarksLib.cli",
            "finetune",
            str(baseModel),
            str(dataset),
            "--out",
            str(out),
            "--minutes",
            f"{minutes:g}",
            "--device",
            device,
        ]
        if iterations is not None:
            self.command += ["--iterations", str(iterations)]
        self.out = out
        self.process: asyncio.subprocess.Process | None = None
        self.cancelled = False

    async def run(self, progress: Progress) -> FinetuneOutcome:
        """Run the command to its end, reporting (fraction of the current stage, message).

        Raises:
            Cancelled: `cancel` was called.
            TrainingError: the command failed (its own error message) or was killed.
        """
        progress(0.0, "starting: reading the base model and the cases")
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        logger.info("fine-tuning started (process %d): %s", self.process.pid, " ".join(self.command))
        lastLines: deque[str] = deque(maxlen=20)
        stdout, _ = await asyncio.gather(
            self.process.stdout.read(), self._follow(self.process.stderr, progress, lastLines)
        )
        status = await self.process.wait()
        if self.cancelled and status != 0:  # (a Cancel that came as it finished changes nothing)
            raise Cancelled(CANCELLED)
        if status != 0:
            logger.warning("fine-tuning ended with exit status %s:\n%s", status, "\n".join(lastLines))
            errors = [line.removeprefix("error: ") for line in lastLines if line.startswith("error: ")]
            raise TrainingError(
                errors[-1] if errors else f"Fine-tuning stopped unexpectedly (exit status {status}); no new model."
            )
        try:
            summary = json.loads(stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise TrainingError("Fine-tuning ended without its result line; no new model.") from None
        return FinetuneOutcome(Path(summary["model"]), summary)

    @staticmethod
    async def _follow(stream: asyncio.StreamReader, progress: Progress, lastLines: deque[str]) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            lastLines.append(line)
            found = PROGRESS_LINE.match(line)
            if found:
                done, total = int(found["done"]), int(found["total"])
                progress(
                    done / max(total, 1),
                    f"{found['stage']} stage: iteration {done} of {total}, loss {found['loss']}, ETA {found['eta']}",
                )

    def cancel(self) -> None:
        """Stop the training (as Ctrl-C would); it is ended if it has not stopped after CANCEL_GRACE_S."""
        if self.process is None or self.process.returncode is not None:
            return
        self.cancelled = True
        self.process.send_signal(signal.SIGINT)
        asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self.stop)

    def stop(self) -> None:
        """End the training process now (the session is ending)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

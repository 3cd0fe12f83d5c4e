"""Landmark detection off the main thread: the slow steps on a worker thread, MRML on the caller's.

`DetectionRunner` drives the logic's three steps (`prepareDetection`, `runDetection`,
`finishDetection`) so that the application stays responsive:

1. worker thread: load the model (the first ``import torch`` and the model file);
2. main thread: check the volume and copy its voxels (MRML is only touched here and in step 4);
3. worker thread: run the network;
4. main thread: create the point list.

The caller starts a detection and then calls `poll` (from a timer in the application) until it
returns the result or raises the error. A second start while one runs is refused; `cancel` is
honoured at the next checkpoint of any step (a model load in progress finishes first) and the
scene is then left exactly as it was.

Python threads only run while the main thread lets go of the interpreter lock; an application
whose event loop keeps it (PythonQt's may) lets the worker run during `poll(wait=...)`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from SCNLandmarksLib.errors import Cancelled, DataError, SCNLandmarksError

from .logic import DetectionJob, DetectionResult, SCNLandmarksLogic

Listener = Callable[[float, str], None]

IDLE = "idle"
LOADING = "loading model"
DETECTING = "detecting"

CANCELLED_MESSAGE = "Landmark detection cancelled; nothing was changed."


class DetectionBusy(SCNLandmarksError):
    """A detection was started while another one is running."""


class DetectionRunner:
    """Runs one detection at a time for a `SCNLandmarksLogic`, the slow steps on a worker thread.

    Example (a script; the module's widget calls `poll` from a timer instead)::

        runner = DetectionRunner(logic)
        runner.start(volumeNode, "/path/model.safetensors")
        result = runner.wait()
    """

    def __init__(self, logic: SCNLandmarksLogic):
        self.logic = logic
        self._phase = IDLE
        self._lock = threading.Lock()
        self._progress = (0.0, "")
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._outcome: tuple[object, BaseException | None] | None = None
        self._request: dict = {}
        self._job: DetectionJob | None = None

    # ------------------------------------------------------------------------------------------
    # state

    @property
    def running(self) -> bool:
        """True from `start` until `poll` has returned the result or raised the error."""
        return self._phase != IDLE

    @property
    def phase(self) -> str:
        """ "idle", "loading model" or "detecting"."""
        return self._phase

    @property
    def workerRunning(self) -> bool:
        """True while a step runs on the worker thread (a cancel waits for it)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def progress(self) -> tuple[float, str]:
        """The latest (fraction in [0, 1], message), whichever thread reported it."""
        with self._lock:
            return self._progress

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the running detection to stop at its next checkpoint (nothing happens when idle)."""
        if self.running:
            self._cancel.set()

    # ------------------------------------------------------------------------------------------
    # driving

    def start(
        self,
        volumeNode,
        modelPath,
        device: str = "auto",
        markupsNode=None,
        keepHeatmaps: bool = True,
        listener: Listener | None = None,
    ) -> None:
        """Start detecting the landmarks of the model file `modelPath` on `volumeNode`.

        Args:
            volumeNode, device, markupsNode, keepHeatmaps: as `SCNLandmarksLogic.detectLandmarks`.
            modelPath: model file path.
            listener: called with (fraction, message) at each progress report, on the thread that
                reports it (the worker's or the main one); it must be quick and thread-safe.

        Raises:
            DetectionBusy: a detection is already running.
            DataError, ModelFileError: the volume or model path is unusable (checked at once).
        """
        if self.running:
            raise DetectionBusy("A landmark detection is already running: wait for it to finish or cancel it.")
        self.logic.checkDetectionInputs(volumeNode, modelPath)
        self._cancel.clear()
        self._request = {
            "volumeNode": volumeNode,
            "modelPath": str(modelPath),
            "device": device,
            "markupsNode": markupsNode,
            "keepHeatmaps": keepHeatmaps,
            "listener": listener,
        }
        self._job = None
        self._phase = LOADING
        self._report(0.0, "loading model")
        self._launch(lambda: self.logic.loadPredictor(modelPath, device))

    def poll(self, wait: float = 0.0) -> DetectionResult | None:
        """Advance the detection; call it from the main thread until it returns the result.

        Args:
            wait: seconds to let the worker run before returning (the main thread waits, without
                holding the interpreter lock).

        Returns:
            None while the detection runs (or when idle), else its DetectionResult.

        Raises:
            Cancelled: it was cancelled; the scene is unchanged.
            DataError, ModelFileError, ...: it failed; the scene is unchanged.
            After a result or an error the runner is idle and can start again.
        """
        if self._phase == IDLE:
            return None
        if self._thread is not None:
            self._thread.join(wait if wait > 0 else 0.0)
            if self._thread.is_alive():
                return None
        value, error = self._outcome
        self._thread, self._outcome = None, None
        try:
            if error is not None:
                if isinstance(error, Cancelled):
                    raise Cancelled(CANCELLED_MESSAGE) from None
                raise error
            self._checkCancelled()
            self._checkStillInScene()
            if self._phase == LOADING:
                self._startNetwork(value)
                return None
            result = self.logic.finishDetection(self._job, self._request["markupsNode"])
        except BaseException:
            self._phase = IDLE
            raise
        self._phase = IDLE
        return result

    def wait(self, interval: float = 0.05) -> DetectionResult:
        """Poll until the detection ends (scripts and tests); returns its result or raises its error."""
        while True:
            result = self.poll(interval)
            if result is not None or not self.running:
                return result

    # ------------------------------------------------------------------------------------------
    # steps

    def _startNetwork(self, predictor) -> None:
        request = self._request
        self._job = self.logic.prepareDetection(
            request["volumeNode"],
            predictor,
            progress=self._report,
            cancel=self._cancel.is_set,
            keepHeatmaps=request["keepHeatmaps"],
        )
        self._job.modelPath = request["modelPath"]
        self._phase = DETECTING
        job = self._job
        self._launch(lambda: self.logic.runDetection(job))

    def _launch(self, work: Callable[[], object]) -> None:
        def target() -> None:
            try:
                self._outcome = (work(), None)
            except BaseException as error:  # handed to the main thread by poll()
                self._outcome = (None, error)

        self._outcome = None
        self._thread = threading.Thread(target=target, name="SCNLandmarks detection", daemon=True)
        self._thread.start()

    def _report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (float(fraction), message)
        listener = self._request.get("listener")
        if listener is not None:
            listener(fraction, message)

    def _checkCancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(CANCELLED_MESSAGE)

    def _checkStillInScene(self) -> None:
        for role in ("volumeNode", "markupsNode"):
            node = self._request[role]
            if node is not None and not self.logic.scene.IsNodePresent(node):
                raise DataError(
                    f"'{node.GetName()}' was removed from the scene during the detection; nothing was added."
                )

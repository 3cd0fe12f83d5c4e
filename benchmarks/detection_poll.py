"""Detection in Slicer's GUI: what the widget's polling costs the detection and the GUI.

    python benchmarks/detection_poll.py [--repeat 3] [--threads 2] [--schedules 100:50 20:10]

Slicer's PythonQt keeps the interpreter lock while its event loop runs (it is built without
thread support), so the module's worker thread (`DetectionRunner`) runs Python only while the GUI
thread waits in `poll(wait)`, called from a timer every `interval`; torch, NumPy and file reads
release the lock while they work and run meanwhile. This emulates that GUI thread: between polls it
holds the lock (a busy loop with a switching interval of 1000 s, which no waiting thread outlasts);
within `poll` it gives the lock away as Python normally does (5 ms switching interval).

For each schedule "INTERVAL:WAIT" (ms), and "free" (a GUI thread that never holds the lock: the
runner's own speed), one JSON line: the detection's wall time (median of --repeat, after a
warm-up; the bundled brain model on the bundled MNI sample, through the module's runner on a
headless scene, model loading included), how long single polls took (the GUI thread away from its
event loop: no repaint, no mouse; median, 95th percentile and longest, the longest including the
poll that copies the voxels or makes the point list), and the share of the detection's time the
GUI thread spent away. The schedules take turns, run by run, so that a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SCNLandmarks"))

from SCNLandmarksMRML import DetectionRunner, SCNLandmarksLogic, createHeadlessScene, loadVolumeFile  # noqa: E402
from SCNLandmarksMRML.catalogue import sampleModel  # noqa: E402

HELD_SWITCH_INTERVAL_S = 1000.0


def detect_free(runner: DetectionRunner, volume, model: Path) -> tuple[float, list[float]]:
    start = time.perf_counter()
    runner.start(volume, model, "cpu", keepHeatmaps=False)
    runner.wait(0.01)
    return time.perf_counter() - start, []


def detect_held(
    runner: DetectionRunner, volume, model: Path, interval: float, wait: float
) -> tuple[float, list[float]]:
    """One detection with a GUI thread that keeps the interpreter lock between its polls: its wall
    time and the duration of each poll (s)."""
    normal = sys.getswitchinterval()
    polls = []
    start = time.perf_counter()
    runner.start(volume, model, "cpu", keepHeatmaps=False)
    due = start + interval
    try:
        while True:
            sys.setswitchinterval(HELD_SWITCH_INTERVAL_S)
            while time.perf_counter() < due:  # the event loop, holding the lock
                pass
            sys.setswitchinterval(normal)
            before = time.perf_counter()
            result = runner.poll(wait)
            after = time.perf_counter()
            polls.append(after - before)
            if result is not None:
                break
            due += interval
            if due < after:  # a QTimer skips the timeouts it missed
                due = after + interval
    finally:
        sys.setswitchinterval(normal)
    return time.perf_counter() - start, polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--schedules", nargs="+", default=["100:50", "20:10", "20:5"], help="INTERVAL:WAIT in ms")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    entry = sampleModel()
    if entry is None or not entry.available or not entry.hasSample:
        sys.exit("the catalogue's sample model or image is missing")
    headless = createHeadlessScene()
    volume = loadVolumeFile(headless.scene, entry.sample)
    runner = DetectionRunner(SCNLandmarksLogic(headless.scene))
    detect_free(runner, volume, entry.path)  # warm-up: torch imported, caches filled

    schedules = [("free", None, None)] + [
        (text, *(float(ms) / 1000 for ms in text.split(":"))) for text in args.schedules
    ]
    runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name, _, _ in schedules}
    for _ in range(args.repeat):
        for name, interval, wait in schedules:
            runs[name].append(
                detect_free(runner, volume, entry.path)
                if interval is None
                else detect_held(runner, volume, entry.path, interval, wait)
            )
    for name, _, _ in schedules:
        seconds = [run[0] for run in runs[name]]
        polls = sorted(1000 * poll for run in runs[name] for poll in run[1])
        print(
            json.dumps(
                {
                    "schedule": name,
                    "model": entry.name,
                    "image": entry.sample.name,
                    "threads": args.threads,
                    "seconds": round(statistics.median(seconds), 3),
                    "seconds_range": [round(min(seconds), 3), round(max(seconds), 3)],
                    "poll_ms": {
                        "median": round(polls[len(polls) // 2], 1),
                        "p95": round(polls[int(0.95 * (len(polls) - 1))], 1),
                        "longest": round(polls[-1], 1),
                    }
                    if polls
                    else None,
                    "gui_away": round(statistics.median(sum(run[1]) / run[0] for run in runs[name]), 3)
                    if polls
                    else None,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

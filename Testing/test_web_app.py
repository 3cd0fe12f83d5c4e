"""The web review station end to end: `scn-landmarks serve` driven by Playwright in Debian's chromium.

The clinician's flow on the bundled brain sample: open it, detect, drag one landmark in Slicer's
slice view, export, and check the downloaded `.mrk.json` against where the point was dropped. Where
a point lies on screen and where it was dropped are read from the page's own cursor readout (the
physical position under the mouse), not from the server's internals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# The flags a root, offline, GPU-less machine needs (no sandbox, no background network calls).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "test-output"
WAIT_MS = 60_000  # the longest any step may take (detection on a slow CI core included)
SERVER_START_S = 120
SETTLE_S = 0.4  # a cursor readout unchanged this long is the answer to the last mouse move


@pytest.fixture(scope="module")
def server():
    """A review server on a free port; stopped at the end (and it stops itself when left idle)."""
    assert CHROMIUM.is_file(), "Debian's chromium is missing: the README's test command installs it"
    process = subprocess.Popen([sys.executable, "-m", "SCNLandmarksLib.cli", "serve", "--port", "0",
                                "--idle-timeout", "30", "--device", "cpu"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []  # printed at the end: pytest shows it when a test fails
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    url, deadline = None, time.monotonic() + SERVER_START_S
    while url is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        found = re.search(r"review station: (http://\S+)", "".join(output))
        url = found.group(1) if found else None
    assert url, "the server did not start:\n" + "".join(output[-50:])
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        print("server output:\n" + "".join(output[-200:]))


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1,
                                          accept_downloads=True)
            context.set_default_timeout(WAIT_MS)
            page = context.new_page()
            page.goto(server)
            page.wait_for_selector("#detect")
            yield page
        finally:
            browser.close()


def cursor_lps(page, x: float, y: float) -> np.ndarray:
    """Hover at page pixel (x, y) and read the physical position the page reports there.

    The mouse first visits a nearby pixel, so that the readout changes even when (x, y) is where it
    already was; the reading is taken once the readout has changed and then stayed the same for
    a while (the server's answer to this move, not to an earlier one).
    """
    readout = page.locator("#cursor-lps")
    for position in ((x + 7, y + 7), (x, y)):
        before = readout.inner_text()
        page.mouse.move(*position)
        page.wait_for_function("previous => document.querySelector('#cursor-lps').innerText !== previous",
                               arg=before)
        deadline, last, stable_since = time.monotonic() + WAIT_MS / 1000, readout.inner_text(), time.monotonic()
        while time.monotonic() - stable_since < SETTLE_S:
            assert time.monotonic() < deadline, "the cursor readout never settled"
            page.wait_for_timeout(50)
            current = readout.inner_text()
            if current != last:
                last, stable_since = current, time.monotonic()
    return np.array([float(v) for v in readout.inner_text().split(":")[1].split(",")])


def row_position(page, name: str) -> np.ndarray:
    text = page.locator(f"#landmarks tr[data-name='{name}'] .landmark-position").inner_text()
    return np.array([float(v) for v in text.split(",")])


def test_detect_drag_and_export_a_corrected_landmark(page, tmp_path):
    page.click("#open-sample")
    page.wait_for_function("document.querySelector('#image-name').innerText.includes('MNI152')")
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(32)")
    assert "32 of 32 landmarks found" in page.locator("#info").inner_text()

    # Centre the slice view on the anterior commissure, then find its pixel from the cursor readout.
    page.click("#landmarks tr[data-name='AC']")
    page.wait_for_timeout(1000)  # the slice view re-renders on the landmark's slice
    box = page.locator("#views").bounding_box()
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    origin = cursor_lps(page, x0, y0)
    along_x = cursor_lps(page, x0 + 100, y0) - origin
    along_y = cursor_lps(page, x0, y0 + 100) - origin
    per_pixel = np.stack([along_x, along_y], axis=1) / 100.0  # LPS mm per page pixel (3 x 2)
    predicted = row_position(page, "AC")
    assert abs((predicted - origin)[2]) < 1.0, "the view should show the landmark's slice"
    offset_px = np.linalg.lstsq(per_pixel, predicted - origin, rcond=None)[0]
    start = (x0 + offset_px[0], y0 + offset_px[1])

    # Drag it like a user: hover (the point highlights), press, move in steps, release.
    target = (start[0] + 60, start[1] + 40)
    page.mouse.move(*start)
    page.wait_for_timeout(500)
    page.mouse.down()
    page.mouse.move(*target, steps=15)
    page.mouse.up()
    page.wait_for_function(
        "document.querySelector(\"#landmarks tr[data-name='AC'] .landmark-status\").innerText === 'moved by user'")
    dropped = cursor_lps(page, *target)

    # The heatmap overlay of the moved landmark: heat colours appear in the slice view.
    page.click("#heatmap-visible")
    page.wait_for_timeout(1500)
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "web_review_after_drag.png"
    page.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    view = pixels[int(box["y"]):int(box["y"] + min(box["height"], 800)), int(box["x"]):]
    hot = (view[..., 0] > 180) & (view[..., 0] - view[..., 2] > 100)
    assert hot.sum() > 200, "no heatmap colours in the view"
    assert page.locator("#error").is_hidden()

    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    assert exported.name == "MNI152NLin2009cAsym_T1w_2mm.mrk.json"

    markups = json.loads(exported.read_text(encoding="utf-8"))["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    points = {p["label"]: np.array(p["position"]) for p in markups["controlPoints"]}
    assert len(points) == 32
    assert np.linalg.norm(points["AC"] - dropped) < 1.0, (points["AC"], dropped)
    assert np.linalg.norm(points["AC"] - predicted) > 5.0  # it really moved
    assert np.linalg.norm(points["PC"] - row_position(page, "PC")) < 0.1  # the others did not


def test_errors_appear_in_the_page_and_the_server_carries_on(page, tmp_path):
    broken = tmp_path / "broken.nrrd"
    broken.write_text("not an image")
    page.set_input_files("#upload", str(broken))
    page.wait_for_selector("#error:visible")
    assert "broken.nrrd" in page.locator("#error").inner_text()

    page.fill("#image-path", str(tmp_path / "absent.nii.gz"))
    page.click("#open-path")
    page.wait_for_function("document.querySelector('#error').innerText.includes('absent.nii.gz: file not found')")

    page.click("#open-sample")
    page.wait_for_function("document.querySelector('#image-name').innerText.includes('MNI152')")
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"\x80\x04not a model")
    page.fill("#model-path", str(not_a_model))
    page.click("#detect")
    page.wait_for_function("document.querySelector('#error').innerText.includes('model.safetensors')")
    assert "not a readable model file" in page.locator("#error").inner_text()

    # A 2D model on the 3D sample.
    cephalometric = REPO / "Resources" / "Models" / "cephalometric-19" / "model.safetensors"
    page.fill("#model-path", str(cephalometric))
    page.click("#detect")
    page.wait_for_function("document.querySelector('#error').innerText.includes('2D')")

    # Still serving: the right model works after the errors.
    page.fill("#model-path", "")
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(32)")
    assert page.locator("#error").is_hidden()

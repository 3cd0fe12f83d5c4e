"""The web review station end to end: `scn-landmarks serve` driven by Playwright in Debian's chromium.

The clinician's flow on the bundled brain sample: open it, detect, drag one landmark in Slicer's
slice view, reset and undo, export, and check the downloaded `.mrk.json` against where the point
was dropped, while a second reviewer works in a second session of the same server. Where a point
lies on screen and where it was dropped are read from the page's own cursor readout (the physical
position under the mouse), not from the server's internals. Every wait is bounded (WAIT_MS) and
every server started here is terminated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# The flags a root, offline, GPU-less machine needs (no sandbox, no background network calls).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "test-output"
WAIT_MS = 60_000  # the longest any step may take (detection on a slow CI core included)
SERVER_START_S = 120
SETTLE_S = 0.4  # a cursor readout unchanged this long is the answer to the last mouse move
BRAIN_MODEL = REPO / "Resources" / "Models" / "brain-afids-32" / "model.safetensors"
CEPH_MODEL = REPO / "Resources" / "Models" / "cephalometric-19" / "model.safetensors"
SAMPLE = "MNI152NLin2009cAsym_T1w_2mm"
TOKEN = "a-test-token-long-enough-0123456789"


@contextmanager
def review_server(*arguments: str, environment: dict[str, str] | None = None):
    """`scn-landmarks serve` on a free port: yields (start URL, output lines); always terminated."""
    process = subprocess.Popen(
        [sys.executable, "-m", "SCNLandmarksLib.cli", "serve", "--port", "0", "--device", "cpu", *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(environment or {})},
    )
    output: list[str] = []  # printed at the end: pytest shows it when a test fails
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    url, deadline = None, time.monotonic() + SERVER_START_S
    while url is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        found = re.search(r"review station: (http://\S+)", "".join(output))
        url = found.group(1) if found else None
    try:
        assert url, "the server did not start:\n" + "".join(output[-50:])
        yield url, output
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        print("server output:\n" + "".join(output[-200:]))


@pytest.fixture(scope="module")
def training_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training-folder")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The one folder the module's server lets the page open files from (--data-root)."""
    return tmp_path_factory.mktemp("data-root")


@pytest.fixture(scope="module")
def server(training_folder, data_root):
    with review_server(
        "--idle-timeout",
        "60",
        "--max-sessions",
        "8",
        "--training-folder",
        str(training_folder),
        "--data-root",
        str(data_root),
    ) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is missing: the README's test command installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, url: str, width: int = 1600, height: int = 1000):
    """A page in a fresh browser context (its own cookies: another reviewer), once the app is up."""
    context = browser.new_context(
        viewport={"width": width, "height": height}, device_scale_factor=1, accept_downloads=True
    )
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#detect")
    return page


def open_sample_and_detect(page) -> None:
    page.click("#open-sample")
    page.wait_for_function(f"document.querySelector('#image-name').innerText.includes('{SAMPLE}')")
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(32)")


def view_box(page, view: str = "Red") -> dict:
    """The page rectangle of one slice view (Red: axial, Yellow: sagittal, Green: coronal)."""
    return page.evaluate(f"""() => {{
        const r = document.querySelector(".slice-view[data-view='{view}']").parentElement.getBoundingClientRect();
        return {{x: r.x, y: r.y, width: r.width, height: r.height}}; }}""")


def cursor_position(page, x: float, y: float) -> np.ndarray:
    """Hover at page pixel (x, y) and read the physical position the page reports there.

    The mouse first visits a nearby pixel, so that the readout changes even when (x, y) is where it
    already was; the reading is taken once the readout has changed and then stayed the same for
    a while (the server's answer to this move, not to an earlier one).
    """
    readout = page.locator("#cursor-position")
    for position in ((x + 7, y + 7), (x, y)):
        before = readout.inner_text()
        page.mouse.move(*position)
        page.wait_for_function(
            "previous => document.querySelector('#cursor-position').innerText !== previous", arg=before
        )
        deadline, last, stable_since = time.monotonic() + WAIT_MS / 1000, readout.inner_text(), time.monotonic()
        while time.monotonic() - stable_since < SETTLE_S:
            assert time.monotonic() < deadline, "the cursor readout never settled"
            page.wait_for_timeout(50)
            current = readout.inner_text()
            if current != last:
                last, stable_since = current, time.monotonic()
    return np.array([float(v) for v in readout.inner_text().split(":")[1].split(",")])


def row(page, name: str):
    return page.locator(f"#landmarks tr[data-name='{name}']")


def row_position(page, name: str) -> np.ndarray:
    return np.array([float(v) for v in row(page, name).get_attribute("data-position").split(",")])


def wait_for_status(page, name: str, status: str) -> None:
    page.wait_for_function(
        f"document.querySelector(\"#landmarks tr[data-name='{name}'] .landmark-status\").innerText === '{status}'"
    )


def drag_landmark(
    page, name: str, by: tuple[float, float], steps: int = 15, center_on: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Center the views on a landmark (`center_on`, default `name`: its row is clicked, so selected),
    then drag `name` by `by` page pixels like a user; returns (position before, position dropped)."""
    row(page, center_on or name).click()
    page.wait_for_timeout(1000)  # the slice views re-render on the landmark's slices
    box = view_box(page, "Red")
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    origin = cursor_position(page, x0, y0)
    along_x = cursor_position(page, x0 + 100, y0) - origin
    along_y = cursor_position(page, x0, y0 + 100) - origin
    per_pixel = np.stack([along_x, along_y], axis=1) / 100.0  # LPS mm per page pixel (3 x 2)
    before = row_position(page, name)
    assert abs((before - origin)[2]) < 1.0, "the axial view should show the landmark's slice"
    offset_px = np.linalg.lstsq(per_pixel, before - origin, rcond=None)[0]
    start = (x0 + offset_px[0], y0 + offset_px[1])
    target = (start[0] + by[0], start[1] + by[1])
    page.mouse.move(*start)  # hover first: the point highlights
    page.wait_for_timeout(500)
    page.mouse.down()
    page.mouse.move(*target, steps=steps)
    page.mouse.up()
    wait_for_status(page, name, "moved by user")
    return before, cursor_position(page, *target)


def export(page, tmp_path: Path, click: str = "#export") -> dict[str, np.ndarray]:
    with page.expect_download() as download:
        page.click(click)
    exported = tmp_path / f"{time.monotonic_ns()}-{download.value.suggested_filename}"
    download.value.save_as(exported)
    assert exported.name.endswith(f"{SAMPLE}.mrk.json")
    markups = json.loads(exported.read_text(encoding="utf-8"))["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    return {p["label"]: np.array(p["position"]) for p in markups["controlPoints"]}


def has_color(pixels: np.ndarray, box: dict, test) -> int:
    region = pixels[int(box["y"]) : int(box["y"] + box["height"]), int(box["x"]) : int(box["x"] + box["width"])]
    return int(test(region[..., 0], region[..., 1], region[..., 2]).sum())


def is_halo(r, g, b):
    """The translucent cyan halo of a moved point (STATUS_COLORS' "moved by user") over the image:
    blue and green well above red (unlike gray, the green points and the heatmap's colors)."""
    return (b - r > 60) & (g - r > 40)


def is_low_confidence_halo(r, g, b):
    """The translucent orange halo of a low-confidence point (STATUS_COLORS' "low confidence") over
    the image: red well above green, green above blue."""
    return (r - g > 50) & (g - b > 20) & (r > 150)


def screenshot(page, name: str) -> np.ndarray:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))
    return np.asarray(Image.open(SCREENSHOTS / name).convert("RGB"), dtype=int)


def test_access_rules(monkeypatch):
    from SCNLandmarksWeb import access

    monkeypatch.delenv(access.TOKEN_ENVIRONMENT, raising=False)
    assert access.isLoopback("127.0.0.1") and access.isLoopback("::1") and access.isLoopback("localhost")
    assert not access.isLoopback("0.0.0.0") and not access.isLoopback("reading-room.example")
    assert access.resolveToken("127.0.0.1", None) is None
    with pytest.raises(access.AccessError, match="access token"):
        access.resolveToken("0.0.0.0", None)
    assert len(access.resolveToken("0.0.0.0", "auto")) >= 16
    with pytest.raises(access.AccessError, match="short|16"):
        access.resolveToken("0.0.0.0", "short")
    assert access.matches(TOKEN, TOKEN) and not access.matches(TOKEN[:-1], TOKEN) and not access.matches(None, TOKEN)


def test_the_page_opens_server_files_only_in_the_data_folders(tmp_path):
    from SCNLandmarksLib.errors import DataError
    from SCNLandmarksWeb.access import dataFile

    root, elsewhere = tmp_path / "data", tmp_path / "private"
    (root / "cases").mkdir(parents=True)
    elsewhere.mkdir()
    image, secret = root / "cases" / "scan.nrrd", elsewhere / "secret.nrrd"
    image.write_bytes(b"image")
    secret.write_bytes(b"secret")
    (root / "link.nrrd").symlink_to(secret)
    roots = [root.resolve()]
    assert dataFile(str(image), roots) == image.resolve()
    assert dataFile("cases/scan.nrrd", roots) == image.resolve()  # relative to a data folder
    assert dataFile(f"{root}/cases/../cases/scan.nrrd", roots) == image.resolve()

    def answer(typed: str) -> str:
        with pytest.raises(DataError) as refused:
            dataFile(typed, roots)
        return str(refused.value).removeprefix(typed)

    # Outside (directly, through a link, through ..), missing, or a folder: one answer, nothing to tell them apart.
    refusals = {
        answer(typed)
        for typed in (
            str(secret),
            str(root / "link.nrrd"),
            f"{root}/../private/secret.nrrd",
            "../private/secret.nrrd",
            "/etc/passwd",
            str(root / "absent.nrrd"),
            str(elsewhere / "absent.nrrd"),
            str(root / "cases"),
        )
    }
    assert refusals == {f": no such file in the station's data folders ({root.resolve()})"}, refusals
    with pytest.raises(DataError, match="--data-root"):
        dataFile(str(image), [])


def test_off_loopback_the_printed_link_names_this_machine_as_others_reach_it():
    from urllib.parse import urlsplit

    from SCNLandmarksWeb import access
    from SCNLandmarksWeb.launcher import LauncherOptions, startUrl

    url = startUrl(LauncherOptions(host="0.0.0.0", token=TOKEN), 8080, True)
    host = urlsplit(url).hostname
    assert host not in ("localhost", "0.0.0.0") and not access.isLoopback(host), url
    assert url.endswith(f":8080/?token={TOKEN}")


def test_two_reviewers_detect_correct_and_export_each_their_own(server, browser, tmp_path):
    first, second = new_page(browser, server), new_page(browser, server)
    assert first.url != second.url, "two reviewers must get two sessions"
    second.click("#open-sample")
    second.wait_for_function(f"document.querySelector('#image-name').innerText.includes('{SAMPLE}')")
    second.click("#detect")  # runs while the first reviewer works
    open_sample_and_detect(first)
    assert "32 of 32 landmarks found" in first.locator("#info").inner_text()

    # A 3D image gets Slicer's three orthogonal views, each showing landmarks (faded when off its slice).
    SCREENSHOTS.mkdir(exist_ok=True)
    first.wait_for_timeout(1500)
    shot = SCREENSHOTS / "web_review_three_views.png"
    first.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    for view in ("Red", "Yellow", "Green"):
        green = has_color(pixels, view_box(first, view), lambda r, g, b: (g > 150) & (g - r > 60) & (g - b > 60))
        assert green > 30, f"no landmarks drawn in the {view} view"
    assert has_color(pixels, view_box(first, "Red"), is_halo) < 5, "a halo before anything was moved"

    # Select one landmark, then drag another of its axial slice (a left/right pair): dragging
    # selects the dragged point, and Reset acts on it.
    positions = {
        name: row_position(first, name)
        for name in first.eval_on_selector_all("#landmarks tbody tr", "rows => rows.map(r => r.dataset.name)")
    }
    selected, name = min(
        ((a, b) for a in positions for b in positions if a < b),
        key=lambda pair: abs(positions[pair[0]][2] - positions[pair[1]][2]),
    )
    assert abs(positions[name][2] - positions[selected][2]) < 1.0, "no two landmarks on one axial slice"
    predicted, dropped = drag_landmark(first, name, (60, 40), steps=4, center_on=selected)
    assert first.locator("#landmarks tr.bg-blue-lighten-4").get_attribute("data-name") == name
    first.click("#reset-point")
    wait_for_status(first, name, "detected")
    assert np.linalg.norm(row_position(first, name) - predicted) < 0.1
    assert "moved by user" not in first.locator("#landmarks").inner_text()
    first.click("#undo-move")  # undoes the reset: back where it was dropped
    wait_for_status(first, name, "moved by user")
    assert np.linalg.norm(row_position(first, name) - dropped) < 1.0

    # The heatmap overlay of the moved landmark (a click on its row shows its own heatmap).
    first.click("#heatmap-visible")
    row(first, name).click()
    first.wait_for_function(
        f"document.querySelector('#heatmap-landmark').closest('.v-input').innerText.includes('{name}')"
    )
    first.wait_for_timeout(1500)
    shot = SCREENSHOTS / "web_review_after_drag.png"
    first.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    hot = has_color(pixels, view_box(first, "Red"), lambda r, g, b: (r > 180) & (r - b > 100))
    assert hot > 200, "no heatmap colors in the view"
    assert has_color(pixels, view_box(first, "Red"), is_halo) > 30, "the moved point is not marked on the view"
    assert first.locator("#error").is_hidden()

    points = export(first, tmp_path)
    assert len(points) == 32
    assert np.linalg.norm(points[name] - dropped) < 1.0, (points[name], dropped)
    assert np.linalg.norm(points[name] - predicted) > 5.0  # it really moved
    assert np.linalg.norm(points[selected] - positions[selected]) < 0.1  # the others did not

    # The second reviewer's session saw none of it, and exports its own points.
    second.wait_for_selector("#landmarks tbody tr:nth-child(32)")
    assert "moved by user" not in second.locator("#landmarks").inner_text()
    assert second.locator("#landmarks tr.bg-blue-lighten-4").count() == 0
    theirs = export(second, tmp_path)
    assert np.linalg.norm(theirs[name] - predicted) < 0.1
    assert np.linalg.norm(theirs[name] - points[name]) > 5.0


# The names of the table rows shown whole: below the table's header and above its end (and the page's).
VISIBLE_ROWS = """() => {
    const table = document.querySelector('#landmarks').getBoundingClientRect();
    const top = document.querySelector('#landmarks thead').getBoundingClientRect().bottom;
    const bottom = Math.min(table.bottom, window.innerHeight);
    return Array.from(document.querySelectorAll('#landmarks tbody tr')).filter(r => {
        const b = r.getBoundingClientRect(); return b.top >= top - 0.5 && b.bottom <= bottom + 0.5; })
        .map(r => r.dataset.name); }"""


def view_names(page, view: str) -> set[str]:
    """The landmarks a slice view names (the page's record of what it put in that view)."""
    names = page.locator(f".slice-view[data-view='{view}']").get_attribute("data-names")
    return set(names.split(",")) if names else set()


def is_selection_mark(r, g, b):
    """The amber cross and name of the selected point (marks.SELECTED_COLOR)."""
    return (r > 200) & (g > 150) & (b < 90)


def test_on_a_laptop_screen_the_table_shows_a_dozen_rows_and_the_selected_point_is_found_and_named(server, browser):
    from SCNLandmarksWeb.marks import NEAR_SLICES

    page = new_page(browser, server, 1366, 768)
    open_sample_and_detect(page)
    shown = page.evaluate(VISIBLE_ROWS)
    assert len(shown) >= 11, shown
    names = page.eval_on_selector_all("#landmarks tbody tr", "rows => rows.map(r => r.dataset.name)")
    positions = {name: row_position(page, name) for name in names}

    # Whoever selects a point (here Next to review, in its own order), its row is scrolled into the table's
    # view; the views are centred on it and mark it, and each view names it and the points near its slice
    # only (the sample's 2 mm slices; the others stay unnamed markers).
    spacing_mm = 2.0
    axis = {"Red": 2, "Yellow": 0, "Green": 1}  # LPS axis across the axial, sagittal and coronal slices
    selected, beyond = None, False
    for _ in names:
        page.click("#next-to-review")
        page.wait_for_function(
            "previous => { const r = document.querySelector('#landmarks tr.bg-blue-lighten-4');"
            " return r && r.dataset.name !== previous; }",
            arg=selected,
        )
        selected = page.locator("#landmarks tr.bg-blue-lighten-4").get_attribute("data-name")
        page.wait_for_function(f"name => ({VISIBLE_ROWS})().includes(name)", arg=selected)  # scrolled to it
        beyond = beyond or names.index(selected) >= len(shown)
        if beyond:
            break
    assert beyond, "Next to review never selected a row below the first screenful"
    page.wait_for_function(
        "name => ['Red', 'Yellow', 'Green'].every(v =>"
        " (document.querySelector(`.slice-view[data-view='${v}']`).dataset.names || '').split(',').includes(name))",
        arg=selected,
    )
    for view, index in axis.items():
        offset = {name: abs(position[index] - positions[selected][index]) for name, position in positions.items()}
        named = view_names(page, view)
        near = {name for name in names if offset[name] <= NEAR_SLICES * spacing_mm - 0.1}
        possibly_near = {name for name in names if offset[name] <= NEAR_SLICES * spacing_mm + 0.1}
        assert near <= named <= possibly_near | {selected}, (view, named, near)
    assert len(view_names(page, "Yellow")) < len(names) / 2, "the side view names every landmark"
    page.wait_for_timeout(1500)  # the views re-render around the selected point
    pixels = screenshot(page, "web_review_laptop_selected.png")
    for view in axis:
        assert has_color(pixels, view_box(page, view), is_selection_mark) > 30, f"no mark in the {view} view"

    # The ≡ button gives the views the whole width, and gives the controls back.
    width = view_box(page, "Red")["width"]
    red_width = "() => document.querySelector(\".slice-view[data-view='Red']\").parentElement.offsetWidth"
    page.click("#panel-toggle")
    page.locator("#panel").wait_for(state="hidden")
    page.wait_for_function(f"({red_width})() > {width + 200}")
    page.click("#panel-toggle")
    page.locator("#panel").wait_for()
    page.wait_for_function(f"({red_width})() < {width + 1}")
    page.context.close()


def test_review_first_heatmap_per_landmark_and_learning_from_corrections(server, browser, training_folder, tmp_path):
    from wslink.chunking import HEADER_LENGTH
    from wslink.protocol import MAX_MSG_SIZE

    from SCNLandmarksWeb.launcher import UPLOAD_ENVELOPE_BYTES

    page = new_page(browser, server)
    # The hard upload cap, on a second connection to this session: a message announcing more than the
    # limit is refused at its first frame (the rest never needs to come)...
    socket = page.url.replace("http://", "ws://").rstrip("/") + "/ws"
    too_big = 512 * 1024**2 + UPLOAD_ENVELOPE_BYTES + 1  # the server's default --max-upload-mb, and one byte
    header = (7).to_bytes(4, "little") + (0).to_bytes(4, "little") + too_big.to_bytes(4, "little")
    assert len(header) == HEADER_LENGTH
    assert websocket_close_code(socket, header + b"\0" * 1024) == 1009
    # ...and one frame larger than a wslink chunk from its frame header, while its bytes still come.
    assert websocket_close_code(socket, b"\0" * (MAX_MSG_SIZE + 1)) in (1009, CUT_WHILE_SENDING)
    # The page's own connection is untouched: the rest of this test runs on it.
    open_sample_and_detect(page)

    # A calibrated model: the expected error of every point, in mm, next to the confidence.
    assert "Exp. error (mm)" in page.locator("#landmarks thead").inner_text()
    table = page.eval_on_selector_all(
        "#landmarks tbody tr",
        """rows => rows.map(r => ({name: r.dataset.name,
        error: parseFloat(r.querySelector('.expected-error').innerText), flagged: r.dataset.flagged === 'true',
        marked: !!r.querySelector('.expected-error .mdi-alert')}))""",
    )
    errors = {entry["name"]: entry["error"] for entry in table}
    assert all(np.isfinite(e) and e > 0 for e in errors.values()), errors
    assert all(entry["flagged"] == entry["marked"] for entry in table), "flagged points carry the mark"

    # Next to review walks the flagged points first, then the others, each largest expected error first
    # (one rule with the orange mark), centring the views on each.
    walked = []
    for _ in range(4):
        previous = walked[-1] if walked else None
        page.click("#next-to-review")
        page.wait_for_function(
            "previous => { const r = document.querySelector('#landmarks tr.bg-blue-lighten-4');"
            " return r && r.dataset.name !== previous; }",
            arg=previous,
        )
        walked.append(page.locator("#landmarks tr.bg-blue-lighten-4").get_attribute("data-name"))
    flagged = {entry["name"] for entry in table if entry["flagged"]}
    expected_order = sorted(errors, key=lambda name: (name not in flagged, -errors[name]))
    assert walked == expected_order[:4], (walked, expected_order)
    page.wait_for_timeout(1000)  # the slice views re-render on the landmark's slices
    box = view_box(page, "Red")
    center = cursor_position(page, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert np.linalg.norm(center - row_position(page, walked[-1])) < 2.0, "the views are not centered on it"
    # Correcting the point the walk is on keeps the walk's place: Next goes on to the fifth, not the first.
    drag_landmark(page, walked[-1], (40, 30), steps=4)
    page.click("#next-to-review")
    page.wait_for_function(
        "moved => { const r = document.querySelector('#landmarks tr.bg-blue-lighten-4');"
        " return r && r.dataset.name !== moved; }",
        arg=walked[-1],
    )
    assert page.locator("#landmarks tr.bg-blue-lighten-4").get_attribute("data-name") == expected_order[4]

    # The all-landmarks heatmap, each landmark scaled to its own peak: heat in all three views.
    page.click("#heatmap-visible")
    chosen = page.locator("#heatmap-landmark").evaluate("e => e.closest('.v-input').innerText")
    assert "each scaled to its peak" in chosen
    page.wait_for_timeout(1500)
    pixels = screenshot(page, "web_review_heatmap_all_landmarks.png")
    for view in ("Red", "Yellow", "Green"):
        hot = has_color(pixels, view_box(page, view), lambda r, g, b: (r > 180) & (r - b > 100))
        assert hot > 100, f"no heatmap in the {view} view"

    # Save as training pair: the case joins the server's training folder; saving it again asks first.
    page.click("#training-button")
    case = page.locator("#case-id").input_value()
    assert case == SAMPLE
    page.click("#save-training-pair")
    page.wait_for_function("document.querySelector('#info').innerText.includes('Saved case')")
    saved = {path.name: path.stat().st_mtime_ns for path in training_folder.iterdir() if path.is_file()}
    assert {f"{case}.nrrd", f"{case}.mrk.json", "dataset.toml"} <= set(saved)
    assert "1 case" in page.locator("#training-folder").inner_text()
    page.click("#save-training-pair")
    page.locator("#confirm-replace-case").wait_for()
    page.click("#replace-case-cancel")
    page.locator("#confirm-replace-case").wait_for(state="hidden")
    assert {path.name: path.stat().st_mtime_ns for path in training_folder.iterdir() if path.is_file()} == saved
    # Another reviewer saving the same image into the shared folder replaces nothing (nor is asked to):
    # their case gets a name of its own, and the page says why.
    other = new_page(browser, server)
    open_sample_and_detect(other)
    other.click("#training-button")
    assert other.locator("#case-id").input_value() == case
    other.click("#save-training-pair")
    other.wait_for_function("document.querySelector('#info').innerText.includes('another reviewer')")
    assert f"saved beside it as {case}-2 (2 cases)" in other.locator("#info").inner_text()
    assert other.locator("#confirm-replace-case").is_hidden()
    assert {f"{case}-2.nrrd", f"{case}-2.mrk.json"} <= {path.name for path in training_folder.iterdir()}
    assert all(training_folder.joinpath(n).stat().st_mtime_ns == saved[n] for n in (f"{case}.nrrd", f"{case}.mrk.json"))
    other.context.close()

    # A base that is not a model is named before any training starts, and nothing is added.
    user_models = Path(os.environ["SCN_LANDMARKS_USER_MODELS"])  # conftest's, inherited by the server
    listed_before = sorted(user_models.glob("*/entry.json"))
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("not a model")
    page.fill("#model-path", str(not_a_model))
    page.click("#start-finetune")
    page.wait_for_selector("#finetune-error:visible")
    assert "notes.safetensors" in page.locator("#finetune-error").inner_text()
    page.fill("#model-path", "")

    # Fine-tune the chosen model on it through the review session's training job, with progress in the
    # page, and Cancel at once: the run's first iteration already spends the tiny budget, and the Cancel is
    # seen at the end of it. Two cases are too few to hold some aside, so the model was never compared with
    # its base: it joins no model list, and the page says why.
    page.fill("#finetune-minutes", "0.001")
    page.fill("#finetune-name", "Brain, our corrections")
    page.evaluate("""() => { window.trainingSeen = [];
        new MutationObserver(() => window.trainingSeen.push(document.querySelector('#finetune-message').innerText))
            .observe(document.querySelector('#finetune-message'), {childList: true, subtree: true,
                                                                    characterData: true}); }""")
    page.click("#start-finetune")
    page.click("#cancel-finetune")
    page.wait_for_selector("#finetune-result:visible", timeout=3 * WAIT_MS)
    result = page.locator("#finetune-result").inner_text()
    assert result.startswith("Not validated: 2 cases are too few") and "nothing was added" in result, result
    seen = page.evaluate("window.trainingSeen")
    assert any("cancelling" in message for message in seen), seen
    assert any("stage: iteration 1 of" in message for message in seen), f"no training progress: {seen}"
    assert sorted(user_models.glob("*/entry.json")) == listed_before
    assert not list(user_models.glob(".*")), "a staging folder was left behind"
    screenshot(page, "web_training_not_validated.png")
    assert "Brain, our corrections" not in page.locator("#model").evaluate("e => e.closest('.v-input').innerText")
    page.click("#training-close")


def run_coroutine(coroutine):
    """Run a coroutine to its end on a thread of its own (Playwright's sync API holds this thread's loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


CUT_WHILE_SENDING = "cut while sending"


def websocket_close_code(url: str, frame: bytes) -> int | str | None:
    """Send one binary frame on a session's websocket; the code the server closes it with,
    CUT_WHILE_SENDING when it closed the connection before the frame was through, None when it stayed open."""
    import aiohttp

    async def attempt() -> int | str | None:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(url, max_msg_size=0) as socket:
                try:
                    await socket.send_bytes(frame)
                except ConnectionError:
                    return CUT_WHILE_SENDING
                try:
                    message = await socket.receive(timeout=WAIT_MS / 1000)
                except TimeoutError:
                    return None
                return (
                    socket.close_code
                    if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
                    else None
                )

    return run_coroutine(attempt())


def test_cancel_keeps_the_previous_result_and_corrections_are_never_lost_silently(server, browser, tmp_path):
    page = new_page(browser, server)
    open_sample_and_detect(page)
    _, dropped = drag_landmark(page, "PC", (-50, 30))
    table = page.locator("#landmarks").inner_text()

    # A model not loaded yet: the page says "loading model" while it loads. Cancel then changes nothing.
    model_copy = tmp_path / "brain copy.safetensors"
    shutil.copy(BRAIN_MODEL, model_copy)
    page.fill("#model-path", str(model_copy))
    page.evaluate("""() => { window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(document.querySelector('#progress-message').innerText))
            .observe(document.querySelector('#progress-message'), {childList: true, subtree: true,
                                                                   characterData: true}); }""")
    page.click("#detect")
    page.locator("#confirm-discard").wait_for()  # re-detecting would replace the corrections: asked first
    page.click("#confirm-discard-button")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#info').innerText.includes('cancelled')")
    page.wait_for_selector("#detect:not([disabled])")
    assert "loading model" in page.evaluate("window.progressSeen")
    assert page.locator("#landmarks").inner_text() == table
    assert np.linalg.norm(row_position(page, "PC") - dropped) < 1.0
    assert page.locator("#error").is_hidden()

    # Opening another image with corrections not exported asks first: Cancel keeps everything...
    page.click("#open-sample")
    page.locator("#confirm-discard").wait_for()
    page.click("#confirm-cancel")
    page.locator("#confirm-discard").wait_for(state="hidden")
    assert page.locator("#landmarks").inner_text() == table
    # ...Export downloads them, then goes on.
    page.click("#open-sample")
    points = export(page, tmp_path, click="#confirm-export")
    assert np.linalg.norm(points["PC"] - dropped) < 1.0
    page.wait_for_function("!document.querySelector('#landmarks tbody tr')")
    # Nothing unsaved now: the next open asks nothing.
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(32)")
    page.click("#open-sample")
    page.wait_for_function("!document.querySelector('#landmarks tbody tr')")
    assert page.locator("#confirm-discard").is_hidden()


def test_corrections_survive_a_closed_tab_and_an_ended_session(browser, tmp_path):
    with review_server("--idle-timeout", "3") as (station, output):
        page = new_page(browser, station)
        session_url, context = page.url, page.context
        open_sample_and_detect(page)
        _, dropped = drag_landmark(page, "PC", (-50, 30))

        # Saved as a training pair into the session's own folder (no --training-folder): that folder goes
        # with the session, so the corrections still count as not exported.
        page.click("#training-button")
        page.click("#start-finetune")
        page.wait_for_function("document.querySelector('#finetune-error').innerText.includes('no cases yet')")
        page.click("#save-training-pair")
        page.wait_for_function("document.querySelector('#info').innerText.includes('Saved case')")
        assert "removed when the session ends: export the points" in page.locator("#info").inner_text()
        assert "1 case" in page.locator("#training-folder").inner_text()
        assert page.locator("#finetune-error").is_hidden(), "a stale 'no cases yet' beside '1 case'"
        page.click("#training-close")
        page.click("#open-sample")
        page.locator("#confirm-discard").wait_for()
        page.click("#confirm-cancel")

        # Leaving the page asks first (the reviewer stays here)...
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.dismiss()))
        page.close(run_before_unload=True)
        deadline = time.monotonic() + WAIT_MS / 1000
        while not asked and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        assert asked == ["beforeunload"] and not page.is_closed()
        # ...but the tab is closed all the same: the session ends after the idle time.
        page.close()
        deadline = time.monotonic() + WAIT_MS / 1000
        while not re.search(r"session \S+ ended", "".join(output)):
            assert time.monotonic() < deadline, "the idle session did not end"
            time.sleep(0.5)

        # Its address, opened again in this browser (whose cache had the page), says what happened.
        again = context.new_page()
        again.goto(session_url)
        assert "ended" in again.locator("#title").inner_text()
        assert "are kept while the station runs" in again.locator("#message").inner_text()

        # A new session in this browser offers the corrections back: download them, or restore the review.
        again.goto(station)
        again.wait_for_selector("#recovery")
        assert f"{SAMPLE}.nii.gz: 1 point moved" in again.locator("#recovery-text").inner_text()
        kept = export(again, tmp_path, click="#recovery-download")
        assert np.linalg.norm(kept["PC"] - dropped) < 1.0
        again.click("#recovery-restore")
        again.wait_for_selector("#landmarks tbody tr:nth-child(32)")
        wait_for_status(again, "PC", "moved by user")
        assert np.linalg.norm(row_position(again, "PC") - dropped) < 1.0
        assert "moved by user" not in row(again, "AC").inner_text()
        assert again.locator("#recovery").count() == 0
        again.click("#open-sample")  # still not exported: asked first
        again.locator("#confirm-discard").wait_for()
        again.click("#confirm-cancel")
        # Another browser (another reviewer) is offered nothing.
        other = new_page(browser, station)
        other.wait_for_timeout(500)
        assert other.locator("#recovery").count() == 0
        other.context.close()
    # The station stops under an open page: the page says what happened instead of going blank.
    again.wait_for_function("document.querySelector('#title')?.innerText.includes('session has ended')")
    context.close()


def logged(output: list[str], pattern: str, count: int = 1) -> list[str]:
    """The first group of the first `count` lines of the station's output that match `pattern`, once there are
    that many (bounded wait)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while len(found := re.findall(pattern, "".join(output))) < count:
        assert time.monotonic() < deadline, f"no {count} lines like {pattern!r} in the station's output"
        time.sleep(0.2)
    return found[:count]


def test_a_session_started_ahead_serves_the_next_reviewer_and_the_next_spare_starts_at_once(browser):
    spare = r"session (\S+) ready \(a spare\)"
    with review_server("--max-sessions", "2") as (station, output):
        [first] = logged(output, spare)  # started with the station, before anyone asked
        page = new_page(browser, station)
        assert f"/s/{first}" in page.url, "the first reviewer did not get the session started ahead"
        # Taking it starts the next one, which the next reviewer gets.
        second = logged(output, spare, 2)[1]
        other = new_page(browser, station)
        assert f"/s/{second}" in other.url
        # Spares count towards --max-sessions: with two reviewers in, none is started, and a third is refused.
        third = browser.new_context().new_page()
        assert third.goto(station).status == 503
        assert len(re.findall(r"session \S+ started", "".join(output))) == 2
        for each in (page, other, third):
            each.context.close()


def test_bad_files_get_user_level_errors_and_the_server_carries_on(server, browser, data_root, tmp_path):
    page = new_page(browser, server)
    broken = tmp_path / "broken.nrrd"
    broken.write_text("not an image")
    page.set_input_files("#upload", str(broken))
    page.wait_for_selector("#error:visible")
    message = page.locator("#error").inner_text()
    assert message.startswith("broken.nrrd:"), message
    assert "/tmp" not in message and str(tmp_path) not in message and "0x" not in message, message
    assert page.locator("#upload").input_value() == "", "the rejected file's name stays in the field"

    # A typed path opens only files in the data folder; outside it, the same answer as for a missing file.
    for typed in (str(data_root / "absent.nii.gz"), "/etc/passwd", f"{data_root}/../../../etc/hostname"):
        page.fill("#image-path", typed)
        page.click("#open-path")
        page.wait_for_function("typed => document.querySelector('#error').innerText.startsWith(typed)", arg=typed)
        assert (
            page.locator("#error").inner_text() == f"{typed}: no such file in the station's data folders ({data_root})"
        )

    page.click("#open-sample")
    page.wait_for_function(f"document.querySelector('#image-name').innerText.includes('{SAMPLE}')")
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"\x80\x04not a model")
    page.fill("#model-path", str(not_a_model))
    page.click("#detect")
    page.wait_for_function("document.querySelector('#error').innerText.includes('model.safetensors')")
    assert "not a readable model file" in page.locator("#error").inner_text()

    # A 2D model on the 3D sample.
    page.fill("#model-path", str(CEPH_MODEL))
    page.click("#detect")
    page.wait_for_function("document.querySelector('#error').innerText.includes('2D')")

    # Still serving: the right model works after the errors.
    page.fill("#model-path", "")
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(32)")
    assert page.locator("#error").is_hidden()

    # A colour picture is refused in terms of this page (no Slicer module to use here); the sample stays.
    colour = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(colour)
    page.set_input_files("#upload", str(colour))
    page.wait_for_function("document.querySelector('#error').innerText.includes('photo.png')")
    message = page.locator("#error").inner_text()
    assert "colour image" in message and "greyscale" in message and "module" not in message, message
    assert SAMPLE in page.locator("#image-name").inner_text()

    # A 2D picture (a grey X-ray stored as RGB, as many are): one view, no slice slider, positions with two values.
    picture = tmp_path / "xray.png"
    sagittal_picture(picture)
    assert Image.open(picture).mode == "RGB"
    page.set_input_files("#upload", str(picture))
    page.wait_for_function("document.querySelector('#image-name').innerText === 'xray.png'")
    # The brain model was chosen: a 2D image gets a 2D model at once, and the page says so.
    assert "The model is now Cephalometric" in page.locator("#info").inner_text()
    assert "Cephalometric" in page.locator("#model").evaluate("e => e.closest('.v-input').innerText")
    assert page.locator(".slice-view").count() == 1
    assert page.locator(".slice-slider:visible").count() == 0
    box = view_box(page)
    assert len(cursor_position(page, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)) == 2
    assert "pixels" in page.locator("#cursor-position").inner_text()

    # A 2D model on it: expected errors in px, points above their landmark's usual error marked, and
    # the export as `scn-landmarks detect` writes it, positions labelled px, not mm.
    page.fill("#model-path", str(CEPH_MODEL))
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr:nth-child(19)")
    assert "Exp. error (px)" in page.locator("#landmarks thead").inner_text()
    # A picture is one slice: its one view names every point found (with the model's abbreviations).
    found = page.eval_on_selector_all("#landmarks tbody tr", "rows => rows.filter(r => r.dataset.position).length")
    page.wait_for_function(
        "count => (document.querySelector(\".slice-view[data-view='Red']\").dataset.names || '').split(',')"
        ".filter(n => n).length === count",
        arg=found,
    )
    marks = page.eval_on_selector_all(
        "#landmarks tbody tr",
        """rows => rows.map(r =>
        [r.dataset.flagged === 'true', !!r.querySelector('.expected-error .mdi-alert')])""",
    )
    assert all(flagged == marked for flagged, marked in marks)
    assert any(flagged for flagged, _ in marks), "a brain slice is no cephalogram: some points must be flagged"
    # Its low-confidence points are ringed orange in the view (the markups 'selected' flag stays the user's).
    statuses = page.eval_on_selector_all("#landmarks .landmark-status", "cells => cells.map(c => c.innerText)")
    assert "low confidence" in statuses, "a brain slice is no cephalogram: some points must be uncertain"
    page.wait_for_timeout(1000)
    assert has_color(screenshot(page, "web_low_confidence.png"), view_box(page), is_low_confidence_halo) > 30
    with page.expect_download() as download:
        page.click("#export")
    web = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))["markups"][0]
    from SCNLandmarksLib.cli import main as command_line

    assert (
        command_line(["detect", str(CEPH_MODEL), str(picture), "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    )
    cli = json.loads((tmp_path / "cli" / "xray.mrk.json").read_text(encoding="utf-8"))["markups"][0]
    assert web["coordinateUnits"] == cli["coordinateUnits"] == "px"
    assert [p["label"] for p in web["controlPoints"]] == [p["label"] for p in cli["controlPoints"]]
    np.testing.assert_allclose(
        [p["position"] for p in web["controlPoints"]], [p["position"] for p in cli["controlPoints"]], atol=1e-3
    )
    described = [[(m["name"], m.get("units")) for m in markup["measurements"]] for markup in (web, cli)]
    assert (
        described[0]
        == described[1]
        == [
            ("confidence", None),
            ("expected error", "px"),
            ("coverage radius 90%", "px"),
        ]
    )
    for ours, theirs in zip(web["measurements"], cli["measurements"]):
        np.testing.assert_allclose(ours["controlPointValues"], theirs["controlPointValues"], atol=1e-3)
    duplicates = page.evaluate("""() => { const seen = {};
        document.querySelectorAll('[id]').forEach(e => seen[e.id] = (seen[e.id] || 0) + 1);
        return Object.keys(seen).filter(id => seen[id] > 1); }""")
    assert duplicates == []


def sagittal_picture(path: Path) -> None:
    """An RGB PNG (no spacing; red = green = blue) of the sample's mid-sagittal slice at about a
    cephalogram's size: the cephalometric model finds some points there, and flags some."""
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(REPO / "Resources" / "Samples" / f"{SAMPLE}.nii.gz")))
    middle = volume[::-1, :, volume.shape[2] // 2].astype(float)
    middle = (255 * (middle - middle.min()) / (middle.max() - middle.min())).astype(np.uint8)
    Image.fromarray(middle).resize((middle.shape[1] * 16, middle.shape[0] * 16)).convert("RGB").save(path)


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        return opener.open(request, timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_off_loopback_a_token_is_required_sessions_are_capped_and_end_when_idle(browser, tmp_path):
    refused = subprocess.run(
        [sys.executable, "-m", "SCNLandmarksLib.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "SCN_LANDMARKS_TOKEN"},
    )
    assert refused.returncode == 2 and "access token" in refused.stderr

    temporary = tmp_path / "server-tmp"
    temporary.mkdir()
    with review_server(
        "--host",
        "0.0.0.0",
        "--max-sessions",
        "1",
        "--idle-timeout",
        "2",
        environment={"SCN_LANDMARKS_TOKEN": TOKEN, "TMPDIR": str(temporary)},
    ) as (url, output):
        port = int(re.search(r":(\d+)/", url).group(1))
        base = f"http://127.0.0.1:{port}"
        assert TOKEN not in "".join(output), "a token given by the user is never printed"
        assert _status(f"{base}/") == 401
        assert _status(f"{base}/?token=wrong-{TOKEN}") == 401
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        assert _status(f"{base}/s/anything/ws", upgrade) == 401  # the websocket (uploads travel on it)
        assert _status(f"{base}/?token={TOKEN}") == 303  # sets the cookie and drops the token from the address

        page = new_page(browser, f"{base}/?token={TOKEN}")
        assert "token" not in page.url
        session_url = page.url
        picture = tmp_path / "upload.png"
        Image.fromarray(np.full((40, 50), 128, dtype=np.uint8)).save(picture)
        page.set_input_files("#upload", str(picture))
        page.wait_for_function("document.querySelector('#image-name').innerText === 'upload.png'")
        uploads = list(temporary.glob("scn-landmarks-web-*/*/upload-*/upload.png"))
        assert len(uploads) == 1, "the upload is kept in the session's own temporary folder"

        # One session at most: a second one gets a page saying so.
        other = page.context.new_page()
        response = other.goto(base + "/")
        assert response.status == 503 and "in use" in other.locator("#title").inner_text()
        other.close()

        # Closing the page ends the session after the idle time; its folder goes with it.
        page.context.close()
        deadline = time.monotonic() + WAIT_MS / 1000
        while uploads[0].parent.parent.exists():
            assert time.monotonic() < deadline, "the idle session did not end"
            time.sleep(0.5)
        ended = browser.new_context().new_page()
        ended.goto(f"{session_url}?token={TOKEN}")
        assert "ended" in ended.locator("#title").inner_text()
        ended.context.close()

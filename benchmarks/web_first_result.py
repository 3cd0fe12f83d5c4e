"""How long a reviewer waits for the web station's first result: one JSON line per reviewer.

    python benchmarks/web_first_result.py [--settle 30] [--gap 30] [--rounds 2] [--warm-spares 1]

Starts `scn-landmarks serve` (CPU; --warm-spares as given: 0 starts each session when its reviewer
comes, as the station did before it kept spares), lets it settle for --settle seconds (a station
that has been up a while), then each reviewer, in a browser context of their own (a new session), opens the
station's address, opens an image and clicks Detect: a cephalogram upload (the first PNG of the
shared data's cephalograms, else the bundled brain sample's mid-sagittal slice at cephalogram
size), then the bundled brain sample (the Sample button); --rounds repeats the pair, --gap seconds
apart. Each line gives the seconds from opening the address to the page being usable (the session
process started and connected), to the image shown, and to the first result listed
(`first_result_s`), and the model the page chose. Needs the test extras (Playwright) and Debian's
chromium; it reuses the browser tests' station and page helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "Testing"))
sys.path.insert(0, str(REPO / "benchmarks"))

from shipped_points import head_profile  # noqa: E402
from test_web_app import CHROMIUM, CHROMIUM_ARGS, SAMPLE, WAIT_MS, review_server  # noqa: E402


def cephalogram(folder: Path) -> Path:
    found = sorted((SHARED / "ceph" / "images").glob("*.png"))
    if found:
        return found[0]
    import SimpleITK as sitk

    path = folder / "head_profile.png"
    sample = sitk.ReadImage(str(REPO / "Resources" / "Samples" / f"{SAMPLE}.nii.gz"))
    picture = sitk.Cast(sitk.RescaleIntensity(head_profile(sample)), sitk.sitkUInt8)
    sitk.WriteImage(picture, str(path))
    return path


def first_result(browser, url: str, image: Path | None) -> dict[str, object]:
    """One new reviewer: open the address, open `image` (None: the bundled sample), detect."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("#detect:not([disabled])")
    usable = time.perf_counter()
    if image is None:
        page.click("#open-sample")
        name = f"{SAMPLE}.nii.gz"
    else:
        page.set_input_files("#upload", str(image))
        name = image.name
    page.wait_for_function("name => document.querySelector('#image-name').innerText === name", arg=name)
    shown = time.perf_counter()
    page.click("#detect")
    page.wait_for_selector("#landmarks tbody tr")
    done = time.perf_counter()
    model = page.locator("#model").evaluate("e => e.closest('.v-input').innerText").split("\n")[-1]
    context.close()
    return {
        "image": name,
        "model": model,
        "page_usable_s": round(usable - started, 2),
        "image_shown_s": round(shown - started, 2),
        "first_result_s": round(done - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=30.0, help="seconds from the start to the first reviewer")
    parser.add_argument("--gap", type=float, default=30.0, help="seconds between two reviewers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-spares", type=int, default=1, help="the station's --warm-spares")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    print(json.dumps({"cpus": os.cpu_count(), "load_average": os.getloadavg(), "warm_spares": args.warm_spares}))
    station = review_server("--warm-spares", str(args.warm_spares))
    with tempfile.TemporaryDirectory() as folder, station as (url, _), sync_playwright() as playwright:
        images = [cephalogram(Path(folder)), None]
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        time.sleep(args.settle)
        for round_number in range(args.rounds):
            for number, image in enumerate(images):
                if round_number or number:
                    time.sleep(args.gap)
                print(json.dumps({"round": round_number + 1, **first_result(browser, url, image)}), flush=True)
        print(json.dumps({"load_average": os.getloadavg()}), flush=True)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

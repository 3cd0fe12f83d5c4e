"""Tests of SCNLandmarksLib.evaluation (metrics, JSON, report) and SCNLandmarksLib.overlay (PNG overlays)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from SCNLandmarksLib.config import InferenceConfig
from SCNLandmarksLib.errors import DataError
from SCNLandmarksLib.evaluation import EvaluationResult, evaluate, write_metrics, write_report
from SCNLandmarksLib.geometry import ImageGeometry
from SCNLandmarksLib.landmark_set import LandmarkSet
from SCNLandmarksLib.overlay import (
    CYAN,
    MAGENTA,
    PANEL_GAP,
    confidence_color,
    display_geometries_3d,
    render_landmarks_png,
)
from SCNLandmarksLib.vocabulary import STATUS_COLORS, LandmarkStatus

GREEN, ORANGE, RED = (
    STATUS_COLORS[s] for s in (LandmarkStatus.DETECTED, LandmarkStatus.LOW_CONFIDENCE, LandmarkStatus.MISSING)
)

NAN = np.nan
NAMES = ["a", "b", "c"]


def _sets():
    """Two images; errors: img1 a=1, b=3, c missed; img2 a=5, b excluded (no truth), c=2."""
    truths = {
        "img1": LandmarkSet(NAMES, [[0, 0], [10, 10], [20, 20]]),
        "img2": LandmarkSet(NAMES, [[0, 0], [NAN, NAN], [5, 5]]),
    }
    predictions = {
        "img1": LandmarkSet(NAMES, [[1, 0], [10, 13], [NAN, NAN]]),
        # Other name order: evaluation must match by name.
        "img2": LandmarkSet(["c", "b", "a"], [[5, 7], [1, 1], [3, 4]]),
    }
    return predictions, truths


# --- metrics --------------------------------------------------------------------------------------


def test_exact_metrics():
    predictions, truths = _sets()
    r = evaluate(predictions, truths)
    assert r.radii == (2.0, 2.5, 3.0, 4.0) and r.outlier_radius == 4.0
    assert r.landmark_names == NAMES and r.image_ids == ["img1", "img2"]
    np.testing.assert_allclose(r.errors, [[1, 3, NAN], [5, NAN, 2]])
    np.testing.assert_array_equal(r.missed, [[False, False, True], [False, False, False]])

    o = r.overall
    errs = np.array([1.0, 3.0, 5.0, 2.0])
    assert (o.count, o.missed, o.total) == (4, 1, 5)
    assert o.mean == pytest.approx(2.75)
    assert o.sd == pytest.approx(errs.std())
    assert o.median == pytest.approx(2.5)
    assert o.max == pytest.approx(5.0)
    # Denominator 5 (4 detected + 1 missed); errors <= r counted.
    assert o.sdr == pytest.approx({2.0: 2 / 5, 2.5: 2 / 5, 3.0: 3 / 5, 4.0: 3 / 5})
    assert o.outliers == 1  # 5 > 4

    a, b, c = (r.per_landmark[n] for n in NAMES)
    assert (a.count, a.missed, a.mean, a.max, a.outliers) == (2, 0, 3.0, 5.0, 1)
    assert a.sd == pytest.approx(2.0) and a.median == pytest.approx(3.0)
    assert a.sdr == pytest.approx({2.0: 0.5, 2.5: 0.5, 3.0: 0.5, 4.0: 0.5})
    # b: img2's truth is missing, so excluded: only the error 3 counts.
    assert (b.count, b.missed, b.mean, b.sd) == (1, 0, 3.0, 0.0)
    assert b.sdr == pytest.approx({2.0: 0.0, 2.5: 0.0, 3.0: 1.0, 4.0: 1.0})
    # c: one missed, one error of 2.
    assert (c.count, c.missed, c.mean) == (1, 1, 2.0)
    assert c.sdr == pytest.approx({2.0: 0.5, 2.5: 0.5, 3.0: 0.5, 4.0: 0.5})

    img1, img2 = r.per_image
    assert img1.image_id == "img1" and img1.count == 2 and img1.missed == ["c"]
    assert img1.mean == pytest.approx(2.0) and img1.max == pytest.approx(3.0)
    assert img2.missed == [] and img2.mean == pytest.approx(3.5) and img2.max == pytest.approx(5.0)
    assert img2.errors["a"] == pytest.approx(5.0) and math.isnan(img2.errors["b"])
    # Missed landmarks rank first.
    assert [row.image_id for row in r.worst_images()] == ["img1", "img2"]


def test_custom_radii_outliers_and_px():
    predictions, truths = _sets()
    r = evaluate(predictions, truths, unit="px", radii=(4, 1), outlier_radius=2.5)
    assert r.unit == "px" and r.radii == (1.0, 4.0)
    assert r.overall.sdr == pytest.approx({1.0: 1 / 5, 4.0: 3 / 5})
    assert r.overall.outliers == 2  # 3 and 5
    with pytest.raises(ValueError):
        evaluate(predictions, truths, unit="px")
    with pytest.raises(ValueError):
        evaluate(predictions, truths, unit="cm")
    with pytest.raises(ValueError):
        evaluate(predictions, truths, radii=(0,))


def test_missing_prediction_images_and_name_errors():
    predictions, truths = _sets()
    del predictions["img2"]
    predictions["extra"] = LandmarkSet(NAMES, np.zeros((3, 2)))
    r = evaluate(predictions, truths)
    assert r.images_without_prediction == ["img2"] and r.images_without_truth == ["extra"]
    assert r.overall.count == 2 and r.overall.missed == 3  # img1 c, img2 a and c
    assert r.per_image[1].missed == ["a", "c"] and math.isnan(r.per_image[1].mean)

    bad = {"img1": LandmarkSet(["a", "b", "zzz"], np.zeros((3, 2)))}
    with pytest.raises(DataError, match="zzz"):
        evaluate(bad, truths)
    with pytest.raises(DataError):
        evaluate({"other": LandmarkSet(NAMES, np.zeros((3, 2)))}, truths)
    with pytest.raises(DataError):
        evaluate({"img1": LandmarkSet(NAMES, np.zeros((3, 3)))}, truths)


def test_no_detections_gives_nan_stats_and_null_json(tmp_path):
    truths = {"i": LandmarkSet(["a"], [[1.0, 2.0]])}
    r = evaluate({"i": LandmarkSet(["a"], [[NAN, NAN]])}, truths)
    assert r.overall.count == 0 and r.overall.missed == 1
    assert math.isnan(r.overall.mean) and r.overall.sdr[2.0] == 0.0
    data = json.loads(write_metrics(r, tmp_path).read_text())
    assert data["overall"]["mean"] is None and data["per_image"][0]["errors"] == {"a": None}


def test_json_round_trip(tmp_path):
    predictions, truths = _sets()
    r = evaluate(predictions, truths)
    path = write_metrics(r, tmp_path / "sub" / "metrics.json")
    assert path == tmp_path / "sub" / "metrics.json"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(r.to_json()))
    assert data["overall"]["sdr"] == {"2": 0.4, "2.5": 0.4, "3": 0.6, "4": 0.6}
    assert data["per_landmark"]["a"]["mean"] == 3.0
    assert data["per_image"][0] == {
        "image": "img1",
        "count": 2,
        "missed": ["c"],
        "mean": 2.0,
        "max": 3.0,
        "errors": {"a": 1.0, "b": 3.0, "c": None},
    }
    assert data["per_image"][1]["errors"]["b"] is None
    again = EvaluationResult.from_json(data)
    assert again.to_json() == data
    np.testing.assert_array_equal(again.missed, r.missed)


# --- report ---------------------------------------------------------------------------------------


def _image_2d(size=(60, 50), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0)):
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    image = sitk.GetImageFromArray((xx * 3 + yy * 2).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def test_report_sections_and_plots(tmp_path):
    predictions, truths = _sets()
    r = evaluate(predictions, truths)
    image = _image_2d()
    overlays = [
        ("img1", image, predictions["img1"], truths["img1"]),
        ("img/2", image, predictions["img2"], truths["img2"]),
        ("broken", image, LandmarkSet(NAMES, np.zeros((3, 3))), truths["img2"]),
    ]
    path = write_report(r, tmp_path, overlays=overlays)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for heading in (
        "# Landmark evaluation report",
        "## Summary",
        "## Per-landmark errors",
        "## Success detection rates",
        "## Worst images",
        "## Plots",
        "## Worst cases",
    ):
        assert heading in text
    assert "| Missed (no prediction) | 1 |" in text
    assert "| Mean ± sd error (mm) | 2.75 ± " in text
    assert "| SDR ≤ 3 mm | 60.0% |" in text
    assert "| a | 2 | 0 | 3.00 | 2.00 | 3.00 | 5.00 | 1 |" in text
    assert "| img1 | 2.00 | 3.00 | b | 2 | c |" in text
    for png in ("errors_per_landmark.png", "cumulative_error.png", "overlays/img1.png", "overlays/img_2.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).stat().st_size > 0
    assert "Overlay failed: DataError" in text


def test_report_without_matplotlib(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    predictions, truths = _sets()
    text = write_report(evaluate(predictions, truths), tmp_path).read_text()
    assert "plots skipped" in text and ".png" not in text
    assert "## Per-landmark errors" in text
    assert not list(tmp_path.glob("*.png"))


# --- overlays -------------------------------------------------------------------------------------


def _read_png(path):
    image = sitk.ReadImage(str(path))
    assert image.GetNumberOfComponentsPerPixel() == 3
    return sitk.GetArrayFromImage(image)  # (rows, cols, 3)


def test_markers_take_the_color_of_the_status_the_model_thresholds_give():
    assert confidence_color(0.9) == STATUS_COLORS[LandmarkStatus.DETECTED]
    assert confidence_color(0.4) == STATUS_COLORS[LandmarkStatus.LOW_CONFIDENCE]  # below 0.5: low confidence
    assert confidence_color(0.05) == STATUS_COLORS[LandmarkStatus.MISSING]
    strict = InferenceConfig(missing_below=0.2, low_confidence_below=0.95)
    assert confidence_color(0.9, strict) == STATUS_COLORS[LandmarkStatus.LOW_CONFIDENCE]
    assert confidence_color(0.1, strict) == STATUS_COLORS[LandmarkStatus.MISSING]
    assert confidence_color(None) == MAGENTA and confidence_color(float("nan")) == MAGENTA


@pytest.mark.parametrize(
    "direction",
    [
        (1.0, 0.0, 0.0, 1.0),
        (-1.0, 0.0, 0.0, 1.0),  # flipped x
        (math.cos(0.5), -math.sin(0.5), math.sin(0.5), math.cos(0.5)),  # oblique
        (0.0, 1.0, 1.0, 0.0),  # swapped axes (improper)
    ],
)
def test_render_2d_markers_at_mapped_pixels(tmp_path, direction):
    image = _image_2d(size=(80, 60), spacing=(0.5, 0.5), origin=(12.0, -7.0), direction=direction)
    geometry = ImageGeometry.of(image)
    pixels = np.array([[10, 12], [60, 40], [35, 25]], dtype=float)  # (x, y) indices
    points = geometry.index_to_physical(pixels + 0.2)  # slightly off-center: rounding
    pred = LandmarkSet(NAMES, points, confidences=[0.95, 0.05, 0.45])
    truth = LandmarkSet(NAMES, geometry.index_to_physical(pixels + [[0, 0], [0, 0], [12, 0]]))
    path = render_landmarks_png(image, tmp_path / "o.png", pred, truth)
    rgb = _read_png(path)
    assert rgb.shape == (60, 80, 3)  # no downscaling: index grid kept as is
    for (x, y), color in zip(pixels.astype(int), [GREEN, RED, ORANGE]):
        assert tuple(rgb[y, x]) == color
    # The truth of c lies 12 pixels right of its prediction: a cyan ring around it, gray at center.
    cx, cy = 35 + 12, 25
    ring = rgb[cy - 8 : cy + 9, cx - 8 : cx + 9]
    assert (ring == CYAN).all(axis=-1).any()
    assert len(set(rgb[cy, cx].tolist())) == 1  # center of the ring: gray image
    assert 0 < (rgb == GREEN).all(axis=-1).sum() < 40  # one disc only


def test_render_2d_heatmap_downscale_and_anisotropic(tmp_path):
    image = _image_2d(size=(400, 100), spacing=(0.5, 2.0))  # 200 mm x 200 mm
    heat = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    heat.CopyInformation(image)
    heat[200, 50] = 1.0
    heat = sitk.SmoothingRecursiveGaussian(heat, 10.0)
    pred = LandmarkSet(["a"], [image.TransformContinuousIndexToPhysicalPoint((100.0, 50.0))])
    plain = _read_png(render_landmarks_png(image, tmp_path / "p.png", pred, max_size=100)).astype(int)
    rgb = _read_png(render_landmarks_png(image, tmp_path / "h.png", pred, heatmap=heat, max_size=100))
    assert rgb.shape == (100, 100, 3)  # square 2 mm pixels, longest side 100
    assert tuple(rgb[50, 25]) == MAGENTA  # index (100, 50) -> display (25, 50); no confidences
    # Near the heatmap peak (index (200, 50) -> display (50, 50)) red rises and blue falls.
    near = rgb[50, 56].astype(int)
    assert near[0] > plain[50, 56, 0] + 20 and near[2] < plain[50, 56, 2] - 20
    # Far from it the image is unchanged.
    np.testing.assert_array_equal(rgb[5, 95], plain[5, 95])


def _volume(direction=None):
    """60 x 40 x 20 voxels at (1, 1, 2) mm: extent x 60, y 40, z 40 mm; an intensity ramp along L."""
    arr = np.zeros((20, 40, 60), dtype=np.float32)
    arr += np.arange(60, dtype=np.float32)[None, None, :]
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.0, 2.0))
    return image


def test_render_3d_size_and_orientation(tmp_path):
    image = _volume()
    g = ImageGeometry.of(image)
    center = g.index_to_physical(np.array([30.0, 20.0, 10.25]))  # (30, 20, 20.5) mm
    pred = LandmarkSet(
        ["c", "left", "ant", "sup", "far"],
        [center, center + [15, 0, 0], center + [0, -10, 0], center + [0, 0, 12], center + [0, 0, 30]],
        confidences=[0.9, 0.9, 0.4, 0.05, 0.9],
    )
    rgb = _read_png(render_landmarks_png(image, tmp_path / "v.png", pred, center_lps=center))
    # Panels: axial 60 x 40, coronal 60 x 40, sagittal 40 x 40 at 1 mm pitch.
    assert rgb.shape == (40, 60 + 60 + 40 + 2 * PANEL_GAP, 3)
    # Bounding box: x -0.5..59.5, y -0.5..39.5, z -1..39; center at (30, 20, 20).
    ax0, cor0, sag0 = 0, 60 + PANEL_GAP, 120 + 2 * PANEL_GAP

    def color(row, col):
        return tuple(int(v) for v in rgb[row, col])

    # Axial (col +L, row +P): center at (30, 20); "left" is to the image right; "ant" is up.
    assert color(20, ax0 + 30) == GREEN
    assert color(20, ax0 + 45) == GREEN
    assert color(10, ax0 + 30) == ORANGE
    # "sup" is 12 mm off the axial plane (slab 5 mm): not drawn there.
    assert not (rgb[:, ax0 : ax0 + 60] == RED).all(axis=-1).any()
    # Coronal (col +L, row -S; row = 38.5 - z): "sup" 12 mm up; "far" lies above the image.
    assert color(18, cor0 + 30) == GREEN
    assert color(18, cor0 + 45) == GREEN
    assert color(6, cor0 + 30) == RED
    # Sagittal (col +P, row -S): "ant" to the image left, "sup" up.
    assert color(18, sag0 + 20) == GREEN
    assert color(18, sag0 + 10) == ORANGE
    assert color(6, sag0 + 20) == RED
    # Gray ramp increases towards patient left (image right) in axial view.
    assert rgb[35, ax0 + 55, 0] > rgb[35, ax0 + 5, 0]


def test_render_3d_storage_order_independent_and_downscaled(tmp_path):
    image = _volume()
    # Same physical content stored flipped in x and with z reversed.
    arr = sitk.GetArrayFromImage(image)[::-1, :, ::-1].copy()
    flipped = sitk.GetImageFromArray(arr)
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((59, 0, 19)))
    pred = LandmarkSet(["a", "b"], [[10.0, 12.0, 30.0], [40.0, 20.0, 20.0]], confidences=[0.8, 0.2])
    a = _read_png(render_landmarks_png(image, tmp_path / "a.png", pred))
    b = _read_png(render_landmarks_png(flipped, tmp_path / "b.png", pred))
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    small = _read_png(render_landmarks_png(image, tmp_path / "s.png", pred, max_size=100))
    assert max(small.shape[:2]) <= 100 and small.shape[1] >= 90
    geos = display_geometries_3d(ImageGeometry.of(image), np.array([25.0, 20.0, 20.0]), max_size=100)
    assert small.shape[1] == sum(g.size[0] for g in geos) + 2 * PANEL_GAP
    assert small.shape[0] == max(g.size[1] for g in geos)
    assert all(g.spacing[0] == g.spacing[1] for g in geos)


def test_render_dimension_mismatch(tmp_path):
    with pytest.raises(DataError):
        render_landmarks_png(_image_2d(), tmp_path / "x.png", LandmarkSet(["a"], [[1.0, 2.0, 3.0]]))

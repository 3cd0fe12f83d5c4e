"""Tests of SCNLandmarksLib.models: shapes for any input size, the SCN combination, initialisation,
params handling and a small overfit run proving that both SCN branches learn."""

from __future__ import annotations

import json
import math

import pytest
import torch

from SCNLandmarksLib.models import ARCHITECTURES, HeatmapOutput, build_model, default_params, resolve_params

# Small versions of every architecture so that the tests stay fast on a CPU.
SMALL = {
    "scn": {"filters": 8, "levels": 3, "sc_downsample": 4, "sc_layers": 3, "sc_kernel": 5, "sc_filters": 8},
    "unet": {"filters": 8, "levels": 3},
    "downsampling": {"filters": 8, "levels": 3, "kernel_size": 3},
    "convonly": {"filters": 8, "layers": 3, "kernel_size": 5},
}

# Odd sizes, none divisible by the pooling factors (2, 4, 16 ...).
SHAPES = {2: [(37, 29), (5, 3)], 3: [(13, 11, 9), (3, 5, 7)]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_shapes_match_any_input_size(architecture, dimension):
    num_landmarks = 3
    model = build_model(architecture, dimension, 2, num_landmarks, SMALL[architecture]).eval()
    for shape in SHAPES[dimension]:
        x = torch.randn(2, 2, *shape)
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, HeatmapOutput)
        assert out.final.shape == (2, num_landmarks, *shape)
        assert out.local.shape == (2, num_landmarks, *shape)
        if architecture == "scn":
            assert out.spatial is not None and out.spatial.shape == (2, num_landmarks, *shape)
        else:
            assert out.spatial is None
            assert out.local is out.final
        assert torch.isfinite(out.final).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_default_models_build_and_forward_2d(architecture):
    model = build_model(architecture, 2, 1, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 23, 19))
    assert out.final.shape == (1, 4, 23, 19)


def test_wrong_input_rank_is_rejected():
    model = build_model("scn", 2, 1, 2, SMALL["scn"])
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 8, 8, 8))


@pytest.mark.parametrize("dimension", [2, 3])
def test_scn_final_is_local_times_spatial_and_spatial_bounded(dimension):
    # A large output-layer init drives tanh well away from 0 so the bound is actually exercised.
    params = dict(SMALL["scn"], heatmap_init_std=0.5)
    model = build_model("scn", dimension, 1, 3, params).eval()
    shape = SHAPES[dimension][0]
    with torch.no_grad():
        out = model(torch.randn(2, 1, *shape))
    assert torch.equal(out.final, out.local * out.spatial)
    assert out.spatial.abs().max() <= 1.0
    assert out.spatial.abs().max() > 0.1


@pytest.mark.parametrize("dimension", [2, 3])
def test_scn_outputs_near_zero_at_init(dimension):
    model = build_model("scn", dimension, 1, 3, SMALL["scn"]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *SHAPES[dimension][0]))
    # Heatmap layers start at std 1e-4: local is small; spatial sits near tanh(sc_init_bias).
    assert out.local.abs().max() < 0.05
    torch.testing.assert_close(out.spatial, torch.full_like(out.spatial, math.tanh(0.5)), atol=1e-3, rtol=0)
    assert out.final.abs().max() < 0.05


@pytest.mark.parametrize("architecture", ["unet", "downsampling", "convonly"])
def test_baselines_near_zero_at_init(architecture):
    model = build_model(architecture, 2, 1, 3, SMALL[architecture]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 31, 27))
    assert out.final.abs().max() < 0.05


def test_default_params_cover_every_architecture_and_are_json():
    for architecture in ARCHITECTURES:
        for dimension in (2, 3):
            p = default_params(architecture, dimension)
            assert p and json.loads(json.dumps(p)) == p
            # A fresh copy each time: mutating it does not leak into the defaults.
            p["filters"] = -1
            assert default_params(architecture, dimension)["filters"] > 0
    # The U-Net baseline is the SCN local appearance net: same tunables minus the sc_* ones.
    scn2 = default_params("scn", 2)
    assert default_params("unet", 2) == {k: v for k, v in scn2.items() if not k.startswith("sc_")}


@pytest.mark.parametrize("dimension", [2, 3])
def test_default_networks_give_one_heatmap_per_landmark_on_any_input_size(dimension):
    model = build_model("scn", dimension, 1, 3).eval()
    shape = (1, 1, *((21, 19, 17)[:dimension]))
    with torch.no_grad():
        out = model(torch.randn(shape))
    for heatmaps in (out.final, out.local, out.spatial):
        assert heatmaps.shape == (1, 3, *shape[2:]) and torch.isfinite(heatmaps).all()


def test_unknown_param_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match="bogus_key"):
        build_model("scn", 2, 1, 2, {"filters": 8, "bogus_key": 1})
    # A key valid for another architecture is still unknown here.
    with pytest.raises(ValueError, match="sc_kernel"):
        build_model("unet", 2, 1, 2, {"sc_kernel": 5})


@pytest.mark.parametrize(
    "bad",
    [
        {"filters": 0},
        {"filters": 8.5},
        {"levels": True},
        {"sc_kernel": 4},
        {"dropout": 1.0},
        {"pad_mode": "reflect"},
        {"heatmap_init_std": 0},
    ],
)
def test_invalid_param_values_are_rejected(bad):
    with pytest.raises(ValueError):
        build_model("scn", 2, 1, 2, bad)


def test_bad_architecture_or_dimension():
    with pytest.raises(ValueError, match="architecture"):
        build_model("resnet", 2, 1, 2)
    with pytest.raises(ValueError, match="dimension"):
        default_params("scn", 4)


def test_partial_params_merge_over_defaults():
    model = build_model("scn", 3, 1, 5, {"filters": 8, "sc_kernel": 3, "levels": 2})
    expected = dict(default_params("scn", 3), filters=8, sc_kernel=3, levels=2)
    assert resolve_params("scn", 3, {"filters": 8, "sc_kernel": 3, "levels": 2}) == expected
    assert model.local_heatmaps.out_channels == 5 and model.local_net.input_conv.in_channels == 1
    kernels = [m.kernel_size for m in model.spatial_net if isinstance(m, torch.nn.Conv3d)]
    assert kernels == [(3, 3, 3)] * expected["sc_layers"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_params_json_round_trip_rebuilds_same_model(architecture):
    model = build_model(architecture, 2, 1, 3, SMALL[architecture]).eval()
    text = json.dumps({"architecture": architecture, "params": resolve_params(architecture, 2, SMALL[architecture])})
    spec = json.loads(text)
    rebuilt = build_model(spec["architecture"], 2, 1, 3, spec["params"]).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 21, 17)
    with torch.no_grad():
        assert torch.equal(model(x).final, rebuilt(x).final)


def test_dropout_only_active_in_training():
    model = build_model("unet", 2, 1, 2, dict(SMALL["unet"], dropout=0.5))
    x = torch.randn(1, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).final, model(x).final)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).final, model(x).final)


def test_local_branch_translation_equivariance():
    # Zero background, zero biases at init and zero padding: shifting the content by a multiple of
    # the pooling grid shifts the local heatmaps exactly.
    model = build_model("scn", 2, 1, 2, dict(SMALL["scn"], dropout=0.0, pad_mode="zeros")).eval()
    # Content in the middle, far enough from the borders that no feature map reaches them.
    x = torch.zeros(1, 1, 96, 96)
    x[..., 44:52, 42:54] = torch.randn(8, 12)
    shifted = torch.roll(x, shifts=(8, -4), dims=(2, 3))
    with torch.no_grad():
        a, b = model(x).local, model(shifted).local
    assert a.abs().max() > 0
    torch.testing.assert_close(b[..., 8:, :-4], a[..., :-8, 4:], rtol=0, atol=1e-7)


def test_small_scn_overfits_a_gaussian_through_both_branches():
    model = build_model("scn", 2, 1, 1, dict(SMALL["scn"], filters=16, sc_filters=16, dropout=0.0))
    h, w, center, sigma = 37, 41, (15, 22), 2.0
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    target = torch.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))[None, None]
    image = target + 0.5 * torch.randn(1, 1, h, w)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    sc_last = [m for m in model.spatial_net if isinstance(m, torch.nn.Conv2d)][-1]
    sc_before = sc_last.weight.detach().clone()
    losses = []
    for _ in range(150):
        out = model(image)
        loss = torch.mean((out.final - target) ** 2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = model(image)
        final_loss = torch.mean((out.final - target) ** 2).item()
    assert final_loss < losses[0] / 50, (losses[0], final_loss)
    # Both branches left their near-zero start: H_sc is no longer ~0 and its output layer moved.
    assert out.spatial.abs().max() > 0.1
    assert out.local.abs().max() > 0.1
    assert (sc_last.weight.detach() - sc_before).abs().max() > 100 * sc_before.abs().max()
    peak = int(out.final.flatten().argmax())
    assert (peak // w, peak % w) == center

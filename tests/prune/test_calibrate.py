"""Pruning statistics: Gram hooks == XᵀX of the captured inputs, baseline scores and depth helpers against
plain formulas (calibration data and the layer-by-layer forward: tests/test_calib.py)."""

from __future__ import annotations

import pytest
import torch

from slimlm import calib
from slimlm.prune import baselines, calibrate, depth
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def test_gram_collector_equals_captured_inputs():
    model = tiny_model("qwen2", seed=4)
    layer = model.model.layers[1]
    batches = [torch.randint(3, 300, (2, 7)), torch.randint(3, 300, (1, 7))]
    inputs = calib.propagate(model.model.layers[0], calib.layer0_inputs(model, batches))
    seen = {"down": [], "o": []}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen["down"].append(a[0])),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen["o"].append(a[0]))]
    stats, outs = calibrate.collect(layer, inputs, {"down": layer.mlp.down_proj, "o": layer.self_attn.o_proj},
                                    keep_outputs=True)
    for h in hooks:
        h.remove()
    for name in ("down", "o"):
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]]).double()
        assert stats[name].dtype == torch.float64
        torch.testing.assert_close(stats[name], X.T @ X, rtol=1e-5, atol=1e-6)
        diag, _ = calibrate.collect(layer, inputs, {name: layer.mlp.down_proj if name == "down" else layer.self_attn.o_proj},
                                    mode="diag")
        torch.testing.assert_close(diag[name], (X * X).sum(0), rtol=1e-5, atol=1e-6)
    assert len(outs) == 2 and outs[0].shape == (2, 7, 64)
    assert not layer._forward_pre_hooks  # collectors removed their hooks


def test_baseline_scores_and_partitions():
    W = torch.tensor([[3.0, 0.0, 1.0, 1.0], [4.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(baselines.magnitude_scores(W, 1), torch.tensor([5.0, 1.0, 2 ** 0.5, 2 ** 0.5],
                                                                             dtype=torch.float64))
    torch.testing.assert_close(baselines.magnitude_scores(W, 2), torch.tensor([26 ** 0.5, 4 ** 0.5], dtype=torch.float64))
    torch.testing.assert_close(baselines.activation_scores(torch.tensor([1.0, 3.0, 4.0, 5.0]), 2),
                               torch.tensor([2.0, 3.0], dtype=torch.float64))
    s = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.8, 0.2])
    assert baselines.top_groups(s, 3) == [1, 2, 4]
    assert baselines.top_groups(s, 3, part=torch.tensor([0, 0, 1, 1, 2, 2])) == [1, 2, 4]
    # scores where the best 3 overall ([0, 1, 4]) differ from the best one per partition ([0, 3, 4])
    s = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.5, 0.4])
    assert baselines.top_groups(s, 3) == [0, 1, 4]
    assert baselines.top_groups(s, 3, part=torch.tensor([0, 0, 1, 1, 2, 2])) == [0, 3, 4]
    assert baselines.top_groups(s, 4, part=torch.tensor([0, 1, 0, 1, 0, 1])) == [0, 1, 4, 5]
    assert baselines.top_groups(torch.ones(4), 2) == [0, 1]  # ties -> lower index


def test_depth_helpers():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])
    torch.testing.assert_close(depth.token_cosines(x, y), torch.tensor([[2 ** -0.5, -1.0]]))
    assert depth.block_influence([0.9, 0.5]) == pytest.approx([0.1, 0.5])
    assert depth.select_layers([0.3, 0.1, 0.5, 0.1, 0.2], 3) == [0, 2, 4]
    assert depth.select_layers([0.1, 0.1, 0.1], 2) == [0, 1]


def test_gram_until_and_shifted_outputs_equal_full_passes():
    """gram_until stops at o_proj but sees the same inputs; y + a(Ŵ − W)ᵀ equals re-running the changed layer."""
    model = tiny_model("mistral", seed=6)
    layer = model.model.layers[0]
    inputs = calib.layer0_inputs(model, [torch.randint(3, 300, (2, 9)), torch.randint(3, 300, (2, 9))])
    full, _ = calibrate.collect(layer, inputs, {"o": layer.self_attn.o_proj})
    torch.testing.assert_close(calibrate.gram_until(layer, inputs, layer.self_attn.o_proj), full["o"])
    H, acts, outs = calibrate.gram_and_outputs(layer, inputs, layer.mlp.down_proj)
    X = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts]).double()
    torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-6)
    old = layer.mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, ::3] = 0.0
        layer.mlp.down_proj.weight[:, 1::3] *= 1.7
    shifted = calibrate.shift_outputs(outs, acts, layer.mlp.down_proj.weight.detach() - old)
    for got, (want, _) in zip(shifted, calib.propagate(layer, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

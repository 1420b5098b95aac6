"""Calibration: windows from each source, layer-by-layer forward == the model's own forward, Gram hooks ==
XᵀX of the captured inputs, baseline scores and depth helpers against plain formulas."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm import SlimlmError
from slimlm.models import FAMILIES
from slimlm.prune import baselines, calibrate, depth
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def test_windows_from_files(tmp_path, tiny_tok):
    words = "the quick brown fox jumps over lazy dog hello world user movie rating".split()
    rng = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=rng))  # no repeats
    txt = tmp_path / "c.txt"
    txt.write_text(text)
    w = calibrate.calibration_windows(tiny_tok, str(txt), samples=5, seq_len=16, seed=1)
    assert w.shape == (5, 16) and w.dtype == torch.long
    stream = tiny_tok(text, add_special_tokens=False).input_ids + [tiny_tok.eos_token_id]
    starts = []
    for row in w.tolist():  # every window is a window of the stream, and they do not overlap
        s = next(i for i in range(0, len(stream) - 15, 16) if stream[i:i + 16] == row)
        starts.append(s)
    assert len(set(starts)) == 5
    assert torch.equal(calibrate.calibration_windows(tiny_tok, str(txt), 5, 16, seed=1), w)  # seeded
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": text[i:i + 200]}) + "\n" for i in range(0, len(text), 200)))
    assert calibrate.calibration_windows(tiny_tok, str(jl), 3, 8).shape == (3, 8)
    with pytest.raises(SlimlmError, match="only"):
        calibrate.calibration_windows(tiny_tok, str(txt), samples=10_000, seq_len=64)
    with pytest.raises(SlimlmError, match="not 'text'"):
        calibrate.check_source(str(tmp_path / "missing.txt"))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(SlimlmError, match=".txt, .jsonl or .parquet"):
        calibrate.check_source(str(tmp_path / "c.csv"))


@pytest.mark.slow
def test_builtin_text_windows_come_from_the_end(tiny_tok):
    from slimlm.tasks.text import read_texts, text_blocks

    w = calibrate.calibration_windows(tiny_tok, "text", samples=4, seq_len=32)
    stream = [t for b in text_blocks(tiny_tok, read_texts(None), 10**9) for t in b]
    assert w.reshape(-1).tolist() == stream[-128:]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_forward_equals_model_forward(family):
    model = tiny_model(family, seed=3, num_hidden_layers=3)
    batches = [torch.randint(3, 300, (2, 10)), torch.randint(3, 300, (3, 10))]
    inputs = calibrate.layer0_inputs(model, batches)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for (h, _), ids in zip(inputs, batches, strict=True):
                want = model(ids, output_hidden_states=True).hidden_states[i]
                torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
            inputs = calibrate.propagate(layer, inputs)
        for (h, _), ids in zip(inputs, batches, strict=True):
            torch.testing.assert_close(model.model.norm(h), model(ids, output_hidden_states=True).hidden_states[-1],
                                       rtol=1e-5, atol=1e-5)


def test_gram_collector_equals_captured_inputs():
    model = tiny_model("qwen2", seed=4)
    layer = model.model.layers[1]
    batches = [torch.randint(3, 300, (2, 7)), torch.randint(3, 300, (1, 7))]
    inputs = calibrate.propagate(model.model.layers[0], calibrate.layer0_inputs(model, batches))
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
    inputs = calibrate.layer0_inputs(model, [torch.randint(3, 300, (2, 9)), torch.randint(3, 300, (2, 9))])
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
    for got, (want, _) in zip(shifted, calibrate.propagate(layer, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""Calibration data and passes: windows from each source, batches, layer-by-layer forward == the model's own
forward."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm import SlimlmError, calib
from slimlm.models import FAMILIES
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def test_windows_from_files(tmp_path, tiny_tok):
    words = "the quick brown fox jumps over lazy dog hello world user movie rating".split()
    rng = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=rng))  # no repeats
    txt = tmp_path / "c.txt"
    txt.write_text(text)
    w = calib.calibration_windows(tiny_tok, str(txt), samples=5, seq_len=16, seed=1)
    assert w.shape == (5, 16) and w.dtype == torch.long
    stream = tiny_tok(text, add_special_tokens=False).input_ids + [tiny_tok.eos_token_id]
    starts = []
    for row in w.tolist():  # every window is a window of the stream, and they do not overlap
        s = next(i for i in range(0, len(stream) - 15, 16) if stream[i:i + 16] == row)
        starts.append(s)
    assert len(set(starts)) == 5
    assert torch.equal(calib.calibration_windows(tiny_tok, str(txt), 5, 16, seed=1), w)  # seeded
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": text[i:i + 200]}) + "\n" for i in range(0, len(text), 200)))
    assert calib.calibration_windows(tiny_tok, str(jl), 3, 8).shape == (3, 8)
    with pytest.raises(SlimlmError, match="only"):
        calib.calibration_windows(tiny_tok, str(txt), samples=10_000, seq_len=64)
    with pytest.raises(SlimlmError, match="not 'text'"):
        calib.check_source(str(tmp_path / "missing.txt"))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(SlimlmError, match=".txt, .jsonl or .parquet"):
        calib.check_source(str(tmp_path / "c.csv"))


@pytest.mark.slow
def test_builtin_text_windows_come_from_the_end(tiny_tok):
    from slimlm.tasks.text import read_texts, text_blocks

    w = calib.calibration_windows(tiny_tok, "text", samples=4, seq_len=32)
    stream = [t for b in text_blocks(tiny_tok, read_texts(None), 10**9) for t in b]
    assert w.reshape(-1).tolist() == stream[-128:]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_forward_equals_model_forward(family):
    model = tiny_model(family, seed=3, num_hidden_layers=3)
    batches = [torch.randint(3, 300, (2, 10)), torch.randint(3, 300, (3, 10))]
    inputs = calib.layer0_inputs(model, batches)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for (h, _), ids in zip(inputs, batches, strict=True):
                want = model(ids, output_hidden_states=True).hidden_states[i]
                torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
            inputs = calib.propagate(layer, inputs)
        for (h, _), ids in zip(inputs, batches, strict=True):
            torch.testing.assert_close(model.model.norm(h), model(ids, output_hidden_states=True).hidden_states[-1],
                                       rtol=1e-5, atol=1e-5)


def test_batches_of_a_tensor_or_lists_are_the_same_consecutive_rows():
    windows = torch.arange(7 * 5).reshape(7, 5)
    got = calib.batches(windows, 3)
    assert [b.shape for b in got] == [(3, 5), (3, 5), (1, 5)] and all(b.dtype == torch.long for b in got)
    assert torch.equal(torch.cat(got), windows)
    for a, b in zip(calib.batches(windows.tolist(), 3, "cpu"), got, strict=True):
        assert torch.equal(a, b)
    assert calib.batches([], 4) == []

"""`slimlm prune` end to end on tiny model directories: a smaller checkpoint + report; errors before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from slimlm.cli import app
from slimlm.testing import save_tiny_model

runner = CliRunner()


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


@pytest.fixture
def calib_txt(tmp_path):
    words = "the user rated movie four stars comedy drama action yes no quick brown fox".split()
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (600,), generator=g)))
    return p


@pytest.mark.parametrize("method", ["osscar", "magnitude"])
def test_prune_cli_writes_a_smaller_loadable_model(method, tmp_path, calib_txt):
    src = save_tiny_model("qwen3", tmp_path / "src", num_attention_heads=6, num_key_value_heads=3,
                          num_hidden_layers=3, intermediate_size=96)
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(src), "--out", str(out), "--method", method, "--mlp-keep", "0.5",
                              "--heads-keep", "4", "--layers-keep", "2", "--hidden-keep", "0.5", "--calib", str(calib_txt),
                              "--samples", "6", "--seq-len", "24", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.hidden_size) == (2, 48, 4, 2, 32, 32)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == method and len(report["kept_layers"]) == 2
    assert report["calibration"]["tokens"] == 6 * 24
    assert report["params_after"]["non_embedding"] < report["params_before"]["non_embedding"]
    assert {"total", "solve", "calibration"} <= set(report["seconds"]) and report["peak_rss_mib"] > 0
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 300, (1, 9))).logits).all()


def test_prune_cli_errors_before_any_work(tmp_path, calib_txt):
    src = save_tiny_model("llama", tmp_path / "src", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    out = tmp_path / "never"
    cases = [
        (["--mlp-keep", "1000"], "only 128 MLP neurons"),
        (["--hidden-keep", "100"], "only 96 hidden channels"),
        (["--heads-keep", "5"], "breaks GQA"),
        (["--hidden-keep", "64"], "would not load in transformers"),  # 64 channels for 6 heads
        (["--mlp-keep", "half"], "fraction like 0.5"),
        (["--mlp-keep", "0.5", "--method", "obs"], "method"),
        (["--mlp-keep", "0.5", "--calib", str(tmp_path / "nope.txt")], "not 'text'"),
        ([], "nothing to prune"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, ["prune", str(src), "--out", str(out), *args])
        assert res.exit_code == 2, (args, res.output)
        assert msg in " ".join(res.output.split()), (args, res.output)
        assert not out.exists()
    res = runner.invoke(app, ["prune", str(tmp_path / "missing"), "--out", str(out), "--mlp-keep", "0.5"])
    assert res.exit_code == 2 and "config.json" in res.output

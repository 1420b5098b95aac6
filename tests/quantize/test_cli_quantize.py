"""`slimlm quantize` end to end on tiny models: output directory, reload, eval, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from slimlm.cli import app
from slimlm.loading import load_model
from slimlm.quantize.linear import Int4Linear, Int8Linear

runner = CliRunner()
PROSE = "The quick brown fox jumps over the lazy dog. Hello world, this is a small test of the tokenizer. " * 40


def test_quantize_int8_then_eval_and_refuse_requantizing(tiny_model_dirs, tmp_path):
    out = tmp_path / "q8"
    res = runner.invoke(app, ["quantize", str(tiny_model_dirs["llama"]), "--scheme", "int8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["quantized_layers"] == 14 and 0 < summary["weights_bytes"] < summary["source_weights_bytes"]
    assert json.loads((out / "slimlm_quantize.json").read_text())["scheme"] == "int8"
    assert isinstance(load_model(out).model.layers[0].mlp.up_proj, Int8Linear)
    (tmp_path / "t.txt").write_text(PROSE)
    res = runner.invoke(app, ["eval", str(out), "--task", "text", "--data", str(tmp_path / "t.txt"),
                              "--split", "all", "--out", str(tmp_path / "ppl.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ppl.json").read_text())["metrics"]["perplexity"] > 1
    res = runner.invoke(app, ["quantize", str(out), "--scheme", "int4", "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "already quantized" in res.output
    assert not (tmp_path / "again").exists()


def test_quantize_int4_gptq_with_calibration_file(tiny_model_dirs, tmp_path):
    (tmp_path / "calib.txt").write_text(PROSE)
    out = tmp_path / "q4"
    res = runner.invoke(app, ["quantize", str(tiny_model_dirs["qwen3"]), "--scheme", "int4", "--out", str(out),
                              "--calib", str(tmp_path / "calib.txt"), "--samples", "4", "--seq-len", "32",
                              "--group-size", "32", "--asymmetric", "--act-order", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "slimlm_quantize.json").read_text())
    assert report["calibration_blocks"] == 4 and report["config"]["method"] == "gptq"
    m = load_model(out)
    layer = m.model.layers[1].self_attn.o_proj
    assert isinstance(layer, Int4Linear) and not layer.symmetric and layer.group_size == 32
    assert layer.actorder == "weight"
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["actorder"] for g in groups.values()] == ["weight"]
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()


def test_quantize_int4_quantease_from_act_order(tiny_model_dirs, tmp_path):
    (tmp_path / "calib.txt").write_text(PROSE)
    out = tmp_path / "qe"
    res = runner.invoke(app, ["quantize", str(tiny_model_dirs["llama"]), "--scheme", "int4", "--out", str(out),
                              "--calib", str(tmp_path / "calib.txt"), "--samples", "4", "--seq-len", "32",
                              "--group-size", "32", "--method", "quantease", "--act-order", "--quantease-iters", "3",
                              "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "slimlm_quantize.json").read_text())
    assert report["config"]["method"] == "quantease" and report["config"]["quantease_iters"] == 3
    qe = report["quantease"]
    assert qe["init"] == "gptq act-order" and qe["max_sweeps"] == 3
    assert all(1 <= o["sweeps"] <= 3 and o["final"] <= o["init"] * (1 + 1e-6) for o in qe["layers"].values())
    layer = load_model(out).model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.group_size == 32 and layer.actorder == "weight"


@pytest.mark.parametrize("args, message", [
    (["--scheme", "int5"], "--scheme"),
    (["--scheme", "int4"], "needs calibration data: add --calib"),
    (["--scheme", "int8", "--group-size", "32"], "apply to --scheme int4 only"),
    (["--scheme", "int8", "--no-clip-search"], "clip_search apply to --scheme int4 only"),
    (["--scheme", "int4", "--method", "rtn", "--act-order"], "--act-order applies to --method gptq or quantease only"),
    (["--scheme", "int4", "--method", "quantease"], "needs calibration data: add --calib"),
    (["--scheme", "int4", "--method", "gptq", "--quantease-iters", "5"], "--quantease-iters applies to --method quantease"),
    (["--scheme", "int4", "--method", "quantease", "--quantease-iters", "0"], "--quantease-iters: Input should be"),
    (["--scheme", "int8", "--method", "gptq"], "--method gptq applies to --scheme int4 only"),
    (["--scheme", "fp8", "--method", "quantease"], "method apply to --scheme int4 only"),
    (["--scheme", "int4", "--group-size", "48", "--method", "rtn"], "--group-size"),
    (["--scheme", "int8", "--smooth", "--calib", "/no/such/file.txt"], "--calib /no/such/file.txt: not"),
    (["--scheme", "fp8", "--ignore", "lm_heda"], "matches no module"),
    (["--scheme", "fp8", "--dtype", "float16"], "--dtype: Input should be"),
])
def test_quantize_errors_are_one_line(tiny_model_dirs, tmp_path, args, message):
    res = runner.invoke(app, ["quantize", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()

"""The placement policy: defaults per device, and bad placements refused before any work with one line."""

from __future__ import annotations

import pytest
import torch

from slimlm import SlimlmError
from slimlm.placement import choose, default_dtype, solver_threads


def test_defaults_follow_the_device():
    p = choose("cpu")
    assert p.device == torch.device("cpu") and p.dtype == torch.float32 and p.world_size == 1
    assert p.to_dict() == {"device": "cpu", "dtype": "float32", "world_size": 1}
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cpu") == torch.float32
    assert solver_threads("cpu") == 1 and solver_threads("cuda") == 0
    if not torch.cuda.is_available():
        assert choose().device == torch.device("cpu")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                          ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(name, dtype):
    assert choose("cpu", name).dtype == dtype


@pytest.mark.parametrize("device, dtype, world, message", [
    ("cpu", "float16", 1, "does not run on cpu"),
    ("cpu", "int8", 1, "expected one of"),
    ("tpu", None, 1, "not a torch device|slimlm runs on"),
    ("cpu", None, 0, "must be at least 1"),
])
def test_bad_placements_fail_with_one_line(device, dtype, world, message):
    with pytest.raises(SlimlmError, match=message) as e:
        choose(device, dtype, world)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(SlimlmError, match="no CUDA GPU"):
        choose("cuda")


# --------------------------------------------------------------------------- stages honour the placement


@pytest.fixture()
def loads(monkeypatch):
    """Every model a stage loads: (device, dtype of its parameters)."""
    import slimlm.loading as loading

    seen = []
    real = loading.load_model

    def recording(*a, **k):
        m = real(*a, **k)
        p = next(m.parameters())
        seen.append((p.device.type, p.dtype))
        return m

    monkeypatch.setattr(loading, "load_model", recording)
    return seen


def test_evaluate_and_quantize_run_where_the_placement_says(tmp_path, loads):
    from slimlm.config import TaskConfig
    from slimlm.evaluate import evaluate_dir
    from slimlm.placement import choose
    from slimlm.quantize.api import QuantizeConfig, quantize_dir
    from slimlm.testing import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Hello world, this is a small test. " * 40)
    where = choose("cpu", "bfloat16")  # not the CPU default: the stage must take it from the placement
    res = evaluate_dir(model, TaskConfig(name="text", data=str(text), max_length=64), split="all", limit=2,
                       speed_probe=False, placement=where)
    assert res["placement"] == {"device": "cpu", "dtype": "bfloat16", "world_size": 1}
    report = quantize_dir(model, tmp_path / "q", QuantizeConfig(scheme="int8"), placement=where)
    assert report["placement"]["dtype"] == "bfloat16"
    assert loads == [("cpu", torch.bfloat16), ("cpu", torch.bfloat16)]
    evaluate_dir(model, TaskConfig(name="text", data=str(text), max_length=64), split="all", limit=2,
                 speed_probe=False)
    assert loads[-1] == ("cpu", torch.float32) or torch.cuda.is_available()  # the default on a CPU machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_placement_this_machine_cannot_run_fails_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from slimlm.cli import app
    from slimlm.pipeline import load_recipe

    res = CliRunner().invoke(app, ["eval", "teacher", "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["eval", "teacher", "--dtype", "float16"])
    assert res.exit_code == 2 and "does not run on cpu" in res.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: x\ndevice: cuda\nstages: [{name: e, kind: evaluate}]\n")
    with pytest.raises(SlimlmError, match="no CUDA GPU"):
        load_recipe(recipe)
    assert not (tmp_path / "x").exists()

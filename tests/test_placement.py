"""The placement policy: defaults per device, and bad placements refused before any work with one line."""

from __future__ import annotations

import json
import math

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


def test_prune_distill_and_teacher_cache_run_where_the_placement_says(tmp_path, loads, monkeypatch):
    """bf16 on CPU is not the default there: each stage must take it from its placement / config."""
    from conftest import synth_movielens, write_movielens
    from safetensors import safe_open

    import slimlm.distill.trainer as trainer
    import slimlm.loading as loading
    from slimlm.config import DistillConfig, PruneConfig, load_config
    from slimlm.distill.teacher import build_teacher_cache
    from slimlm.placement import choose
    from slimlm.prune.api import prune_dir
    from slimlm.quantize.api import QuantizeConfig, quantize_dir
    from slimlm.testing import save_tiny_model

    monkeypatch.setattr(trainer, "load_model", loading.load_model)  # the trainer's own name for it, recorded too

    def dtypes(d):
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    teacher = save_tiny_model("llama", tmp_path / "teacher", seed=1)
    report = prune_dir(teacher, tmp_path / "pruned", PruneConfig(method="osscar", mlp_keep=0.5, calib="text",
                                                                 samples=4, seq_len=32), placement=choose("cpu", "bfloat16"))
    assert report["placement"] == {"device": "cpu", "dtype": "bfloat16", "world_size": 1}
    assert loads == [("cpu", torch.bfloat16)] and dtypes(tmp_path / "pruned") == {"BF16"}

    users, items, ratings = synth_movielens(n_users=6, per_user=12, seed=4)
    write_movielens(tmp_path / "ml", users, items, ratings)
    common = [f"student={tmp_path / 'pruned'}", f"teacher={teacher}", f"task.data={tmp_path / 'ml'}", "max_steps=1",
              "eval_every=0", "task.eval_limit=8", "tensorboard=false", "device=cpu", "dtype=bfloat16",
              "teacher_dtype=bfloat16"]
    loads.clear()
    trainer.train(load_config(DistillConfig, None, [*common, f"out={tmp_path / 'kd'}"]))
    assert loads == [("cpu", torch.bfloat16), ("cpu", torch.bfloat16)]  # student, then the live teacher
    assert dtypes(tmp_path / "kd" / "model") == {"BF16"}
    assert json.loads((tmp_path / "kd" / "metrics.json").read_text())["teacher_precision"] == "bfloat16"
    # the CPU option of a frozen teacher in INT8 W8A8 on slimlm's runtime: a quantized export as the teacher
    quantize_dir(teacher, tmp_path / "t8", QuantizeConfig(scheme="int8"), placement=choose("cpu"))
    trainer.train(load_config(DistillConfig, None, [*common[:-3], f"teacher={tmp_path / 't8'}", f"out={tmp_path / 'kd8'}"]))
    kd8 = json.loads((tmp_path / "kd8" / "metrics.json").read_text())
    assert kd8["teacher_precision"].startswith("int8 (slimlm's quantized runtime") and math.isfinite(kd8["eval_kl"])
    loads.clear()
    build_teacher_cache(load_config(DistillConfig, None, [*common, f"out={tmp_path / 'c'}", "teacher_signal=cached",
                                                          f"teacher_cache={tmp_path / 'cache'}"]))
    assert loads == [("cpu", torch.bfloat16)]


@pytest.mark.parametrize("avx512_bf16, amx, fast", [(False, False, False), (True, False, True), (False, True, True)])
def test_fast_bf16_follows_the_cpus_features(monkeypatch, avx512_bf16, amx, fast):
    from slimlm.placement import fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert fast_bf16("cpu") is fast


@pytest.mark.parametrize("fast, mixed, autocast", [(True, True, "bfloat16"), (True, False, "off"), (False, True, "off")])
def test_training_autocasts_only_where_bf16_is_fast(tmp_path, monkeypatch, fast, mixed, autocast):
    """mixed_precision on a device with fast bf16 (a CPU with AVX512_BF16 / AMX, or CUDA): the forward passes
    autocast to bf16 and the frozen teacher is held in bf16; elsewhere, or with mixed_precision off, fp32."""
    from conftest import synth_movielens, write_movielens

    import slimlm.distill.trainer as trainer
    from slimlm.config import DistillConfig, load_config
    from slimlm.testing import save_tiny_model

    monkeypatch.setattr(trainer, "fast_bf16", lambda device: fast)
    teacher = save_tiny_model("llama", tmp_path / "teacher", seed=1)
    student = save_tiny_model("llama", tmp_path / "student", seed=2, num_hidden_layers=1)
    users, items, ratings = synth_movielens(n_users=4, per_user=10, seed=4)
    write_movielens(tmp_path / "ml", users, items, ratings)
    trainer.train(load_config(DistillConfig, None, [
        f"student={student}", f"teacher={teacher}", f"task.data={tmp_path / 'ml'}", "max_steps=2", "eval_every=0",
        "task.eval_limit=4", "tensorboard=false", "device=cpu", f"mixed_precision={str(mixed).lower()}",
        f"out={tmp_path / 'kd'}"]))
    metrics = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert metrics["autocast"] == autocast
    assert metrics["teacher_precision"] == ("bfloat16" if autocast != "off" else "float32")
    assert math.isfinite(metrics["eval_kl"])

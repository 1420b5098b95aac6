"""The GPU tier (``pytest -m gpu``): what only a CUDA machine can check. Every test skips cleanly without
CUDA; ``benchmarks/gpu_check.sh`` runs this tier plus a short GPU benchmark.

- a bf16-autocast training step (fp32 master weights) on CUDA, against the same step on CPU in fp32;
- INT8 (``torch._int_mm``) and INT4 runtime modules on CUDA against their CPU results;
- packed multi-item scoring on CUDA against the unpacked reference;
- the decode loop on CUDA, eager and compiled, against its greedy tokens on CPU;
- the tiny recipe end to end on CUDA (placement from the recipe's ``device``);
- the stages the first GPU run (2026-12-04, one H200) did not reach: on-policy KD (generation inside
  training), GPTQ and QuantEase INT4 and FP8 quantization with calibration on CUDA, a cached-teacher KD stage;
- the server on CUDA: /v1/score and greedy /v1/completions against the same model's CPU server;
- DDP and FSDP2 steps on NCCL through torchrun (2 ranks when two GPUs exist, else 1).
(The fp8 ``_scaled_mm`` check lives beside the fp8 module: tests/quantize/test_linear.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs a CUDA GPU")]


def test_bf16_autocast_training_step_matches_fp32_on_cpu():
    from slimlm.distill.data import Seq, collate
    from slimlm.distill.losses import LossConfig
    from slimlm.distill.trainer import DistillModule
    from slimlm.testing import tiny_model

    seqs = [Seq(tuple(range(5, 25)), (-100,) * 10 + tuple(range(15, 25)), 10),
            Seq(tuple(range(30, 42)), (-100,) * 6 + tuple(range(36, 42)), 6)]
    losses = {}
    for device in ("cpu", "cuda"):
        student, teacher = tiny_model("llama", seed=1).to(device).train(), tiny_model("llama", seed=2).to(device)
        b = collate(seqs, 0, device)
        module = DistillModule(student, teacher, LossConfig(), student.config.vocab_size, 8)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = module(b["input_ids"], b["attention_mask"], b["labels"], mode="kd")
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
        assert student.get_output_embeddings().weight.dtype == torch.float32  # masters stay fp32
        losses[device] = float(loss.detach())
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-2)  # bf16 matmuls


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_runtime_on_cuda_matches_cpu(scheme):
    from slimlm.quantize.api import QuantConfig, quantize_model
    from slimlm.testing import tiny_model

    model = tiny_model("llama", seed=3)
    quantize_model(model, QuantConfig(scheme=scheme, method="rtn", group_size=32) if scheme == "int4" else QuantConfig(scheme=scheme),
                   None)
    ids = torch.randint(5, 300, (3, 17))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.to("cuda")(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)


def test_packed_scoring_on_cuda_matches_unpacked():
    from slimlm.runtime.scoring import label_probs_full, label_probs_packed
    from slimlm.testing import tiny_model

    model = tiny_model("qwen3", seed=3, initializer_range=0.2).cuda()
    g = torch.Generator().manual_seed(0)
    groups = [([int(t) for t in torch.randint(5, 300, (p,), generator=g)],
               [[int(t) for t in torch.randint(5, 300, (n,), generator=g)] for n in sizes])
              for p, sizes in ((20, (3, 7, 1)), (9, (4,)), (31, (2, 2, 5, 6)))]
    packed = label_probs_packed(model, groups, (5, 6), batch_size=2)
    for (prefix, sufs), got in zip(groups, packed, strict=True):
        ref = label_probs_full(model, [prefix + s for s in sufs], (5, 6))
        assert abs(got - ref).max() < 1e-4


def test_shared_prefix_attention_on_cuda_matches_the_broadcast(monkeypatch):
    """Candidates reading the prefix KV in place (CPU-only by default, slimlm.runtime.shared_prefix.DEVICES)
    forced on CUDA: the same scores as the copying broadcast, in fp32 and bf16 (gpu_bench.py --sections scoring
    times the two)."""
    from slimlm.runtime import shared_prefix
    from slimlm.runtime.scoring import label_probs_shared_prefix
    from slimlm.testing import tiny_model

    g = torch.Generator().manual_seed(0)
    prefix = [int(t) for t in torch.randint(5, 300, (40,), generator=g)]
    sufs = [[int(t) for t in torch.randint(5, 300, (n,), generator=g)] for n in (3, 7, 1, 5, 2)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = tiny_model("llama", seed=3, initializer_range=0.2).to("cuda", dtype=dtype)
        copied = label_probs_shared_prefix(model, prefix, sufs, (5, 6), batch_size=2, pack_max=0)
        monkeypatch.setattr(shared_prefix, "DEVICES", ("cpu", "cuda"))
        assert shared_prefix.applies(model, len(prefix), 7)
        in_place = label_probs_shared_prefix(model, prefix, sufs, (5, 6), batch_size=2, pack_max=0)
        monkeypatch.undo()
        assert abs(in_place - copied).max() < tol


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
def test_decoding_on_cuda_gives_the_cpu_tokens(compile_step):
    """The decode loop on CUDA (preallocated KV written in place; the step compiled or eager), with rows
    joining and leaving, gives the greedy tokens of the same fp32 model on CPU."""
    from slimlm.runtime.decoding import DecodeBatch, Generation, SamplingParams
    from slimlm.testing import tiny_model

    g = torch.Generator().manual_seed(1)
    prompts = [[int(t) for t in torch.randint(5, 300, (n,), generator=g)] for n in (6, 17, 2, 9)]
    budgets = (7, 3, 9, 5)

    def decode(model, **kw):
        gens = [Generation(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(prompts, budgets, strict=True)]
        batch = DecodeBatch(model, **kw)
        batch.add(gens[:2])
        batch.step()
        batch.add(gens[2:])
        while len(batch):
            batch.step()
        return [x.tokens for x in gens], batch

    cpu, _ = decode(tiny_model("llama", seed=5, initializer_range=0.2))
    got, batch = decode(tiny_model("llama", seed=5, initializer_range=0.2).cuda(), compile=compile_step)
    assert batch.cache.keys[0].is_cuda and batch.compiled == compile_step
    assert got == cpu


def test_tiny_recipe_end_to_end_on_cuda(recipe_world, tmp_path):
    from typer.testing import CliRunner

    from slimlm.cli import app

    root, data = recipe_world
    train = {"max_steps": 2, "batch_size": 3, "eval_every": 0, "save_every": 0, "tensorboard": False}
    tree = {"out": str(tmp_path / "run"), "teacher": str(root / "teacher"), "device": "cuda",
            "task": {"name": "movielens-ranking", "data": str(data), "eval_limit": 6, "candidates_per_prefix": 4},
            "stages": [{"name": "teacher-sft", "kind": "distill", "config": {**train, "mode": "sft"}},
                       {"name": "student", "kind": "prune", "config": {"layers_keep": 2, "mlp_keep": 0.5,
                                                                       "calib": "movielens-ranking", "samples": 4,
                                                                       "seq_len": 64}},
                       {"name": "kd", "kind": "distill", "teacher": "teacher-sft", "config": {**train, "mode": "kd"}},
                       {"name": "int8", "kind": "quantize", "config": {"scheme": "int8"}},
                       {"name": "eval", "kind": "evaluate", "models": ["teacher-sft", "int8"],
                        "config": {"split": "val", "limit": 6}}]}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    res = CliRunner().invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "eval" / "stage.json").read_text())["metrics"]
    assert all(r["placement"]["device"].startswith("cuda") for r in results.values())


def test_more_stages_end_to_end_on_cuda(recipe_world, tmp_path):
    from conftest import more_stages_recipe

    from slimlm.pipeline import load_recipe, run

    root, data = recipe_world
    recipe = tmp_path / "more.yaml"
    recipe.write_text(yaml.safe_dump(more_stages_recipe(root, data, tmp_path / "run", "cuda")))
    records = run(load_recipe(recipe))
    results = records["eval"]["metrics"]
    assert set(results) == {"on-policy", "cached", "int4-gptq", "int4-qe", "fp8"}
    assert all(r["placement"]["device"].startswith("cuda") for r in results.values())
    assert all(0.0 <= r["metrics"]["auc"] <= 1.0 for r in results.values())


def test_server_on_cuda_scores_and_generates_like_the_cpu_server(tmp_path):
    import httpx

    from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
    from slimlm.testing import save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama", seed=0, initializer_range=0.2)
    limits = dict(max_prompt_tokens=64, max_tokens=16, max_candidates=10, max_batch=4)
    score = {"model": "tiny-llama", "prefix": "User: 24-year-old male technician. Recently rated movies:\n",
             "candidates": ["Candidate movie: Toy Story. Answer:", "Four Rooms?", "Yes No Yes"]}
    gen = {"model": "tiny-llama", "prompt": "User: 24-year-old", "max_tokens": 12, "temperature": 0}
    out = {}
    for device in ("cpu", "cuda"):
        app = create_app(model_dir, ServeConfig(**limits), device=device, dtype=torch.float32)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
            s, g = c.post("/v1/score", json=score), c.post("/v1/completions", json=gen)
            assert s.status_code == 200 and g.status_code == 200, (s.text, g.text)
            out[device] = (s.json()["scores"], g.json()["choices"][0]["text"])
    torch.testing.assert_close(torch.tensor(out["cuda"][0]), torch.tensor(out["cpu"][0]), rtol=0, atol=1e-4)
    assert out["cuda"][1] == out["cpu"][1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_nccl_training_steps_through_torchrun(parallel, tmp_path, recipe_world):
    root, data = recipe_world
    ranks = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "slimlm", "distill",
           f"student={root / 'teacher'}", f"teacher={root / 'teacher'}", f"out={tmp_path / 'run'}", "mode=kd",
           f"parallel={parallel}", "device=cuda", f"task.data={data}", "task.eval_limit=6", "max_steps=3",
           "batch_size=2", "eval_every=0", "save_every=2", "tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in (Path(tmp_path / "run") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

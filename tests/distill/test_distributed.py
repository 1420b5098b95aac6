"""Scale-out: 2 gloo processes under torchrun (DDP and FSDP2) reproduce the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, synth_movielens, write_movielens
from safetensors.torch import load_file

from slimlm.placement import fast_bf16
from slimlm.testing import save_tiny_model

STOPPER = Path(__file__).with_name("dist_stop.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    users, items, ratings = synth_movielens(n_users=10, per_user=14, seed=4)
    write_movielens(root / "ml", users, items, ratings)
    save_tiny_model("llama", root / "teacher", seed=1)
    save_tiny_model("llama", root / "student", seed=2, num_hidden_layers=1)
    return root


def _distill(root, out, extra, nproc=1, stop_after=None, fails=False):
    args = [f"student={root / 'student'}", f"teacher={root / 'teacher'}", f"task.data={root / 'ml'}",
            "max_steps=3", "eval_every=0", "task.eval_limit=6", "tensorboard=false", "optim.lr=1e-3",
            "grad_accum=2", "loss.divergence=jsd", f"out={out}",
            "mixed_precision=false",  # fp32 everywhere: the equalities below are fp32's (bf16 CPUs autocast)
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = ["-m", "slimlm", "distill"] if stop_after is None else [str(STOPPER), str(stop_after)]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *entry, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if fails:
        assert proc.returncode != 0
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


@pytest.fixture(scope="module")
def single(run_dir):
    return _distill(run_dir, run_dir / "single", ["batch_size=4"])


@pytest.mark.skipif(not fast_bf16("cpu"), reason="this CPU has no bf16 dot products: training does not autocast")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_under_bf16_autocast_follow_the_single_process_run(run_dir, single, strategy):
    """Where training autocasts on a CPU (AVX512_BF16 / AMX), DDP and FSDP2 (the teacher held in bf16 and
    sharded too) train as one process does, to bf16's rounding (the batch split changes the bf16 sums)."""
    runs = {name: _distill(run_dir, run_dir / f"{name}-bf16", [*extra, "mixed_precision=true"], nproc=n)
            for name, extra, n in (("single", ["batch_size=4"], 1),
                                   (strategy, ["batch_size=2", f"parallel={strategy}"], 2))}
    for out in runs.values():
        final = json.loads((out / "metrics.json").read_text())
        assert final["autocast"] == "bfloat16" and final["teacher_precision"] == "bfloat16"
    assert _losses(runs[strategy]) == pytest.approx(_losses(runs["single"]), rel=2e-2)
    assert _losses(runs[strategy]) != pytest.approx(_losses(single), rel=1e-6)  # not the fp32 run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_gloo_matches_single_process(run_dir, single, strategy):
    out = _distill(run_dir, run_dir / strategy, ["batch_size=2", f"parallel={strategy}"], nproc=2)
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-5)
    # the final evaluation: under FSDP2 the teacher's layers gather one at a time for the held-out KL
    final = json.loads((out / "metrics.json").read_text())
    want = json.loads((single / "metrics.json").read_text())
    assert final["eval_kl"] == pytest.approx(want["eval_kl"], rel=1e-4) and final["eval_auc"] == want["eval_auc"]
    a = load_file(str(single / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()  # the same checkpoint layout (tied head stored once)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)
    # the comparison can fail: training moved the weights far beyond its tolerance (every tensor checked)
    init = load_file(str(single.parent / "student" / "model.safetensors"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 100 * 2e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_resume_matches_uninterrupted(run_dir, strategy):
    """Interrupted after 2 of 4 steps and resumed (on-policy batches included, so every rank's sampler
    state must be restored) == one uninterrupted 2-process run, bit for bit."""
    extra = ["batch_size=2", f"parallel={strategy}", "max_steps=4", "mode=on_policy", "on_policy.lam=0.5",
             "on_policy.max_new_tokens=4"]
    whole = _distill(run_dir, run_dir / f"{strategy}-whole", extra, nproc=2)
    parted = run_dir / f"{strategy}-parted"
    _distill(run_dir, parted, extra, nproc=2, stop_after=2)
    assert (parted / "checkpoint" / "state.json").exists() and not (parted / "model").exists()
    _distill(run_dir, parted, extra, nproc=2)
    assert _losses(parted) == _losses(whole)
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(parted / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_teacher_cache_is_built_by_both_ranks(run_dir, single):
    """teacher_signal=cached under 2 DDP processes: both ranks build the cache (no rank waits for another's
    whole build), and training on it equals the single-process run on its own cache."""
    extra = ["teacher_signal=cached", "cache_top_k=16"]
    one = _distill(run_dir, run_dir / "cached-1", ["batch_size=4", f"teacher_cache={run_dir / 'cache-1'}", *extra])
    two = _distill(run_dir, run_dir / "cached-2", ["batch_size=2", "parallel=ddp",
                                                   f"teacher_cache={run_dir / 'cache-2'}", *extra], nproc=2)
    assert json.loads((run_dir / "cache-2" / "index.json").read_text()) == \
        json.loads((run_dir / "cache-1" / "index.json").read_text())
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert _losses(one) != pytest.approx(_losses(single), rel=1e-3)  # top-16 of the teacher, not the live one


def test_resume_refuses_another_kind_of_checkpoint(run_dir):
    """A checkpoint of a single-process run cannot be resumed as FSDP2 shards: one line says so."""
    out = run_dir / "kind"
    _distill(run_dir, out, ["batch_size=2", "max_steps=4"], stop_after=1)
    err = _distill(run_dir, out, ["batch_size=2", "max_steps=4", "parallel=fsdp2"], nproc=2, fails=True)
    assert "written by a run without parallel=fsdp2" in err

"""FSDP2 without a whole model on any rank: the row arithmetic against torch.chunk, row reading across
files, meta-device construction + per-rank loading against the files, rank-local checkpoints restored by
2 and by 3 ranks, and a teacher cache written by every rank against the single-process one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file, save_file
from sharded_worker import LOGIT_IDS, cache_sequences

from slimlm import SlimlmError
from slimlm.distill.sharded import RowFiles, model_files, row_range
from slimlm.distill.teacher import TeacherCache, write_teacher_cache
from slimlm.io import recover_dir, shared_atomic_dir
from slimlm.loading import load_model
from slimlm.testing import save_tiny_model

WORKER = Path(__file__).with_name("sharded_worker.py")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_row_range_is_torch_chunk(n, world):
    """FSDP2 splits dim 0 with torch.chunk; ranks past the last chunk hold nothing."""
    chunks = torch.arange(n).chunk(world) if n else ()
    for r in range(world):
        a, b = row_range(n, r, world)
        want = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(a, b)) == want


def test_row_files_reassemble_any_range(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(7, 3, generator=g), "v": torch.randn(2, generator=g), "step": torch.tensor(5.0)}
    files = []
    for r in range(3):  # as 3 ranks would write them: each its rows, 0-dim tensors whole
        part = {k: (t[slice(*row_range(t.shape[0], r, 3))] if t.dim() else t).contiguous() for k, t in full.items()}
        save_file(part, str(tmp_path / f"r{r}.safetensors"))
        files.append(tmp_path / f"r{r}.safetensors")
    rows = RowFiles.rank_files(files, {k: tuple(t.shape) for k, t in full.items()})
    for a in range(8):
        for b in range(a, 8):
            torch.testing.assert_close(rows.rows("w", a, b), full["w"][a:b], rtol=0, atol=0)
    torch.testing.assert_close(rows.rows("v", 0, 2), full["v"], rtol=0, atol=0)
    assert float(rows.rows("step", 0, 0)) == 5.0
    with pytest.raises(SlimlmError, match="not all in the files"):
        RowFiles({"w": [(files[0], 0, 3)]}).rows("w", 0, 5)
    with pytest.raises(SlimlmError, match="cannot read x"):
        RowFiles({"x": [(files[0], 0, 3)]}).rows("x", 0, 3)


def test_shared_atomic_dir_replaces_whole_and_recovers(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with shared_atomic_dir(final, main=True, sync=lambda: None) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # nothing visible before every process is done
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    leftover = tmp_path / ".ckpt.shared.tmp"  # a write killed midway
    leftover.mkdir()
    (leftover / "half").write_text("x")
    assert any("shared.tmp" in line for line in recover_dir(final))
    assert not leftover.exists() and (final / "new.txt").read_text() == "new"
    with pytest.raises(RuntimeError), shared_atomic_dir(final, main=True, sync=lambda: None) as tmp:
        (tmp / "partial.txt").write_text("x")
        raise RuntimeError("a rank failed")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]  # untouched


def _torchrun(nproc: int, *args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied embeddings; untied with q/k/v biases
def test_meta_construction_loads_each_rank_its_rows(tmp_path, family):
    model_dir = save_tiny_model(family, tmp_path / "model", seed=5, num_hidden_layers=3)
    _torchrun(2, "materialize", model_dir, tmp_path / "out")
    got = load_file(str(tmp_path / "out.state.safetensors"))
    want = load_file(str(model_files(model_dir)[0]))
    for k, t in want.items():  # every stored tensor, gathered from the two ranks' shards
        assert torch.equal(got[k], t), k
    with torch.no_grad():  # the logits also need the non-persistent rotary tables, rebuilt from the config
        want_logits = load_model(model_dir)(input_ids=LOGIT_IDS).logits
    torch.testing.assert_close(got["logits"], want_logits, rtol=1e-5, atol=1e-5)


def test_rank_local_checkpoint_restores_with_two_and_three_ranks(tmp_path):
    model_dir = save_tiny_model("qwen3", tmp_path / "model", seed=6, num_hidden_layers=3)
    ckpt = tmp_path / "ckpt"
    _torchrun(2, "save", model_dir, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model-rank00000.safetensors", "model-rank00001.safetensors", "optimizer-rank00000.safetensors",
        "optimizer-rank00001.safetensors", "rng.safetensors", "state.json"]
    saved = load_file(str(tmp_path / "ckpt.saved.safetensors"))
    assert any(k.endswith(".exp_avg") for k in saved) and any(k.endswith(".step") for k in saved)
    for world in (2, 3):  # the same ranks, and more ranks than wrote it (rows read across files)
        _torchrun(world, "load", model_dir, ckpt)
        loaded = load_file(str(tmp_path / f"ckpt.loaded-{world}.safetensors"))
        assert loaded.keys() == saved.keys()
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), (world, k)
    # the step moved the weights, so equality above is not the initial weights compared with themselves
    init = load_file(str(model_files(model_dir)[0]))
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])


def test_teacher_cache_written_by_every_rank_equals_one_process(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "teacher", seed=7)
    one = write_teacher_cache(load_model(model_dir), cache_sequences(), tmp_path / "one", k=5, batch_size=3,
                              shard_sequences=4)
    _torchrun(2, "cache", model_dir, tmp_path / "two")
    two = TeacherCache(tmp_path / "two")
    assert two.index == one and len(one["shards"]) == 5  # 19 sequences, 4 a shard: 3 shards on rank 0, 2 on 1
    ref = TeacherCache(tmp_path / "one")
    for sid in range(19):
        for a, b in zip(ref.rows([sid]), two.rows([sid]), strict=True):
            assert torch.equal(a, b), sid
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_meta_model_refuses_a_quantized_export(tmp_path):
    from slimlm.distill.sharded import meta_model
    from slimlm.quantize.api import QuantizeConfig, quantize_dir

    model_dir = save_tiny_model("llama", tmp_path / "model", seed=8)
    quantize_dir(model_dir, tmp_path / "q", QuantizeConfig(scheme="int8"))
    with pytest.raises(SlimlmError, match="quantized export: FSDP2 shards plain"):
        meta_model(tmp_path / "q")
    assert meta_model(model_dir).get_input_embeddings().weight.device.type == "meta"

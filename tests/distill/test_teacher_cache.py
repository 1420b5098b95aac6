"""The offline teacher signal: cache contents against the live teacher, k = V equals dense, mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synth_movielens, write_movielens

from slimlm import SlimlmError
from slimlm.config import DistillConfig, load_config
from slimlm.distill.chunked import fused_linear_cached_kd_loss, fused_linear_kd_loss
from slimlm.distill.data import Seq, collate
from slimlm.distill.losses import LossConfig
from slimlm.distill.teacher import TeacherCache, write_teacher_cache
from slimlm.distill.trainer import train
from slimlm.testing import save_tiny_model, tiny_model


def _seqs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 384, (4 + 2 * i,), generator=g).tolist()
        p = 1 + i % 3
        out.append(Seq(tuple(ids), (-100,) * p + tuple(ids[p:]), p))
    return out


def test_cache_rows_match_the_live_teacher(tmp_path):
    teacher = tiny_model("qwen2", seed=7)
    seqs = _seqs()
    index = write_teacher_cache(teacher, seqs, tmp_path / "c", k=5, temperature=2.0, batch_size=3,
                                shard_sequences=3)
    assert index["sequences"] == 7 and len(index["shards"]) == 3 and index["bytes_per_target_token"] == 5 * 6 + 4
    assert index["targets"] == sum(len(s.input_ids) - s.prompt_len for s in seqs)
    cache = TeacherCache(tmp_path / "c")
    order = [4, 0, 6]
    ids, lp, tail = cache.rows(order)
    with torch.no_grad():
        rows = []
        for i in order:
            s = seqs[i]
            logits = teacher(torch.tensor([s.input_ids])).logits[0, :-1]
            keep = torch.tensor(s.labels[1:]) != -100
            rows.append(torch.log_softmax(logits[keep].double() / 2.0, -1))
        ref = torch.cat(rows)
    top, top_ids = ref.topk(5, -1)
    assert ids.dtype == torch.int32 and lp.dtype == torch.float16 and tail.dtype == torch.float32
    assert torch.equal(ids.long(), top_ids)
    torch.testing.assert_close(lp.double(), top, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(tail.double(), torch.log1p(-top.exp().sum(-1)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_cached_full_vocab_equals_dense(div):
    torch.manual_seed(0)
    n, hs_dim, ht_dim, v = 29, 12, 20, 53
    cfg = LossConfig(divergence=div, temperature=1.5, ce_weight=0.2)
    hs = torch.randn(n, hs_dim, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, hs_dim, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, ht_dim, dtype=torch.float64), torch.randn(v, ht_dim, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    dense = fused_linear_kd_loss(hs, ws, labels, cfg, teacher_hidden=ht, teacher_weight=wt, chunk_size=4)
    gd = torch.autograd.grad(dense, (hs, ws))
    t = torch.log_softmax((ht @ wt.T) / cfg.temperature, -1)[labels != -100]
    lp, ids = t.sort(-1, descending=True)
    tail = torch.full((ids.shape[0],), float("-inf"), dtype=torch.float64)
    cached = fused_linear_cached_kd_loss(hs, ws, labels, cfg, teacher_ids=ids, teacher_logprobs=lp,
                                         teacher_tail=tail, chunk_size=6)
    gc = torch.autograd.grad(cached, (hs, ws))
    assert cached.item() == pytest.approx(dense.item(), rel=1e-10)
    for a, b in zip(gd, gc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # a top-k smaller than V is a different (coarser) loss, not silently the same
    short = fused_linear_cached_kd_loss(hs, ws, labels, cfg, teacher_ids=ids[:, :3], teacher_logprobs=lp[:, :3],
                                        teacher_tail=torch.logsumexp(lp[:, 3:], -1))
    assert short.item() != pytest.approx(dense.item(), rel=1e-6)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_cached_top_k_equals_the_bucketed_reference(div):
    """k < V: the loss is the divergence between teacher and student distributions over k + 1 buckets (the
    teacher's k listed tokens, then everything else), computed here from the definitions in float64."""
    from test_losses import naive_divergence

    torch.manual_seed(1)
    n, hdim, v, k, tau, ce_w, kd_w = 23, 10, 41, 3, 1.5, 0.2, 0.7
    cfg = LossConfig(divergence=div, temperature=tau, ce_weight=ce_w, kd_weight=kd_w)
    hs = torch.randn(n, hdim, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, hdim, dtype=torch.float64, requires_grad=True)
    zt = 2 * torch.randn(n, v, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[1::4] = -100
    keep = labels != -100
    t_lp = torch.log_softmax(zt[keep] / tau, -1)
    top, ids = t_lp.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1))
    got = fused_linear_cached_kd_loss(hs, ws, labels, cfg, teacher_ids=ids, teacher_logprobs=top,
                                      teacher_tail=tail, chunk_size=5)
    g_got = torch.autograd.grad(got, (hs, ws))

    zs = (hs @ ws.T)[keep]
    p_s = torch.softmax(zs / tau, -1)
    q_s = p_s.gather(-1, ids)
    q_s = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)  # student mass on the teacher's buckets
    q_t = torch.cat([top.exp(), tail.exp()[:, None]], -1)
    ref = kd_w * tau**2 * naive_divergence(q_s, q_t, div).sum() \
        - ce_w * torch.log_softmax(zs, -1).gather(-1, labels[keep][:, None]).sum()
    g_ref = torch.autograd.grad(ref, (hs, ws))
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_cached_rows_must_match_targets():
    cfg = LossConfig()
    labels = torch.tensor([1, -100, 2])
    with pytest.raises(SlimlmError, match="do not match the batch's 2 target tokens"):
        fused_linear_cached_kd_loss(torch.randn(3, 4), torch.randn(10, 4), labels, cfg,
                                    teacher_ids=torch.zeros(3, 2, dtype=torch.long),
                                    teacher_logprobs=torch.zeros(3, 2), teacher_tail=torch.zeros(3))


def test_cache_refuses_other_data_and_temperature(tmp_path):
    seqs = _seqs(3)
    write_teacher_cache(tiny_model("llama"), seqs, tmp_path / "c", k=4)
    cache = TeacherCache(tmp_path / "c")
    cache.check(seqs, 1.0)
    with pytest.raises(SlimlmError, match="made for other training data"):
        cache.check(_seqs(3, seed=1), 1.0)
    with pytest.raises(SlimlmError, match="temperature"):
        cache.check(seqs, 2.0)
    with pytest.raises(SlimlmError, match="not a teacher cache"):
        TeacherCache(tmp_path / "missing")
    b = collate(seqs, 0)
    assert b["labels"].shape == b["input_ids"].shape


def test_training_from_the_cache_matches_the_live_teacher(tmp_path):
    users, items, ratings = synth_movielens(n_users=8, per_user=12, seed=4)
    data = write_movielens(tmp_path / "ml", users, items, ratings)
    save_tiny_model("llama", tmp_path / "teacher", seed=1)
    save_tiny_model("llama", tmp_path / "student", seed=2, num_hidden_layers=1)
    common = [f"student={tmp_path / 'student'}", f"teacher={tmp_path / 'teacher'}", f"task.data={data}",
              "max_steps=3", "batch_size=3", "eval_every=0", "task.eval_limit=6", "tensorboard=false",
              "optim.lr=1e-3", "loss.temperature=2"]
    train(load_config(DistillConfig, None, [*common, f"out={tmp_path / 'online'}"]))
    cached = load_config(DistillConfig, None, [*common, f"out={tmp_path / 'cached'}", "teacher_signal=cached",
                                               f"teacher_cache={tmp_path / 'cache'}", "cache_top_k=100000"])
    train(cached)
    losses = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)] for n in ("online", "cached")}
    # the cache stores log-probs in fp16 (spacing ~4e-3 at log p = -6): an absolute error of ~1e-4 on the KL
    assert losses["online"] == pytest.approx(losses["cached"], abs=5e-4)
    assert losses["online"] != pytest.approx(losses["cached"], abs=1e-9)  # really two different signals
    with pytest.raises(SlimlmError, match="works with mode 'kd' only"):
        load_config(DistillConfig, None, [*common, "out=x", "mode=on_policy", "teacher_signal=cached",
                                          "teacher_cache=c"])

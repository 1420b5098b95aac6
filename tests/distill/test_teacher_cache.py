"""The offline teacher signal: chunked top-k against the full softmax, cache contents against the live teacher,
k = V equals dense, bounded shard reading, fingerprints and mismatch errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import synth_movielens, write_movielens

from slimlm import SlimlmError
from slimlm.config import DistillConfig, load_config
from slimlm.distill.chunked import fused_linear_cached_kd_loss, fused_linear_kd_loss
from slimlm.distill.data import Seq, collate
from slimlm.distill.losses import LossConfig
from slimlm.distill.teacher import (
    TeacherCache,
    chunked_top_k,
    fingerprint,
    teacher_hidden,
    write_teacher_cache,
)
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


def naive_top_k(h, weight, k, bias=None, temperature=1.0, vocab=None):
    """The full-vocabulary reference: [N, V] logits in the input dtype, float32 log-softmax, top-k, the rest."""
    vocab = vocab or weight.shape[0]
    logits = h @ weight[:vocab].T
    if bias is not None:
        logits = logits + bias[:vocab]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    top, ids = logp.topk(k, -1)
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
    return top, ids, rest


# per input dtype: (atol, rtol) on log-probs; the logits are formed in the input dtype in both computations
TOL = {torch.float32: (2e-5, 1e-5), torch.float64: (2e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 32, 97, 200])  # 7, 32: don't divide V = 97; 97: one chunk; 200 > V
@pytest.mark.parametrize("k", [1, 5, 40, 97])  # 40 > some chunks; 97 = the whole vocabulary
def test_chunked_top_k_equals_the_full_softmax(dtype, chunk, k):
    g = torch.Generator().manual_seed(chunk * 100 + k)
    n, hdim, v = 13, 16, 97
    h = (3 * torch.randn(n, hdim, generator=g)).to(dtype)
    w = torch.randn(v + 3, hdim, generator=g).to(dtype)  # a padded head: only the first V rows are the vocabulary
    b = torch.randn(v + 3, generator=g).to(dtype)
    for bias, tau in ((None, 1.0), (b, 2.5)):
        lp, ids, tail = chunked_top_k(h, w, k, bias=bias, temperature=tau, vocab_size=v, chunk_size=chunk)
        ref_lp, ref_ids, ref_tail = naive_top_k(h, w, k, bias=bias, temperature=tau, vocab=v)
        assert lp.shape == ids.shape == (n, k) and tail.shape == (n,)
        assert lp.dtype == tail.dtype == torch.float32 and ids.dtype == torch.long
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=rtol)
        assert (lp[:, 1:] <= lp[:, :-1]).all()  # descending, as topk returns them
        full = torch.log_softmax(((h @ w[:v].T) + (bias[:v] if bias is not None else 0)).float() / tau, -1)
        torch.testing.assert_close(full.gather(-1, ids), lp, atol=atol, rtol=rtol)  # ties may pick either id
        assert (ids.sort(-1).values.unique_consecutive(dim=-1).shape[1] if k > 1 else 1) == k  # distinct ids
        if dtype != torch.bfloat16:  # no ties among float32 logits here: the very same ids
            assert torch.equal(ids, ref_ids)
        if k == v:
            assert torch.isneginf(tail).all()
        else:
            torch.testing.assert_close(tail, ref_tail, atol=atol, rtol=rtol)
            torch.testing.assert_close(torch.logaddexp(torch.logsumexp(lp, -1), tail), torch.zeros(n),
                                       atol=1e-5, rtol=0)  # top-k and tail hold all the mass


def test_chunked_top_k_tail_keeps_a_tiny_remainder():
    """When the top-k holds nearly all the mass, log(1 - Σ top) in float32 is log(0); the tail is still exact."""
    h = torch.tensor([[1.0]])
    w = torch.tensor([[0.0], [-40.0], [-50.0], [-60.0]])  # p ∝ 1, e^-40, e^-50, e^-60
    lp, ids, tail = chunked_top_k(h, w, 1, chunk_size=3)
    assert ids.tolist() == [[0]]
    expected = torch.logsumexp(torch.tensor([-40.0, -50.0, -60.0], dtype=torch.float64), 0)
    assert tail.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isneginf(torch.log1p(-lp.exp().sum()))  # what log(1 - Σ top) gives in float32
    with pytest.raises(SlimlmError, match="top-k must be between 1 and the vocabulary size 4"):
        chunked_top_k(h, w, 5)


def test_teacher_hidden_passes_extra_inputs_through():
    teacher = tiny_model("qwen2", seed=3)
    enc = collate(_seqs(3), 0)
    plain = teacher_hidden(teacher, enc)
    t = enc["input_ids"].shape[1]
    same = teacher_hidden(teacher, {**enc, "position_ids": torch.arange(t).expand(3, t)})
    shifted = teacher_hidden(teacher, {**enc, "position_ids": torch.arange(t).expand(3, t) + 5})
    torch.testing.assert_close(same, plain)
    assert plain.shape == (3, t, teacher.config.hidden_size)
    assert not torch.allclose(shifted, plain)  # position_ids reached the decoder


@pytest.mark.parametrize(("k", "vocab_chunk", "row_block"), [(5, 8192, 4096), (5, 7, 3), (384, 100, 5)])
def test_cache_rows_match_the_live_teacher(tmp_path, k, vocab_chunk, row_block):
    teacher = tiny_model("qwen2", seed=7)
    seqs = _seqs()
    index = write_teacher_cache(teacher, seqs, tmp_path / "c", k=k, temperature=2.0, batch_size=3,
                                shard_sequences=3, vocab_chunk=vocab_chunk, row_block=row_block)
    assert index["sequences"] == 7 and len(index["shards"]) == 3 and index["bytes_per_target_token"] == k * 6 + 4
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
    top, top_ids = ref.topk(k, -1)
    assert ids.dtype == torch.int32 and lp.dtype == torch.float16 and tail.dtype == torch.float32
    torch.testing.assert_close(lp.double(), top, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ref.gather(-1, ids.long()), top, atol=1e-5, rtol=1e-5)
    if k < 384:
        assert torch.equal(ids.long(), top_ids)
        torch.testing.assert_close(tail.double(), torch.log1p(-top.exp().sum(-1)), atol=1e-4, rtol=1e-4)
    else:  # k = V: every token listed (a permutation of the vocabulary), nothing left over
        assert torch.equal(ids.long().sort(-1).values, torch.arange(384).expand_as(ids))
        assert torch.isneginf(tail).all()


def test_cache_reading_keeps_a_bounded_number_of_shards_open(tmp_path):
    seqs = _seqs(9)
    write_teacher_cache(tiny_model("llama", seed=2), seqs, tmp_path / "c", k=3, batch_size=2, shard_sequences=2)
    everything = TeacherCache(tmp_path / "c", max_open_shards=100)
    one_by_one = [everything.rows([i]) for i in range(9)]
    assert len(everything.open_shards) == 5
    cache = TeacherCache(tmp_path / "c", max_open_shards=2)
    order = [8, 0, 3, 8, 5, 1, 6, 2, 7, 4]
    got = cache.rows(order)
    for j, part in enumerate(zip(*(one_by_one[i] for i in order), strict=True)):
        assert torch.equal(got[j], torch.cat(part))
    assert cache.open_shards == [3, 2]  # the last two used: sequence 7 (shard 3), then 4 (shard 2)
    for i in (0, 2, 4, 6, 8):
        cache.rows([i])
        assert len(cache.open_shards) <= 2
    assert [t.shape[0] for t in cache.rows([])] == [0, 0, 0]
    with pytest.raises(SlimlmError, match="sequence 9 is not in this cache of 9 sequences"):
        cache.rows([9])
    with pytest.raises(SlimlmError, match="max_open_shards must be at least 1"):
        TeacherCache(tmp_path / "c", max_open_shards=0)


def test_fingerprint_covers_tokens_labels_boundaries_and_settings():
    seqs = _seqs(4)
    base = dict(k=4, temperature=1.0, vocab=384)
    fp = fingerprint(seqs, **base)
    assert fp == fingerprint(list(seqs), **base) and len(fp) == 64
    s0 = seqs[0]
    changed_token = [Seq((s0.input_ids[0] + 1, *s0.input_ids[1:]), s0.labels, s0.prompt_len), *seqs[1:]]
    changed_label = [Seq(s0.input_ids, (*s0.labels[:-1], -100), s0.prompt_len), *seqs[1:]]
    a, b = Seq((5, 6), (-100, 6), 1), Seq((7,), (7,), 0)
    moved = Seq((5,), (-100,), 1), Seq((6, 7), (6, 7), 0)  # the same token stream cut elsewhere
    others = {fingerprint(changed_token, **base), fingerprint(changed_label, **base), fingerprint(seqs[:3], **base),
              fingerprint(seqs, **{**base, "k": 5}), fingerprint(seqs, **{**base, "temperature": 2.0}),
              fingerprint(seqs, **{**base, "vocab": 385})}
    assert fp not in others and len(others) == 6
    assert fingerprint([a, b], **base) != fingerprint(list(moved), **base)


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
    with pytest.raises(SlimlmError, match="made for other training data or by an older slimlm: rebuild"):
        cache.check(_seqs(3, seed=1), 1.0)
    with pytest.raises(SlimlmError, match="temperature"):
        cache.check(seqs, 2.0)
    with pytest.raises(SlimlmError, match="not a teacher cache"):
        TeacherCache(tmp_path / "missing")
    # a cache from slimlm <= 0.1 (JSON-dumped sequences, no settings, no scheme): a clear request to rebuild
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    del index["fingerprint_scheme"]
    index["fingerprint"] = hashlib.sha256(b"".join(json.dumps([s.input_ids, s.labels]).encode() for s in seqs)).hexdigest()
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SlimlmError, match=r"made for other training data or by an older slimlm: rebuild it \(`slimlm"):
        TeacherCache(tmp_path / "c").check(seqs, 1.0)
    b = collate(seqs, 0)
    assert b["labels"].shape == b["input_ids"].shape


@pytest.mark.parametrize("k", [1, 4])
def test_training_from_the_cache_matches_the_live_teacher(tmp_path, k):
    """Also on packed multi-item batches (k = 4): the cache is written with the same packing."""
    users, items, ratings = synth_movielens(n_users=8, per_user=12, seed=4)
    data = write_movielens(tmp_path / "ml", users, items, ratings)
    save_tiny_model("llama", tmp_path / "teacher", seed=1)
    save_tiny_model("llama", tmp_path / "student", seed=2, num_hidden_layers=1)
    common = [f"student={tmp_path / 'student'}", f"teacher={tmp_path / 'teacher'}", f"task.data={data}",
              "max_steps=3", "batch_size=3", "eval_every=0", "task.eval_limit=6", "tensorboard=false",
              "optim.lr=1e-3", "loss.temperature=2", f"task.candidates_per_prefix={k}"]
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

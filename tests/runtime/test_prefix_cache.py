"""The prefix cache as a data structure, against a naive reference (a plain list of stored sequences):
longest-prefix lookups, bytes, LRU eviction under a budget, claims; and, with tiny models, scoring and
generation from cached KV against computing it afresh."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from conftest import greedy_reference

from slimlm import SlimlmError
from slimlm.models import FAMILIES
from slimlm.runtime.decoding import DecodeBatch, Generation, Prefill, SamplingParams, prefill
from slimlm.runtime.prefix_cache import PrefixCache, kv_len
from slimlm.runtime.scoring import label_probs_shared_prefix
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py

LAYERS, HEADS, DIM = 2, 2, 3
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # fp32 keys and values of one token, every layer
LABELS = (305, 304)
ATOL = 1e-5


def fake_kv(tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV whose column t is a function of tokens[:t + 1] only (as a causal model's is), so a wrong slice,
    a wrong node or a stale value shows."""
    cols = [float(hash(tuple(tokens[:t + 1])) % 100_003) for t in range(len(tokens))]
    base = torch.tensor(cols).view(1, 1, -1, 1)
    return [(base.expand(1, HEADS, -1, DIM) + layer, base.expand(1, HEADS, -1, DIM) - layer - 0.5)
            for layer in range(LAYERS)]


def assert_kv_equal(got, want):
    assert len(got) == len(want)
    for (kg, vg), (kw, vw) in zip(got, want, strict=True):
        assert kg.shape == kw.shape and torch.equal(kg, kw) and torch.equal(vg, vw)


def lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def random_seqs(rng, n, alphabet=3, lengths=(1, 12)):
    return [tuple(rng.randrange(alphabet) for _ in range(rng.randint(*lengths))) for _ in range(n)]


# --------------------------------------------------------------------------- the data structure


@pytest.mark.parametrize("seed", range(4))
def test_lookup_is_the_longest_common_prefix_with_anything_stored(seed):
    """A small alphabet makes sequences share prefixes, diverge inside edges and extend each other."""
    rng = random.Random(seed)
    cache, stored = PrefixCache(1 << 30), []
    for step in range(60):
        if rng.random() < 0.5:
            s = random_seqs(rng, 1)[0]
            cache.insert(s, fake_kv(s))
            stored.append(s)
        q = random_seqs(rng, 1, lengths=(1, 14))[0]
        limit = rng.choice([None, rng.randint(0, len(q))])
        found = cache.lookup(q, limit=limit)
        m = min(max((lcp(q, s) for s in stored), default=0), len(q) if limit is None else limit)
        assert found.length == m, (step, q, limit)
        if m:
            assert_kv_equal(found.kv, fake_kv(q[:m]))
        else:
            assert found.kv is None
    # every distinct token position (= distinct non-empty prefix) is stored once
    distinct = {s[:i] for s in stored for i in range(1, len(s) + 1)}
    st = cache.stats()
    assert st["stored_tokens"] == len(distinct) and st["bytes"] == len(distinct) * TOKEN_BYTES
    assert st["evictions"] == 0 and st["hits"] + st["misses"] == 60


def test_shared_prefixes_are_stored_once_and_counters_count():
    cache = PrefixCache(1 << 20)
    p, x, y = (1, 2, 3, 4, 5), (6, 7), (8,)
    assert cache.insert(p + x, fake_kv(p + x)) == 7
    assert cache.insert(p + y, fake_kv(p + y)) == 1  # splits the edge after p: only y is new
    assert cache.insert(p, fake_kv(p)) == 0
    assert cache.bytes == 8 * TOKEN_BYTES and cache.stats()["nodes"] == 3
    assert cache.lookup(p + (6, 9)).length == 6
    assert cache.lookup((9, 9)).length == 0
    st = cache.stats()
    assert (st["hits"], st["misses"], st["reused_tokens"]) == (1, 1, 6)
    with pytest.raises(SlimlmError, match="expected 3 tokens"):
        cache.insert((1, 2, 3), fake_kv((1, 2)))


def test_lru_eviction_keeps_the_budget_and_evicts_the_least_recent():
    a, b, c = (1,) * 4, (2,) * 4, (3,) * 4
    cache = PrefixCache(8 * TOKEN_BYTES)  # room for two of them
    cache.insert(a, fake_kv(a))
    cache.insert(b, fake_kv(b))
    assert cache.lookup(a).length == 4  # a is now more recent than b
    cache.insert(c, fake_kv(c))
    assert cache.bytes <= cache.max_bytes and cache.stats()["evictions"] == 1
    assert cache.lookup(b).length == 0 and cache.lookup(a).length == 4 and cache.lookup(c).length == 4
    # a shared prefix outlives its leaves: the leaf (least recent) goes first, then the prefix
    tree = PrefixCache(7 * TOKEN_BYTES)
    p = (5, 5, 5)
    tree.insert(p + (1, 1), fake_kv(p + (1, 1)))
    tree.insert(p + (2, 2), fake_kv(p + (2, 2)))  # 7 tokens: full
    tree.lookup(p + (2, 2))
    tree.insert((9,), fake_kv((9,)))  # over by one token: the (1, 1) leaf goes, p stays
    assert tree.lookup(p + (1, 1)).length == 3 and tree.lookup(p + (2, 2)).length == 5
    assert tree.bytes == 6 * TOKEN_BYTES
    # a sequence over the whole budget is not stored (and evicts nothing)
    assert tree.insert((7,) * 8, fake_kv((7,) * 8)) == 0 and tree.bytes == 6 * TOKEN_BYTES


@pytest.mark.parametrize("seed", range(3))
def test_a_tiny_budget_never_returns_wrong_kv(seed):
    rng = random.Random(seed)
    cache, stored = PrefixCache(10 * TOKEN_BYTES), []
    for _ in range(80):
        s = random_seqs(rng, 1)[0]
        cache.insert(s, fake_kv(s))
        stored.append(s)
        assert cache.bytes <= cache.max_bytes
        q = random_seqs(rng, 1)[0]
        found = cache.lookup(q)
        assert found.length <= max(lcp(q, s) for s in stored)
        if found.length:
            assert_kv_equal(found.kv, fake_kv(q[:found.length]))
    assert cache.stats()["evictions"] > 0


def test_claims_make_concurrent_lookups_wait_instead_of_computing_again():
    cache = PrefixCache(1 << 20)
    p = tuple(range(10))
    first = cache.lookup(p, claim=True)
    assert first.length == 0 and first.claim is not None
    assert cache.lookup(p).pending is first.claim.done  # the same prefix
    assert cache.lookup(p + (99,)).pending is not None  # extends the claimed one
    assert cache.lookup(p[:4], claim=True).pending is not None  # is a prefix of it
    assert cache.lookup(p[:4] + (50, 51)).pending is None  # diverges: computes its own
    cache.insert(p, fake_kv(p), claim=first.claim)
    assert first.claim.done.is_set() and cache.stats()["claims"] == 0
    again = cache.lookup(p + (99,), claim=True)
    assert again.length == 10 and again.claim is not None and again.pending is None
    cache.release(again.claim)
    assert cache.lookup(p, claim=True).claim is None  # all of it is cached: nothing left to claim
    short = PrefixCache(1 << 20, min_tokens=4)
    c = short.lookup((1, 2, 3, 4, 5), claim=True).claim
    assert short.lookup((1, 2, 3)).pending is None  # would reuse fewer than min_tokens: not worth waiting
    short.insert((1, 2, 3, 4, 5), fake_kv((1, 2, 3, 4, 5)), claim=c)
    assert short.lookup((1, 2, 3)).length == 0 and short.lookup((1, 2, 3, 4, 9)).length == 4


# --------------------------------------------------------------------------- with models


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=3, initializer_range=0.2)


def _ids(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(n)]


def _stored_copy(cache):
    return [t.clone() for n in sorted(cache._nodes, key=lambda n: n.tokens) for kv in n.kv for t in kv]


def test_scores_with_the_cache_equal_scores_without(model):
    user, other = _ids(1, 23), _ids(2, 17)
    suffixes = [_ids(10 + i, 1 + i % 5) for i in range(6)]
    want = label_probs_shared_prefix(model, user, suffixes, LABELS, batch_size=4)
    cache = PrefixCache(1 << 24)
    cold = label_probs_shared_prefix(model, user, suffixes, LABELS, batch_size=4, cache=cache)
    np.testing.assert_array_equal(cold, want)  # a miss runs exactly today's path
    snapshot = _stored_copy(cache)
    warm = label_probs_shared_prefix(model, user, suffixes[::-1], LABELS, batch_size=3, cache=cache)
    np.testing.assert_allclose(warm, want[::-1], atol=ATOL, rtol=0)
    assert cache.stats()["hits"] == 1 and cache.stats()["reused_tokens"] == 23
    for a, b in zip(_stored_copy(cache), snapshot, strict=True):
        assert torch.equal(a, b)  # using cached KV never changes it
    # a cached part of the prefix (the first 15 tokens, from another user's request) is extended
    longer = user[:15] + other
    np.testing.assert_allclose(label_probs_shared_prefix(model, longer, suffixes, LABELS, cache=cache),
                               label_probs_shared_prefix(model, longer, suffixes, LABELS), atol=ATOL, rtol=0)
    assert cache.stats()["reused_tokens"] == 23 + 15
    # an explicit past and a chunked prefix give the same scores
    past = cache.lookup(user[:9]).kv
    np.testing.assert_allclose(label_probs_shared_prefix(model, user, suffixes, LABELS, past=past, prefill_chunk=4),
                               want, atol=ATOL, rtol=0)


def test_eviction_under_a_tiny_budget_keeps_scores_exact(model):
    users = [_ids(20 + u, 12 + 3 * u) for u in range(4)]
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads) * 4
    cache = PrefixCache(20 * per_token)  # about one user prefix
    for rnd in range(2):
        for u, prefix in enumerate(users):
            suffixes = [_ids(100 * rnd + 10 * u + i, 1 + i) for i in range(3)]
            got = label_probs_shared_prefix(model, prefix, suffixes, LABELS, cache=cache)
            want = label_probs_shared_prefix(model, prefix, suffixes, LABELS)
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
            assert cache.bytes <= cache.max_bytes
    assert cache.stats()["evictions"] > 0


@pytest.mark.parametrize("pack_max", [0, 16])  # broadcast, or a packed first forward (prefix + candidates)
def test_concurrent_threads_compute_a_shared_prefix_once(model, pack_max):
    prefix, suffixes = _ids(5, 30), [_ids(6 + i, 3) for i in range(4)]
    want = label_probs_shared_prefix(model, prefix, suffixes, LABELS)
    cache, prefix_forwards, lock = PrefixCache(1 << 24), [], threading.Lock()
    base = model.get_decoder()
    forward = base.forward

    def counting(*a, **k):
        if k["input_ids"][0, :5].tolist() == list(prefix[:5]):  # a forward of the prefix, not of candidates
            with lock:
                prefix_forwards.append(k["input_ids"].shape[1])
        return forward(*a, **k)

    base.forward = counting
    try:
        results = [None] * 4
        gate = threading.Barrier(4)

        def run(i):
            gate.wait()
            results[i] = label_probs_shared_prefix(model, prefix, suffixes, LABELS, cache=cache, pack_max=pack_max)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        base.forward = forward
    assert prefix_forwards == [30 if pack_max == 0 else 30 + 4 * 3]
    for r in results:
        np.testing.assert_allclose(r, want, atol=ATOL, rtol=0)
    st = cache.stats()
    assert (st["misses"], st["hits"], st["claims"]) == (1, 3, 0)


def test_a_prompt_prefilled_from_cached_kv_generates_the_same_tokens(model):
    """Generation from a cached prefix (inserted by a scoring request) and in chunks equals the reference."""
    prompt = _ids(7, 21)
    cache = PrefixCache(1 << 24)
    label_probs_shared_prefix(model, prompt[:13], [_ids(8, 2)], LABELS, cache=cache)
    found = cache.lookup(prompt, limit=len(prompt) - 1)
    assert found.length == 13
    batch = DecodeBatch(model)
    item = Prefill(Generation(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)), found.kv)
    while item.remaining:
        prefill(model, [item], [min(3, item.remaining)])
    assert kv_len(item.kv) == 21 and item.logits is not None
    batch.join([item])
    while len(batch):
        batch.step()
    assert item.gen.tokens == greedy_reference(model, prompt, 6)

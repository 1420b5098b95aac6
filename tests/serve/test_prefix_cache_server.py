"""The server's prefix cache, chunked prefill and cancellation: scores with the cache equal scores without
(and the runtime's), a tiny budget evicts and stays exact, concurrent requests for one prefix compute it
once, generation reuses cached prompts, /metrics counts it all, and a non-streaming request whose client
disconnects stops generating."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import prometheus

from slimlm.loading import load_model, load_tokenizer
from slimlm.runtime.decoding import SamplingParams, generate_text
from slimlm.runtime.scoring import label_probs_full
from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
from slimlm.testing import save_tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py

LIMITS = dict(max_prompt_tokens=200, max_tokens=300, max_candidates=50, max_batch=4, prefix_cache_min_tokens=4)
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # tiny llama: layers x (K, V) x KV heads x head_dim x fp32


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = save_tiny_model("llama", tmp_path_factory.mktemp("pc") / "tiny", seed=0, initializer_range=0.2)
    return d, load_model(d), load_tokenizer(d)


@pytest.fixture(scope="module")
def servers(ref, _one_thread):
    """Three servers on one model: cache on, cache off, and a cache of ~40 tokens."""
    d, model, tok = ref
    configs = {"on": ServeConfig(**LIMITS, max_prefill_tokens=16), "off": ServeConfig(**LIMITS, prefix_cache_mb=0),
               "tiny": ServeConfig(**LIMITS, prefix_cache_mb=40 * TOKEN_BYTES / 2**20)}
    apps = {k: create_app(d, c, model=model, tokenizer=tok) for k, c in configs.items()}
    with serve_in_thread(apps["on"]) as on, serve_in_thread(apps["off"]) as off, serve_in_thread(apps["tiny"]) as tiny:
        yield {"on": (on, apps["on"]), "off": (off, apps["off"]), "tiny": (tiny, apps["tiny"])}


def user_prefix(u: int) -> str:
    return f"User: {20 + u}-year-old {'male' if u % 2 else 'female'} technician. Recently rated movies:\n"


def candidates(r: int, n: int = 3) -> list[str]:
    return [f"Candidate movie: Film {r * n + c}. Answer:" for c in range(n)]


def reference_scores(ref, prefix: str, cands: list[str]) -> np.ndarray:
    _, model, tok = ref
    labels = [tok(x, add_special_tokens=False).input_ids[0] for x in (" Yes", " No")]
    pre = tok(prefix).input_ids
    return label_probs_full(model, [pre + tok(c, add_special_tokens=False).input_ids for c in cands], labels,
                            batch_size=1)


def score(url, prefix, cands) -> np.ndarray:
    r = httpx.post(url + "/v1/score", json={"prefix": prefix, "candidates": cands}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["scores"])


def test_scores_with_the_cache_equal_scores_without(servers, ref):
    on, off = servers["on"][0], servers["off"][0]
    before = prometheus(on)
    for rnd in range(3):  # each user scored three times, new candidates each time
        for u in range(3):
            cands = candidates(10 * u + rnd)
            got, plain = score(on, user_prefix(u), cands), score(off, user_prefix(u), cands)
            np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)
            np.testing.assert_allclose(got, reference_scores(ref, user_prefix(u), cands), atol=1e-5, rtol=0)
    after = prometheus(on)
    # the first round misses (or reuses the shared "User: ..." start of another user), later rounds hit whole
    assert after["slimlm_prefix_cache_hits_total"] - before["slimlm_prefix_cache_hits_total"] >= 6
    whole = 2 * sum(len(ref[2](user_prefix(u)).input_ids) for u in range(3))
    assert after["slimlm_prefix_cache_reused_tokens_total"] - before["slimlm_prefix_cache_reused_tokens_total"] >= whole
    assert after["slimlm_prefix_cache_bytes"] > 0 and after["slimlm_prefix_cache_capacity_bytes"] == 512 * 2**20
    assert "slimlm_prefix_cache_hits_total" not in prometheus(off)
    text = httpx.get(on + "/metrics").text
    for name in ("hits", "misses", "evictions", "reused_tokens"):
        assert f"# TYPE slimlm_prefix_cache_{name}_total counter" in text
    assert "# TYPE slimlm_prefix_cache_bytes gauge" in text and "# TYPE slimlm_cancelled_requests_total counter" in text


def test_eviction_under_a_tiny_budget_keeps_scores_exact(servers, ref):
    url, app = servers["tiny"]
    for rnd in range(2):
        for u in range(4):
            cands = candidates(7 * u + rnd, 2)
            np.testing.assert_allclose(score(url, user_prefix(u), cands), reference_scores(ref, user_prefix(u), cands),
                                       atol=1e-5, rtol=0)
            cache = app.state.slimlm.prefix_cache
            assert cache.bytes <= cache.max_bytes
    m = prometheus(url)
    assert m["slimlm_prefix_cache_evictions_total"] > 0 and m["slimlm_prefix_cache_bytes"] <= 40 * TOKEN_BYTES


def test_concurrent_requests_for_one_prefix_compute_it_once(servers, ref):
    url, app = servers["on"]
    prefix = user_prefix(77) + "Average rating 3.9 over 120 movies.\n"  # a user no other test sends
    n_prefix = len(ref[2](prefix).input_ids)
    base = app.state.slimlm.model.get_decoder()
    forward, prefix_tokens, lock = base.forward, [], threading.Lock()

    def counting(*a, **k):
        ids = k["input_ids"]
        if ids.shape[0] == 1 and k.get("position_ids") is None:  # prefix chunks; candidates carry their positions
            with lock:
                prefix_tokens.append(ids.shape[1])
        return forward(*a, **k)

    before = prometheus(url)
    base.forward = counting
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: score(url, prefix, candidates(100 + i, 2)), range(6), timeout=120))
    finally:
        base.forward = forward
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, reference_scores(ref, prefix, candidates(100 + i, 2)), atol=1e-5, rtol=0)
    assert sum(prefix_tokens) <= n_prefix  # once in all (in chunks of 16), less if a shared start was cached
    after = prometheus(url)
    assert after["slimlm_prefix_cache_hits_total"] - before["slimlm_prefix_cache_hits_total"] >= 5
    assert after["slimlm_prefix_cache_reused_tokens_total"] - before["slimlm_prefix_cache_reused_tokens_total"] >= 5 * n_prefix


def test_generation_reuses_a_cached_prompt_and_gives_the_same_text(servers, ref):
    url, _ = servers["on"]
    _, model, tok = ref
    system = {"role": "system", "content": "You rank movies for a 31-year-old writer who likes dramas."}
    before = prometheus(url)
    for q in ("Toy Story?", "GoldenEye?", "Toy Story?"):
        msgs = [system, {"role": "user", "content": q}]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 6,
                                                           "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False).input_ids
        want = generate_text(model, tok, [ids], SamplingParams(max_tokens=6, temperature=0))[0]
        assert r.json()["choices"][0]["message"]["content"] == want.text
    after = prometheus(url)
    assert after["slimlm_prefix_cache_hits_total"] - before["slimlm_prefix_cache_hits_total"] >= 2
    n_system = len(tok(tok.apply_chat_template([system], tokenize=False), add_special_tokens=False).input_ids)
    assert after["slimlm_prefix_cache_reused_tokens_total"] - before["slimlm_prefix_cache_reused_tokens_total"] >= 2 * n_system


@pytest.mark.parametrize("pack_max, packed", [(None, True), (0, False), (2, False)])
def test_score_pack_max_picks_the_way_and_keeps_scores(ref, _one_thread, monkeypatch, pack_max, packed):
    """``score_pack_max``: a request of at most that many candidates runs packed (one row, block mask), a larger
    one (or any, at 0) broadcasts the prefix KV to candidate batches; the scores are the same either way."""
    import slimlm.runtime.scoring as scoring

    d, model, tok = ref
    calls = []
    for name in ("_packed_with_prefix_kv", "_packed_after_prefix"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cfg = ServeConfig(**LIMITS, **({} if pack_max is None else {"score_pack_max": pack_max}))
    app = create_app(d, cfg, model=model, tokenizer=tok)
    with serve_in_thread(app) as url:
        for rnd in range(2):  # a miss, then a hit on the cached prefix
            cands = candidates(40 + rnd)
            np.testing.assert_allclose(score(url, user_prefix(5), cands), reference_scores(ref, user_prefix(5), cands),
                                       atol=1e-5, rtol=0)
    assert calls == (["_packed_with_prefix_kv", "_packed_after_prefix"] if packed else [])

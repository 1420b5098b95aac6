"""A failing request fails alone: in the scheduler (preparing, prefilling with others, decoding in a batch,
an unforeseen error in the worker) and over HTTP (the same prefill batch, a keep-alive connection after a
500, an abandoned request that stops consuming decode steps)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest
from conftest import greedy_reference, prometheus, wait_for

from slimlm import SlimlmError
from slimlm.runtime.decoding import SamplingParams
from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
from slimlm.serve.scheduler import Scheduler
from slimlm.testing import save_tiny_model, tiny_model

TIMEOUT = 60
POISON = 2  # a token id the poisoned model refuses (the prompts below use ids >= 3)

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def poisoned(model, calls: list[int]):
    """Make ``model`` raise on any forward whose input holds POISON (a failure only one request causes);
    ``calls`` gets the batch size of every forward."""
    forward = model.forward

    def guarded(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        calls.append(int(ids.shape[0]))
        if (ids == POISON).any():
            raise RuntimeError("poisoned token")
        return forward(*a, **k)

    model.forward = guarded
    return model


@pytest.fixture(scope="module")
def reference(tiny_tok):
    return tiny_model("llama", seed=21, vocab_size=len(tiny_tok), initializer_range=0.2)


GOOD = [[5, 6, 7, 8], [30, 31], [100, 90, 80, 70, 60], [9, 9, 9]]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


# --------------------------------------------------------------------------- the scheduler


def test_a_prompt_failing_in_a_shared_prefill_fails_alone(reference, tiny_tok):
    want = [greedy_reference(reference, p, 6) for p in GOOD]
    assert all(POISON not in w for w in want)  # the good rows never feed the poison to a decode step
    calls: list[int] = []
    model = poisoned(tiny_model("llama", seed=21, vocab_size=len(tiny_tok), initializer_range=0.2), calls)
    sched = Scheduler(model, tiny_tok, max_batch=8, max_prefill_tokens=512)
    # queued before the worker starts: all five are admitted together and prefilled in one forward
    good = [sched.submit(p, greedy(6)) for p in GOOD[:2]]
    bad = sched.submit([40, POISON, 41], greedy(6))
    good += [sched.submit(p, greedy(6)) for p in GOOD[2:]]
    with sched:
        got = [r.wait(TIMEOUT).tokens for r in good]
        with pytest.raises(RuntimeError, match="prefill failed: RuntimeError: poisoned token"):
            bad.wait(TIMEOUT)
    assert calls[0] == 5  # the shared prefill, which failed; then each prompt alone
    assert got == want
    assert bad.gen.finish_reason == "error" and sched.cancelled == 0


def test_a_row_failing_while_decoding_leaves_the_batch(reference, tiny_tok):
    want = [greedy_reference(reference, p, 8) for p in GOOD]
    sched = Scheduler(reference, tiny_tok, max_batch=8)
    reqs = [sched.submit(p, greedy(8)) for p in GOOD]
    broken_text = sched.submit([50, 51, 52], greedy(8))
    append = broken_text.gen._append

    def failing_after_three(token, stop_ids):  # e.g. a detokenizer that breaks on this row's text
        if len(broken_text.gen.tokens) >= 3:
            raise ValueError("detokenizer broke")
        append(token, stop_ids)

    broken_text.gen._append = failing_after_three
    bad_sampler = sched.submit([60, 61], SamplingParams(max_tokens=8, temperature=0.8, seed=1))
    bad_sampler.gen.generator = "not a generator"  # this row's sampling fails at the first step
    with sched:
        assert [r.wait(TIMEOUT).tokens for r in reqs] == want
        with pytest.raises(RuntimeError, match="decoding failed: ValueError: detokenizer broke"):
            broken_text.wait(TIMEOUT)
        with pytest.raises(RuntimeError, match="sampling failed"):
            bad_sampler.wait(TIMEOUT)
    assert len(broken_text.gen.tokens) == 3 and bad_sampler.gen.tokens == []


def test_the_worker_survives_an_unforeseen_error(reference, tiny_tok):
    with Scheduler(reference, tiny_tok, max_batch=4) as sched:
        running = sched.submit([5, 6], greedy(200))
        wait_for(lambda: sched.steps >= 1)
        drop = sched._drop_cancelled

        def bug():  # a bug in the worker's own bookkeeping, once
            sched._drop_cancelled = drop
            raise KeyError("bookkeeping bug")

        sched._drop_cancelled = bug
        with pytest.raises(RuntimeError, match="internal error: KeyError"):
            running.wait(TIMEOUT)
        after = sched.submit([5, 6], greedy(5))  # the worker goes on serving
        assert after.wait(TIMEOUT).tokens == greedy_reference(reference, [5, 6], 5)
        assert sched.stats() == {"waiting": 0, "calls_waiting": 0, "running": 0, "prefilling": 0}


def test_seeds_beyond_64_bits_are_refused_before_the_batch():
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-(2**63))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(SlimlmError, match="seed must be a 64-bit integer"):
            SamplingParams(seed=seed)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("iso") / "tiny", seed=3, initializer_range=0.2)
    # fused_decode off: the tests instrument model.forward, which decode steps then go through too
    app = create_app(path, ServeConfig(max_batch=8, max_tokens=400, prefix_cache_mb=0, fused_decode=False))
    with serve_in_thread(app) as url:
        yield url, app.state.slimlm


def test_a_bad_request_in_the_same_prefill_batch_as_good_ones(server):
    url, state = server
    prompts = [[30 + i, 40 + i, 50 + i] for i in range(4)]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = [httpx.post(url + "/v1/completions", json={**body, "prompt": p}, timeout=30).json()["choices"][0]["text"]
             for p in prompts]
    calls: list[int] = []
    forward = state.model.forward
    poisoned(state.model, calls)
    release = threading.Event()
    hold = state.scheduler.call(lambda: release.wait(TIMEOUT))  # the worker waits while the requests queue up
    results: dict[int, httpx.Response] = {}

    def post(i, prompt):
        results[i] = httpx.post(url + "/v1/completions", json={**body, "prompt": prompt}, timeout=60)

    try:
        wait_for(hold.running)
        threads = [threading.Thread(target=post, args=(i, p)) for i, p in enumerate([*prompts, [33, POISON, 35]])]
        for t in threads:
            t.start()
        wait_for(lambda: state.scheduler.stats()["waiting"] == 5)
        release.set()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        state.model.forward = forward
    assert calls[0] == 5  # they were prefilled together
    assert [results[i].json()["choices"][0]["text"] for i in range(4)] == alone
    assert results[4].status_code == 500 and "poisoned token" in results[4].json()["error"]["message"]


def test_a_500_leaves_the_keep_alive_connection_usable(server):
    url, state = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    check = state.check_model

    def bug(name):  # an exception no handler expects
        raise ZeroDivisionError("handler bug")

    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        state.check_model = bug
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 500 and json.loads(r.read())["error"]["message"] == "internal error: ZeroDivisionError"
        sock = conn.sock
        state.check_model = check
        for _ in range(3):  # the same connection serves the next requests
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["choices"]
            assert conn.sock is sock
    finally:
        state.check_model = check
        conn.close()


def test_an_abandoned_non_streaming_request_stops_decoding(server):
    url, state = server
    forward = state.model.forward

    def slow(*a, **k):  # 400 tokens take > 8 s: the request must leave the batch long before
        time.sleep(0.02)
        return forward(*a, **k)

    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    before = prometheus(url)
    state.model.forward = slow
    try:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: state.scheduler.steps > before["slimlm_decode_steps"] + 5)
        wait_for(lambda: prometheus(url)["slimlm_cancelled_requests_total"] > before["slimlm_cancelled_requests_total"])
        steps = prometheus(url)["slimlm_decode_steps"]
        time.sleep(0.5)  # nothing decodes for nobody
        after = prometheus(url)
    finally:
        state.model.forward = forward
    assert after["slimlm_decode_steps"] == steps
    assert steps - before["slimlm_decode_steps"] < 200  # it left the batch long before its 400 tokens
    assert after["slimlm_cancelled_requests_total"] - before["slimlm_cancelled_requests_total"] == 1
    assert after["slimlm_running_sequences"] == 0
    wait_for(lambda: prometheus(url).get('slimlm_requests_total{endpoint="/v1/completions",status="499"}', 0)
              > before.get('slimlm_requests_total{endpoint="/v1/completions",status="499"}', 0))

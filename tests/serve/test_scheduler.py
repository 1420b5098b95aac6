"""Continuous batching: concurrently submitted requests give what each gives alone; calls, cancellation,
overload and failures leave the worker serving."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from conftest import greedy_reference, wait_for

from slimlm import SlimlmError
from slimlm.runtime.decoding import SamplingParams, generate_text
from slimlm.runtime.scoring import label_probs_shared_prefix
from slimlm.serve.scheduler import QueueFull, Scheduler
from slimlm.testing import tiny_model

TIMEOUT = 60


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py



@pytest.fixture(scope="module")
def model(tiny_tok):
    return tiny_model("llama", seed=11, vocab_size=len(tiny_tok), initializer_range=0.2)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randrange(1, 20))] for _ in range(n)]


def test_concurrent_greedy_requests_equal_each_alone(model, tiny_tok):
    prompts = _prompts(10)
    budgets = [random.Random(i).randrange(2, 9) for i in range(10)]
    budgets[0] = budgets[1] = 300  # long-running rows that the others join; cancelled once the rest are done
    with Scheduler(model, tiny_tok, max_batch=4, max_prefill_tokens=30) as sched:
        reqs = {i: sched.submit(prompts[i], SamplingParams(max_tokens=budgets[i], temperature=0, ignore_eos=True))
                for i in (0, 1)}
        wait_for(lambda: sched.steps >= 2)  # the batch is decoding; the rest must join it

        def client(i):
            time.sleep(random.Random(i).random() * 0.02)
            reqs[i] = sched.submit(prompts[i], SamplingParams(max_tokens=budgets[i], temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2, 10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {i: reqs[i].wait(TIMEOUT) for i in range(2, 10)}
        assert not reqs[0].done and not reqs[1].done
        for i in (0, 1):
            sched.cancel(reqs[i])
            results[i] = reqs[i].wait(TIMEOUT)
        assert sched.admissions >= 3 and sched.peak_batch == 4  # rows joined a running batch
    for i, g in results.items():
        assert g.finish_reason == ("cancelled" if i < 2 else "length")
        assert g.tokens == greedy_reference(model, prompts[i], len(g.tokens)), i
        assert len(g.tokens) == budgets[i] or i < 2


def test_streamed_pieces_and_seeded_samples_match_a_request_alone(model, tiny_tok):
    texts = ["Hello world", "The quick brown fox", "Candidate movie:", "Yes No Yes"]
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
    alone = [generate_text(model, tiny_tok, [t], params)[0] for t in texts]
    pieces: dict[int, list[str]] = {i: [] for i in range(len(texts))}
    with Scheduler(model, tiny_tok, max_batch=3) as sched:
        reqs = [sched.submit(tiny_tok(t).input_ids, params, on_delta=lambda g, s, i=i: pieces[i].append(s))
                for i, t in enumerate(texts)]
        got = [r.wait(TIMEOUT) for r in reqs]
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        assert g.tokens == a.tokens
        assert "".join(pieces[i]) == g.text == a.text


def test_calls_run_between_steps_and_their_failures_stay_theirs(model, tiny_tok):
    prefix, suffixes = _prompts(1, 1)[0], _prompts(5, 2)
    want = label_probs_shared_prefix(model, prefix, suffixes, (10, 20))
    with Scheduler(model, tiny_tok, max_batch=2) as sched:
        long = sched.submit([5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        wait_for(lambda: sched.steps >= 1)
        fut = sched.call(lambda: label_probs_shared_prefix(model, prefix, suffixes, (10, 20)))
        bad = sched.call(lambda: 1 / 0)
        np.testing.assert_allclose(fut.result(TIMEOUT), want, atol=1e-6)
        with pytest.raises(ZeroDivisionError):
            bad.result(TIMEOUT)
        assert not long.done  # the score ran while the generation was still decoding
        assert long.wait(TIMEOUT).tokens == greedy_reference(model, [5, 6, 7], 40)


def test_cancel_and_failing_callbacks_do_not_disturb_others(model, tiny_tok):
    def boom(g, s):
        raise RuntimeError("client callback bug")

    with Scheduler(model, tiny_tok, max_batch=4) as sched:
        victim = sched.submit([9, 8, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        noisy = sched.submit([4, 4], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), on_delta=boom,
                             on_finish=lambda g: 1 / 0)
        other = sched.submit([3, 1, 4, 1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        wait_for(lambda: len(victim.gen.tokens) >= 2)
        sched.cancel(victim)
        assert victim.wait(TIMEOUT).finish_reason == "cancelled" and len(victim.gen.tokens) < 200
        assert noisy.wait(TIMEOUT).tokens == greedy_reference(model, [4, 4], 6)
        assert other.wait(TIMEOUT).tokens == greedy_reference(model, [3, 1, 4, 1], 6)
        queued = sched.submit([1], SamplingParams(max_tokens=3, temperature=0))
        assert len(queued.wait(TIMEOUT).tokens) >= 1


def test_prefill_failure_fails_only_that_admission(tiny_tok):
    model = tiny_model("llama", seed=12, vocab_size=len(tiny_tok), max_position_embeddings=16)
    with Scheduler(model, tiny_tok, max_batch=1) as sched:
        too_long = sched.submit(list(range(3, 40)), SamplingParams(max_tokens=2, temperature=0))
        ok = sched.submit([5, 6], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        with pytest.raises(RuntimeError, match="context"):
            too_long.wait(TIMEOUT)
        g = ok.wait(TIMEOUT)
        assert g.finish_reason == "length" and len(g.prompt) + len(g.tokens) == 16


def test_queue_limit_and_close(model, tiny_tok):
    sched = Scheduler(model, tiny_tok, max_batch=1, max_waiting=2)  # not started: nothing is taken
    reqs = [sched.submit([1, 2], SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(QueueFull):
        sched.submit([1, 2], SamplingParams(max_tokens=2))
    sched.close()
    for r in reqs:
        with pytest.raises(RuntimeError, match="shutting down"):
            r.wait(1)
    with pytest.raises(SlimlmError, match="shutting down"):
        sched.submit([1], SamplingParams())
    with pytest.raises(SlimlmError):
        Scheduler(model, tiny_tok, max_batch=0)


def test_a_stepwise_call_interleaves_with_decode_steps(model, tiny_tok):
    """A generator call advances one step per loop: decode steps run between its steps."""
    with Scheduler(model, tiny_tok, max_batch=2) as sched:
        long = sched.submit([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        wait_for(lambda: sched.steps >= 1)
        seen = []

        def stepwise():
            for _ in range(5):
                seen.append(sched.steps)
                yield
            return "done"

        assert sched.call(stepwise).result(TIMEOUT) == "done"
        assert all(b > a for a, b in zip(seen, seen[1:], strict=False)), seen
        def fails_later():
            yield
            yield
            raise ZeroDivisionError("third step")

        bad = sched.call(fails_later)
        with pytest.raises(ZeroDivisionError):
            bad.result(TIMEOUT)
        sched.cancel(long)
        long.wait(TIMEOUT)
        assert sched.call(lambda: 7).result(TIMEOUT) == 7


# --------------------------------------------------------------------------- chunked prefill, prefix cache


def _logged_forwards(model):
    """Replace ``model.forward`` with one that logs each call's input shape [B, T]; returns (log, undo)."""
    shapes, forward = [], model.forward

    def logged(*a, **k):
        shapes.append(tuple((k.get("input_ids") if "input_ids" in k else a[0]).shape))
        return forward(*a, **k)

    model.forward = logged
    return shapes, lambda: setattr(model, "forward", forward)


def test_chunked_prefill_gives_the_same_greedy_tokens(model, tiny_tok):
    prompts = _prompts(6, seed=3) + _prompts(1, seed=9)
    prompts[-1] = (prompts[-1] * 45)[:45]
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    outputs = {}
    for chunk in (4, 7, 512):
        with Scheduler(model, tiny_tok, max_batch=3, max_prefill_tokens=chunk) as sched:
            reqs = [sched.submit(p, params) for p in prompts]
            outputs[chunk] = [r.wait(TIMEOUT).tokens for r in reqs]
            if chunk == 4:
                assert sched.prefill_forwards >= 45 // 4
    want = [greedy_reference(model, p, 7) for p in prompts]
    assert outputs[4] == outputs[7] == outputs[512] == want


def test_a_long_prompt_is_prefilled_between_decode_steps(model, tiny_tok):
    long_prompt = [t for p in _prompts(30, seed=4) for t in p][:60]
    assert len(long_prompt) == 60
    shapes, undo = _logged_forwards(model)
    try:
        # fused=False: every forward, decode steps included, goes through the logged model.forward
        with Scheduler(model, tiny_tok, max_batch=2, max_prefill_tokens=8, fused=False) as sched:
            running = sched.submit([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            wait_for(lambda: sched.steps >= 2)
            start = len(shapes)
            late = sched.submit(long_prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            got = late.wait(TIMEOUT).tokens
            sched.cancel(running)
            running.wait(TIMEOUT)
    finally:
        undo()
    assert got == greedy_reference(model, long_prompt, 3)
    log = shapes[start:]
    chunks = [i for i, (b, t) in enumerate(log) if t > 1]
    assert len(chunks) == 60 // 8 + 1 and all(log[i][1] <= 8 for i in chunks)
    # a decode step of the running request between every two chunks of the long prompt
    assert all(any(log[j] == (1, 1) for j in range(a + 1, b)) for a, b in zip(chunks, chunks[1:], strict=False))


def test_generation_reuses_cached_prompt_prefixes_and_computes_them_once(model, tiny_tok):
    from slimlm.runtime.prefix_cache import PrefixCache

    system = [t for p in _prompts(20, seed=5) for t in p][:30]
    prompts = [system + [7, 8, 9], system + [7, 8, 9], system + [11], system + [12, 13]]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    cache = PrefixCache(1 << 24, min_tokens=4)
    shapes, undo = _logged_forwards(model)
    try:
        with Scheduler(model, tiny_tok, max_batch=4, prefix_cache=cache) as sched:
            first = sched.submit(system, params)  # the "system prompt" request goes first
            reqs = [sched.submit(p, params) for p in prompts]  # queued behind it: they wait for its KV
            got = [first.wait(TIMEOUT).tokens] + [r.wait(TIMEOUT).tokens for r in reqs]
    finally:
        undo()
    assert got == [greedy_reference(model, p, 5) for p in [system, *prompts]]
    # the system prompt ran once, not five times: every later prompt ran only its own last tokens
    assert shapes.count((1, 30)) == 1 and max(t for b, t in shapes if (b, t) != (1, 30)) <= 3
    st = cache.stats()
    assert (st["hits"], st["misses"], st["claims"]) == (4, 1, 0)
    assert st["reused_tokens"] == 30 + 32 + 30 + 30  # the repeated prompt reused all but its last token

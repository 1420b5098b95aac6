"""The HTTP server against the official ``openai`` client (the oracle for the API shapes) and the runtime
(the oracle for the numbers): completions, chat, streaming, /v1/score, errors, metrics, a bounded load test."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from slimlm.loading import load_model, load_tokenizer
from slimlm.runtime.decoding import SamplingParams, generate_text
from slimlm.runtime.scoring import label_probs_full, score_full
from slimlm.serve.app import ServeConfig, create_app, is_loopback, serve_in_thread
from slimlm.testing import save_tiny_model

KEY = "sk-test-key"
LIMITS = dict(max_prompt_tokens=64, max_tokens=32, max_candidates=50, max_body_bytes=16 * 1024, max_choices=6,
              max_batch=4)


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a wider init than the default so scores spread away from 0.5 and generations are not all one token
    return save_tiny_model("llama", tmp_path_factory.mktemp("srv") / "tiny-llama", seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def ref(model_dir):
    return load_model(model_dir), load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, _one_thread):
    app = create_app(model_dir, ServeConfig(api_key=KEY, **LIMITS))
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def greedy_text(ref, ids, n, stop=()):
    model, tok = ref
    return generate_text(model, tok, [ids], SamplingParams(max_tokens=n, temperature=0, stop=tuple(stop)))[0]


def chat_ids(tok, messages):
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids


def assert_serving(client):
    """The server still answers a normal request."""
    out = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------- OpenAI-compatible API


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert http.get("/health").json()["status"] == "ok"


def test_completion_equals_engine_greedy(client, ref):
    tok = ref[1]
    out = client.completions.create(model="tiny-llama", prompt="User: 24-year-old", max_tokens=8, temperature=0)
    want = greedy_text(ref, tok("User: 24-year-old").input_ids, 8)
    assert out.object == "text_completion" and out.choices[0].text == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(tok("User: 24-year-old").input_ids)
    assert out.usage.completion_tokens == len(want.tokens)


def test_completion_batch_of_prompts_token_ids_and_n(client, ref):
    tok = ref[1]
    out = client.completions.create(model="tiny-llama", prompt=["Yes", "The quick"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c, p in zip(out.choices, ["Yes", "Yes", "The quick", "The quick"], strict=True):
        assert c.text == greedy_text(ref, tok(p).input_ids, 4).text
    ids = tok("Candidate movie").input_ids
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == greedy_text(ref, ids, 4).text


def test_chat_completion_uses_the_chat_template(client, ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Will the user like it?"}]
    out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=6, temperature=0)
    want = greedy_text(ref, chat_ids(ref[1], msgs), 6)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(chat_ids(ref[1], msgs))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Will the user "}, {"type": "text", "text": "like it?"}]}]
    same = client.chat.completions.create(model="tiny-llama", messages=parts, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == greedy_text(ref, chat_ids(ref[1], [
        {"role": "user", "content": "Will the user like it?"}]), 6).text


def test_streaming_completion_and_chat(client, ref):
    tok = ref[1]
    want = greedy_text(ref, tok("The quick brown").input_ids, 10)
    chunks = list(client.completions.create(model="tiny-llama", prompt="The quick brown", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    msgs = [{"role": "user", "content": "Hello world"}]
    want = greedy_text(ref, chat_ids(tok, msgs), 10)
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)


def test_raw_sse_ends_with_done(http):
    body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_strings_and_seeds(client, ref):
    tok = ref[1]
    free = greedy_text(ref, tok("Hello world").input_ids, 16)
    assert len(free.text) > 6, free.text
    stop = free.text[4:6]
    out = client.completions.create(model="tiny-llama", prompt="Hello world", max_tokens=16, temperature=0, stop=stop)
    assert out.choices[0].text == free.text[:free.text.find(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-llama", prompt="Hello world", max_tokens=16, temperature=0,
                                         stop=[stop, "zzz"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    a, b = (client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=8, temperature=1.0, seed=3)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


# --------------------------------------------------------------------------- /v1/score


def test_score_equals_full_prompt_scores(http, ref):
    model, tok = ref
    prefix = "User: 24-year-old male technician. Recently rated movies:\n"
    cands = ["Candidate movie: Toy Story. Answer:", "Candidate movie: GoldenEye (1995). Answer:", "Four Rooms?",
             "Yes No Yes"]
    r = http.post("/v1/score", json={"model": "tiny-llama", "prefix": prefix, "candidates": cands})
    assert r.status_code == 200, r.text
    body = r.json()
    yes, no = tok(" Yes", add_special_tokens=False).input_ids[0], tok(" No", add_special_tokens=False).input_ids[0]
    assert body["labels"] == [" Yes", " No"] and body["label_token_ids"] == [yes, no]
    pre = tok(prefix).input_ids
    prompts = [pre + tok(c, add_special_tokens=False).input_ids for c in cands]
    want = score_full(model, prompts, (yes, no), batch_size=1)
    got = np.array(body["scores"])
    assert got.shape == (4, 2) and np.ptp(want) > 0.01
    np.testing.assert_allclose(got[:, 0], want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-9)
    assert body["usage"]["prefix_tokens"] == len(pre)

    labels = [5, 17, 300]
    r = http.post("/v1/score", json={"prefix": pre, "candidates": [p[len(pre):] for p in prompts],
                                     "label_token_ids": labels})
    np.testing.assert_allclose(r.json()["scores"], label_probs_full(model, prompts, labels, batch_size=1), atol=1e-4)
    r = http.post("/v1/score", json={"prefix": "", "candidates": cands})  # no prefix: whole prompts
    want = score_full(model, [tok(c, add_special_tokens=False).input_ids for c in cands], (yes, no))
    np.testing.assert_allclose(np.array(r.json()["scores"])[:, 0], want, atol=1e-4)


# --------------------------------------------------------------------------- errors


def test_auth_errors(server, client):
    url = server[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-llama", prompt="x", max_tokens=1)
    r = httpx.post(url + "/v1/score", content=b"{not json")  # no key: 401 before the body is looked at
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key
    assert httpx.get(url + "/metrics").status_code == 200
    assert_serving(client)


@pytest.mark.parametrize("case", [
    ("malformed JSON", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400),
    ("not an object", "/v1/score", b"[1, 2]", 422),
    ("missing field", "/v1/completions", {"model": "tiny-llama"}, 422),
    ("unknown field", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "bogus": 1}, 422),
    ("wrong type", "/v1/chat/completions", {"model": "tiny-llama", "messages": "hi"}, 422),
    ("bad role", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "x", "content": "y"}]}, 422),
    ("temperature range", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "temperature": 5}, 422),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("unknown model, score", "/v1/score", {"model": "gpt-4", "prefix": "a", "candidates": ["b"]}, 404),
    ("max_tokens over limit", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 33}, 400),
    ("too many choices", "/v1/completions", {"model": "tiny-llama", "prompt": ["a", "b"], "n": 4}, 400),
    ("prompt too long", "/v1/completions", {"model": "tiny-llama", "prompt": "Yes No " * 40}, 413),
    ("prompt ids too long", "/v1/completions", {"model": "tiny-llama", "prompt": [5] * 65}, 413),
    ("id outside vocab", "/v1/completions", {"model": "tiny-llama", "prompt": [5, 100000]}, 400),
    ("empty prompt", "/v1/completions", {"model": "tiny-llama", "prompt": ""}, 400),
    ("too many candidates", "/v1/score", {"prefix": "a", "candidates": ["b"] * 51}, 413),
    ("empty candidates", "/v1/score", {"prefix": "a", "candidates": []}, 422),
    ("empty candidate", "/v1/score", {"prefix": "a", "candidates": ["b", ""]}, 400),
    ("multi-token label", "/v1/score", {"prefix": "a", "candidates": ["b"], "labels": [" Yes", " Nonsense"]}, 400),
    ("one label", "/v1/score", {"prefix": "a", "candidates": ["b"], "label_token_ids": [5]}, 400),
    ("unsupported penalty", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "presence_penalty": 1}, 400),
    ("non-text part", "/v1/chat/completions", {"model": "tiny-llama", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("body too large", "/v1/score", {"prefix": "a" * 20000, "candidates": ["b"]}, 413),
], ids=lambda c: c[0])
def test_bad_requests_get_json_4xx_and_the_server_keeps_serving(http, client, case):
    _, path, body, status = case
    r = http.post(path, content=body, headers={"Content-Type": "application/json"}) if isinstance(body, bytes) \
        else http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    assert_serving(client)


def test_method_route_and_chunked_body_errors(http, client):
    assert http.get("/v1/completions").status_code == 405
    r = http.post("/v1/nothing", json={})
    assert r.status_code == 404 and "error" in r.json()

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        for _ in range(40):
            yield b" " * 1024

    r = http.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body over")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert_serving(client)


def test_a_failing_model_gives_500_and_the_server_recovers(server, client):
    state = server[1].state.slimlm
    forward = state.model.forward

    def broken(*a, **k):
        raise RuntimeError("simulated device failure")

    state.model.forward = broken
    try:
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=3)
        chunks = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=3, stream=True)
        with pytest.raises(openai.APIError, match="generation failed"):
            list(chunks)
    finally:
        state.model.forward = forward
    assert_serving(client)


def test_client_disconnect_mid_stream_frees_the_slot(server, http, client):
    state = server[1].state.slimlm
    body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 32, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while state.scheduler.stats()["running"] or state.scheduler.stats()["waiting"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_serving(client)


# --------------------------------------------------------------------------- load, metrics


def test_bounded_concurrent_load_has_zero_errors(server, ref):
    """40 mixed requests from 8 threads: all succeed, and greedy results equal each request run alone."""
    url = server[0]
    tok = ref[1]
    prompts = [f"User {i}: Hello world" for i in range(5)]
    want = {p: greedy_text(ref, tok(p).input_ids, 6).text for p in prompts}
    clients = [openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60) for _ in range(8)]
    errors: list[str] = []
    lock = threading.Lock()

    def one(i):
        c = clients[i % 8]
        p = prompts[i % 5]
        try:
            kind = i % 4
            if kind == 0:
                text = c.completions.create(model="tiny-llama", prompt=p, max_tokens=6, temperature=0).choices[0].text
                assert text == want[p], (text, want[p])
            elif kind == 1:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="tiny-llama", prompt=p, max_tokens=6, temperature=0, stream=True))
                assert text == want[p]
            elif kind == 2:
                c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": p}],
                                          max_tokens=5, temperature=0.7, seed=i)
            else:
                r = httpx.post(url + "/v1/score", json={"prefix": p + "\n", "candidates": ["Yes", "No", "Maybe"]},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                assert r.status_code == 200 and len(r.json()["scores"]) == 3
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(f"{i}: {e!r}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40), timeout=120))
    assert errors == []
    state = server[1].state.slimlm
    assert state.scheduler.peak_batch > 1  # concurrent requests were decoded together


def test_metrics_in_prometheus_text_format(server, http, client):
    client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
    http.post("/v1/score", json={"prefix": "a\n", "candidates": ["b", "c"]})
    text = http.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert int(lines['slimlm_requests_total{endpoint="/v1/completions",status="200"}']) >= 1
    assert float(lines["slimlm_generation_tokens_total"]) >= 2
    assert float(lines["slimlm_scored_candidates_total"]) >= 2
    assert float(lines["slimlm_queue_depth"]) == 0 and "slimlm_running_sequences" in lines
    assert int(lines['slimlm_request_duration_seconds_count{endpoint="/v1/score"}']) >= 1
    assert "# TYPE slimlm_request_duration_seconds histogram" in text
    buckets = [int(v) for k, v in lines.items() if k.startswith('slimlm_request_duration_seconds_bucket{endpoint="/v1/score"')]
    assert buckets == sorted(buckets)


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


@pytest.mark.slow  # compiling takes seconds to tens of seconds on a 2-core CPU
def test_compiled_decode_serves_the_engines_greedy_text(model_dir, ref):
    """``--compile-decode``: the server's decode batch runs the step through torch.compile; the text is the
    engine's greedy text (or, where compiling cannot run here, the eager step's after one warning)."""
    app = create_app(model_dir, ServeConfig(compile_decode=True, **LIMITS))
    assert app.state.slimlm.scheduler.batch._compiled is not None
    tok = ref[1]
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        out = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "User: 24-year-old",
                                              "max_tokens": 8, "temperature": 0}).json()
    assert out["choices"][0]["text"] == greedy_text(ref, tok("User: 24-year-old").input_ids, 8).text

"""Bad input never reaches the model: a table of values the engine cannot take (each a 4xx JSON error naming
the field), then a bounded fuzz run — a few hundred generated bad requests against a tiny model on loopback
while good requests run beside them: every answer is a 4xx JSON error or a correct result, good requests
get exactly what they get alone, and the server ends healthy and idle."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
from slimlm.testing import save_tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py

LIMITS = dict(max_prompt_tokens=64, max_tokens=8, max_candidates=20, max_choices=4, max_batch=4,
              max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("fuzz") / "tiny", seed=5, initializer_range=0.2)
    app = create_app(path, ServeConfig(**LIMITS))
    with serve_in_thread(app) as url:
        yield url, app.state.slimlm


COMPLETION = {"model": "tiny", "prompt": "Hello there", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
SCORE = {"prefix": "User likes", "candidates": ["Toy Story", "Heat"]}
BODIES = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/v1/score": SCORE}


def raw(body) -> bytes:
    return json.dumps(body).encode()


# (endpoint, body or raw bytes, status, the field the error names)
REFUSED = [
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, 422, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}, 422, "seed"),
    ("/v1/completions", {**COMPLETION, "temperature": float("nan")}, 422, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": float("inf")}, 422, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, 422, "n"),
    ("/v1/completions", {**COMPLETION, "n": 2**70}, 400, "n"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2**70}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [2**70]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "hi \ud800 there"}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", "\udfff"]}, 400, "prompt[1]"),
    ("/v1/completions", {**COMPLETION, "stop": ["\ud800"]}, 400, "stop[0]"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, 400, "model"),
    ("/v1/completions", {**COMPLETION, "user": "\udc00"}, 400, "user"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
     400, "messages[0].content[0].text"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**63}, 422, "seed"),
    ("/v1/score", {**SCORE, "prefix": "a\ud800"}, 400, "prefix"),
    ("/v1/score", {**SCORE, "candidates": ["ok", "\ud800"]}, 400, "candidates[1]"),
    ("/v1/score", {**SCORE, "candidates": ["ok", ""]}, 400, "candidates"),
    ("/v1/score", {**SCORE, "labels": [" Yes", ""]}, 400, "labels"),
    ("/v1/score", {**SCORE, "labels": [" Yes", "\ud800"]}, 400, "labels[1]"),
    ("/v1/score", {**SCORE, "label_token_ids": [1, 2**70]}, 400, "label_token_ids"),
    ("/v1/score", {**SCORE, "label_token_ids": [5, 5]}, 400, "labels"),
    ("/v1/score", {**SCORE, "candidates": [[1, 2], [-3]]}, 400, "candidates[1]"),
]


@pytest.mark.parametrize("endpoint,body,status,param", REFUSED, ids=[f"{e}:{p}:{i}" for i, (e, _, _, p) in enumerate(REFUSED)])
def test_values_the_engine_cannot_take_are_refused_naming_the_field(server, endpoint, body, status, param):
    r = httpx.post(server[0] + endpoint, content=raw(body), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"], error


# --------------------------------------------------------------------------- the fuzz run

WEIRD = [None, True, -1, 0, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 0.5, float("nan"), float("inf"),
         "", "\ud800", "x" * 300, "\x00", "NaN", [], {}, [[]], [None], [2**70], [-1], [1] * 200, ["a", 1],
         {"type": "text"}, [{"type": "image_url"}], [{"role": "wizard", "content": "x"}]]
FIELDS = {"/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                              "echo", "logprobs", "best_of", "logit_bias", "stream_options", "presence_penalty"],
          "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "n",
                                   "seed", "stop", "tools", "response_format", "logprobs", "top_logprobs"],
          "/v1/score": ["model", "prefix", "candidates", "labels", "label_token_ids"]}


def mutate(rng: random.Random, endpoint: str) -> tuple[bytes, str]:
    """A request body that is broken in one to three ways (and occasionally, by chance, still valid)."""
    body = json.loads(json.dumps(BODIES[endpoint]))
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.6:
            body[rng.choice(FIELDS[endpoint])] = rng.choice(WEIRD)
        elif kind < 0.7:
            body.pop(rng.choice(list(body)), None)
        elif kind < 0.75:
            body[f"unknown_{rng.randint(0, 9)}"] = 1
        elif kind < 0.85 and endpoint == "/v1/chat/completions":
            body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "tool", "x"]),
                                 "content": rng.choice(["hi", "", None, "\ud800", [], [{"type": "text", "text": 5}]])}]
        elif kind < 0.9 and endpoint == "/v1/score":
            body["candidates"] = [rng.choice(["", "ok", "\udfff", "y" * 100]) for _ in range(rng.randint(0, 30))]
    text = json.dumps(body)
    kind = rng.random()
    if kind < 0.05:
        return text[: rng.randint(0, len(text) - 1)].encode(), "application/json"  # cut off
    if kind < 0.08:
        return rng.choice([b"\xff\xfe{", b"[]", b"3", b'"x"', b"", b"null", b"{" * 500]), "application/json"
    if kind < 0.1:
        return text.encode(), rng.choice(["text/plain", "application/x-www-form-urlencoded"])
    return text.encode(), "application/json"


def check_answer(endpoint: str, body: bytes, r: httpx.Response) -> None:
    """A 4xx JSON error with a message, or (the body was valid after all) a correct result."""
    assert r.status_code in (200, 400, 404, 413, 422), (endpoint, body[:200], r.status_code, r.text[:300])
    out = r.json()
    if r.status_code != 200:
        assert isinstance(out["error"]["message"], str) and out["error"]["message"], out
        return
    sent = json.loads(body)
    if endpoint == "/v1/score":
        assert len(out["scores"]) == len(sent["candidates"])
        assert all(abs(sum(row) - 1) < 1e-4 for row in out["scores"])
    else:
        assert out["choices"] and all(c["finish_reason"] in ("stop", "length") for c in out["choices"])


def test_fuzzed_bad_requests_get_4xx_and_good_ones_are_unaffected(server):
    url, state = server
    good = [("/v1/completions", {**COMPLETION, "prompt": f"User {i} says", "max_tokens": 4}) for i in range(3)]
    good.append(("/v1/score", {**SCORE, "prefix": "User 9 likes"}))
    with httpx.Client(base_url=url, timeout=30) as c:
        alone = [c.post(e, json=b).json() for e, b in good]
    stop, seen, errors = threading.Event(), [0], []

    def good_traffic():  # alongside the fuzz: the same requests, the same answers
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                for (e, b), want in zip(good, alone, strict=True):
                    out = c.post(e, json=b).json()
                    key = "scores" if e == "/v1/score" else "choices"
                    if e == "/v1/score":
                        ok = all(abs(x - y) < 1e-5 for r1, r2 in zip(out[key], want[key], strict=True)
                                 for x, y in zip(r1, r2, strict=True))
                    else:
                        ok = [ch["text"] for ch in out[key]] == [ch["text"] for ch in want[key]]
                    if not ok:
                        errors.append((e, out))
                    seen[0] += 1

    threads = [threading.Thread(target=good_traffic) for _ in range(2)]
    for t in threads:
        t.start()
    rng, deadline, sent = random.Random(0), time.monotonic() + 240, 0
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(300):
                assert time.monotonic() < deadline, f"the fuzz run is over its time limit after {i} requests"
                endpoint = rng.choice(list(BODIES))
                body, ctype = mutate(rng, endpoint)
                check_answer(endpoint, body, c.post(endpoint, content=body, headers={"Content-Type": ctype}))
                sent += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert sent == 300 and seen[0] >= 4 and not errors, errors[:2]
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    end = time.monotonic() + 30
    while any(state.scheduler.stats().values()):
        assert time.monotonic() < end, state.scheduler.stats()
        time.sleep(0.01)

"""A bounded load generator for a slimlm (or any OpenAI-compatible) server on this machine.

``concurrency`` workers send requests back to back until ``requests`` have been sent or ``duration``
seconds have passed, whichever comes first; each request has a timeout. Only loopback URLs are accepted:
this is a tool for measuring one's own server, not for loading someone else's. Reports throughput
(requests/s, generated tokens/s, scored candidates/s) and latency percentiles (and time to first token
when streaming).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from slimlm import SlimlmError

KINDS = ("completions", "chat", "score")
MAX_REQUESTS, MAX_CONCURRENCY, MAX_DURATION = 100_000, 256, 3600.0

_PROMPTS = (
    "User: 24-year-old male technician. Recently rated movies: Toy Story (1995): 4, GoldenEye (1995): 3.",
    "Write one sentence about the weather in spring.",
    "The quick brown fox jumps over the lazy dog. Continue the story:",
    "List three movies a 30-year-old writer who likes dramas might enjoy:",
    "Explain in one line why the sky is blue.",
    "Candidate movie: Four Rooms (1995; Thriller). Will the user rate it 4 or higher?",
)


def synthetic_score_payload(candidates: int, i: int = 0) -> dict:
    """A MovieLens-style ranking request: one user prefix, ``candidates`` movie suffixes."""
    genres = ("Comedy", "Drama", "Thriller", "Action, Adventure", "Animation, Children's", "Romance", "Sci-Fi")
    recent = "".join(f"- Movie {i * 7 + k} ({1980 + k}; {genres[k % 7]}): {1 + (i + k) % 5}\n" for k in range(8))
    prefix = (f"User: {20 + i % 40}-year-old {'male' if i % 2 else 'female'} engineer. Average rating 3.6 over "
              f"{50 + i} movies. Recently rated movies:\n{recent}")
    cands = [f"Candidate movie: Film {c} ({1970 + c % 40}; {genres[c % 7]}), rated 3.{c % 10} by {c + 10} users. "
             "Will the user rate it 4 or higher? Answer:" for c in range(candidates)]
    return {"prefix": prefix, "candidates": cands}


def check_loopback(url: str) -> None:
    from slimlm.serve.app import is_loopback

    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise SlimlmError(f"bench-serve only targets this machine (loopback), not {host or url!r}")


@dataclass
class _Result:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    candidates: int = 0
    errors: list[str] = field(default_factory=list)
    sent: int = 0


def _percentiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


async def _load(url: str, kind: str, requests: int, concurrency: int, duration: float, timeout: float,
                headers: dict, model: str | None, max_tokens: int, candidates: int, stream: bool,
                payloads: list[dict] | None) -> tuple[_Result, float, str | None]:
    import httpx

    res = _Result()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        if model is None and kind != "score":
            try:
                r = await client.get("/v1/models")
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            except httpx.HTTPStatusError as e:
                raise SlimlmError(f"{url}/v1/models: HTTP {e.response.status_code} (wrong --api-key?)") from None
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                raise SlimlmError(f"{url}: no slimlm server answering /v1/models ({type(e).__name__}); start "
                                  "`slimlm serve`, or pass --model") from None
        start = time.perf_counter()
        deadline = start + duration
        counter = iter(range(requests))

        def body(i: int) -> tuple[str, dict]:
            if payloads is not None:
                return {"completions": "/v1/completions", "chat": "/v1/chat/completions",
                        "score": "/v1/score"}[kind], dict(payloads[i % len(payloads)])
            p = _PROMPTS[i % len(_PROMPTS)]
            common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                      "ignore_eos": True}
            if kind == "completions":
                return "/v1/completions", {**common, "prompt": p}
            if kind == "chat":
                return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": p}]}
            return "/v1/score", synthetic_score_payload(candidates, i)

        async def one(i: int) -> None:
            path, payload = body(i)
            if kind != "score" and stream:
                payload["stream_options"] = {"include_usage": True}
            t0 = time.perf_counter()
            try:
                if payload.get("stream"):
                    first, usage = None, None
                    async with client.stream("POST", path, json=payload) as r:
                        if r.status_code != 200:
                            await r.aread()
                            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise RuntimeError(str(event["error"])[:200])
                            usage = event.get("usage") or usage
                            choice = (event.get("choices") or [{}])[0]
                            got = choice.get("text") or (choice.get("delta") or {}).get("content")
                            if first is None and (got or choice.get("finish_reason")):
                                first = time.perf_counter() - t0  # first generated text (not the role chunk)
                    res.ttft.append(first if first is not None else time.perf_counter() - t0)
                    res.tokens += (usage or {}).get("completion_tokens", 0)
                else:
                    r = await client.post(path, json=payload)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    out = r.json()
                    if kind == "score":
                        res.candidates += len(out["scores"])
                    else:
                        res.tokens += out["usage"]["completion_tokens"]
                res.latency.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                res.errors.append(f"{type(e).__name__}: {e}"[:300])

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                res.sent += 1
                await one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return res, wall, model


def run_load(url: str, *, kind: str = "completions", requests: int = 100, concurrency: int = 8,
             duration: float = 60.0, timeout: float = 120.0, api_key: str | None = None, model: str | None = None,
             max_tokens: int = 32, candidates: int = 100, stream: bool = False,
             payloads: list[dict] | None = None) -> dict:
    """Send up to ``requests`` requests from ``concurrency`` workers for at most ``duration`` seconds.

    ``payloads`` replaces the built-in request bodies (cycled). Returns counts, throughput and latency
    percentiles (seconds)."""
    check_loopback(url)
    if kind not in KINDS:
        raise SlimlmError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise SlimlmError(f"requests must be in 1..{MAX_REQUESTS}, got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise SlimlmError(f"concurrency must be in 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 0 < duration <= MAX_DURATION:
        raise SlimlmError(f"duration must be in (0, {MAX_DURATION:.0f}] seconds, got {duration}")
    if max_tokens < 1 or candidates < 1:
        raise SlimlmError("max_tokens and candidates must be >= 1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res, wall, model = asyncio.run(_load(url.rstrip("/"), kind, requests, concurrency, duration, timeout, headers,
                                         model, max_tokens, candidates, stream, payloads))
    ok = len(res.latency)
    out = {"url": url, "kind": kind, "model": model, "stream": stream, "concurrency": concurrency,
           "requests_sent": res.sent, "ok": ok, "errors": len(res.errors), "error_examples": res.errors[:5],
           "wall_s": round(wall, 3), "requests_per_s": ok / wall if wall > 0 else 0.0,
           "latency_s": _percentiles(res.latency)}
    if kind == "score":
        out["candidates"] = res.candidates
        out["candidates_per_s"] = res.candidates / wall if wall > 0 else 0.0
    else:
        out["completion_tokens"] = res.tokens
        out["tokens_per_s"] = res.tokens / wall if wall > 0 else 0.0
        if stream:
            out["ttft_s"] = _percentiles(res.ttft)
    return out

"""HTTP server: ranking scores, OpenAI-compatible completions and chat completions, metrics.

Endpoints (all JSON; errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/score``: ``prefix`` + ``candidates`` (text or token ids) + label strings or ids ->
  ``scores[i][j]`` = P(label j | prefix + candidate i), normalised over the label set. The prefix runs once: up
  to ``score_pack_max`` candidates in one packed row with it, more on its KV (``runtime/scoring.py``).
- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's request/response shapes, ``stream``
  as server-sent events ending with ``data: [DONE]``; generation runs in the continuous-batching
  :class:`~slimlm.serve.scheduler.Scheduler` (one worker thread owns the model; scoring runs there too,
  between decode steps).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Prefix cache (``prefix_cache_mb`` > 0): one :class:`~slimlm.runtime.prefix_cache.PrefixCache` of prompt KV shared by
all requests. A score request starts from the longest cached part of its prefix and stores the whole prefix's KV; a
generation request starts from the longest cached prefix of its prompt and stores the prompt's KV once prefilled. So a
user scored again (new candidates) skips the prefix, and a chat whose system prompt or earlier turns were seen skips
those. Reuse changes no result beyond float rounding. Prompts are prefilled in chunks of ``max_prefill_tokens``
between decode steps; a client that goes away (a closed stream, or a non-streaming request whose connection closes)
has its request cancelled.

Guards: an optional API key (``Authorization: Bearer KEY``) on every ``/v1/`` route, checked before the body is read;
a body-size limit (413); limits on prompt tokens (413), candidates per request (413), ``max_tokens`` and choices per
request (400); a bounded queue (503 when full); a bounded number of open connections (uvicorn answers 503 beyond it).
Status codes: 400 malformed JSON or an invalid value (out of the engine's range, text that is not valid Unicode, a
candidate or label that tokenises to nothing), 401 wrong or missing key, 404 unknown model or route, 405 wrong method,
413 too large, 422 wrong types, out-of-range numbers or unknown fields, 499 the client went away, 503 overloaded, 500
a failure inside the model. A 500 is that request's alone: the scheduler isolates failures (see
``serve/scheduler.py``), every error is a complete JSON response, and the keep-alive connection stays usable.

Request models and error bodies are in ``serve/schemas.py``; metrics and the guarding middleware in
``serve/metrics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from slimlm import SlimlmError
from slimlm.runtime.decoding import Generation, SamplingParams
from slimlm.runtime.prefix_cache import PrefixCache
from slimlm.runtime.scoring import PACK_MAX_CANDIDATES, iter_label_probs_full, iter_label_probs_shared_prefix
from slimlm.serve.metrics import Guard, Metrics
from slimlm.serve.scheduler import QueueFull, Scheduler
from slimlm.serve.schemas import (
    INVALID_UNICODE,
    STATUS_TYPES,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
    ScoreRequest,
    TextPart,
    error_body,
    json_response,
)

LOOPBACK = "127.0.0.1"


class ServeConfig(BaseModel):
    """Server settings and limits (the CLI's ``slimlm serve`` options)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = None  # the id clients send as "model" (default: the directory's name)
    api_key: str | None = None  # if set, /v1/ routes need "Authorization: Bearer <api_key>"
    max_batch: int = Field(8, ge=1)  # sequences decoded together
    max_waiting: int = Field(256, ge=1)  # queued requests before 503
    max_prefill_tokens: int = Field(512, ge=1)  # new prompt tokens per prefill forward (chunked prefill)
    max_prompt_tokens: int = Field(4096, ge=1)  # per prompt (prefix + longest candidate for scoring)
    max_tokens: int = Field(512, ge=1)  # largest max_tokens a request may ask for
    max_choices: int = Field(16, ge=1)  # prompts x n per completion request
    max_candidates: int = Field(1024, ge=1)  # candidates per score request
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_connections: int = Field(256, ge=1)  # open connections before uvicorn answers 503
    score_batch_size: int = Field(16, ge=1)  # candidates per forward when scoring
    score_pack_max: int = Field(PACK_MAX_CANDIDATES, ge=0)  # <= N candidates: one packed row (0: never)
    # Prompt KV kept across requests (0 = off). 512 MiB holds ~11k tokens of SmolLM2-135M KV in fp32
    # (46 KiB/token: ~45 MovieLens user prefixes) or 4k of an 8B Llama-3 in bf16 (128 KiB/token): a
    # window of recently active users, small next to the decode batch's own KV and the weights.
    prefix_cache_mb: float = Field(512, ge=0)
    # matches shorter than this are misses: a BOS token or a chat template's header is not worth a hit
    prefix_cache_min_tokens: int = Field(16, ge=1)
    # decode steps by runtime/fused_step.py where it applies (CPU: float32, INT8 W8A8 without fast _int_mm; a
    # copy of the linear weights)
    fused_decode: bool = True
    compile_decode: bool = False  # torch.compile the decode step (DecodeBatch(compile=True))


# --------------------------------------------------------------------------- the app


class ServerState:
    """What the route handlers share: model, tokenizer, scheduler, limits, metrics."""

    def __init__(self, model, tokenizer, detok_tokenizer, config: ServeConfig, model_name: str, root: str):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_name, self.root = model_name, root
        self.created = int(time.time())
        self.vocab = model.get_output_embeddings().weight.shape[0]
        ctx = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.context = ctx
        self.max_prompt = min(config.max_prompt_tokens, ctx - 1)
        self.metrics = Metrics()
        self.prefix_cache = (PrefixCache(int(config.prefix_cache_mb * 2**20), min_tokens=config.prefix_cache_min_tokens)
                             if config.prefix_cache_mb > 0 else None)
        self.scheduler = Scheduler(model, detok_tokenizer, max_batch=config.max_batch,
                                   max_waiting=config.max_waiting, max_prefill_tokens=config.max_prefill_tokens,
                                   max_positions=ctx, prefix_cache=self.prefix_cache, fused=config.fused_decode,
                                   compile=config.compile_decode)

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "not_found_error", "model_not_found", "model")

    def check_ids(self, ids: list[int], what: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise APIError(400, f"{what}: token id {bad[0]} is outside the vocabulary (size {self.vocab})",
                           param=what)
        return ids

    def check_prompt(self, n_tokens: int, what: str = "prompt", param: str = "prompt") -> None:
        if n_tokens == 0:
            raise APIError(400, f"{what} is empty", param=param)
        if n_tokens > self.max_prompt:
            raise APIError(413, f"{what} has {n_tokens} tokens; the limit is {self.max_prompt}",
                           "request_too_large", "prompt_too_long", param)

    def sampling(self, req: SamplingRequest, max_tokens: int, prompt_len: int, choice: int) -> SamplingParams:
        if max_tokens > self.config.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {self.config.max_tokens}",
                           param="max_tokens")
        if prompt_len + max_tokens > self.context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.context} tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p,
                                  seed=None if req.seed is None else req.seed + choice, stop=tuple(stop),
                                  ignore_eos=req.ignore_eos)
        except SlimlmError as e:  # InvalidValue names the field
            raise APIError(400, str(e), param=getattr(e, "field", None)) from None

    def unsupported(self, req: SamplingRequest, **neutral: Any) -> None:
        fields = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
                  **neutral}
        for name, ok in fields.items():
            if getattr(req, name) not in ok:
                raise APIError(400, f"'{name}' is not supported by this server", param=name)

    def gauges(self) -> dict[str, tuple[str, float]]:
        s = self.scheduler.stats()
        out = {"slimlm_queue_depth": ("Requests and score calls waiting for the model.", s["waiting"] + s["calls_waiting"]),
               "slimlm_running_sequences": ("Sequences in the running decode batch.", s["running"]),
               "slimlm_prefilling_sequences": ("Admitted prompts whose prefill is not complete.", s["prefilling"]),
               "slimlm_decode_steps": ("Decode steps run since start.", self.scheduler.steps)}
        if self.prefix_cache is not None:
            c = self.prefix_cache.stats()
            out["slimlm_prefix_cache_bytes"] = ("Bytes of prompt KV held by the prefix cache.", c["bytes"])
            out["slimlm_prefix_cache_capacity_bytes"] = ("The prefix cache's byte budget.", c["max_bytes"])
            out["slimlm_prefix_cache_tokens"] = ("Tokens whose KV the prefix cache holds.", c["stored_tokens"])
        return out

    def live_counters(self) -> dict[str, tuple[str, float]]:
        """Counters kept by the scheduler and the prefix cache (rendered as Prometheus counters)."""
        out = {"slimlm_cancelled_requests_total": ("Generation requests cancelled because their client went away.",
                                                   self.scheduler.cancelled),
               "slimlm_prefill_forwards_total": ("Prefill forwards (chunks of at most max_prefill_tokens) run.",
                                                 self.scheduler.prefill_forwards)}
        if self.prefix_cache is not None:
            c = self.prefix_cache.stats()
            out |= {"slimlm_prefix_cache_hits_total": ("Lookups that reused a cached prefix (score prefixes and "
                                                       "generation prompts).", c["hits"]),
                    "slimlm_prefix_cache_misses_total": ("Lookups that found no cached prefix.", c["misses"]),
                    "slimlm_prefix_cache_evictions_total": ("Cache nodes evicted to stay within the budget.",
                                                            c["evictions"]),
                    "slimlm_prefix_cache_reused_tokens_total": ("Prompt tokens whose KV came from the cache.",
                                                                c["reused_tokens"])}
        return out


def create_app(model_dir: str | Path, config: ServeConfig | None = None, *, device: str = "cpu", dtype=None,
               model=None, tokenizer=None):
    """The FastAPI app serving ``model_dir`` (loaded now, so a bad directory fails before binding a port).

    ``model`` / ``tokenizer`` may be passed already loaded (tests, benchmarks); ``model_dir`` then only
    names the model."""
    from slimlm.loading import load_model, load_tokenizer, resolve_model

    config = config or ServeConfig()
    path = resolve_model(model_dir)
    if model is None:
        model = load_model(path, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    # The worker decodes with its own tokenizer object, so the event loop (encoding) and the worker
    # (decoding) never share one Rust tokenizer across threads.
    detok = copy.deepcopy(tokenizer)
    name = config.model_name or (path.name if str(model_dir) != "teacher" else "teacher")
    state = ServerState(model, tokenizer, detok, config, name, str(path))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.close()

    app = FastAPI(title="slimlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slimlm = state

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return json_response(e.status, error_body(e.message, e.type, e.code, e.param))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            msg = errors[0].get("ctx", {}).get("error") or errors[0].get("msg")
            return json_response(400, error_body(f"malformed JSON body: {msg}", code="invalid_json"))
        bad_text = [err for err in errors if err.get("type") == INVALID_UNICODE]
        if bad_text:  # a value, not a type: 400, naming the field
            return json_response(400, error_body(bad_text[0]["msg"], code=INVALID_UNICODE,
                                                 param=bad_text[0]["ctx"]["param"]))
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body')}: {err.get('msg')}" for err in errors[:5]]
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return json_response(422, error_body("invalid request: " + "; ".join(parts), param=param or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code)
        return json_response(e.status_code, error_body(str(e.detail), STATUS_TYPES.get(e.status_code, "error"), code),
                              getattr(e, "headers", None))

    # ------------------------------------------------------------------ plain routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.gauges(), state.live_counters()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "slimlm", "root": state.root,
                                            "max_model_len": state.context}]}

    # ------------------------------------------------------------------ scoring

    @app.post("/v1/score")
    async def score(req: ScoreRequest):
        state.check_model(req.model)
        cfg = state.config
        if len(req.candidates) > cfg.max_candidates:
            raise APIError(413, f"{len(req.candidates)} candidates; the limit is {cfg.max_candidates} per request",
                           "request_too_large", "too_many_candidates", "candidates")
        labels, label_ids = _label_ids(state, req)
        if isinstance(req.prefix, str):
            prefix = state.tokenizer(req.prefix).input_ids if req.prefix else []
        else:
            prefix = state.check_ids(list(req.prefix), "prefix")
        if isinstance(req.candidates[0], str):
            suffixes = state.tokenizer(list(req.candidates), add_special_tokens=False).input_ids
        else:
            suffixes = [state.check_ids(list(c), f"candidates[{i}]") for i, c in enumerate(req.candidates)]
        for i, s in enumerate(suffixes):
            if not s:
                raise APIError(400, f"candidates[{i}] is empty", param="candidates")
        state.check_prompt(len(prefix) + max(len(s) for s in suffixes), "prefix + longest candidate", "candidates")
        bs, pad = cfg.score_batch_size, state.tokenizer.pad_token_id or 0
        if prefix:  # stepwise: the worker interleaves prefix chunks and candidate batches with decode steps
            def fn():
                return iter_label_probs_shared_prefix(state.model, prefix, suffixes, label_ids, batch_size=bs,
                                                      pad_id=pad, cache=state.prefix_cache,
                                                      prefill_chunk=cfg.max_prefill_tokens, pack_max=cfg.score_pack_max)
        else:
            def fn():
                return iter_label_probs_full(state.model, suffixes, label_ids, batch_size=bs, pad_id=pad)
        try:
            probs = await asyncio.wrap_future(state.scheduler.call(fn))
        except QueueFull as e:
            raise APIError(503, str(e), "server_overloaded") from None
        n_tokens = len(prefix) + sum(len(s) for s in suffixes)
        state.metrics.add("prompt_tokens", n_tokens)
        state.metrics.add("scored_candidates", len(suffixes))
        return {"object": "scoring", "model": state.model_name, "labels": labels, "label_token_ids": label_ids,
                "scores": probs.tolist(),
                "usage": {"prompt_tokens": n_tokens, "prefix_tokens": len(prefix),
                          "total_tokens": n_tokens}}

    # ------------------------------------------------------------------ generation

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        state.check_model(req.model)
        state.unsupported(req, echo=(False,), logprobs=(None,), suffix=(None,), best_of=(None, req.n))
        p = req.prompt
        if isinstance(p, str):
            prompts = [state.tokenizer(p).input_ids]
        elif not p:
            raise APIError(400, "prompt is empty", param="prompt")
        elif isinstance(p[0], str):
            prompts = state.tokenizer(list(p)).input_ids
        elif isinstance(p[0], int):
            prompts = [state.check_ids(list(p), "prompt")]
        else:
            prompts = [state.check_ids(list(x), f"prompt[{i}]") for i, x in enumerate(p)]
        jobs = _jobs(state, req, prompts, lambda n: req.max_tokens if req.max_tokens is not None else 16)
        return await _respond(state, request, req, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        state.check_model(req.model)
        state.unsupported(req, logprobs=(None, False), top_logprobs=(None,), tools=(None, []),
                          tool_choice=(None, "none"), response_format=(None, {"type": "text"}))
        prompt = _render_chat(state.tokenizer, req.messages)
        limit = req.max_completion_tokens or req.max_tokens

        def max_tokens(n_prompt: int) -> int:  # unset: as much as the server limit and the context allow
            return limit if limit is not None else max(1, min(state.config.max_tokens, state.context - n_prompt))

        jobs = _jobs(state, req, [prompt], max_tokens)
        return await _respond(state, request, req, jobs, chat=True)

    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=state.metrics,
                       routes={"/v1/score", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                               "/metrics"})
    return app


def _label_ids(state: ServerState, req: ScoreRequest) -> tuple[list[str], list[int]]:
    if req.labels is not None and req.label_token_ids is not None:
        raise APIError(400, "give either labels or label_token_ids, not both", param="labels")
    if req.label_token_ids is not None:
        ids = state.check_ids(list(req.label_token_ids), "label_token_ids")
        labels = [state.tokenizer.decode([i]) for i in ids]
    else:
        labels = list(req.labels) if req.labels is not None else [" Yes", " No"]
        ids = []
        for text in labels:
            enc = state.tokenizer(text, add_special_tokens=False).input_ids
            if len(enc) != 1:
                raise APIError(400, f"label {text!r} is {len(enc)} tokens for this tokenizer; labels must be single "
                                    "tokens (or send label_token_ids)", param="labels")
            ids.append(enc[0])
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise APIError(400, f"need two or more distinct label tokens, got ids {ids}", param="labels")
    return labels, ids


def _render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    msgs = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                else:
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(texts)
        else:
            content = m.content or ""
        msgs.append({"role": m.role, "content": content})
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template rejecting the conversation (e.g. role order) is the caller's
        raise APIError(400, f"chat template rejected the messages: {e}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _jobs(state: ServerState, req: SamplingRequest, prompts: list[list[int]], max_tokens) -> list[tuple[int, list[int], SamplingParams]]:
    """(prompt index, prompt ids, params) per choice, in OpenAI's order (prompt-major, then n)."""
    if len(prompts) * req.n > state.config.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} choices; the limit is {state.config.max_choices}",
                       param="n")
    jobs = []
    for i, ids in enumerate(prompts):
        state.check_prompt(len(ids), "prompt" if len(prompts) == 1 else f"prompt[{i}]",
                           "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        for j in range(req.n):
            jobs.append((i, ids, state.sampling(req, max_tokens(len(ids)), len(ids), j)))
    return jobs


def _submit(state: ServerState, jobs, stream: bool):
    """Submit every choice; events (choice, kind, payload) arrive on an asyncio queue from the worker."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def post(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    reqs = []
    try:
        for k, (_, ids, params) in enumerate(jobs):
            on_delta = (lambda g, s, k=k: post((k, "delta", s))) if stream else None
            reqs.append(state.scheduler.submit(ids, params, on_delta=on_delta,
                                               on_finish=lambda g, k=k: post((k, "done", g))))
    except (QueueFull, SlimlmError) as e:
        for r in reqs:
            state.scheduler.cancel(r)
        raise APIError(503, str(e), "server_overloaded") from None
    state.metrics.add("prompt_tokens", _usage(jobs, [])["prompt_tokens"])
    return reqs, queue


def _usage(jobs, gens: list[Generation]) -> dict[str, int]:
    prompt = sum(len(ids) for i, (p, ids, _) in enumerate(jobs) if i == 0 or jobs[i - 1][0] != p)
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(state: ServerState, request, req: SamplingRequest, jobs, *, chat: bool):
    reqs, queue = _submit(state, jobs, req.stream)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if req.stream:
        gen = _stream(state, reqs, queue, jobs, rid, created, chat, req)
        return StreamingResponse(gen, media_type="text/event-stream",
                                                    headers={"Cache-Control": "no-cache"})
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        pending = len(reqs)
        while pending:
            item = asyncio.ensure_future(queue.get())
            await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():  # the client closed the connection: stop generating for nobody
                item.cancel()
                for r in reqs:
                    state.scheduler.cancel(r)
                raise APIError(499, "client closed the request", "client_closed_request")
            pending -= item.result()[1] == "done"
    except asyncio.CancelledError:  # the handler itself was cancelled: free the batch slots
        for r in reqs:
            state.scheduler.cancel(r)
        raise
    finally:
        gone.cancel()
    failed = [r.error for r in reqs if r.error is not None]
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}", "server_error")
    gens = [r.gen for r in reqs]
    state.metrics.add("generation_tokens", sum(len(g.tokens) for g in gens))
    if chat:
        choices = [{"index": k, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                    "finish_reason": g.finish_reason} for k, g in enumerate(gens)]
    else:
        choices = [{"index": k, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                   for k, g in enumerate(gens)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.model_name, "choices": choices, "usage": _usage(jobs, gens)}


async def _client_gone(request: Request) -> None:
    """Return when the client has closed the connection.

    The body has been read by now, so the next ASGI message is ``http.disconnect``: the server sends it
    when the connection drops (Starlette's ``is_disconnected`` polls for the same message)."""
    with contextlib.suppress(Exception):  # a broken receive channel means the client is gone too
        while (await request.receive())["type"] != "http.disconnect":
            pass


async def _stream(state: ServerState, reqs, queue: asyncio.Queue, jobs, rid: str, created: int, chat: bool,
                  req: SamplingRequest) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices, usage=None):
        body = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(k, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return {"index": k, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish}

    pending = len(reqs)
    try:
        if chat:
            yield chunk([choice(k, role=True) for k in range(len(reqs))])
        while pending:
            k, kind, payload = await queue.get()
            if kind == "delta":
                yield chunk([choice(k, text=payload)])
                continue
            pending -= 1
            if reqs[k].error is not None:
                err = error_body(f"generation failed: {reqs[k].error}", "server_error")
                yield f"data: {json.dumps(err)}\n\n"
                for r in reqs:
                    state.scheduler.cancel(r)
                break
            state.metrics.add("generation_tokens", len(payload.tokens))
            yield chunk([choice(k, finish=payload.finish_reason)])
        else:
            if include_usage:
                yield chunk([], _usage(jobs, [r.gen for r in reqs]))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away mid-stream (the generator is closed)
        for r in reqs:
            if not r.done:
                state.scheduler.cancel(r)


# --------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serve_in_thread(app, host: str = LOOPBACK, port: int = 0, *, log_level: str = "warning",
                    max_connections: int = 256) -> Iterator[str]:
    """Run ``app`` under uvicorn on a background thread; yield its base URL; stop it on exit.

    The socket is bound here (``port=0`` picks a free port), so the URL is known before the server starts."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                           limit_concurrency=max_connections, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="slimlm-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise SlimlmError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def run_server(model_dir: str | Path, config: ServeConfig, *, host: str = LOOPBACK, port: int = 8000,
               device: str = "cpu", dtype=None, log_level: str = "info") -> None:
    """Serve ``model_dir`` in the foreground until interrupted (the ``slimlm serve`` command)."""
    import uvicorn

    app = create_app(model_dir, config, device=device, dtype=dtype)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=config.max_connections,
                timeout_graceful_shutdown=5)

"""Continuous batching: one worker thread owns the model and interleaves all work on it.

Between two decode steps of the running :class:`~slimlm.runtime.decoding.DecodeBatch` the worker

1. runs one step of the current call (e.g. a scoring request) — so scoring and decoding share the
   model without two threads ever running it at once. A call that returns a generator is advanced one
   ``next()`` per loop (a scoring request: a chunk of the prefix, then one candidate batch at a time), so
   a large scoring request delays running generations by one forward at a time, not by its whole duration;
2. drops cancelled requests (a client that went away), running or still prefilling;
3. admits waiting requests into free slots (running + prefilling <= ``max_batch``), starting each from
   the longest prefix of its prompt in the ``prefix_cache`` (if one is given);
4. runs one prefill forward of at most ``max_prefill_tokens`` new tokens (chunked prefill): the oldest
   prefilling prompt's next chunk, together with later prompts at the same point whose whole rest fits
   (B x C <= max_prefill_tokens for B rows of C tokens). Prompts that are complete join the running batch,
   and their KV goes into the prefix cache. A long prompt therefore costs the running rows one chunk's
   forward per step, not its whole prefill;
5. runs one decode step; finished rows leave the batch and their requests complete.

Compute once: a request whose prompt extends (or is a prefix of) one being computed right now for the
cache — another request's prompt, a score request's prefix — waits in the queue until that is cached.

Callers on other threads (the HTTP server's event loop) submit work and receive text pieces and the
finish through callbacks, which the worker calls on its own thread: they must be quick and thread-safe
(the server hands them to its event loop with ``call_soon_threadsafe``).

Failures stay with the request that caused them. Preparing a request (its seed, its length) fails it
alone; a prefill forward that fails for a group of prompts is re-run prompt by prompt, so only the prompt
that fails on its own fails and the others go on with the results they would have had alone; a row whose
own decode work fails (sampling, detokenising, stop strings) leaves the batch alone. Only a failure of the
shared decode forward itself, which no single row can be blamed for (e.g. the device running out of
memory), fails the rows of that batch. The worker never dies of a request: anything unforeseen fails the
requests it was handling and the loop goes on.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from slimlm import SlimlmError
from slimlm.runtime.decoding import (
    DecodeBatch,
    Generation,
    OnDelta,
    Prefill,
    SamplingParams,
    eos_token_ids,
    prefill,
    tokenizer_pad_id,
)
from slimlm.runtime.prefix_cache import Claim, PrefixCache

log = logging.getLogger("slimlm.serve")

OnFinish = Callable[[Generation], None]


class QueueFull(SlimlmError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


@dataclass(eq=False)
class Request:
    """A submitted generation: its :class:`Generation`, completion signal, and timings."""

    gen: Generation
    on_finish: OnFinish | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    error: str | None = None
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> Generation:
        """Block until the request has finished; return its generation (raise if it failed)."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.gen

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass(eq=False)
class _Prefilling:
    req: Request
    item: Prefill
    claim: Claim | None = None  # the prefix cache's claim on the prompt, resolved when it is inserted


class Scheduler:
    """Owns ``model`` on a worker thread; see the module docstring for the loop.

    ``max_prefill_tokens``: new prompt tokens per prefill forward (the chunk size of chunked prefill).
    ``prefix_cache``: prompt KV shared across requests (the server shares it with its score requests).
    ``fused``: decode steps by :mod:`slimlm.runtime.fused_step` where it applies; ``compile``: the step
    through ``torch.compile`` (both: see :class:`DecodeBatch`).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_waiting: int = 256,
                 max_prefill_tokens: int = 512, max_positions: int | None = None,
                 prefix_cache: PrefixCache | None = None, fused: bool = True, compile: bool = False):
        if max_batch < 1 or max_waiting < 1 or max_prefill_tokens < 1:
            raise SlimlmError("max_batch, max_waiting and max_prefill_tokens must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.batch = DecodeBatch(model, pad_id=tokenizer_pad_id(tokenizer), eos_ids=eos_token_ids(model, tokenizer),
                                 max_positions=max_positions, fused=fused, compile=compile)
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._current: tuple[Generator, Future] | None = None  # a stepwise call in progress
        self._running: dict[int, Request] = {}  # id(gen) -> request, for rows in the batch
        self._prefilling: list[_Prefilling] = []  # admitted, prompt not yet complete, oldest first
        self.prefix_cache = prefix_cache
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)
        self.admissions = 0  # groups of prompts that joined the running batch
        self.prefill_forwards = 0  # prefill forwards (chunks) run
        self.peak_batch = 0  # most rows decoded together
        self.cancelled = 0  # requests that finished cancelled (their client went away)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="slimlm-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; unfinished requests fail with 'server shutting down'."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for p in self._prefilling:
            self._release(p)
        for req in list(self._waiting) + [p.req for p in self._prefilling] + list(self._running.values()):
            self._fail(req, "server shutting down")
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        for _, fut in self._calls:
            fut.cancel()
        self._calls.clear()
        if self._current is not None:
            self._current[1].set_exception(SlimlmError("server shutting down"))
            self._current = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ submitting work

    def submit(self, prompt: Sequence[int], params: SamplingParams, *, on_delta: OnDelta | None = None,
               on_finish: OnFinish | None = None) -> Request:
        """Queue a generation; text pieces go to ``on_delta``, the end to ``on_finish`` (worker thread)."""
        gen = Generation(list(prompt), params, tokenizer=self.tokenizer, on_delta=_guarded(on_delta))
        req = Request(gen, on_finish)
        with self._cv:
            if self._stop:
                raise SlimlmError("server shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already waiting; retry later")
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the worker thread between decode steps; its result (or exception) in a Future.

        If ``fn()`` returns a generator, the worker advances it one step per loop, between decode steps,
        and the Future gets the generator's return value."""
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise SlimlmError("server shutting down")
            if len(self._calls) >= self.max_waiting:
                raise QueueFull(f"{len(self._calls)} calls already waiting; retry later")
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def cancel(self, req: Request) -> None:
        """Ask the worker to drop ``req`` (it finishes with reason ``cancelled`` before the next step)."""
        with self._cv:
            req.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._waiting), "calls_waiting": len(self._calls), "running": len(self.batch),
                    "prefilling": len(self._prefilling)}

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            with self._cv:
                while (not self._stop and not self._waiting and not self._calls and not len(self.batch)
                       and self._current is None and not self._prefilling):
                    self._cv.wait()
                if self._stop:
                    return
                call = self._calls.popleft() if self._calls and self._current is None else None
                admit = self._take_admissions()
            try:
                if call is not None:
                    self._run_call(*call)
                elif self._current is not None:
                    self._advance()
                self._drop_cancelled()
                if admit:
                    self._admit(admit)
                    admit = []
                if self._prefilling:
                    self._prefill_step()
                if len(self.batch):
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the worker: fail what it was handling
                log.exception("scheduler step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}", admit)

    def _fail_all(self, message: str, admitting: list[Request]) -> None:
        """Fail every request the worker holds (the state they were in can no longer be trusted)."""
        for p in self._prefilling:
            self._release(p)
        for req in admitting + [p.req for p in self._prefilling] + list(self._running.values()):
            if not req.done:
                self._fail(req, message)
        self._prefilling.clear()
        self._running.clear()
        self.batch.drop([])

    def _take_admissions(self) -> list[Request]:
        """Pop waiting requests for the free slots (caller holds the lock). Cancelled ones finish here."""
        out = []
        while self._waiting and len(self.batch) + len(self._prefilling) + len(out) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancelled:
                req.gen.finish("cancelled")
                self._complete(req)
                continue
            out.append(req)
        return out

    def _run_call(self, fn, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as e:  # the caller gets the exception; the worker carries on
            fut.set_exception(e)
            return
        if inspect.isgenerator(result):
            self._current = (result, fut)
            self._advance()
        else:
            fut.set_result(result)

    def _advance(self) -> None:
        steps, fut = self._current
        try:
            next(steps)
        except StopIteration as done:
            self._current = None
            fut.set_result(done.value)
        except BaseException as e:  # noqa: BLE001
            self._current = None
            fut.set_exception(e)

    def _drop_cancelled(self) -> None:
        for g in [g for g in self.batch.rows if self._running[id(g)].cancelled]:
            self.batch.cancel(g)
            self._complete(self._running.pop(id(g)))
        for p in [p for p in self._prefilling if p.req.cancelled]:
            self._prefilling.remove(p)
            self._release(p)
            p.req.gen.finish("cancelled")
            self._complete(p.req)

    def _admit(self, reqs: list[Request]) -> None:
        """Start each request's prefill from the longest cached prefix of its prompt. One whose prompt is
        being computed for the cache right now goes back to the head of the queue, to reuse that."""
        later = []
        for r in reqs:
            try:
                self.batch.prepare(r.gen)
                kv, claim = None, None
                if self.prefix_cache is not None:
                    # at most all but the last token: its forward gives the logits of the first new token
                    found = self.prefix_cache.lookup(r.gen.prompt, limit=len(r.gen.prompt) - 1, claim=True)
                    if found.pending is not None:
                        later.append((r, found.pending))
                        continue
                    kv, claim = found.kv, found.claim
            except Exception as e:  # noqa: BLE001 - this request's settings: it fails, the others go on
                self._fail(r, f"prefill failed: {_describe(e)}")
                continue
            self._prefilling.append(_Prefilling(r, Prefill(r.gen, kv), claim))
        if later:
            if not self._prefilling and not len(self.batch) and self._current is None:
                later[0][1].wait(0.05)  # the work we wait for runs on another thread: don't spin
            with self._cv:
                self._waiting.extendleft(r for r, _ in reversed(later))

    def _prefill_step(self) -> None:
        """One prefill forward: the oldest prompt's next chunk plus the later prompts at the same point
        whose whole rest fits the budget (padded size B x C <= max_prefill_tokens)."""
        head = self._prefilling[0]
        group, counts = [head], [min(head.item.remaining, self.max_prefill_tokens)]
        width = counts[0]
        for p in self._prefilling[1:]:
            rest = p.item.remaining
            if p.item.done == head.item.done and (len(group) + 1) * max(width, rest) <= self.max_prefill_tokens:
                group.append(p)
                counts.append(rest)
                width = max(width, rest)
        try:
            prefill(self.model, [p.item for p in group], counts, pad_id=self.batch.pad_id)
            self.prefill_forwards += 1
        except Exception:  # noqa: BLE001 - find the prompt to blame: each alone (a failed forward changed nothing)
            log.exception("prefill failed; running its %d prompt(s) one by one", len(group))
            for p, c in zip(list(group), counts, strict=True):
                try:
                    prefill(self.model, [p.item], [c], pad_id=self.batch.pad_id)
                    self.prefill_forwards += 1
                except Exception as e:  # noqa: BLE001
                    group.remove(p)
                    self._prefilling.remove(p)
                    self._release(p)
                    self._fail(p.req, f"prefill failed: {_describe(e)}")
        done = [p for p in group if p.item.remaining == 0]
        if not done:
            return
        for p in done:
            self._prefilling.remove(p)
            if self.prefix_cache is not None:
                try:
                    self.prefix_cache.insert(p.req.gen.prompt, p.item.kv, claim=p.claim)
                except Exception:  # noqa: BLE001 - a cache that cannot store serves the request all the same
                    log.exception("prefix cache insert failed")
                p.claim = None
        try:
            self.batch.join([p.item for p in done])
            joined = done
        except Exception:  # noqa: BLE001 - a failed join changed nothing: join them one by one
            log.exception("joining the batch failed; joining %d prompt(s) one by one", len(done))
            joined = []
            for p in done:
                try:
                    self.batch.join([p.item])
                    joined.append(p)
                except Exception as e:  # noqa: BLE001
                    self._fail(p.req, f"prefill failed: {_describe(e)}")
        if not joined:
            return
        self.admissions += 1
        self.peak_batch = max(self.peak_batch, len(self.batch))
        for p in joined:
            self._running[id(p.req.gen)] = p.req

    def _release(self, p: _Prefilling) -> None:
        if p.claim is not None:
            self.prefix_cache.release(p.claim)
            p.claim = None

    def _step(self) -> None:
        try:
            finished = self.batch.step()
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
            log.exception("decode step failed")
            for r in list(self._running.values()):
                self._fail(r, f"decode failed: {e}")
            self._running.clear()
            self.batch.drop([])
            return
        self.steps += 1
        now = time.perf_counter()
        for g in self.batch.rows:
            r = self._running[id(g)]
            if r.first_token is None:
                r.first_token = now
        for g in finished:
            r = self._running.pop(id(g))
            if r.first_token is None:
                r.first_token = now
            if g.error is not None:  # this row's own failure; the rest of the batch went on
                self._fail(r, g.error)
            else:
                self._complete(r)

    def _complete(self, req: Request) -> None:
        req.finished = time.perf_counter()
        if req.gen.finish_reason == "cancelled":
            self.cancelled += 1
        req._done.set()
        if req.on_finish is not None:
            try:
                req.on_finish(req.gen)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the worker
                log.exception("on_finish callback failed")

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        if not req.gen.done:
            req.gen.finish_reason = "error"
        self._complete(req)


def _describe(e: Exception) -> str:
    """An exception for a client: the message of slimlm's own errors, the type and message of others."""
    return str(e) if isinstance(e, SlimlmError) else f"{type(e).__name__}: {e}"


def _guarded(on_delta: OnDelta | None) -> OnDelta | None:
    """``on_delta`` with its exceptions logged, not raised into the decode step (which would fail the batch)."""
    if on_delta is None:
        return None

    def call(gen: Generation, piece: str) -> None:
        try:
            on_delta(gen, piece)
        except Exception:  # noqa: BLE001
            log.exception("on_delta callback failed")

    return call

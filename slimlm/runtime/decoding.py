"""Generation: sampling, the KV-cached decode batch, and the loops that drive it.

:class:`DecodeBatch` holds the running sequences of a batch and their KV cache, a preallocated
:class:`~slimlm.runtime.kv_cache.SlotCache` that each decode step writes in place (one row per slot, cache
column = position id, buffers grown geometrically between steps). Sequences join it (a prompt's KV copied
into a free slot) and leave it (the last rows move into the holes) between decode steps; every row
carries explicit position ids and a mask that follows from its own position, so a row's tokens, positions
and attention are the same whatever else shares the batch. The LM head runs only at each row's last
position, and the per-token step can run through ``torch.compile`` (with an eager fallback).

:func:`prefill` is the one prompt forward: it runs the next tokens of several :class:`Prefill` items
(from the start, from a cached prefix's KV, or a chunk of a long prompt continuing the last one), so a
scheduler can split a long prompt into chunks between decode steps and start a prompt from the KV of a
prefix it has seen before; whole prompts then :meth:`DecodeBatch.join` the batch.

:func:`generate` (one batch of token prompts), :func:`generate_text` (text, stop strings, continuous
batching in one thread) and :func:`stream` (text deltas as they are decoded) drive it; so do on-policy
sampling in distillation, evaluation, the benchmarks, and the server's continuous-batching scheduler
(``serve/scheduler.py``, from a worker thread) — one decode loop for all of them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from slimlm import InvalidValue, SlimlmError
from slimlm.models import attention_layout, cache_kwargs
from slimlm.runtime.fused_step import FusedStep, fused_step_for
from slimlm.runtime.kv_cache import SlotCache
from slimlm.runtime.prefix_cache import KV, kv_len
from slimlm.runtime.text import Detokenizer, StopText


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V]: greedy when ``temperature == 0``, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    ``temperature == 0`` is greedy. ``seed`` makes a sampled request reproducible whatever else shares
    its batch (each request draws from its own generator). ``stop`` strings end the text before the
    first occurrence (not included); ``stop_token_ids`` end it after that token (not included in the text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise InvalidValue("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise InvalidValue("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise InvalidValue("seed", f"seed must be a 64-bit integer, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidValue("stop", "stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


OnDelta = Callable[["Generation", str], None]  # called with the row and its newly released text


@dataclass(eq=False)
class Generation:
    """One sequence being generated: its prompt, settings and output so far.

    Sampled rows draw from ``generator``; if None, the batch gives the row its own, seeded with
    ``params.seed`` (or a random seed).

    ``tokens`` are the new token ids (ending with the stop token if one ended it); ``text`` (with a
    tokenizer) is their decoded text cut at a stop string. ``finish_reason``: ``stop`` (a stop token or
    string), ``length`` (max_tokens or the model's context), ``cancelled``, ``error``; None while running.
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    tokenizer: object | None = None
    on_delta: OnDelta | None = None  # called with each newly released piece of text
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why the row failed (finish_reason "error"): its own failure, not the batch's
    _detok: Detokenizer | None = None
    _stop: StopText | None = None

    def __post_init__(self):
        self.prompt = list(self.prompt)
        if not self.prompt:
            raise SlimlmError("a prompt needs at least one token")
        if self.tokenizer is not None:
            self._detok = Detokenizer(self.tokenizer, self.prompt)
            self._stop = StopText(self.params.stop)
        elif self.params.stop:
            raise SlimlmError("stop strings need a tokenizer")

    @property
    def text(self) -> str:
        return self._stop.text if self._stop is not None else ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, piece: str) -> None:
        if piece and self.on_delta is not None:
            self.on_delta(self, piece)

    def _append(self, token: int, stop_ids: frozenset[int]) -> None:
        """Record one sampled token and decide whether the sequence is finished."""
        self.tokens.append(token)
        if token in stop_ids:
            self.finish("stop")
            return
        if self._detok is not None:
            self._emit(self._stop.feed(self._detok.push(token)))
            if self._stop.stopped:
                self.finish("stop")
                return
        if len(self.tokens) >= self.params.max_tokens:
            self.finish("length")

    def fail(self, message: str) -> None:
        """End this row with ``error`` (no further text is released)."""
        if not self.done:
            self.error, self.finish_reason = message, "error"

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if self._detok is not None and not self._stop.stopped:
            piece = self._stop.feed(self._detok.flush())
            if reason != "stop" and self._stop.stopped:
                reason = "stop"
            self._emit(piece + self._stop.release())
        self.finish_reason = reason


@dataclass(eq=False)
class Prefill:
    """A prompt on its way into a :class:`DecodeBatch`: the KV of its first ``done`` tokens.

    ``kv``: per layer ([1, H_kv, done, D] keys, values), None before the first forward; pass the KV of a
    cached prefix of the prompt to start from it. ``logits`` [V]: the next-token logits after the last
    prompt token, set by the forward that completes the prompt.
    """

    gen: Generation
    kv: KV | None = None
    logits: torch.Tensor | None = None

    @property
    def done(self) -> int:
        return kv_len(self.kv)

    @property
    def remaining(self) -> int:
        return len(self.gen.prompt) - self.done


@torch.inference_mode()
def prefill(model, items: Sequence[Prefill], counts: Sequence[int] | None = None, *, pad_id: int = 0) -> None:
    """Run the next ``counts[i]`` prompt tokens of every item (default: all the rest) in one forward.

    Every item must have the same number of tokens done, P (a chunk boundary, a cached prefix, or 0).
    With C = max counts: input ids [B, C], each row's new tokens right-aligned (left padding); attention
    mask [B, P + C] (ones over the past); position ids P, P+1, ... on the real tokens; past KV
    [B, H_kv, P, D] = the items' KV stacked along the batch. Afterwards item i's ``kv`` is its past plus its
    c_i new columns, [1, H_kv, P + c_i, D], and an item whose prompt is now complete has ``logits`` (the LM
    head runs at the last column only, where every row's last new token sits).
    """
    from transformers.cache_utils import DynamicCache

    if not items:
        return
    counts = [it.remaining for it in items] if counts is None else list(counts)
    p = items[0].done
    if any(it.done != p for it in items):
        raise SlimlmError("items prefilled together must have the same number of tokens done")
    if any(not 1 <= c <= it.remaining for c, it in zip(counts, items, strict=True)):
        raise SlimlmError("each item must run between 1 token and the rest of its prompt")
    device = next(model.parameters()).device
    n, width = len(items), max(counts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, p + width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    mask[:, :p] = 1
    for i, (it, c) in enumerate(zip(items, counts, strict=True)):
        ids[i, width - c:] = torch.tensor(it.gen.prompt[p:p + c], dtype=torch.long)
        mask[i, p + width - c:] = 1
        positions[i, width - c:] = torch.arange(p, p + c)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    past = None if p == 0 else [(torch.cat([it.kv[layer][0] for it in items]), torch.cat([it.kv[layer][1] for it in items]))
                                for layer in range(len(items[0].kv))]
    cache = DynamicCache() if past is None else DynamicCache(ddp_cache_data=past)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits[:, -1].float()
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    for i, (it, c) in enumerate(zip(items, counts, strict=True)):
        # row i: its past columns, then its real new ones (the padding in between is dropped)
        if c == width:
            it.kv = [(k[i:i + 1], v[i:i + 1]) for k, v in kv]
        else:
            it.kv = [(torch.cat([k[i:i + 1, :, :p], k[i:i + 1, :, p + width - c:]], dim=2),
                      torch.cat([v[i:i + 1, :, :p], v[i:i + 1, :, p + width - c:]], dim=2)) for k, v in kv]
        if it.remaining == 0:
            it.logits = logits[i]


def _decode_forward(model, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, width: int,
                    cache_arg: str) -> torch.Tensor:
    """One decode step of m rows: ids [m] at positions [m] (the columns their KV is written to, see
    :class:`SlotCache`), attention over columns 0..width-1. Returns the next-token logits [m, V] (fp32; the
    LM head runs at the one new position only). The function :class:`DecodeBatch` compiles."""
    mask = cache.decode_mask(positions, width)
    out = model(input_ids=ids[:, None], attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                logits_to_keep=1, **{cache_arg: cache})
    return out.logits[:, -1].float()


def _step_forward(model, step: FusedStep | None, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor,
                  width: int, cache_arg: str) -> torch.Tensor:
    """:func:`_decode_forward`, or the fused ``step`` where there is one."""
    if step is not None:
        return step(ids, positions, cache, width)
    return _decode_forward(model, cache, ids, positions, width, cache_arg)


def _compiled_part(model, step: FusedStep | None, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor,
                   width: int, cache_arg: str) -> torch.Tensor:
    """What :class:`DecodeBatch` compiles: the fused ``step``'s layers up to the final norm (hidden [m, H]; its
    LM head then runs eagerly, see :meth:`FusedStep.logits`), or the whole :func:`_decode_forward` (logits)."""
    if step is not None:
        return step.hidden(ids, positions, cache, width)
    return _decode_forward(model, cache, ids, positions, width, cache_arg)


COMPILE_FAILED = "torch.compile of the decode step failed"  # how the fallback's one warning starts


# Under CUDA graphs one compile per shape, as measured on an H200; automatic dynamic there: gpu_bench.py's "compiled_dynamic"
CUDA_GRAPHS_DYNAMIC = False


def _compile_step(fn: Callable, mode: str | None = None, dynamic: bool | None = None) -> Callable:
    """``fn`` compiled with ``torch.compile`` (the one place decoding compiles; tests replace it to simulate a
    failure). Compilation itself is lazy: a failure shows at the first call, where the batch falls back.
    ``mode``: inductor's ("reduce-overhead": CUDA graphs, what a GPU decode step needs, see DecodeBatch).
    ``dynamic``: torch.compile's (None: automatic dynamic shapes, the first shape static, a dimension that
    then changes made symbolic by the recompile; False: one compile per shape)."""
    return torch.compile(fn, dynamic=dynamic, mode=mode)


class DecodeBatch:
    """The running sequences of one batch, their KV cache, and the decode step.

    State, per running row r (``rows[r]``, n rows): it lives in slot r of ``cache``, a :class:`SlotCache`
    (per layer preallocated [B_cap, H_kv, T_cap, D] keys and values, written in place; its column c holds
    the row's token at position c, so rows are left-aligned and carry no padding); ``positions[r]``: the
    position (and cache column) its next token takes = the number of tokens cached; ``logits`` [n, V]: the
    logits of its next token. The row order is the slot order: when rows leave, the last rows move into
    the holes (one row's KV copied per hole), so the running rows always fill slots 0..n-1.

    ``add`` prefills new prompts together (one :func:`prefill` forward: left-padded, LM head at the last
    position only) and joins them to the batch; ``join`` takes prompts prefilled elsewhere (in chunks,
    from a cached prefix: the server's scheduler); ``step`` samples one token per row, retires finished
    rows and runs one forward for the rest. Not thread-safe: one thread drives a batch.

    ``fused``: on a CPU in float32, run the eager step as :mod:`slimlm.runtime.fused_step` does (q/k/v and
    gate/up fused, weights in oneDNN's layout: ~1.5x the tokens/s of transformers' forward at batch 1, for
    a copy of the linear weights); models it does not cover run transformers' forward.

    ``compile``: run the per-token step (the fused one where it applies, with its weights in the ordinary
    layout; else transformers' forward) through ``torch.compile`` over the preallocated buffers (the running
    rows rounded up to a power of two, idle slots computed and ignored, and all T_cap columns, a power of
    two). On a CPU with automatic dynamic shapes: the first shape compiles static, a change of the row count
    or of the buffers' columns compiles once more with that dimension symbolic, so any mix of shapes costs at
    most 5 compiles (one per shape ran into torch's recompile limit of 8, then decoded eagerly). If
    compiling is unavailable or fails: one warning, and the eager step (same tokens). Off by default: on a
    2-core CPU a compile takes 10 s (inductor's disk cache warm) to a minute (cold); it
    pays where a step is small-op overhead, not weight reading (benchmarks/decode.py: the 20x INT8 student
    ~1.4x at batch 1, a 135M fp32 model on par with the eager fused step). On a GPU the compiled step is
    replayed as a CUDA graph (inductor's "reduce-overhead"; the cache buffers marked fixed-address), one
    compile per shape there (:data:`CUDA_GRAPHS_DYNAMIC`).

    The buffers only grow (slots up to the most rows decoded together, columns up to the longest prompt +
    max_tokens seen, within the model's context); a batch that empties keeps them for the rows that join
    next, and frees them when it is dropped.
    """

    def __init__(self, model, *, pad_id: int = 0, eos_ids: Sequence[int] = (), max_positions: int | None = None,
                 compile: bool = False, fused: bool = True):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_positions = max_positions or getattr(model.config, "max_position_embeddings", None)
        self.rows: list[Generation] = []
        self.positions: list[int] = []
        self.logits: torch.Tensor | None = None
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise SlimlmError(f"decoding runs sdpa or eager attention, not {impl!r}")
        types, window = attention_layout(model.config)
        # on a GPU the compiled step is replayed as a CUDA graph (a batch-1 step is ~1,000 small kernels whose
        # launches, not the weight reads, set the pace): the cache buffers it writes keep fixed addresses
        self._graphs = compile and self.device.type == "cuda"
        self.cache = SlotCache(model.config.num_hidden_layers, layer_types=types, window=window, attn_impl=impl,
                               pow2=compile, static=self._graphs)
        self._cache_arg = next(iter(cache_kwargs(model, None)))
        self._compiled: Callable | None = None
        self._fused = fused_step_for(model, packed=not compile) if fused else None
        if compile:
            try:
                self._compiled = _compile_step(_compiled_part, "reduce-overhead" if self._graphs else None,
                                               None if not self._graphs or CUDA_GRAPHS_DYNAMIC else False)
            except Exception as e:  # noqa: BLE001 - no compiler here: the eager step gives the same tokens
                self._compile_failed(e)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def compiled(self) -> bool:
        """Whether the next steps run compiled (False after a fallback)."""
        return self._compiled is not None

    def _compile_failed(self, e: Exception) -> None:
        self._compiled = None
        if self._fused is not None:  # the eager fused step, with its weights in the faster layout again
            self._fused = fused_step_for(self.model)
        warnings.warn(f"{COMPILE_FAILED} ({type(e).__name__}: {e}); decoding without compiling (same tokens)",
                      RuntimeWarning, stacklevel=3)

    def _stop_ids(self, gen: Generation) -> frozenset[int]:
        base = frozenset() if gen.params.ignore_eos else self.eos_ids
        return base | frozenset(gen.params.stop_token_ids)

    def _max_columns(self, gens: Sequence[Generation]) -> int | None:
        """Cache columns ``gens`` can ever need: prompt + max_tokens, at most the model's context. For the
        compiled step only the context bounds them (power-of-two sizes, not fitted to these rows: fewer
        shapes to compile for)."""
        if self.cache.pow2:
            return self.max_positions
        most = max(len(g.prompt) + g.params.max_tokens for g in gens)
        return min(most, self.max_positions) if self.max_positions else most

    def prepare(self, gen: Generation) -> None:
        """Check that ``gen`` fits the model's context and give a sampled row its own generator (on the
        model's device, seeded with ``params.seed`` or at random). Raises :class:`SlimlmError` if too long."""
        if self.max_positions and len(gen.prompt) >= self.max_positions:
            raise SlimlmError(f"prompt of {len(gen.prompt)} tokens leaves no room in the model's context "
                              f"({self.max_positions} positions)")
        if gen.params.temperature > 0 and gen.generator is None:
            gen.generator = torch.Generator(device=self.device)
            if gen.params.seed is None:
                gen.generator.seed()
            else:
                gen.generator.manual_seed(gen.params.seed)

    def add(self, gens: Sequence[Generation]) -> None:
        """Prefill ``gens`` in one left-padded forward and join them to the running batch."""
        if not gens:
            return
        for g in gens:
            self.prepare(g)
        items = [Prefill(g) for g in gens]
        prefill(self.model, items, pad_id=self.pad_id)
        self.join(items)

    @torch.inference_mode()
    def join(self, items: Sequence[Prefill]) -> None:
        """Join fully prefilled prompts (see :func:`prefill`) to the running batch.

        Item i's KV [1, H_kv, n_i, D] per layer is copied into the next free slot's columns 0..n_i-1 (the
        buffers grow first if the slots or columns run out); its next position is n_i. A join that fails
        leaves the batch as it was."""
        if not items:
            return
        if any(it.logits is None or it.done != len(it.gen.prompt) for it in items):
            raise SlimlmError("only fully prefilled prompts can join the batch")
        n = len(self.rows)
        gens = self.rows + [it.gen for it in items]
        self.cache.reserve(len(gens), max(it.done for it in items) + 1, live=n, like=items[0].kv,
                           max_cols=self._max_columns(gens))
        for i, it in enumerate(items):
            self.cache.put(n + i, it.kv)
        logits = torch.stack([it.logits for it in items])
        self.logits = logits if self.logits is None or not n else torch.cat([self.logits, logits])
        self.positions.extend(it.done for it in items)
        self.rows.extend(it.gen for it in items)

    def _sample(self) -> list[int]:
        """One token per row. Rows with the same settings and generator sample together (one draw for the
        group, as :func:`sample_next` on the stacked logits); greedy rows always share one argmax."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, g in enumerate(self.rows):
            p = g.params
            key = ("greedy",) if p.temperature == 0 else (p.temperature, p.top_p, id(g.generator))
            groups[key].append(i)
        out = [0] * len(self.rows)
        for idx in groups.values():
            p, gen = self.rows[idx[0]].params, self.rows[idx[0]].generator
            rows = self.logits if len(idx) == len(self.rows) else self.logits[idx]
            try:
                picked = sample_next(rows, p.temperature, p.top_p, gen).tolist()
            except Exception as e:  # noqa: BLE001 - these rows' settings or generator: they fail, not the batch
                for i in idx:
                    self.rows[i].fail(f"sampling failed: {type(e).__name__}: {e}")
                continue
            for i, t in zip(idx, picked, strict=True):
                out[i] = t
        return out

    @torch.inference_mode()
    def drop(self, keep: Sequence[int]) -> list[int]:
        """Keep only rows ``keep`` (indices into ``rows``). The kept rows past the new end move into the
        holes, so ``rows`` afterwards is in slot order, not necessarily in the order of ``keep``; returns
        that order (the old row index of each new slot)."""
        keep = list(keep)
        if len(keep) == len(self.rows):
            return keep
        if not keep:  # the buffers stay allocated for the rows that join next
            self.rows, self.positions, self.logits = [], [], None
            return []
        n, kept = len(keep), set(keep)
        order = list(range(n))
        movers = (i for i in keep if i >= n)
        for hole in (i for i in range(n) if i not in kept):
            src = next(movers)
            self.cache.move(src, hole, self.positions[src])
            order[hole] = src
        self.rows = [self.rows[i] for i in order]
        self.positions = [self.positions[i] for i in order]
        self.logits = self.logits[torch.tensor(order, device=self.logits.device)]
        return order

    def cancel(self, gen: Generation, reason: str = "cancelled") -> None:
        """Finish ``gen`` now and remove it from the batch."""
        gen.finish(reason)
        self.drop([i for i, g in enumerate(self.rows) if g is not gen])

    @torch.inference_mode()
    def step(self) -> list[Generation]:
        """Sample the next token of every row, retire finished rows, advance the rest by one forward.

        Returns the rows that finished in this step (already removed from the batch). A failure of one
        row's own work (its sampling, its text: detokenising, stop strings, its ``on_delta``) ends that row
        with ``error`` set and the others carry on; a failure of the shared forward raises.
        """
        if not self.rows:
            return []
        tokens = self._sample()
        for g, t, pos in zip(self.rows, tokens, self.positions, strict=True):
            if g.done:  # failed while sampling
                continue
            try:
                g._append(t, self._stop_ids(g))
            except Exception as e:  # noqa: BLE001
                g.fail(f"decoding failed: {type(e).__name__}: {e}")
            if not g.done and self.max_positions and pos >= self.max_positions - 1:
                g.finish("length")  # t took the model's last position: prompt + output fill the context
        finished = [g for g in self.rows if g.done]
        order = self.drop([i for i, g in enumerate(self.rows) if not g.done]) if finished else range(len(tokens))
        if not self.rows:
            return finished
        self.logits = self._forward([tokens[i] for i in order])
        self.positions = [p + 1 for p in self.positions]
        return finished

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        """Logits [n, V] after feeding each row its token at its position (the cache grows first if a row
        reaches the end of its columns)."""
        n, width = len(self.rows), max(self.positions) + 1
        self.cache.reserve(n, width, live=n, max_cols=self._max_columns(self.rows))
        if self._compiled is not None:  # static shapes: the rows rounded up to a power of two, every column
            m, w = min(1 << (n - 1).bit_length(), self.cache.batch_capacity), self.cache.capacity
            ids = torch.tensor(tokens + [0] * (m - n), device=self.device)
            pos = torch.tensor(self.positions + [0] * (m - n), device=self.device)  # idle slots: column 0 only
            self.cache.bind(pos, w, views=True)
            try:
                if self._graphs:  # a new step: the graph's outputs of the last one are no longer read
                    torch.compiler.cudagraph_mark_step_begin()
                out = self._compiled(self.model, self._fused, self.cache, ids, pos, w, self._cache_arg)[:n]
                return out if self._fused is None else self._fused.logits(out)
            except Exception as e:  # noqa: BLE001 - the eager step below rewrites the same KV and gives the same tokens
                self._compile_failed(e)
        ids = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(self.positions, device=self.device)
        self.cache.bind(pos, width, full=all(p == width - 1 for p in self.positions))
        return _step_forward(self.model, self._fused, self.cache, ids, pos, width, self._cache_arg)


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """Stop token ids: the tokenizer's EOS and the model's generation-config EOS (an int or a list)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return sorted(ids)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, compile: bool = False) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens (batched, left-padded, KV cache).

    Returns the new tokens per prompt, each ending at (and including) ``eos_id`` if it was produced.
    All rows share ``generator`` (one draw per step for the whole batch). The model's LM head runs only
    at the last position of each step. ``compile``: see :class:`DecodeBatch`.
    """
    if not prompts:
        return []
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    batch = DecodeBatch(model, pad_id=pad_id, eos_ids=() if eos_id is None else (eos_id,), compile=compile)
    gens = [Generation(list(p), params, generator=generator) for p in prompts]
    batch.add(gens)
    while len(batch):
        batch.step()
    _raise_row_errors(gens)
    return [g.tokens for g in gens]


def _raise_row_errors(gens: Sequence[Generation]) -> None:
    """Library callers get a row's own failure as an error (the server's scheduler fails that request alone)."""
    failed = next((g for g in gens if g.error is not None), None)
    if failed is not None:
        raise SlimlmError(failed.error)


def generate_text(model, tokenizer, prompts: Sequence[str | Sequence[int]], params: SamplingParams = SamplingParams(),
                  *, max_batch: int = 8) -> list[Generation]:
    """Generate for text (or token-id) prompts with stop strings; batches of ``max_batch`` rows, where a
    finished row's slot is refilled from the remaining prompts before the next step (continuous batching
    in one thread). With ``params.seed``, prompt i samples from its own generator seeded ``seed + i``."""
    gens = [_new_generation(model, tokenizer, p, params, i) for i, p in enumerate(prompts)]
    batch = DecodeBatch(model, pad_id=tokenizer_pad_id(tokenizer), eos_ids=eos_token_ids(model, tokenizer))
    waiting = list(reversed(gens))
    while waiting or len(batch):
        room = max_batch - len(batch)
        if room > 0 and waiting:
            batch.add([waiting.pop() for _ in range(min(room, len(waiting)))])
        batch.step()
    _raise_row_errors(gens)
    return gens


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as it is decoded (stop strings honoured)."""
    pieces: list[str] = []
    gen = _new_generation(model, tokenizer, prompt, params, 0, on_delta=lambda g, s: pieces.append(s))
    batch = DecodeBatch(model, pad_id=tokenizer_pad_id(tokenizer), eos_ids=eos_token_ids(model, tokenizer))
    batch.add([gen])
    while len(batch):
        batch.step()
        yield from pieces
        pieces.clear()
    _raise_row_errors([gen])


def tokenizer_pad_id(tokenizer) -> int:
    """The id that fills padded slots: the tokenizer's pad token, else 0 (padded slots are masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _new_generation(model, tokenizer, prompt, params: SamplingParams, i: int, on_delta: OnDelta | None = None):
    ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    if params.seed is not None:
        params = replace(params, seed=params.seed + i)
    return Generation(ids, params, tokenizer=tokenizer, on_delta=on_delta)

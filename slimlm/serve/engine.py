"""The one engine that runs models: label-token scoring with shared-prefix reuse, and generation.

Scoring (the paper's ranking use): for a prompt ``prefix + suffix`` and label tokens ``l_1..l_L`` the
label probabilities are

    p = softmax([z_1, ..., z_L]),   z_j = h_last · W[l_j] (+ b[l_j])

where ``h_last`` is the final (normed) hidden state at the last prompt token and ``W`` the LM head. The
full-vocabulary softmax normaliser cancels, so the LM head runs only on the L label rows and only at the
scored positions, never over [tokens x vocab]. The ranking score is p_1 (P(" Yes") over {" Yes", " No"}).

Candidates that share a prefix (same ``group`` and identical prefix ids) run the prefix once; its KV
cache is copied into each candidate batch and only the suffixes run. Groups of one candidate gain
nothing from that, so they run as whole prompts, sorted by length and batched.

Generation: :class:`DecodeBatch` holds the running sequences of a batch and their KV cache. Sequences
join it (a batched, left-padded prefill whose KV tensors are left-padded to the running batch's length
and concatenated along the batch) and leave it (rows dropped, all-padding columns trimmed) between
decode steps; every row carries explicit position ids, so a row's tokens, positions and attention are
the same whatever else shares the batch. :func:`generate` (one batch of prompts), :func:`generate_text`
(text, stop strings) and :func:`stream` (text deltas as they are decoded) drive it; the server's
continuous-batching scheduler (``serve/scheduler.py``) drives the same class from a worker thread.

Evaluation, distillation (on-policy samples), benchmarks and the HTTP server call this module, so there
is one scoring path and one decode loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.models import cache_kwargs
from slimlm.tasks.ranking import TokenizedRanking

Progress = Callable[[int], None]  # called with the number of candidates just finished


def _label_head(model, label_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's rows for ``label_ids``: weight [L, H] and bias [L] (or None), in fp32."""
    head = model.get_output_embeddings()
    idx = torch.tensor(list(label_ids), device=head.weight.device)
    w = head.weight.index_select(0, idx).float()
    b = head.bias.index_select(0, idx).float() if getattr(head, "bias", None) is not None else None
    return w, b


def _label_probs(hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Probabilities over the label set [B, L] from final hidden states [B, H]."""
    z = hidden.float() @ w.T
    if b is not None:
        z = z + b
    return torch.softmax(z, dim=-1)


def _check_labels(model, label_ids: Sequence[int]) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(label_ids) < 2 or len(set(label_ids)) != len(label_ids):
        raise SlimlmError(f"label ids {list(label_ids)}: need two or more distinct ids")
    if any(not 0 <= i < vocab for i in label_ids):
        raise SlimlmError(f"label ids {list(label_ids)}: outside the vocabulary (size {vocab})")


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids padded on the right with ``pad_id``, and the matching 0/1 attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _even_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n items in ceil(n / batch_size) batches of near-equal size."""
    k = max(1, -(-n // batch_size))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


def _drive(steps: Generator[int, None, np.ndarray], progress: Progress | None) -> np.ndarray:
    """Run a stepwise scorer to the end, reporting each step's candidate count to ``progress``."""
    while True:
        try:
            n = next(steps)
        except StopIteration as done:
            return done.value
        if progress:
            progress(n)


def label_probs_full(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[int], *, batch_size: int = 16,
                     pad_id: int = 0, progress: Progress | None = None) -> np.ndarray:
    """Label probabilities [N, L] for whole prompts (no reuse), batched by length."""
    return _drive(iter_label_probs_full(model, prompts, label_ids, batch_size=batch_size, pad_id=pad_id), progress)


@torch.inference_mode()
def iter_label_probs_full(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[int], *,
                          batch_size: int = 16, pad_id: int = 0) -> Generator[int, None, np.ndarray]:
    """:func:`label_probs_full` one batch at a time: yields the batch's size, returns the [N, L] array
    (so a scheduler can interleave other work between batches)."""
    _check_labels(model, label_ids)
    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = np.empty((len(prompts), len(label_ids)), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = right_pad([prompts[i] for i in idx], pad_id, device)
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(idx), device=device), mask.sum(1) - 1]
        out[idx] = _label_probs(last, w, b).double().cpu().numpy()
        yield len(idx)
    return out


def label_probs_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                              label_ids: Sequence[int], *, batch_size: int = 16, pad_id: int = 0,
                              progress: Progress | None = None) -> np.ndarray:
    """Label probabilities [N, L] for ``prefix + s`` for every suffix ``s``, running the prefix once.

    The prefix's KV cache [1, H_kv, P, D] per layer is broadcast to each candidate batch; suffixes run
    sorted by length (less padding) in batches of near-equal size, with positions P, P+1, ...
    """
    return _drive(iter_label_probs_shared_prefix(model, prefix, suffixes, label_ids, batch_size=batch_size,
                                                 pad_id=pad_id), progress)


@torch.inference_mode()
def iter_label_probs_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                                   label_ids: Sequence[int], *, batch_size: int = 16,
                                   pad_id: int = 0) -> Generator[int, None, np.ndarray]:
    """:func:`label_probs_shared_prefix` one step at a time: yields 0 after the prefix, then each
    candidate batch's size; returns the [N, L] array."""
    from transformers.cache_utils import DynamicCache

    _check_labels(model, label_ids)
    if not prefix:
        raise SlimlmError("shared-prefix scoring needs a non-empty prefix")
    if any(len(s) == 0 for s in suffixes):
        raise SlimlmError("every candidate suffix needs at least one token")
    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    p = len(prefix)
    out = np.empty((len(suffixes), len(label_ids)), dtype=np.float64)
    if not suffixes:
        return out
    pre = DynamicCache()
    base(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, **cache_kwargs(base, pre))
    kv = [(layer.keys, layer.values) for layer in pre.layers]
    yield 0
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start, stop in _even_batches(len(order), batch_size):
        idx = order[start:stop]
        n = len(idx)
        ids, mask = right_pad([suffixes[i] for i in idx], pad_id, device)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
        full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=device), mask], dim=1)
        positions = torch.arange(p, p + ids.shape[1], device=device).unsqueeze(0).expand(n, -1)
        hidden = base(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                      use_cache=True, **cache_kwargs(base, cache)).last_hidden_state
        last = hidden[torch.arange(n, device=device), mask.sum(1) - 1]
        out[idx] = _label_probs(last, w, b).double().cpu().numpy()
        yield n
    return out


def score_full(model, prompts: Sequence[Sequence[int]], label_ids: tuple[int, int], *, batch_size: int = 16,
               pad_id: int = 0, progress: Progress | None = None) -> np.ndarray:
    """P(pos) for whole prompts (no reuse), batched by length; the reference for :func:`score`."""
    return label_probs_full(model, prompts, label_ids, batch_size=batch_size, pad_id=pad_id, progress=progress)[:, 0]


def score_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                        label_ids: tuple[int, int], *, batch_size: int = 16, pad_id: int = 0,
                        progress: Progress | None = None) -> np.ndarray:
    """P(pos) for ``prefix + s`` for every suffix ``s``, running the prefix once."""
    return label_probs_shared_prefix(model, prefix, suffixes, label_ids, batch_size=batch_size, pad_id=pad_id,
                                     progress=progress)[:, 0]


def score(model, examples: Sequence[TokenizedRanking], label_ids: tuple[int, int], *, batch_size: int = 16,
          pad_id: int = 0, reuse_prefix: bool = True, progress: Progress | None = None) -> np.ndarray:
    """P(pos) for every example, in input order.

    With ``reuse_prefix``, groups of two or more candidates sharing identical prefix ids run their prefix
    once; the rest run as whole prompts.
    """
    out = np.empty(len(examples), dtype=np.float64)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[(ex.group, ex.prefix_ids)].append(i)
    singles = []
    for (_, prefix), idx in groups.items():
        if reuse_prefix and len(idx) > 1 and prefix:
            out[idx] = score_shared_prefix(model, prefix, [examples[i].suffix_ids for i in idx], label_ids,
                                           batch_size=batch_size, pad_id=pad_id, progress=progress)
        else:
            singles.extend(idx)
    if singles:
        out[singles] = score_full(model, [examples[i].input_ids for i in singles], label_ids,
                                  batch_size=batch_size, pad_id=pad_id, progress=progress)
    return out


# --------------------------------------------------------------------------- sampling


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
            raise SlimlmError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise SlimlmError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SlimlmError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


# --------------------------------------------------------------------------- text: detokenizer, stop strings


class Detokenizer:
    """Incremental text of a growing token list.

    Text is decoded over a short sliding window ``ids[prefix_offset:]`` (seeded with the last prompt tokens,
    so tokenizers that drop a leading space when decoding a lone token still see the context) and a new
    piece is released only when it does not end in U+FFFD, i.e. a UTF-8 character split across tokens is
    held back until its last byte arrives. Concatenating the pieces gives ``decode(new tokens)``.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _pending(self) -> tuple[str, str]:
        return self._decode(self.ids[self.prefix_offset:self.read_offset]), self._decode(self.ids[self.prefix_offset:])

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before, full = self._pending()
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before, full = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(before):]


class StopText:
    """Accumulates text, cuts it at the first stop string, and releases only text that cannot turn into one.

    A tail of the text that is a proper prefix of some stop string is held back until the next piece
    shows whether the stop string completes; so streamed pieces never contain any part of a stop string.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the newly releasable text. Sets ``stopped`` when a stop string appears."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.release()
        hold = 0
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                hold = k
                break
        return self.release(len(self.text) - hold)

    def release(self, upto: int | None = None) -> str:
        upto = len(self.text) if upto is None else upto
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


# --------------------------------------------------------------------------- generation


OnDelta = Callable[["Generation", str], None]


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

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if self._detok is not None and not self._stop.stopped:
            piece = self._stop.feed(self._detok.flush())
            if reason != "stop" and self._stop.stopped:
                reason = "stop"
            self._emit(piece + self._stop.release())
        self.finish_reason = reason


def _kv_left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a KV tensor [B, H, T, D] with zeros to T = width (the padded slots are masked out)."""
    extra = width - t.shape[-2]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, extra, 0))


class DecodeBatch:
    """The running sequences of one batch, their KV cache, and the decode step.

    State, per running row r (B rows, T cache columns, every row right-aligned to column T-1):
    ``mask`` [B, T] (0 = padding on the left), ``kv`` per layer ([B, H_kv, T, D] keys, values),
    ``next_pos`` [B] (the position id the row's next token gets), ``logits`` [B, V] (for the next token).

    ``add`` prefills new prompts together (left-padded, position ids = cumsum(mask) - 1, LM head at the
    last position only) and joins them to the batch; ``step`` samples one token per row, retires finished
    rows and runs one forward for the rest. Not thread-safe: one thread drives a batch.
    """

    def __init__(self, model, *, pad_id: int = 0, eos_ids: Sequence[int] = (), max_positions: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_positions = max_positions or getattr(model.config, "max_position_embeddings", None)
        self.rows: list[Generation] = []
        self.cache = None  # a transformers DynamicCache over all rows
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _stop_ids(self, gen: Generation) -> frozenset[int]:
        base = frozenset() if gen.params.ignore_eos else self.eos_ids
        return base | frozenset(gen.params.stop_token_ids)

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _set_kv(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers.cache_utils import DynamicCache

        self.cache = DynamicCache(ddp_cache_data=kv)

    @torch.inference_mode()
    def add(self, gens: Sequence[Generation]) -> None:
        """Prefill ``gens`` in one left-padded forward and join them to the running batch."""
        from transformers.cache_utils import DynamicCache

        if not gens:
            return
        for g in gens:
            if g.params.temperature > 0 and g.generator is None:  # its own stream, on the model's device
                g.generator = torch.Generator(device=self.device)
                if g.params.seed is None:
                    g.generator.seed()
                else:
                    g.generator.manual_seed(g.params.seed)
            if self.max_positions and len(g.prompt) >= self.max_positions:
                raise SlimlmError(f"prompt of {len(g.prompt)} tokens leaves no room in the model's context "
                                  f"({self.max_positions} positions)")
        n, width = len(gens), max(len(g.prompt) for g in gens)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, g in enumerate(gens):
            ids[i, width - len(g.prompt):] = torch.tensor(g.prompt, dtype=torch.long)
            mask[i, width - len(g.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **cache_kwargs(self.model, cache)).logits[:, -1].float()
        new_kv = [(layer.keys, layer.values) for layer in cache.layers]
        next_pos = positions[:, -1] + 1
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, mask, next_pos, logits
        else:
            t = max(self.mask.shape[1], width)
            old_kv = self._kv()
            self._set_kv([(torch.cat([_kv_left_pad(ko, t), _kv_left_pad(kn, t)]),
                           torch.cat([_kv_left_pad(vo, t), _kv_left_pad(vn, t)]))
                          for (ko, vo), (kn, vn) in zip(old_kv, new_kv, strict=True)])
            pad = torch.nn.functional.pad
            self.mask = torch.cat([pad(self.mask, (t - self.mask.shape[1], 0)), pad(mask, (t - width, 0))])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
        self.rows.extend(gens)

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
            for i, t in zip(idx, sample_next(rows, p.temperature, p.top_p, gen).tolist(), strict=True):
                out[i] = t
        return out

    def drop(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (indices into ``rows``); trim cache columns that are padding in every row."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_pos, self.logits = [], None, None, None, None
            return
        idx = torch.tensor(list(keep), device=self.device)
        mask = self.mask.index_select(0, idx)
        first = int(mask.any(0).nonzero()[0])  # leading columns that no remaining row attends to
        self._set_kv([(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                      for k, v in self._kv()])
        self.mask = mask[:, first:]
        self.next_pos = self.next_pos.index_select(0, idx)
        self.logits = self.logits.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    def cancel(self, gen: Generation, reason: str = "cancelled") -> None:
        """Finish ``gen`` now and remove it from the batch."""
        gen.finish(reason)
        self.drop([i for i, g in enumerate(self.rows) if g is not gen])

    @torch.inference_mode()
    def step(self) -> list[Generation]:
        """Sample the next token of every row, retire finished rows, advance the rest by one forward.

        Returns the rows that finished in this step (already removed from the batch)."""
        if not self.rows:
            return []
        tokens = self._sample()
        positions = self.next_pos.tolist()
        for g, t, pos in zip(self.rows, tokens, positions, strict=True):
            g._append(t, self._stop_ids(g))
            if not g.done and self.max_positions and pos >= self.max_positions - 1:
                g.finish("length")  # t took the model's last position: prompt + output fill the context
        finished = [g for g in self.rows if g.done]
        keep = [i for i, g in enumerate(self.rows) if not g.done]
        if finished:
            self.drop(keep)
        if not self.rows:
            return finished
        tok = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=self.mask.dtype, device=self.device)], 1)
        self.logits = self.model(input_ids=tok, attention_mask=self.mask, position_ids=self.next_pos[:, None],
                                 use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, self.cache)).logits[:, -1].float()
        self.next_pos = self.next_pos + 1
        return finished


def _eos_ids(model, tokenizer=None) -> list[int]:
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
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens (batched, left-padded, KV cache).

    Returns the new tokens per prompt, each ending at (and including) ``eos_id`` if it was produced.
    All rows share ``generator`` (one draw per step for the whole batch). The model's LM head runs only
    at the last position of each step.
    """
    if not prompts:
        return []
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    batch = DecodeBatch(model, pad_id=pad_id, eos_ids=() if eos_id is None else (eos_id,))
    gens = [Generation(list(p), params, generator=generator) for p in prompts]
    batch.add(gens)
    while len(batch):
        batch.step()
    return [g.tokens for g in gens]


def generate_text(model, tokenizer, prompts: Sequence[str | Sequence[int]], params: SamplingParams = SamplingParams(),
                  *, max_batch: int = 8) -> list[Generation]:
    """Generate for text (or token-id) prompts with stop strings; batches of ``max_batch`` rows, where a
    finished row's slot is refilled from the remaining prompts before the next step (continuous batching
    in one thread). With ``params.seed``, prompt i samples from its own generator seeded ``seed + i``."""
    gens = [_new_generation(model, tokenizer, p, params, i) for i, p in enumerate(prompts)]
    batch = DecodeBatch(model, pad_id=_pad_id(tokenizer), eos_ids=_eos_ids(model, tokenizer))
    waiting = list(reversed(gens))
    while waiting or len(batch):
        room = max_batch - len(batch)
        if room > 0 and waiting:
            batch.add([waiting.pop() for _ in range(min(room, len(waiting)))])
        batch.step()
    return gens


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as it is decoded (stop strings honoured)."""
    pieces: list[str] = []
    gen = _new_generation(model, tokenizer, prompt, params, 0, on_delta=lambda g, s: pieces.append(s))
    batch = DecodeBatch(model, pad_id=_pad_id(tokenizer), eos_ids=_eos_ids(model, tokenizer))
    batch.add([gen])
    while len(batch):
        batch.step()
        yield from pieces
        pieces.clear()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _new_generation(model, tokenizer, prompt, params: SamplingParams, i: int, on_delta: OnDelta | None = None):
    ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    if params.seed is not None:
        params = replace(params, seed=params.seed + i)
    return Generation(ids, params, tokenizer=tokenizer, on_delta=on_delta)

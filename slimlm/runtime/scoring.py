"""Label-token scoring: the probabilities a causal LM gives a small label set after each prompt.

For a prompt ``prefix + suffix`` and label tokens ``l_1..l_L`` the label probabilities are

    p = softmax([z_1, ..., z_L]),   z_j = h_last · W[l_j] (+ b[l_j])

where ``h_last`` is the final (normed) hidden state at the last prompt token and ``W`` the LM head. The
full-vocabulary softmax normaliser cancels, so the LM head runs only on the L label rows and only at the
scored positions, never over [tokens x vocab]. The ranking score is p_1 (P(" Yes") over {" Yes", " No"}).

Candidates that share a prefix (same ``group`` and identical prefix ids) run the prefix once, in one of
two ways:

- **packed** (:mod:`slimlm.runtime.packing`): the prefix and the group's candidates form one row with a
  block attention mask and restarted positions; rows of many groups are batched together, so a task of
  many small groups (MovieLens evaluation: 2 candidates per user) runs in a few large forwards;
- **broadcast**: the prefix runs alone and batches of the group's candidates run on its KV cache
  [1, H_kv, P, D] per layer; attention costs each candidate only P + S keys, so it wins for one prefix with
  many candidates (a serving request of 100 items), where a packed row's (P + N·S)² block grows. On a CPU the
  candidates read the prefix KV in place (:mod:`slimlm.runtime.shared_prefix`: one product over the prefix
  per batch and KV head); elsewhere it is expanded into each batch's cache.

:func:`score` packs groups of up to :data:`PACK_MAX_CANDIDATES` candidates (the crossing point measured by
``benchmarks/serve.py``) and broadcasts larger ones.

Across calls, a :class:`~slimlm.runtime.prefix_cache.PrefixCache` keeps prefix KV: a prefix scored again
(the same user with new candidates) takes the longest cached part of its KV and runs only the rest; then
up to :data:`PACK_MAX_CANDIDATES` candidates run as one packed row after the cached prefix (each attends to
the prefix and itself), more are broadcast as above (they cross at the same point: ``benchmarks/packed_scoring.py``).

The ``iter_*`` forms yield after each forward pass, so a caller that shares the model (the server's
scheduler) can interleave other work between candidate batches; the plain forms run them to the end.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.models import cache_kwargs
from slimlm.runtime import shared_prefix
from slimlm.runtime.prefix_cache import KV, PrefixCache, kv_len
from slimlm.tasks.ranking import TokenizedRanking

# groups with more candidates than this are scored by KV broadcast, smaller ones packed (see the module doc)
PACK_MAX_CANDIDATES = 16

OnScored = Callable[[int], None]  # called with the number of candidates just scored (not a Progress)


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


def _drive(steps: Generator[int, None, np.ndarray], on_scored: OnScored | None) -> np.ndarray:
    """Run a stepwise scorer to the end, reporting each step's candidate count to ``on_scored``."""
    while True:
        try:
            n = next(steps)
        except StopIteration as done:
            return done.value
        if on_scored:
            on_scored(n)


def label_probs_full(model, prompts: Sequence[Sequence[int]], label_ids: Sequence[int], *, batch_size: int = 16,
                     pad_id: int = 0, on_scored: OnScored | None = None) -> np.ndarray:
    """Label probabilities [N, L] for whole prompts (no reuse), batched by length."""
    return _drive(iter_label_probs_full(model, prompts, label_ids, batch_size=batch_size, pad_id=pad_id), on_scored)


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
                              past: KV | None = None, cache: PrefixCache | None = None,
                              prefill_chunk: int | None = None, pack_max: int = PACK_MAX_CANDIDATES,
                              on_scored: OnScored | None = None) -> np.ndarray:
    """Label probabilities [N, L] for ``prefix + s`` for every suffix ``s``, running the prefix once.

    The prefix's KV cache [1, H_kv, P, D] per layer is broadcast to each candidate batch; suffixes run
    sorted by length (less padding) in batches of near-equal size, with positions P, P+1, ... A cold prefix
    with at most ``pack_max`` candidates runs packed instead, in one forward (0: always broadcast).

    ``past``: the KV of ``prefix[:m]`` (e.g. kept from an earlier request); only ``prefix[m:]`` runs.
    ``cache``: a :class:`~slimlm.runtime.prefix_cache.PrefixCache` to take the longest cached part of the
    prefix from and to store the whole prefix's KV in (waiting, if another thread is computing the same
    prefix, for its result). ``prefill_chunk``: run the prefix in forwards of at most this many tokens.
    The scores equal those without reuse up to float rounding (the same KV, computed in other shapes).
    """
    return _drive(iter_label_probs_shared_prefix(model, prefix, suffixes, label_ids, batch_size=batch_size,
                                                 pad_id=pad_id, past=past, cache=cache, prefill_chunk=prefill_chunk,
                                                 block=True, pack_max=pack_max), on_scored)


def _extend_prefix(base, tokens: Sequence[int], past: KV | None, chunk: int | None) -> Generator[int, None, KV]:
    """The KV [1, H_kv, len(tokens), D] per layer of ``tokens``, given ``past`` = the KV of ``tokens[:m]``:
    runs ``tokens[m:]`` (positions m, m+1, ...) in forwards of at most ``chunk`` tokens, yielding 0
    between them. ``past`` is only read (a fresh DynamicCache per forward grows by concatenation)."""
    from transformers.cache_utils import DynamicCache

    device = next(base.parameters()).device
    done, kv = kv_len(past), past
    if done > len(tokens):
        raise SlimlmError(f"the cached KV covers {done} tokens, more than the prefix's {len(tokens)}")
    while done < len(tokens):
        n = len(tokens) - done if chunk is None else min(chunk, len(tokens) - done)
        cache = DynamicCache() if kv is None else DynamicCache(ddp_cache_data=kv)
        # no position ids: transformers numbers the new tokens from the cache's length, done, done + 1, ...
        base(input_ids=torch.tensor([list(tokens[done:done + n])], device=device), use_cache=True,
             **cache_kwargs(base, cache))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        done += n
        if done < len(tokens):
            yield 0
    return kv


def _packed_with_prefix_kv(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                          label_ids: Sequence[int]) -> tuple[np.ndarray, KV]:
    """One packed forward of ``prefix`` + every suffix (block mask, restarted positions): the [N, L] label
    probabilities and the prefix's KV [1, H_kv, P, D] per layer (the first P cached positions: prefix tokens
    attend to the prefix only, so their keys and values are exactly those of the prefix alone)."""
    from transformers.cache_utils import DynamicCache

    from slimlm.runtime.packing import attention_inputs, pack

    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    ids, pos, seg = pack(prefix, suffixes)
    mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
    cache = DynamicCache()
    hidden = base(input_ids=torch.tensor([ids], device=device), use_cache=True, **cache_kwargs(base, cache),
                  **attention_inputs(base, mask, torch.tensor([pos], device=device),
                                     torch.tensor([seg], device=device))).last_hidden_state
    ends = np.cumsum([len(s) for s in suffixes]) + len(prefix) - 1
    probs = _label_probs(hidden[0, torch.as_tensor(ends, device=device)], w, b).double().cpu().numpy()
    p = len(prefix)
    return probs, [(layer.keys[:, :, :p].clone(), layer.values[:, :, :p].clone()) for layer in cache.layers]


@torch.inference_mode()
def iter_label_probs_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                                   label_ids: Sequence[int], *, batch_size: int = 16, pad_id: int = 0,
                                   past: KV | None = None, cache: PrefixCache | None = None,
                                   prefill_chunk: int | None = None, block: bool = False,
                                   pack_max: int = PACK_MAX_CANDIDATES) -> Generator[int, None, np.ndarray]:
    """:func:`label_probs_shared_prefix` one step at a time: yields 0 after each forward of the prefix,
    then each candidate batch's size; returns the [N, L] array.

    A prefix with nothing of it computed yet (no ``past``, nothing in ``cache``) and at most ``pack_max``
    candidates runs as one packed forward (prefix and candidates together; its prefix KV still goes to
    ``cache``), unless that row would exceed ``prefill_chunk``; otherwise the prefix runs first and its KV
    is broadcast to candidate batches (see the module docstring for the crossing point).

    While another caller computes this prefix for ``cache``, it waits on that (``block``) or yields 0
    until the result is in the cache (a scheduler advancing this generator between other work)."""
    _check_labels(model, label_ids)
    if not prefix:
        raise SlimlmError("shared-prefix scoring needs a non-empty prefix")
    if any(len(s) == 0 for s in suffixes):
        raise SlimlmError("every candidate suffix needs at least one token")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise SlimlmError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    out = np.empty((len(suffixes), len(label_ids)), dtype=np.float64)
    if not suffixes:
        return out
    base = model.get_decoder()
    claim = None
    try:
        if cache is not None:
            found = cache.lookup(prefix, claim=True)
            while found.pending is not None:  # someone else is computing (more of) this prefix: reuse theirs
                if block:
                    found.pending.wait()
                else:
                    yield 0
                found = cache.lookup(prefix, claim=True)
            claim = found.claim
            if found.length > kv_len(past):
                past = found.kv
        row = len(prefix) + sum(len(x) for x in suffixes)
        if kv_len(past) == 0 and len(suffixes) <= pack_max and (prefill_chunk is None or row <= prefill_chunk):
            out[:], kv = _packed_with_prefix_kv(model, prefix, suffixes, label_ids)
            if cache is not None:
                cache.insert(prefix, kv, claim=claim)
                claim = None
            yield len(suffixes)
            return out
        kv = yield from _extend_prefix(base, prefix, past, prefill_chunk)
        if cache is not None:
            cache.insert(prefix, kv, claim=claim)
            claim = None
    finally:  # failed or abandoned (the generator closed): whoever waits on the claim must not wait forever
        if claim is not None:
            cache.release(claim)
    yield 0
    if len(suffixes) <= pack_max:  # the prefix's KV was cached or just computed: the candidates in one packed row
        out[:] = _packed_after_prefix(model, kv, suffixes, label_ids)
        yield len(suffixes)
        return out
    return (yield from _iter_candidates(model, kv, suffixes, label_ids, out, batch_size=batch_size, pad_id=pad_id))


def _packed_after_prefix(model, kv: KV, suffixes: Sequence[Sequence[int]], label_ids: Sequence[int]) -> np.ndarray:
    """[N, L] label probabilities of ``prefix + s`` for every suffix from one forward of the suffixes packed
    into one row after the prefix's KV [1, H_kv, P, D] per layer (each suffix sees the prefix and itself;
    positions P, P + 1, ... per suffix): no padding and no copy of the prefix KV per candidate. ``kv`` is only
    read (the forward's cache grows by concatenation)."""
    from transformers.cache_utils import DynamicCache

    from slimlm.runtime.packing import after_prefix_mask, layer_masks

    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    p = kv_len(kv)
    ids = [t for s in suffixes for t in s]
    pos = [p + i for s in suffixes for i in range(len(s))]
    seg = torch.tensor([j for j, s in enumerate(suffixes, 1) for _ in s], device=device)
    cache = DynamicCache(ddp_cache_data=kv)
    pos = torch.tensor([pos], device=device)
    keys = torch.cat([torch.arange(p, device=device)[None], pos], dim=1)  # the prefix's positions, the candidates'
    hidden = base(input_ids=torch.tensor([ids], device=device), position_ids=pos, use_cache=True,
                  attention_mask=layer_masks(base, after_prefix_mask(p, seg), pos, keys),
                  **cache_kwargs(base, cache)).last_hidden_state
    ends = torch.as_tensor(np.cumsum([len(s) for s in suffixes]) - 1, device=device)
    return _label_probs(hidden[0, ends], w, b).double().cpu().numpy()


def _iter_candidates(model, kv: KV, suffixes: Sequence[Sequence[int]], label_ids: Sequence[int], out: np.ndarray, *,
                     batch_size: int, pad_id: int) -> Generator[int, None, np.ndarray]:
    """Fill ``out`` [N, L] with the label probabilities of ``prefix + s`` per suffix, from the prefix's KV
    [1, H_kv, P, D] per layer shared by each candidate batch — read in place by
    :mod:`slimlm.runtime.shared_prefix` where it applies, else broadcast into the batch's cache; yields each
    batch's size."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    p = kv_len(kv)
    shared = shared_prefix.applies(model, p, max(len(s) for s in suffixes))
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start, stop in _even_batches(len(order), batch_size):
        idx = order[start:stop]
        n = len(idx)
        ids, mask = right_pad([suffixes[i] for i in idx], pad_id, device)
        if shared:
            hidden = shared_prefix.candidates_forward(base, kv, ids, mask)
        else:
            cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
            full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=device), mask], dim=1)
            positions = torch.arange(p, p + ids.shape[1], device=device).unsqueeze(0).expand(n, -1)
            hidden = base(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                          use_cache=True, **cache_kwargs(base, cache)).last_hidden_state
        last = hidden[torch.arange(n, device=device), mask.sum(1) - 1]
        out[idx] = _label_probs(last, w, b).double().cpu().numpy()
        yield n
    return out


def label_probs_packed(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                       label_ids: Sequence[int], *, batch_size: int = 16, pad_id: int = 0,
                       on_scored: OnScored | None = None) -> list[np.ndarray]:
    """Label probabilities for groups ``(prefix, [suffix, ...])``: one packed row per group (prefix once,
    each suffix attending to the prefix and itself), rows batched by length. Returns one [n_g, L] array
    per group, in order."""
    return _drive(iter_label_probs_packed(model, groups, label_ids, batch_size=batch_size, pad_id=pad_id),
                  on_scored)


@torch.inference_mode()
def iter_label_probs_packed(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                            label_ids: Sequence[int], *, batch_size: int = 16,
                            pad_id: int = 0) -> Generator[int, None, list[np.ndarray]]:
    """:func:`label_probs_packed` one batch of rows at a time: yields the candidates scored, returns the list."""
    from slimlm.runtime.packing import PAD_SEGMENT, attention_inputs, pack

    _check_labels(model, label_ids)
    if any(len(s) == 0 for _, sufs in groups for s in sufs):
        raise SlimlmError("every candidate suffix needs at least one token")
    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    rows = [pack(prefix, sufs) for prefix, sufs in groups]
    out = [np.empty((len(sufs), len(label_ids)), dtype=np.float64) for _, sufs in groups]
    order = sorted(range(len(rows)), key=lambda g: len(rows[g][0]))
    for start in range(0, len(order), batch_size):
        idx = [g for g in order[start:start + batch_size] if groups[g][1]]
        if not idx:
            continue
        ids, mask = right_pad([rows[g][0] for g in idx], pad_id, device)
        positions, _ = right_pad([rows[g][1] for g in idx], 0, device)
        segments, _ = right_pad([rows[g][2] for g in idx], PAD_SEGMENT, device)
        hidden = base(input_ids=ids, use_cache=False,
                      **attention_inputs(base, mask, positions, segments)).last_hidden_state
        r, t = [], []  # (row, position) of every candidate's last token
        for i, g in enumerate(idx):
            end = len(groups[g][0])
            for suf in groups[g][1]:
                end += len(suf)
                r.append(i)
                t.append(end - 1)
        probs = _label_probs(hidden[torch.tensor(r, device=device), torch.tensor(t, device=device)], w, b)
        probs = probs.double().cpu().numpy()
        k = 0
        for g in idx:
            out[g][:] = probs[k:k + len(groups[g][1])]
            k += len(groups[g][1])
        yield k
    return out


def score_full(model, prompts: Sequence[Sequence[int]], label_ids: tuple[int, int], *, batch_size: int = 16,
               pad_id: int = 0, on_scored: OnScored | None = None) -> np.ndarray:
    """P(pos) for whole prompts (no reuse), batched by length; the reference for :func:`score`."""
    return label_probs_full(model, prompts, label_ids, batch_size=batch_size, pad_id=pad_id, on_scored=on_scored)[:, 0]


def score_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                        label_ids: tuple[int, int], *, batch_size: int = 16, pad_id: int = 0,
                        on_scored: OnScored | None = None) -> np.ndarray:
    """P(pos) for ``prefix + s`` for every suffix ``s``, running the prefix once."""
    return label_probs_shared_prefix(model, prefix, suffixes, label_ids, batch_size=batch_size, pad_id=pad_id,
                                     on_scored=on_scored)[:, 0]


def score(model, examples: Sequence[TokenizedRanking], label_ids: tuple[int, int], *, batch_size: int = 16,
          pad_id: int = 0, reuse_prefix: bool = True, strategy: str = "auto",
          on_scored: OnScored | None = None) -> np.ndarray:
    """P(pos) for every example, in input order.

    With ``reuse_prefix``, candidates sharing a group and identical prefix ids run their prefix once:
    ``strategy`` "auto" packs groups of up to :data:`PACK_MAX_CANDIDATES` candidates (many groups per
    forward) and broadcasts the prefix KV of larger ones; "packed" / "broadcast" force one way. Without
    it every example runs as a whole prompt.
    """
    if strategy not in ("auto", "packed", "broadcast"):
        raise SlimlmError(f"scoring strategy {strategy!r}: expected auto, packed or broadcast")
    out = np.empty(len(examples), dtype=np.float64)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[(ex.group, ex.prefix_ids)].append(i)
    singles, packed = [], []
    for (_, prefix), idx in groups.items():
        if not reuse_prefix or not prefix or (len(idx) == 1 and strategy != "packed"):
            singles.extend(idx)
        elif strategy == "packed" or (strategy == "auto" and len(idx) <= PACK_MAX_CANDIDATES):
            packed.append((prefix, idx))
        else:
            out[idx] = score_shared_prefix(model, prefix, [examples[i].suffix_ids for i in idx], label_ids,
                                           batch_size=batch_size, pad_id=pad_id, on_scored=on_scored)
    if packed:
        probs = label_probs_packed(model, [(p, [examples[i].suffix_ids for i in idx]) for p, idx in packed],
                                   label_ids, batch_size=batch_size, pad_id=pad_id, on_scored=on_scored)
        for (_, idx), pr in zip(packed, probs, strict=True):
            out[idx] = pr[:, 0]
    if singles:
        out[singles] = score_full(model, [examples[i].input_ids for i in singles], label_ids,
                                  batch_size=batch_size, pad_id=pad_id, on_scored=on_scored)
    return out

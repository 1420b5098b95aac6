"""The one engine that runs models: label-token scoring with shared-prefix reuse.

Scoring (the paper's ranking use): for a prompt ``prefix + suffix`` the score is

    p = softmax([z_pos, z_neg])[0],   z = h_last · W_label^T

where ``h_last`` is the final (normed) hidden state at the last prompt token and ``W_label`` the two
rows of the LM head for the label tokens. The full-vocabulary softmax normaliser cancels, so the LM head
runs only on two rows and only at the scored positions, never over [tokens x vocab].

Candidates that share a prefix (same ``group`` and identical prefix ids) run the prefix once; its KV
cache is copied into each candidate batch and only the suffixes run. Groups of one candidate gain
nothing from that, so they run as whole prompts, sorted by length and batched.

Evaluation, benchmarks and (later) the HTTP server call this module, so there is one scoring path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from slimlm.tasks.ranking import TokenizedRanking

Progress = Callable[[int], None]  # called with the number of candidates just finished


def _label_head(model, label_ids: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    idx = torch.tensor(label_ids, device=head.weight.device)
    w = head.weight.index_select(0, idx).float()
    b = head.bias.index_select(0, idx).float() if getattr(head, "bias", None) is not None else None
    return w, b


def _p_pos(hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """P(pos) over the label pair from final hidden states [B, H]."""
    z = hidden.float() @ w.T
    if b is not None:
        z = z + b
    return torch.softmax(z, dim=-1)[:, 0]


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids padded on the right with ``pad_id``, and the matching 0/1 attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def score_full(model, prompts: Sequence[Sequence[int]], label_ids: tuple[int, int], *, batch_size: int = 16,
               pad_id: int = 0, progress: Progress | None = None) -> np.ndarray:
    """P(pos) for whole prompts (no reuse), batched by length; the reference for :func:`score`."""
    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = np.empty(len(prompts), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = right_pad([prompts[i] for i in idx], pad_id, device)
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(idx), device=device), mask.sum(1) - 1]
        out[idx] = _p_pos(last, w, b).double().cpu().numpy()
        if progress:
            progress(len(idx))
    return out


@torch.inference_mode()
def score_shared_prefix(model, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                        label_ids: tuple[int, int], *, batch_size: int = 16, pad_id: int = 0,
                        progress: Progress | None = None) -> np.ndarray:
    """P(pos) for ``prefix + s`` for every suffix ``s``, running the prefix once."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    w, b = _label_head(model, label_ids)
    base = model.get_decoder()
    p = len(prefix)
    pre = base(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in pre.past_key_values.layers]
    out = np.empty(len(suffixes), dtype=np.float64)
    for start in range(0, len(suffixes), batch_size):
        chunk = suffixes[start:start + batch_size]
        n = len(chunk)
        ids, mask = right_pad(chunk, pad_id, device)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
        full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=device), mask], dim=1)
        positions = torch.arange(p, p + ids.shape[1], device=device).unsqueeze(0).expand(n, -1)
        hidden = base(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                      past_key_values=cache, use_cache=True).last_hidden_state
        last = hidden[torch.arange(n, device=device), mask.sum(1) - 1]
        out[start:start + n] = _p_pos(last, w, b).double().cpu().numpy()
        if progress:
            progress(n)
    return out


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
        if reuse_prefix and len(idx) > 1:
            out[idx] = score_shared_prefix(model, prefix, [examples[i].suffix_ids for i in idx], label_ids,
                                           batch_size=batch_size, pad_id=pad_id, progress=progress)
        else:
            singles.extend(idx)
    if singles:
        out[singles] = score_full(model, [examples[i].input_ids for i in singles], label_ids,
                                  batch_size=batch_size, pad_id=pad_id, progress=progress)
    return out


# --------------------------------------------------------------------------- generation


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


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens (batched, left-padded, KV cache).

    Returns the new tokens per prompt, each ending at (and including) ``eos_id`` if it was produced.
    The model's LM head runs only at the last position of each step.
    """
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(n, dtype=torch.bool, device=device)
    new: list[list[int]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator).masked_fill(done, pad_id)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                new[i].append(t)
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = next_pos + 1
    return new

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


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
        ids, mask = _right_pad([prompts[i] for i in idx], pad_id, device)
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
        ids, mask = _right_pad(chunk, pad_id, device)
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

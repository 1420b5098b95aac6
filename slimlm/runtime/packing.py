"""Multi-item packing: one shared prefix and several candidates in one sequence, each candidate attending to
the prefix and to itself only, so the prefix is computed once for all of them.

One packed row of T tokens holds the prefix (P tokens, segment 0), then candidate j = 1..k (L_j tokens,
segment j). Position ids restart after the prefix for every candidate, so candidate j's tokens sit at
P, ..., P + L_j − 1 exactly as in the sequence ``prefix + candidate_j`` alone. Query q may attend key t iff

    t ≤ q  and  t is not padding  and  (seg[t] = 0  or  seg[t] = seg[q])

which for an unpacked row (all segments 0) is the ordinary causal mask. With these positions and this mask
every candidate token's hidden state equals the one it has in its own unpacked sequence (up to float
summation order), so losses, gradients and scores match the one-candidate-per-sequence computation.

Cost of a row against k separate sequences: P + Σ L_j tokens through every matmul instead of k·P + Σ L_j;
attention is computed over the whole (P + Σ L_j)² block and masked, which at ranking shapes (P ~ 200,
L ~ 45) is a small part of the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from slimlm.models import attention_layout

PAD_SEGMENT = -1


def pack(prefix: Sequence[int], candidates: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """(input ids, position ids, segment ids) of ``prefix`` followed by every candidate (segments 1..k)."""
    ids, pos, seg = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    for j, cand in enumerate(candidates, 1):
        ids += list(cand)
        pos += range(len(prefix), len(prefix) + len(cand))
        seg += [j] * len(cand)
    return ids, pos, seg


def block_mask(segments: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask [B, 1, T, T] (True = may attend) for segment ids [B, T] and a padding
    mask [B, T] (1 = real token). A padding query attends to key 0 only, so no row is empty (an all-masked
    softmax row is NaN); its outputs are never read."""
    T = segments.shape[1]
    real = pad_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal[None] & real[:, None, :] & real[:, :, None] & ((seg_k == 0) | (seg_k == seg_q))
    allowed[:, :, 0] |= ~real  # padding queries: key 0
    return allowed[:, None]


def attention_inputs(model: torch.nn.Module, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                     segments: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` / ``model.get_decoder()(...)``: the plain 2-D padding mask when
    nothing is packed, else the block mask in the form the model's attention takes (boolean for SDPA and
    flex-style kernels; additive 0 / −inf-like floats in the model's dtype for eager attention) and the
    position ids."""
    if segments is None:
        return {"attention_mask": attention_mask, **({"position_ids": position_ids} if position_ids is not None else {})}
    return {"attention_mask": layer_masks(model, block_mask(segments, attention_mask), position_ids, position_ids),
            "position_ids": position_ids}


def layer_masks(model: torch.nn.Module, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """A boolean mask [B, 1, Q, K] in the form :func:`model_mask` gives, for every kind of layer the model
    has: where layers attend through a sliding window (Mistral, some Qwen2/Qwen3 configurations), they also
    drop keys ``window`` or more positions before the query (by the position ids ``q_pos`` [B, Q] and
    ``k_pos`` [B, K], so restarted positions count as in the unpacked sequence), as transformers' own masks
    do. One kind of layer: that mask; both: ``{"full_attention": ..., "sliding_attention": ...}``, the form
    the model's forward takes per layer type."""
    types, window = attention_layout(model.config)
    if window is None:
        return model_mask(model, allowed)
    near = (q_pos[:, :, None] - k_pos[:, None, :] < window)[:, None]
    masks = {"full_attention": allowed, "sliding_attention": allowed & near}
    kinds = sorted(set(types))
    return model_mask(model, masks[kinds[0]]) if len(kinds) == 1 else {k: model_mask(model, masks[k]) for k in kinds}


def model_mask(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask [B, 1, Q, K] (True = may attend) in the form the model's attention takes: boolean for
    SDPA and flex-style kernels, additive 0 / −inf-like floats in the model's dtype for eager attention."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def after_prefix_mask(prefix_len: int, segments: torch.Tensor) -> torch.Tensor:
    """The boolean mask [1, 1, S, P + S] of one packed row of candidates (segment ids [S], 1..k) that follows
    ``prefix_len`` = P cached prefix positions: every query sees the whole prefix, then the earlier tokens of
    its own candidate."""
    S = segments.shape[0]
    own = torch.ones(S, S, dtype=torch.bool, device=segments.device).tril() & (segments[:, None] == segments[None, :])
    return torch.cat([torch.ones(S, prefix_len, dtype=torch.bool, device=segments.device), own], dim=1)[None, None]

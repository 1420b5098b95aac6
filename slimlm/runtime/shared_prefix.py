"""Candidates attending to one shared prefix KV, without a copy of the prefix per candidate.

Scoring a request of N candidates after one prefix (:mod:`slimlm.runtime.scoring`, the "broadcast" way)
runs the prefix once, then batches of candidates on its KV [1, H_kv, P, D] per layer. Expanded to a batch of
n candidates and handed to transformers' attention, that KV is copied twice per layer and batch: the
cache's concatenation with the candidates' own keys writes n copies, and SDPA with a mask repeats the KV
heads for grouped-query attention (n x queries-per-KV-head copies). On the SmolLM2-135M teacher at 100
candidates x 16 tokens after a 192-token prefix, those copies took ~60% of the forward's CPU time (torch
profiler: ``copy_`` + ``cat`` 4.4 of 7.2 s; ``mm`` 2.1 s).

Here each layer's attention of a candidate batch splits the keys in two, with one softmax over both:

- **the prefix**: every candidate's queries — and every query head that shares a KV head — stacked into one
  [n·r·S, D] matrix per KV head and multiplied by the prefix's keys [P, D]: one product that reads the prefix
  once, whatever n is; the same for the values;
- **the candidate itself**: its own S keys (causal, padding masked), [n, H_kv, r·S, S].

The logits are those of ordinary attention over ``prefix + candidate`` (exact up to float rounding: tests
compare with the broadcast and with one sequence per candidate), computed in float32.

:func:`applies` says where it is used: CPU models with SDPA attention (on CUDA the broadcast stays until
measured there) whose sliding windows, if any, cannot cut into the prefix. It reaches the layers through
transformers' own forward: the "sdpa" attention entry is wrapped once (:func:`_install`) to take this path
when a call carries the prefix's KV, and torch's SDPA otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from slimlm.models import attention_layout
from slimlm.runtime.prefix_cache import KV

DEVICES = ("cpu",)  # where it replaces the broadcast (measured: BENCHMARKS.md, "Multi-item ranking")


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: KV | None = None, **_: object) -> tuple[torch.Tensor, None]:
    """The attention function (transformers' interface): ``query`` [n, H, S, D], ``key`` / ``value``
    [n, H_kv, S, D] of the candidates, ``attention_mask`` [n, 1, S, S] boolean (True: may attend) over the
    candidates' own keys, ``shared_prefix`` the prefix's KV [1, H_kv, P, D] per layer. Returns [n, S, H, D]."""
    if shared_prefix is None:
        raise RuntimeError("shared-prefix attention called without the prefix's KV")
    pk, pv = shared_prefix[module.layer_idx]
    n, heads, s, d = query.shape
    kv_heads, p = key.shape[1], pk.shape[2]
    r = heads // kv_heads
    scaling = d**-0.5 if scaling is None else scaling
    # [H_kv, n, r·S, D]: query head h reads KV head h // r, so a KV head's r heads stack along the queries
    q = query.reshape(n, kv_heads, r * s, d).transpose(0, 1).contiguous()
    over_prefix = torch.matmul(q.view(1, kv_heads, n * r * s, d), pk.transpose(-1, -2))  # the prefix read once
    over_prefix = over_prefix.view(kv_heads, n, r * s, p).float().mul_(scaling)
    own_k, own_v = key.transpose(0, 1), value.transpose(0, 1)  # [H_kv, n, S, D]
    over_self = torch.matmul(q, own_k.transpose(-1, -2)).float().mul_(scaling)
    over_self.masked_fill_(~attention_mask.transpose(0, 1).repeat(1, 1, r, 1), float("-inf"))
    # one softmax over both key sets, without joining them: a shared max, exponentials in place, one sum
    top = torch.maximum(over_prefix.amax(-1, keepdim=True), over_self.amax(-1, keepdim=True))
    e_prefix, e_self = over_prefix.sub_(top).exp_(), over_self.sub_(top).exp_()
    total = e_prefix.sum(-1, keepdim=True) + e_self.sum(-1, keepdim=True)
    out = torch.matmul(e_prefix.to(value.dtype).view(1, kv_heads, n * r * s, p), pv).view(kv_heads, n, r * s, d)
    out = out + torch.matmul(e_self.to(value.dtype), own_v)
    out = (out.float() / total).to(value.dtype)  # [H_kv, n, r·S, D]
    return out.view(kv_heads, n, r, s, d).permute(1, 3, 0, 2, 4).reshape(n, s, heads, d), None


def _install() -> None:
    """Route transformers' "sdpa" attention here for calls that carry ``shared_prefix`` (only
    :func:`candidates_forward` passes it; every other call reaches torch's SDPA exactly as before). A wrapper of
    the registered entry rather than a new implementation name: no model's config changes, so threads that
    share a model (the prefix cache computes a prefix once for all of them) each get the attention they ask for."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "shared_prefix", False):
        return

    def sdpa_or_shared_prefix(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get("shared_prefix") is not None:
            return shared_prefix_attention(module, query, key, value, attention_mask, **kwargs)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    sdpa_or_shared_prefix.shared_prefix = True
    AttentionInterface.register("sdpa", sdpa_or_shared_prefix)


_install()


def applies(model: torch.nn.Module, prefix_len: int, longest: int) -> bool:
    """Whether candidates of up to ``longest`` tokens after a ``prefix_len``-token prefix run here: a model on
    one of :data:`DEVICES`, with SDPA attention (transformers' default), whose sliding-window layers, if any, see
    the whole prefix from every candidate token (else the broadcast, which masks the window)."""
    if next(model.parameters()).device.type not in DEVICES or model.config._attn_implementation != "sdpa":
        return False
    _, window = attention_layout(model.config)
    return window is None or prefix_len + longest <= window


@contextlib.contextmanager
def only_on(*devices: str) -> Iterator[None]:
    """Within the block, the shared-prefix path runs on ``devices`` only (none: scoring expands the prefix KV
    into each batch, the broadcast as before and as on CUDA): for benchmarks that compare the two ways."""
    global DEVICES
    saved, DEVICES = DEVICES, tuple(devices)
    try:
        yield
    finally:
        DEVICES = saved


def candidates_forward(base: torch.nn.Module, kv: KV, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [n, S, H] of a right-padded batch of candidates ``ids`` [n, S] (``mask`` [n, S]: 1 =
    token) after the prefix whose KV is ``kv``, by :func:`shared_prefix_attention` in every layer; ``kv`` is
    only read. ``base`` is the decoder (``model.get_decoder()``)."""
    n, s = ids.shape
    p = kv[0][0].shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]  # a padded query still sees the prefix: no NaN
    positions = torch.arange(p, p + s, device=ids.device).unsqueeze(0).expand(n, -1)
    return base(input_ids=ids, attention_mask=allowed, position_ids=positions, use_cache=False,
                shared_prefix=kv).last_hidden_state  # the keyword reaches every layer's attention call

"""The decode batch's KV cache: preallocated per-layer buffers that each decode step writes in place.

Layout. Layer l holds ``keys[l]``, ``values[l]`` of shape [B_cap, H_kv, T_cap, D]. Running row r lives in
slot r (rows are dense: slots 0..n-1), and its token at position p sits in column p — rows are
left-aligned, so a column *is* a position id and no row carries padding. The attention mask of a decode
step follows from the rows' positions alone:

    allowed[r, c] = c <= pos[r]                                  (full attention)
                    and c > pos[r] - window                      (sliding-window layers)

so there is no mask tensor to grow per step: :meth:`SlotCache.decode_mask` compares a preallocated column
index with the positions.

A decode forward of m rows (the running ones; for a static-shape compiled step, their count rounded up to a
power of two) is set up by :meth:`SlotCache.bind`: the positions [m] its new tokens take and the number of
columns attention reads. transformers then calls :meth:`SlotCache.update` once per layer with the new keys/values
[m, H_kv, 1, D]; it writes them at (slot r, column pos[r]) with one ``index_copy_`` and returns views of
the first m slots and ``width`` columns (no copy).

Growth is geometric and happens between steps, never inside one: :meth:`SlotCache.reserve` reallocates
when more slots or columns are needed (at least doubling, up to a caller's upper bound), copying only the
live part. Rows leave by :meth:`SlotCache.move` (the batch fills a hole with one of the last rows: one
row's KV copied, not the whole cache re-gathered); rows join by :meth:`SlotCache.put` (a prompt's KV,
the prefix-cache format [1, H_kv, n, D] per layer, copied into its slot's first n columns).

This is a subclass of transformers' public ``Cache`` (its ``update`` is the API every model family's
attention calls); it owns its tensors and touches no transformers internals.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from slimlm import SlimlmError
from slimlm.runtime.prefix_cache import KV


def _grow(current: int, needed: int, cap: int | None, *, headroom: bool = False, pow2: bool = False) -> int:
    """New size for a buffer dimension of ``current`` that must hold ``needed``: at least double; with
    ``pow2``, a power of two (few distinct shapes: what a compiled step is specialised on); else with
    ``headroom`` at least twice ``needed`` (room to decode into). Never beyond ``cap`` (the most that will
    ever be needed), never below ``needed``."""
    size = max(needed, 2 * current)
    if pow2:
        size = 1 << (size - 1).bit_length()
    elif headroom:
        size = max(size, 2 * needed)
    if cap is not None:
        size = min(size, max(cap, needed))
    return size


class SlotCache(Cache):
    """Per-layer KV buffers [B_cap, H_kv, T_cap, D], written in place; see the module docstring.

    ``layer_types``: per layer "full_attention" or "sliding_attention" (``window`` columns) — what the
    mask of :meth:`decode_mask` follows. ``attn_impl``: the model's attention implementation; eager
    attention takes an additive float mask, SDPA a boolean one. ``pow2``: buffer sizes are powers of two
    (up to the callers' bounds), so that a compiled step sees few distinct shapes. ``static``: the buffers (and
    the views :meth:`bind` makes) are marked as fixed-address inputs, so a compiled step that writes them can be
    replayed as a CUDA graph.
    """

    def __init__(self, n_layers: int, *, layer_types: list[str] | None = None, window: int | None = None,
                 attn_impl: str = "sdpa", pow2: bool = False, static: bool = False):
        super().__init__(layers=[])  # we hold the tensors ourselves; transformers only calls update()
        self.n_layers = n_layers
        self.layer_types = list(layer_types or ["full_attention"] * n_layers)
        self._all_full = all(t == "full_attention" for t in self.layer_types)  # no layer slides
        if len(self.layer_types) != n_layers:
            raise SlimlmError(f"{len(self.layer_types)} layer types for {n_layers} layers")
        if "sliding_attention" in self.layer_types and not window:
            raise SlimlmError("sliding-window layers need a window size")
        self.window = window
        self.attn_impl = attn_impl
        self.pow2 = pow2
        self.static = static  # buffers marked as fixed-address inputs of a compiled step (CUDA graphs)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None  # the KV's, from the first prompt that joins
        self.columns: torch.Tensor | None = None  # 0..T_cap-1
        self._slot_heads: torch.Tensor | None = None  # [B_cap, H_kv]: row r of head h = r * H_kv + h
        self._index: torch.Tensor | None = None  # this forward's writes: rows of keys[l].view(-1, D)
        self._bound: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # bind(views=True)'s views
        self._width = 0
        self._full = False  # bind(full=True): this forward needs no mask

    # ------------------------------------------------------------------ sizes

    @property
    def batch_capacity(self) -> int:
        """Slots: B_cap."""
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        """Columns (positions) each slot holds: T_cap."""
        return self.keys[0].shape[2] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, rows: int, cols: int, *, live: int, like: KV | None = None, max_rows: int | None = None,
                max_cols: int | None = None) -> bool:
        """Make room for ``rows`` slots of ``cols`` columns, keeping the first ``live`` slots' contents.

        Grows each dimension geometrically (at least doubling), bounded by ``max_rows`` / ``max_cols`` (the
        most the caller will ever need). The first call takes the KV's heads, head size, dtype and device
        from ``like`` (a prompt's KV). Returns whether it (re)allocated."""
        b, t = self.batch_capacity, self.capacity
        if rows <= b and cols <= t:
            return False
        if not self.keys and like is None:
            raise SlimlmError("the first reservation needs a KV to take its shape from")
        k, v = (self.keys[0], self.values[0]) if self.keys else like[0]
        self.dtype = k.dtype
        h, dk, dv, device = k.shape[1], k.shape[3], v.shape[3], k.device
        nb = b if rows <= b else _grow(b, rows, max_rows, pow2=self.pow2)
        nt = t if cols <= t else _grow(t, cols, max_cols, headroom=True, pow2=self.pow2)
        old_k, old_v = self.keys, self.values
        self.keys = [torch.zeros((nb, h, nt, dk), dtype=self.dtype, device=device) for _ in range(self.n_layers)]
        self.values = [torch.zeros((nb, h, nt, dv), dtype=self.dtype, device=device) for _ in range(self.n_layers)]
        if old_k and live:
            for new, old in zip(self.keys + self.values, old_k + old_v, strict=True):
                new[:live, :, :t].copy_(old[:live])
        self.columns = torch.arange(nt, device=device)
        self._slot_heads = torch.arange(nb * h, device=device).view(nb, h)
        self._mark_static(self.keys + self.values)
        return True

    # ------------------------------------------------------------------ rows joining and leaving

    def put(self, slot: int, kv: KV) -> None:
        """Copy a prompt's KV (per layer [1, H_kv, n, D]) into ``slot``'s columns 0..n-1 (reserve first)."""
        if len(kv) != self.n_layers:
            raise SlimlmError(f"KV of {len(kv)} layers for a cache of {self.n_layers}")
        n = kv[0][0].shape[2]
        if slot >= self.batch_capacity or n > self.capacity:
            raise SlimlmError(f"a KV of {n} columns in slot {slot} does not fit the cache "
                              f"({self.batch_capacity} x {self.capacity})")
        for layer, (k, v) in enumerate(kv):
            self.keys[layer][slot, :, :n].copy_(k[0])
            self.values[layer][slot, :, :n].copy_(v[0])

    def move(self, src: int, dst: int, cols: int) -> None:
        """Copy slot ``src``'s first ``cols`` columns to slot ``dst`` (a row filling a hole)."""
        for t in self.keys + self.values:
            t[dst, :, :cols].copy_(t[src, :, :cols])

    # ------------------------------------------------------------------ the decode forward

    def bind(self, positions: torch.Tensor, width: int, *, views: bool = False, full: bool = False) -> None:
        """Set up the next forward: its m new tokens go to columns ``positions`` [m] of slots 0..m-1, and
        attention reads columns 0..width-1. ``full``: every row's new token is at column width-1 (batch 1, or
        rows of one length), so each row attends to all the columns read and :meth:`decode_mask` gives no mask.

        The writes are one ``index_copy_`` per layer into the buffer viewed as rows of D: (slot r, head h,
        column p) is row (r * H_kv + h) * T_cap + p; the index [m * H_kv] is computed here once per step.
        ``views``: the forward reads and writes views of the first m slots made here (a compiled step: its
        graph then depends on m and T_cap, not on how many slots the buffers have grown to)."""
        m = positions.shape[0]
        if width > self.capacity or m > self.batch_capacity:
            raise SlimlmError(f"decode forward of {m} rows x {width} columns does not fit the "
                              f"cache ({self.batch_capacity} x {self.capacity})")
        self._index = (self._slot_heads[:m] * self.capacity + positions[:, None]).reshape(-1)
        self._width = width
        self._full = full
        self._bound = ([k[:m] for k in self.keys], [v[:m] for v in self.values]) if views else None
        if views:  # the views a CUDA graph writes: the same addresses every step
            self._mark_static(self._bound[0] + self._bound[1])

    def _mark_static(self, tensors: list[torch.Tensor]) -> None:
        """With ``static``: mark ``tensors`` as fixed-address inputs of a compiled step (see the class docstring)."""
        if self.static:
            from torch._dynamo import mark_static_address

            for t in tensors:
                mark_static_address(t)

    def decode_mask(self, positions: torch.Tensor, width: int):
        """The attention mask of a one-token decode forward, in the form the model takes: [m, 1, 1, width]
        (boolean, True = may attend; additive 0 / dtype-min floats for eager attention), or, when full and
        sliding-window layers mix, a dict {layer type: mask}.

        None when :meth:`bind` was told every row attends to every column read and no layer slides: as
        ``generate`` does for an unpadded batch, so SDPA may take its flash kernel (any mask rules it out on
        CUDA) and nothing is built per step."""
        if self._full and self._all_full:
            return None
        cols = self.columns[:width][None, :]
        pos = positions[:, None]
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            allowed = cols <= pos
            if kind == "sliding_attention":
                allowed = allowed & (cols > pos - self.window)
            allowed = allowed[:, None, None, :]
            if self.attn_impl == "eager":
                allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
                    ~allowed, torch.finfo(self.dtype).min)
            masks[kind] = allowed
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's keys/values [m, H_kv, 1, D] at (slot r, column positions[r]); return the
        first m slots' first ``width`` columns (views)."""
        m = key_states.shape[0]
        if key_states.shape[2] != 1:
            raise SlimlmError("SlotCache takes one new token per row (decode); prompts go through prefill")
        k, v = (self.keys[layer_idx], self.values[layer_idx]) if self._bound is None else (
            self._bound[0][layer_idx], self._bound[1][layer_idx])
        k.view(-1, k.shape[-1]).index_copy_(0, self._index, key_states.reshape(-1, k.shape[-1]))
        v.view(-1, v.shape[-1]).index_copy_(0, self._index, value_states.reshape(-1, v.shape[-1]))
        return k[:m, :, :self._width], v[:m, :, :self._width]

    # What transformers may ask a cache besides update(): sizes for its own mask creation (we pass a prepared
    # mask, so these only describe the buffers), and the layer kinds it uses to pick the mask it builds.

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._width, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        # transformers reads this only in generate (not used with this cache) and in its mask creation, which a
        # decode forward reaches only without a mask of ours (bind(full=True)): False lets it keep "no mask" for
        # SDPA at one query token, as with its own dynamic cache (True would make it build an all-True mask)
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.n_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.n_layers

"""The decode step with fused projections: one matrix-vector product for q/k/v, one for gate/up.

A batch-1 decode step reads every weight once, so on a CPU its speed is that of the matrix-vector products
(GEMVs) and of the Python around them. transformers' forward runs 7 GEMVs a layer (q, k, v, o, gate, up,
down) through ``F.linear``, which on a CPU is one thread's bandwidth (``benchmarks/decode.py``). This step
runs the same maths over the same modules' weights with

- q/k/v concatenated into one weight and gate/up into another: 4 GEMVs a layer instead of 7;
- on a CPU in float32 (or bfloat16 where the CPU has bf16 dot products: half the bytes a step, for a model
  served with ``--dtype bfloat16``), every weight (LM head included) reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and run by ``mkldnn._linear_pointwise``, which uses every
  thread; elsewhere the fused weights run through ``F.linear``;
- the layer loop written out: RMSNorms, rotary embeddings (the model's own ``rotary_emb`` module, so any
  rope scaling is the model's), Qwen3's q/k norms, SDPA over the :class:`~slimlm.runtime.kv_cache.SlotCache`
  with its decode mask, the MLP activation (the model's ``act_fn``).

It covers the decoder families slimlm supports (Llama, Qwen2, Qwen3, Mistral: :data:`slimlm.models.FAMILIES`);
:func:`fused_step_for` returns ``None`` for anything else, and the decode loop then runs transformers'
forward. Greedy tokens equal the unfused step's (tested for every family; float summation order differs).

INT8 W8A8 layers (:class:`slimlm.quantize.linear.Int8Linear`) are fused too: q/k/v's int8 codes concatenated
(and gate/up's), each token's activations quantized per token once a group (as the unfused modules share
them), the exact integer sums scaled by both scales: the same W8A8 arithmetic. Where ``torch._int_mm`` is fast
(int8 dot-product instructions, VNNI / AMX: :func:`slimlm.quantize.linear.int_mm_is_fast`) the products are
``_int_mm`` over the int8 codes, a quarter of float32's bytes a step; elsewhere the codes are held as float32
values in oneDNN's layout (the integer sums are exact in float32 below 2^24), which beats the int8 modules'
own path there (it converts the weights to float32 on every call). FP8 and INT4 layers keep transformers'
forward.

Compiled (``DecodeBatch(compile=True)``), the step's layers (:meth:`FusedStep.hidden`) run through
``torch.compile`` with the fused weights in the ordinary layout (``packed=False``: the oneDNN-layout tensors
cannot be traced), so inductor fuses the elementwise work between the products: what a small model's step is
made of (on a 2-core CPU the 20x INT8 student decoded ~1.4x faster compiled; a 135M fp32 model, bound by
reading its weights, no faster). The LM head runs after the graph, eagerly, in oneDNN's layout.

The fused weights are a copy (about the size of the model's linear weights: the price of the speed). They
are built once per model and rebuilt when a weight changes in place (an optimizer step: on-policy sampling
decodes with the student being trained), judged by the weights' version counters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slimlm.runtime.kv_cache import SlotCache

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def _mkldnn(w: torch.Tensor) -> bool:
    """Whether ``w`` runs in oneDNN's layout: on a CPU, float32, or bfloat16 where the CPU has bf16 dot products
    (:func:`slimlm.placement.fast_bf16`; emulated bf16 would be slower than transformers' own forward)."""
    from slimlm.placement import fast_bf16

    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and fast_bf16("cpu"))


class FusedLinear:
    """``y = x Wᵀ + b`` for the row-wise concatenation of several linears' weights (and biases; a missing
    bias is zeros when another has one). On a CPU in float32 the weight is held in oneDNN's layout only,
    unless ``packed`` is False (a step to be compiled)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], packed: bool = True):
        w = weights[0].detach() if len(weights) == 1 else torch.cat([x.detach() for x in weights])
        self.sizes = [x.shape[0] for x in weights]
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else w.new_zeros(n)
                                   for b, n in zip(biases, self.sizes, strict=True)])
        else:
            self.bias = None
        if packed and _mkldnn(w):
            self.weight, self.packed = None, torch.ops.mkldnn._reorder_linear_weight(w, 1)
        else:
            self.weight, self.packed = w, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class FusedInt8Linear:
    """W8A8 over concatenated :class:`~slimlm.quantize.linear.Int8Linear` layers: per-token int8 activations,
    the integer products, then ``· s_x · s_w + b``. ``int_mm``: the products by ``torch._int_mm`` over the int8
    codes [N, K]; else summed by :class:`FusedLinear` over the codes held as float32 (exact while a sum stays
    below 2^24, as in ``linear.int8_matmul``'s float path)."""

    def __init__(self, mods, packed: bool = True, int_mm: bool = False):
        self.int_mm = torch.cat([m.qweight for m in mods]).contiguous() if int_mm else None
        self.codes = None if int_mm else FusedLinear([m.qweight.float() for m in mods], [None] * len(mods), packed)
        self.scale = torch.cat([m.weight_scale.reshape(-1) for m in mods])
        biases = [m.bias for m in mods]
        self.bias = (torch.cat([b.detach().float() if b is not None else self.scale.new_zeros(m.out_features)
                                for b, m in zip(biases, mods, strict=True)])
                     if any(b is not None for b in biases) else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from slimlm.quantize.schemes import INT8_QMAX, symmetric_scale

        x = x.float()
        s = symmetric_scale(x, INT8_QMAX)
        # quantize_int8_per_token's codes; for the float path kept as the float32 integers they are (no int8
        # round trip): float32 sums of integer products are integers (exact below 2^24, where every float32 is
        # one above), so no rounding after the product
        codes = torch.div(x, s).round_()
        if self.int_mm is not None:
            y = torch._int_mm(codes.to(torch.int8), self.int_mm.t()).float()
        else:
            y = self.codes(codes)
        y = y.mul_(s).mul_(self.scale)
        return y if self.bias is None else y.add_(self.bias)


def _linear(mods, packed: bool) -> FusedLinear | FusedInt8Linear:
    from slimlm.quantize.linear import Int8Linear, int_mm_is_fast

    if all(isinstance(m, Int8Linear) for m in mods):
        return FusedInt8Linear(mods, packed, int_mm=int_mm_is_fast())
    return FusedLinear([m.weight for m in mods], [getattr(m, "bias", None) for m in mods], packed)


# the fused products of a decoder layer: name -> (submodule, the linears concatenated into one weight)
GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


def _group(layer, name: str) -> list:
    part, names = GROUPS[name]
    return [getattr(getattr(layer, part), n, None) for n in names]


class _Layer:
    def __init__(self, layer, packed: bool):
        a, m = layer.self_attn, layer.mlp
        self.attn, self.mlp = a, m
        self.qkv, self.o, self.gate_up, self.down = (_linear(_group(layer, g), packed) for g in GROUPS)
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _attention(q, keys, values, mask, scale: float, gqa: bool) -> torch.Tensor:
    """SDPA of one new token per row. bf16 on a CPU runs in float32: torch's CPU flash kernel takes ~5x longer
    in bf16 than in float32 for a one-token query (1.76 ms vs 0.28 ms at 8 rows x 330 columns, an AVX512_BF16
    CPU), far more than the casts (0.34 ms with them)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        o = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
        return o.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)


class FusedStep:
    """One decode step of m rows over a :class:`SlotCache`: ``step(ids [m], positions [m], cache, width)``
    -> next-token logits [m, V] (float32), as ``decoding._decode_forward`` computes them. ``packed``: the
    float32 weights in oneDNN's layout on a CPU (eager); False for a step to be compiled."""

    def __init__(self, model, packed: bool = True):
        self.model, self.packed = model, packed
        self.decoder = model.get_decoder()
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [_Layer(layer, packed) for layer in self.decoder.layers]
        # the LM head always in the fast layout: a compiled step runs it eagerly after the graph (``logits``),
        # where oneDNN's layout uses both threads (a compiled F.linear of a 49k-row head: ~2x slower here)
        self.head = _linear([model.get_output_embeddings()], True)
        self.version = weight_version(model)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache, width: int) -> torch.Tensor:
        return self.logits(self.hidden(ids, positions, cache, width))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [m, V] (float32) from :meth:`hidden`'s [m, H]."""
        return self.head(hidden).float()

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache, width: int) -> torch.Tensor:
        """The decoder's final-normed hidden states [m, H] after the step (the part a compiled step compiles)."""
        m, d = ids.shape[0], self.head_dim
        h = self.decoder.embed_tokens(ids)  # [m, H]
        cos, sin = self.decoder.rotary_emb(h[:, None], positions[:, None])  # [m, 1, D]
        cos, sin = cos[:, None], sin[:, None]  # [m, 1 (heads), 1 (token), D]
        masks = cache.decode_mask(positions, width)
        nq, nkv = self.heads * d, self.kv_heads * d
        for i, lay in enumerate(self.layers):
            x = lay.norm1(h)
            q, k, v = lay.qkv(x).split((nq, nkv, nkv), dim=-1)
            q, k, v = q.view(m, self.heads, 1, d), k.view(m, self.kv_heads, 1, d), v.view(m, self.kv_heads, 1, d)
            if lay.q_norm is not None:
                q, k = lay.q_norm(q), lay.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v, i)
            mask = masks if not isinstance(masks, dict) else masks[cache.layer_types[i]]
            o = _attention(q, keys, values, mask, lay.attn.scaling, self.heads != self.kv_heads)
            h = h + lay.o(o.reshape(m, nq))
            gate, up = lay.gate_up(lay.norm2(h)).chunk(2, dim=-1)
            h = h + lay.down(lay.mlp.act_fn(gate) * up)
        return self.decoder.norm(h)


def weight_version(model) -> tuple:
    """Identity and in-place version of every parameter (and int8 weight buffer): changes when any weight is
    replaced or updated."""
    out = []
    for p in [*model.parameters(), *_int8_codes(model)]:
        try:
            out.append((p.data_ptr(), p._version))
        except RuntimeError:  # an inference tensor has no version counter; it cannot be updated in place either
            out.append((p.data_ptr(), 0))
    return tuple(out)


def _int8_codes(model) -> list[torch.Tensor]:
    from slimlm.quantize.linear import Int8Linear

    return [m.qweight for m in model.modules() if isinstance(m, Int8Linear)]


def _room_for_copy(model) -> bool:
    """Whether a copy of the model's weights fits in half the memory available now (else the fused step
    is skipped: its speed is not worth swapping or an out-of-memory kill)."""
    from slimlm.quantize.linear import int_mm_is_fast

    need = sum(p.numel() * p.element_size() for p in model.parameters())
    need += sum(b.numel() * (1 if int_mm_is_fast() else 4) for b in _int8_codes(model))  # int8, or float32 codes
    try:  # Linux: MemAvailable (free + reclaimable cache)
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # neither: assume room
            return True
    return need <= free // 2


def fused_step_for(model, packed: bool = True) -> FusedStep | None:
    """The model's :class:`FusedStep` (built on first use, rebuilt after its weights change or to change
    ``packed``; one copy of the weights is kept per model), or None when
    the model is not of a supported family with plain linear layers, not on a CPU in float32 or fast bfloat16
    (where the fused step was measured), or when a copy of its weights would not fit in half the free memory."""
    if getattr(model.config, "model_type", None) not in SUPPORTED:
        return None
    from slimlm.quantize.linear import Int8Linear

    for layer in model.get_decoder().layers:  # other quantized layers (slimlm's runtime modules) keep their path
        for group in GROUPS:  # each fused group: all float linears, or all int8
            kinds = {type(m) for m in _group(layer, group)}
            if kinds not in ({torch.nn.Linear}, {Int8Linear}):
                return None
    head = model.get_output_embeddings()
    head_weight = head.weight_scale if isinstance(head, Int8Linear) else getattr(head, "weight", None)
    if head_weight is not None and head_weight.dtype != torch.float32 and any(
            isinstance(m, Int8Linear) for m in model.modules()):
        return None  # INT8 layers compute in float32: fused only with the float32 tensors slimlm loads them with
    if head_weight is None or not _mkldnn(head_weight) or getattr(model.config, "_attn_implementation", "sdpa") not in (
            "sdpa", "eager"):
        return None
    step = getattr(model, "_slimlm_fused_step", None)
    if step is None and not _room_for_copy(model):
        return None
    if step is None or step.version != weight_version(model) or step.packed != packed:
        model._slimlm_fused_step = step = None  # drop the old copy before building the new one
        model._slimlm_fused_step = step = FusedStep(model, packed)
    return step

"""Apply a kept-set to a Hugging Face model: the result is a genuinely smaller model and config.

Layers: :func:`keep_layers` builds a model with ``num_hidden_layers = len(keep)`` whose decoder layer i
is a copy of layer ``keep[i]`` of the source (everything else copied unchanged). Used to initialise a
student from its teacher, and by depth pruning.

Width: :func:`slice_width` keeps, in every decoder layer, a set of MLP neurons (rows of gate/up, columns
of down) and a set of attention heads (query heads: rows of q and columns of o; KV heads: rows of k and
v), with optional replacement weights for ``down_proj`` / ``o_proj`` (the solver's refit). Every layer
keeps the same counts, so the result is a standard config (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``; ``head_dim`` written explicitly) that vanilla transformers loads.
:func:`mask_width` is the same operation done by zeroing the removed columns of down/o in place (the
model keeps its shapes and computes exactly what the sliced model computes): calibration runs on it.

Hidden size (``slice_width(..., hidden=kept)``): the residual stream keeps channels ``kept`` everywhere —
columns of the embedding and the LM head, entries of every residual-stream RMSNorm, input columns of
q/k/v/gate/up, output rows of o/down. The oracle is :func:`mask_hidden`: the same model with the removed
channels zeroed wherever they enter the residual stream (embedding columns, o/down rows), so they stay 0
through every layer. The two differ only in the RMSNorms, which average over d channels in the masked
model and over d' = len(kept) in the sliced one: rsqrt(S/d + ε)·w = rsqrt(S/d' + ε·d/d')·w·sqrt(d/d')
for the sum of squares S of the kept channels, so the sliced model writes ``rms_norm_eps·d/d'`` into its
config and multiplies the norm weights by sqrt(d/d') — exactly the masked model's function. Qwen3's q/k
norms (over head_dim) read the same ``rms_norm_eps``; there ε stays as it is and the residual-stream
norms differ from the masked model by the ε term alone (relative ε·(d/d'−1)/mean(x²), ~1e-6 for a real
residual stream; tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from slimlm import SlimlmError

Kept = Sequence[Sequence[int]]  # per decoder layer: kept indices (ascending)


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total`` layers, always including the first and the last."""
    if not 1 <= keep <= total:
        raise SlimlmError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A new model with only the decoder layers ``keep`` (in that order), weights copied; ``model`` is untouched."""
    from transformers import AutoModelForCausalLM

    n = model.config.num_hidden_layers
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise SlimlmError(f"layer indices must be distinct and within 0..{n - 1}, got {keep}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        config.layer_types = [layer_types[i] for i in keep]
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(config, dtype=dtype)
    src = model.state_dict()
    prefix = _layers_prefix(model)
    remap = {}
    for new_i, old_i in enumerate(keep):
        remap[f"{prefix}.{new_i}."] = f"{prefix}.{old_i}."
    state = {}
    for name in small.state_dict():
        source = name
        for new_p, old_p in remap.items():
            if name.startswith(new_p):
                source = old_p + name[len(new_p):]
                break
        state[name] = src[source]
    small.load_state_dict(state)
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _layers_prefix(model: torch.nn.Module) -> str:
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise SlimlmError("could not locate the decoder layers in this model")


# --------------------------------------------------------------------------- width


def head_columns(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Feature indices of heads ``heads`` in a [heads * head_dim] projection (rows of q/k/v, columns of o)."""
    h = torch.as_tensor(list(heads), dtype=torch.long).reshape(-1, 1)
    return (h * head_dim + torch.arange(head_dim)).reshape(-1)


def _check_kept(name: str, kept: Kept | None, layers: int, size: int) -> None:
    if kept is None:
        return
    if len(kept) != layers:
        raise SlimlmError(f"{name}: {len(kept)} kept sets for {layers} layers")
    counts = {len(k) for k in kept}
    if len(counts) != 1:
        raise SlimlmError(f"{name}: every layer must keep the same number, got {sorted(counts)}")
    for k in kept:
        if not k or len(set(k)) != len(k) or not all(0 <= i < size for i in k) or list(k) != sorted(k):
            raise SlimlmError(f"{name}: kept indices must be distinct, ascending and within 0..{size - 1}")


def _kv_for_heads(heads: Sequence[int], qpk: int, kv: Sequence[int]) -> None:
    """GQA: query head h reads KV head h // qpk; after slicing, new head i must read new KV head i // qpk'."""
    if len(heads) % len(kv):
        raise SlimlmError(f"{len(heads)} query heads do not split evenly over {len(kv)} KV heads")
    new_qpk = len(heads) // len(kv)
    for i, h in enumerate(heads):
        if h // qpk != kv[i // new_qpk]:
            raise SlimlmError(f"query head {h} would read KV head {kv[i // new_qpk]} instead of {h // qpk}: keep "
                              "the same number of query heads in every kept KV group")


def width_config(config, *, head_dim: int, heads: int, kv_heads: int, intermediate: int | None = None,
                 hidden: int | None = None):
    """A copy of ``config`` with the widths a width prune sets (None: unchanged); ``head_dim`` written out, as
    after head pruning hidden / heads is no longer the head size."""
    config = copy.deepcopy(config)
    config.head_dim = head_dim
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    if intermediate is not None:
        config.intermediate_size = intermediate
    if hidden is not None:
        config.hidden_size = hidden
    return config


def depth_config(config, layers: int):
    """A copy of ``config`` with its first ``layers`` decoder layers' entries (the count a depth prune or an
    init keeps; per-layer lists such as Qwen's ``layer_types`` cut to match)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def slice_width(model: torch.nn.Module, *, mlp: Kept | None = None, heads: Kept | None = None,
                kv_heads: Kept | None = None, down_weights: Sequence[torch.Tensor] | None = None,
                o_weights: Sequence[torch.Tensor] | None = None,
                hidden: Sequence[int] | None = None) -> torch.nn.Module:
    """A new, smaller model keeping per layer the neurons ``mlp[i]``, query heads ``heads[i]`` and KV heads
    ``kv_heads[i]`` (None = all), and the residual-stream channels ``hidden`` (None = all; module
    docstring). ``down_weights[i]`` [hidden, len(mlp[i])] and ``o_weights[i]`` [hidden, len(heads[i]) *
    head_dim] replace the kept columns of down_proj / o_proj when given (in the source's hidden size)."""
    from transformers import AutoModelForCausalLM

    from slimlm.models import arch_facts

    facts = arch_facts(model.config)
    n, hd, qpk = facts.num_layers, facts.head_dim, facts.queries_per_kv
    _check_kept("mlp", mlp, n, facts.intermediate_size)
    _check_kept("heads", heads, n, facts.num_heads)
    _check_kept("kv_heads", kv_heads, n, facts.num_kv_heads)
    _check_kept("hidden", None if hidden is None else [hidden], 1, facts.hidden_size)
    all_heads = [list(range(facts.num_heads))] * n
    all_kv = [list(range(facts.num_kv_heads))] * n
    heads_l = [list(h) for h in heads] if heads is not None else all_heads
    kv_l = [list(k) for k in kv_heads] if kv_heads is not None else all_kv
    for h, k in zip(heads_l, kv_l, strict=True):
        _kv_for_heads(h, qpk, k)

    config = width_config(model.config, head_dim=hd, intermediate=len(mlp[0]) if mlp is not None else None,
                          heads=len(heads_l[0]), kv_heads=len(kv_l[0]),
                          hidden=len(hidden) if hidden is not None else None)
    norm_scale = 1.0
    if hidden is not None:
        d, d_new = facts.hidden_size, len(hidden)
        norm_scale = (d / d_new) ** 0.5
        if not _eps_shared(model):
            config.rms_norm_eps = model.config.rms_norm_eps * d / d_new
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(config, dtype=dtype)

    prefix = _layers_prefix(model) + "."
    src = model.state_dict()
    residual = _residual_params(model) if hidden is not None else {}
    keep_h = None if hidden is None else torch.as_tensor(list(hidden), dtype=torch.long)
    state = {}
    for name in small.state_dict():
        t = src[name]
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            i = int(i)
            t = _slice_param(rest, t, i, mlp, heads_l, kv_l, hd, down_weights, o_weights)
        role = residual.get(name)
        if role == "reads":  # [out, d]: keep the input columns
            t = t[:, keep_h.to(t.device)]
        elif role == "writes":  # [d, in]: keep the output rows
            t = t[keep_h.to(t.device)]
        elif role == "norm":
            t = t[keep_h.to(t.device)] * norm_scale
        state[name] = t
    try:
        small.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise SlimlmError(f"this architecture has layer weights slimlm cannot slice: {detail}") from e
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _eps_shared(model: torch.nn.Module) -> bool:
    """Whether RMSNorms outside the residual stream read ``rms_norm_eps`` too (Qwen3's q/k norms)."""
    return any(hasattr(layer.self_attn, "q_norm") for layer in model.get_decoder().layers)


def _residual_params(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter with a residual-stream (hidden-size) dimension, by state-dict name: ``reads``
    ([out, d] weights that take the stream as input, and the embedding and LM head, whose columns are
    channels), ``writes`` ([d, in]: o/down rows) and ``norm`` (the RMSNorm weights over d)."""
    roles: dict[int, str] = {}
    dec = model.get_decoder()
    roles[id(model.get_input_embeddings())] = "reads"
    head = model.get_output_embeddings()
    if head is not None:
        roles[id(head)] = "reads"
    roles[id(dec.norm)] = "norm"
    for layer in dec.layers:
        a, m = layer.self_attn, layer.mlp
        for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            roles[id(mod)] = "reads"
        for mod in (a.o_proj, m.down_proj):
            roles[id(mod)] = "writes"
        roles[id(layer.input_layernorm)] = roles[id(layer.post_attention_layernorm)] = "norm"
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        role = roles.get(id(mod))
        if role is None:
            continue
        for p_name, _p in mod.named_parameters(recurse=False):
            if p_name == "weight" or (role == "writes" and p_name == "bias"):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = role
    return out


def _slice_param(rest: str, t: torch.Tensor, i: int, mlp: Kept | None, heads: list[list[int]],
                 kv: list[list[int]], hd: int, down_weights, o_weights) -> torch.Tensor:
    module, _, kind = rest.rpartition(".")
    if module in ("mlp.gate_proj", "mlp.up_proj") and mlp is not None:
        return t[torch.as_tensor(list(mlp[i]))]
    if module == "mlp.down_proj" and kind == "weight":
        if down_weights is not None:
            return down_weights[i].to(t.dtype)
        return t[:, torch.as_tensor(list(mlp[i]))] if mlp is not None else t
    if module == "self_attn.q_proj":
        return t[head_columns(heads[i], hd)]
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        return t[head_columns(kv[i], hd)]
    if module == "self_attn.o_proj" and kind == "weight":
        if o_weights is not None:
            return o_weights[i].to(t.dtype)
        return t[:, head_columns(heads[i], hd)]
    return t


@torch.no_grad()
def mask_width(layer: torch.nn.Module, *, mlp: Sequence[int] | None = None, heads: Sequence[int] | None = None,
               head_dim: int | None = None, down_weight: torch.Tensor | None = None,
               o_weight: torch.Tensor | None = None) -> None:
    """In place on one decoder layer: zero the down_proj columns of removed neurons / the o_proj columns of
    removed heads, and write ``down_weight`` / ``o_weight`` into the kept columns when given.

    A removed neuron or head then contributes nothing, exactly as if it had been sliced away (down_proj and
    o_proj have no bias in the supported families; a bias would be kept either way)."""
    if mlp is not None:
        w = layer.mlp.down_proj.weight
        cols = torch.as_tensor(list(mlp), dtype=torch.long)
        new = w[:, cols] if down_weight is None else down_weight.to(w.device, w.dtype)
        w.zero_()
        w[:, cols] = new
    if heads is not None:
        w = layer.self_attn.o_proj.weight
        cols = head_columns(heads, head_dim)
        new = w[:, cols] if o_weight is None else o_weight.to(w.device, w.dtype)
        w.zero_()
        w[:, cols] = new


@torch.no_grad()
def mask_hidden(model: torch.nn.Module, hidden: Sequence[int]) -> None:
    """In place: zero the residual-stream channels not in ``hidden`` wherever they enter the stream
    (embedding columns, o_proj / down_proj rows) and wherever they are read (q/k/v/gate/up and LM head
    columns): the removed channels are 0 in every layer, the oracle :func:`slice_width` with ``hidden``
    equals (module docstring)."""
    d = model.config.hidden_size
    drop = torch.ones(d, dtype=torch.bool)
    drop[torch.as_tensor(list(hidden), dtype=torch.long)] = False
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, role in _residual_params(model).items():
        t = params[name]
        if role == "reads":
            t[:, drop.to(t.device)] = 0
        elif role == "writes":
            t[drop.to(t.device)] = 0

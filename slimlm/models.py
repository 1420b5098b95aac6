"""Hugging Face causal LMs: architecture facts, parameter counts, saving; a leaf that imports no other stage.

Loading (plain directories, compressed-tensors directories, built-in asset names) is in
:mod:`slimlm.loading`, which depends on this module, the assets and the quantized runtime; the tiny random
models the tests use are in :mod:`slimlm.testing`.

Only safetensors weights are read or written (no pickle), and ``trust_remote_code`` stays off unless
the caller asks for it. Supported families: Llama, Qwen2, Qwen3, Mistral (anything whose config uses
the standard attribute names also loads).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm import SlimlmError
from slimlm.io import atomic_dir

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ArchFacts:
    """The shape facts every stage needs (pruning, quantization, serving, reports)."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_facts(config: Any) -> ArchFacts:
    """Read :class:`ArchFacts` from a transformers config (``head_dim`` defaults to hidden / heads)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ArchFacts(
        family=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total, embedding (input embeddings + an untied LM head) and non-embedding parameter counts.

    Quantized layers (slimlm.quantize) keep their weights as buffers in packed form; they count as the
    in x out logical weights they stand for (``logical_numel``), so counts do not change on quantizing."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates; be explicit anyway
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    total += sum(m.logical_numel for m in model.modules() if hasattr(m, "logical_numel"))
    emb_params = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    quantized_head = out is not None and hasattr(out, "logical_numel")
    if out is not None and not quantized_head:
        emb_params.add(id(out.weight))
    embedding = sum(p.numel() for p in model.parameters() if id(p) in emb_params)
    embedding += out.logical_numel if quantized_head else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def config_param_counts(config: Any) -> dict[str, int]:
    """:func:`param_counts` of the model ``config`` describes, built on the meta device (no memory, no
    weights; seconds even at 8B). A quantized config counts its logical weights, as a loaded one does."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.quantization_config = None  # the shapes are the unquantized model's; counts do not change on quantizing
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return param_counts(model)


def attention_layout(config) -> tuple[list[str], int | None]:
    """Per layer "full_attention" or "sliding_attention", and the sliding window (None if no layer slides):
    from ``config.layer_types`` (Qwen2/Qwen3), else ``config.sliding_window`` for every layer (Mistral)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    types = list(types)[:n] if types is not None else ["sliding_attention" if window else "full_attention"] * n
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise SlimlmError(f"slimlm supports full and sliding-window attention layers, not {sorted(unknown)}")
    return types, (window if "sliding_attention" in types else None)


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword argument for ``model(...)``: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (passing the old name to a newer version works but warns on every run)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
               extra: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config + safetensors weights + tokenizer (+ extra JSON files) to ``out_dir`` atomically.

    ``state_dict`` replaces the model's own (a distributed run passes the gathered full state)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out_dir

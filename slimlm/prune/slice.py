"""Apply a kept-set to a Hugging Face model: the result is a genuinely smaller model and config.

Layers: :func:`keep_layers` builds a model with ``num_hidden_layers = len(keep)`` whose decoder layer i
is a copy of layer ``keep[i]`` of the source (everything else copied unchanged). Used to initialise a
student from its teacher, and by depth pruning.
"""

from __future__ import annotations

import copy

import torch

from slimlm import SlimlmError


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

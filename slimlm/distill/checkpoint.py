"""Atomic training checkpoints without pickle: model, optimizer, scheduler, RNG and data position.

Layout of ``DIR/checkpoint/`` (replaced whole by an atomic rename, so a crash mid-save leaves the
previous checkpoint intact):

    model.safetensors       student weights (tied tensors stored once)
    optimizer.safetensors   every tensor of the optimizer state, keyed "<param index>.<name>"
    rng.safetensors         torch CPU RNG, CUDA RNG (if any), the on-policy sampling generator
    state.json              step, data position, scheduler state, optimizer param groups, numpy RNG
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

from slimlm import SlimlmError
from slimlm.io import atomic_dir


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": v.detach().cpu().contiguous()
               for idx, st in sd["state"].items() for name, v in st.items() if isinstance(v, torch.Tensor)}
    return tensors, sd["param_groups"]


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any], generator: torch.Generator | None = None,
                    model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint directory atomically. ``model_state`` overrides ``model.state_dict()``
    (distributed runs pass the gathered full state)."""
    opt_tensors, groups = _optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        rng["generator"] = generator.get_state()
    with atomic_dir(path) as tmp:
        if model_state is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            **state, "scheduler": scheduler.state_dict(), "param_groups": groups,
        }, indent=2))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    generator: torch.Generator | None = None, load_model_weights: bool = True) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the trainer ``state`` dict."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if load_model_weights:
            weights = load_file(str(path / "model.safetensors"))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            # tied tensors are stored once, under either name: a missing key is fine if it shares storage
            # with a loaded one
            own = model.state_dict()
            loaded_ptrs = {own[k].data_ptr() for k in weights if k in own}
            really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
            if really_missing or unexpected:
                raise SlimlmError(f"{path}/model.safetensors: does not match the model "
                                  f"(missing {really_missing[:3]}, unexpected {unexpected[:3]})")
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise SlimlmError(f"{path}: unreadable checkpoint ({e})") from e
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])
    return state

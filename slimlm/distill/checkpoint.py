"""Atomic training checkpoints without pickle: model, optimizer, scheduler, RNG and data position.

Layout of ``DIR/checkpoint/`` (replaced whole by :func:`slimlm.io.atomic_dir`: a process killed at any
instant of a save leaves the previous or the new checkpoint complete, and the next start-up of the run
takes the newer one and removes the rest; the trainer writes a checkpoint only once the next step's
loss and gradient norm on its weights passed the divergence guard):

    model.safetensors       student weights (tied tensors stored once)
    optimizer.safetensors   every tensor of the optimizer state, keyed "<param key>.<name>" (the key is
                            the parameter's index, or its name for distributed full state dicts)
    rng.safetensors         per rank r: torch CPU RNG "torch_cpu.r", CUDA RNG "torch_cuda.r" (if any),
                            and each named generator "<name>.r" (the trainer's on-policy coins/samples)
    state.json              step, data position, scheduler state, optimizer param groups

Under FSDP2 the caller gathers full (unsharded) model and optimizer state dicts and passes them in
(``model_state``, ``optimizer_state``); on resume every rank reads the full files and re-shards them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

from slimlm import SlimlmError
from slimlm.io import atomic_dir


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {f"{idx}.{name}": v.detach().cpu().contiguous()
               for idx, st in sd["state"].items() for name, v in st.items() if isinstance(v, torch.Tensor)}
    return tensors, sd["param_groups"]


Generators = dict[str, torch.Generator]


def rng_state(generators: Generators | None = None) -> dict[str, torch.Tensor]:
    """This process's random state: torch CPU, CUDA (if any) and each of ``generators``."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    for name, g in (generators or {}).items():
        rng[name] = g.get_state()
    return rng


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any], generators: Generators | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    rank_rngs: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write a checkpoint directory atomically. ``model_state`` / ``optimizer_state`` override the
    model's and optimizer's own state dicts (FSDP2 runs pass gathered full ones); ``rank_rngs`` holds
    every rank's :func:`rng_state` (default: this process's, as rank 0)."""
    opt_tensors, groups = _optimizer_tensors(optimizer_state or optimizer.state_dict())
    rng = {f"{k}.{r}": v for r, states in enumerate(rank_rngs or [rng_state(generators)]) for k, v in states.items()}
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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scheduler,
                    generators: Generators | None = None, load_model_weights: bool = True,
                    rank: int = 0) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the trainer ``state`` dict.

    With ``optimizer=None`` nothing is loaded into the model or an optimizer; the full model and
    optimizer state dicts are returned as ``state["model_state"]`` / ``state["optimizer_state"]``
    (FSDP2 re-shards them with ``set_state_dict``). ``rank`` picks this process's RNG states."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if optimizer is None:
            state["model_state"] = load_file(str(path / "model.safetensors"))
        elif load_model_weights:
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
    groups = state.pop("param_groups")
    by_name = bool(groups) and any(isinstance(p, str) for g in groups for p in g["params"])
    per_param: dict[int | str, dict[str, torch.Tensor]] = {}
    for key, v in opt_tensors.items():
        idx, name = key.rsplit(".", 1)  # parameter names contain dots; state names do not
        per_param.setdefault(idx if by_name else int(idx), {})[name] = v
    optim_sd = {"state": per_param, "param_groups": groups}
    if optimizer is None:
        state["optimizer_state"] = optim_sd
    else:
        optimizer.load_state_dict(optim_sd)
    scheduler.load_state_dict(state.pop("scheduler"))
    own = f".{rank}" if f"torch_cpu.{rank}" in rng else ".0"  # resumed with fewer/more ranks: rank 0's
    torch.set_rng_state(rng["torch_cpu" + own])
    if "torch_cuda" + own in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda" + own])
    for name, g in (generators or {}).items():
        if name + own in rng:
            g.set_state(rng[name + own])
    return state

"""Atomic training checkpoints without pickle: model, optimizer, scheduler, RNG and data position.

Layout of ``DIR/checkpoint/`` (replaced whole by :func:`slimlm.io.atomic_dir` or, written by every rank,
:func:`slimlm.io.shared_atomic_dir`: a process killed at any
instant of a save leaves the previous or the new checkpoint complete, and the next start-up of the run
takes the newer one and removes the rest; the trainer writes a checkpoint only once the next step's
loss and gradient norm on its weights passed the divergence guard):

    model.safetensors       student weights (tied tensors stored once)
    optimizer.safetensors   every tensor of the optimizer state, keyed "<param index>.<name>"
    rng.safetensors         per rank r: torch CPU RNG "torch_cpu.r", CUDA RNG "torch_cuda.r" (if any),
                            and each named generator "<name>.r" (the trainer's on-policy coins/samples)
    state.json              step, data position, scheduler state, optimizer param groups

Under FSDP2 (:func:`save_sharded_checkpoint`) no rank gathers anything: every rank writes its own rows of the
weights and of the optimizer state, and on resume every rank reads only the rows it owns (with any number of
ranks; :mod:`slimlm.distill.sharded`):

    model-rank00000.safetensors ...       rank r's rows of every weight (tied tensors once)
    optimizer-rank00000.safetensors ...   rank r's rows of every optimizer state tensor, "<param name>.<name>"
    rng.safetensors, state.json           as above; state.json also holds "fsdp2_world", the ranks that wrote
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

from slimlm import SlimlmError
from slimlm.io import atomic_dir, shared_atomic_dir


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
                    rank_rngs: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write a checkpoint directory atomically (a single process, or rank 0 of a DDP run, whose replicas are
    whole). ``rank_rngs`` holds every rank's :func:`rng_state` (default: this process's, as rank 0)."""
    opt_tensors, groups = _optimizer_tensors(optimizer.state_dict())
    rng = {f"{k}.{r}": v for r, states in enumerate(rank_rngs or [rng_state(generators)]) for k, v in states.items()}
    with atomic_dir(path) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            **state, "scheduler": scheduler.state_dict(), "param_groups": groups,
        }, indent=2))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    generators: Generators | None = None, rank: int = 0) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the trainer ``state`` dict. ``rank``
    picks this process's RNG states."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
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
    return _restore(state, rng, scheduler, generators, rank)


def _restore(state: dict[str, Any], rng: dict[str, torch.Tensor], scheduler, generators: Generators | None,
             rank: int) -> dict[str, Any]:
    """The scheduler and this rank's random states; returns ``state``."""
    scheduler.load_state_dict(state.pop("scheduler"))
    own = f".{rank}" if f"torch_cpu.{rank}" in rng else ".0"  # resumed with fewer/more ranks: rank 0's
    torch.set_rng_state(rng["torch_cpu" + own])
    if "torch_cuda" + own in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda" + own])
    for name, g in (generators or {}).items():
        if name + own in rng:
            g.set_state(rng[name + own])
    return state


def _rank_file(kind: str, rank: int) -> str:
    return f"{kind}-rank{rank:05d}.safetensors"


def save_sharded_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                            state: dict[str, Any], rank_rngs: list[dict[str, torch.Tensor]], *, rank: int,
                            world: int, sync) -> None:
    """FSDP2: every rank (all must call this, ``sync`` a barrier) writes its rows of the student's weights and
    of the optimizer state; rank 0 also the RNG states of every rank and ``state.json``. Atomic as a whole."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from slimlm.distill.sharded import local_part, named_tensors

    optim_sd = get_optimizer_state_dict(student, optimizer)  # keyed by parameter name
    weights = {name: local_part(t)[0].detach().cpu().contiguous() for name, t in named_tensors(student)}
    moments = {f"{fqn}.{k}": local_part(v)[0].detach().cpu().contiguous()
               for fqn, st in optim_sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    written_by = {"rank": str(rank), "world": str(world)}  # for a reader of the files; loading uses state.json
    with shared_atomic_dir(path, rank == 0, sync) as tmp:
        save_file(weights, str(tmp / _rank_file("model", rank)), metadata=written_by)
        save_file(moments, str(tmp / _rank_file("optimizer", rank)), metadata=written_by)
        if rank == 0:
            save_file({f"{k}.{r}": v for r, states in enumerate(rank_rngs) for k, v in states.items()},
                      str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps({
                **state, "fsdp2_world": world, "scheduler": scheduler.state_dict(),
                "param_groups": optim_sd["param_groups"]}, indent=2))


def is_sharded_checkpoint(path: Path) -> bool:
    try:
        return "fsdp2_world" in json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return False


@torch.no_grad()
def load_sharded_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                            generators: Generators | None = None, rank: int = 0) -> dict[str, Any]:
    """FSDP2: restore what :func:`save_sharded_checkpoint` wrote into this rank's shards, reading only the rows
    this rank owns (the checkpoint may have been written by another number of ranks); returns ``state``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from slimlm.distill.sharded import RowFiles, copy_rows, named_tensors

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        world = int(state.pop("fsdp2_world"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise SlimlmError(f"{path}: unreadable checkpoint ({e})") from e
    # the optimizer's state, created (zeros) if no step ran yet, is the template the rows are copied into
    optim_sd = get_optimizer_state_dict(student, optimizer)
    targets = dict(named_tensors(student))
    moments = {f"{fqn}.{k}": v for fqn, st in optim_sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    for kind, tensors in (("model", targets), ("optimizer", moments)):
        files = [path / _rank_file(kind, r) for r in range(world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SlimlmError(f"{path}: checkpoint written by {world} ranks lacks {missing[0]}")
        copy_rows(tensors, RowFiles.rank_files(files, {k: tuple(t.shape) for k, t in tensors.items()}), path)
    optim_sd["param_groups"] = state.pop("param_groups")
    set_optimizer_state_dict(student, optimizer, optim_sd)
    return _restore(state, rng, scheduler, generators, rank)

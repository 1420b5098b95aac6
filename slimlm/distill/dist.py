"""Scale-out on PyTorch's own engines: ``torchrun`` + DDP or FSDP2 (``fully_shard``), gloo on CPU, NCCL on GPU.

    torchrun --nproc_per_node=2 -m slimlm distill -c recipe.yaml parallel=ddp
    torchrun --nproc_per_node=8 -m slimlm distill -c recipe.yaml parallel=fsdp2

Every rank reads a distinct slice of each global batch (see ``BatchOrder``), the window's target-token
count is summed over ranks, and the per-rank loss is scaled by the world size because both engines
average gradients: the update equals a single process seeing the whole global batch. Under FSDP2 each
decoder layer of the student *and of the frozen teacher* is its own shard unit, so neither model is
replicated whole on every rank.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from slimlm import SlimlmError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp2
    # where collectives' tensors live: NCCL takes CUDA tensors only, gloo CPU ones; every collective below
    # moves its tensor here, so gloo tests run the code path NCCL runs
    comm_device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(parallel: str, device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device(device)
    if parallel == "none":
        raise SlimlmError("launched with torchrun (WORLD_SIZE > 1) but parallel=none; use ddp or fsdp2")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
    strategy = "ddp" if parallel == "auto" else parallel
    comm = f"cuda:{local}" if torch_dist.get_backend() == "nccl" else "cpu"
    return Dist(rank, world, local, strategy, comm), torch.device(f"cuda:{local}" if cuda else "cpu")


def wrap(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: DDP replica, FSDP2-sharded, or ``module`` itself."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if dist.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for model in (module.student, module.teacher):
            if model is not None:
                for layer in model.get_decoder().layers:
                    fully_shard(layer)
        return fully_shard(module)  # the rest (embeddings, norms, LM heads) shard as the root unit
    return module


@contextlib.contextmanager
def gathered(wrapped: torch.nn.Module, dist: Dist, within: torch.nn.Module | None = None):
    """Within the block every FSDP2 unit of ``within`` (default: all of ``wrapped``) and the root unit are
    unsharded and stay so across forward calls, so the student can be called outside the wrapped forward
    (generation, evaluation) with no collectives: ranks may then run different numbers of forwards
    (sampling stops early on different ranks). Costs those whole layers per rank for the duration: the trainer
    gathers the student alone, and the teacher's layers (evaluation's held-out KL: the same forwards on every
    rank) all-gather one at a time through their own FSDP2 hooks. A no-op for DDP and single-process runs."""
    if dist.strategy != "fsdp2":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # the root already keeps its parameters after forward; the layer units (fully_shard defaults)
    # reshard after each forward unless told not to
    layers = [m for m in (within or wrapped).modules() if isinstance(m, FSDPModule) and m is not wrapped]
    wrapped.unshard()
    for m in layers:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()
        wrapped.reshard()


def sum_int(value: int, dist: Dist) -> int:
    return int(all_sum([value], dist, torch.long)[0])


def all_sum(values: list[float], dist: Dist, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sum over ranks (identity in a single process)."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=dist.comm_device)
    torch_dist.all_reduce(t)
    return t.cpu().tolist()


def no_sync(wrapped: torch.nn.Module, dist: Dist, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a window."""
    if dist.strategy == "ddp" and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def full_state_dict(student: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The student's whole state on CPU (gathered under FSDP2; every rank must call this)."""
    if dist.strategy != "fsdp2":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _drop_tied_head(student, sd)
    return sd


def gather_states(states: dict[str, torch.Tensor], dist: Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``states`` (same keys and shapes on all ranks, e.g. RNG byte tensors), by rank, on the
    CPU (they travel through ``dist.comm_device``)."""
    if dist.world == 1:
        return [states]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.world)]
    for key, t in states.items():
        sent = t.contiguous().to(dist.comm_device)
        parts = [torch.empty_like(sent) for _ in range(dist.world)]
        torch_dist.all_gather(parts, sent)
        for r, part in enumerate(parts):
            out[r][key] = part.cpu()
    return out


def _drop_tied_head(student: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Tied embeddings are stored once, under the input embedding's name (as save_pretrained does)."""
    if getattr(student.config, "tie_word_embeddings", False):
        head = student.get_output_embeddings()
        sd.pop(next(n for n, m in student.named_modules() if m is head) + ".weight", None)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch_dist.barrier()


def shutdown(dist: Dist) -> None:
    if dist.world > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()

"""One rank of the sharded-FSDP2 tests (run under torchrun with gloo; see test_sharded.py).

    torchrun --nproc_per_node=W tests/distill/sharded_worker.py materialize MODEL_DIR OUT
    torchrun ... sharded_worker.py save MODEL_DIR CKPT     # one AdamW step, then a rank-local checkpoint
    torchrun ... sharded_worker.py load MODEL_DIR CKPT     # restore it (any W) and write the full state
    torchrun ... sharded_worker.py cache MODEL_DIR OUT     # a teacher cache written by every rank

Each writes what the test compares (full, gathered tensors) from rank 0 as safetensors under OUT or CKPT.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from slimlm.distill.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from slimlm.distill.sharded import materialize, meta_model

LOGIT_IDS = torch.arange(40).view(2, 20) % 200 + 3


def cache_sequences():
    """19 sequences of uneven lengths and prompt lengths (the data of the distributed teacher-cache test)."""
    from slimlm.distill.data import Seq

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(19):
        ids = torch.randint(3, 300, (5 + i % 7,), generator=g).tolist()
        p = 1 + i % 4
        out.append(Seq(tuple(ids), (-100,) * p + tuple(ids[p:]), p))
    return out


def sharded(model_dir: Path) -> torch.nn.Module:
    model = meta_model(model_dir, dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    materialize(model, torch.device("cpu"), [(model, model_dir)])
    return model


def full_state(model, optimizer=None) -> dict[str, torch.Tensor]:
    """Every weight (and optimizer tensor, "optim.<name>.<state>") whole, on rank 0 (empty elsewhere)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = dict(get_model_state_dict(model, options=opts))
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        out.update({f"optim.{fqn}.{k}": v for fqn, st in osd.get("state", {}).items()
                    for k, v in st.items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def adamw_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def main() -> None:
    what, model_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    torch.manual_seed(0)
    if what == "cache":
        from slimlm.distill.teacher import write_teacher_cache
        from slimlm.loading import load_model
        write_teacher_cache(load_model(model_dir), cache_sequences(), out, k=5, batch_size=3, shard_sequences=4,
                            rank=rank, world=world, sync=torch_dist.barrier)
        torch_dist.destroy_process_group()
        return
    model = sharded(model_dir)
    if what == "materialize":  # the weights, and logits (which also need the rebuilt rotary tables)
        with torch.no_grad():
            logits = model(input_ids=LOGIT_IDS).logits
        state = {**full_state(model), "logits": logits}
    else:
        opt, sched = adamw_step(model)
        if what == "save":  # one real step, so the moments are not zeros
            ids = torch.arange(12).view(2, 6) % 50 + 3
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            sched.step()
            state = full_state(model, opt)
            save_sharded_checkpoint(out, model, opt, sched, {"step": 1}, [{"torch_cpu": torch.get_rng_state()}],
                                    rank=rank, world=world, sync=torch_dist.barrier)
        else:
            restored = load_sharded_checkpoint(out, model, opt, sched, rank=rank)
            assert restored["step"] == 1 and sched.last_epoch == 1, restored
            state = full_state(model, opt)
    if rank == 0:
        name = {"materialize": "state", "save": "saved", "load": f"loaded-{world}"}[what]
        save_file(state, str(out.parent / f"{out.name}.{name}.safetensors"))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()

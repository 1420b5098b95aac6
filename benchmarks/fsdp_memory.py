"""FSDP2 host memory per rank: loading a model and writing a checkpoint, whole (before) vs sharded (now).

    python benchmarks/fsdp_memory.py [--ranks 2] [--hidden 1024] [--layers 8] [--vocab 32000]
                                     [--work runs/bench/fsdp_memory] [--out runs/bench/fsdp_memory.json]

A synthetic Llama (untied; 187M parameters at the defaults) is saved once in bf16, as released checkpoints are,
and trained in fp32 (714 MiB; slimlm's CPU default; on a GPU the whole copy would sit in GPU memory); for each way,
a fresh ``torchrun --nproc_per_node=RANKS`` (gloo, CPU) runs one rank per process:

- ``whole`` (slimlm before this change, rebuilt here from torch's public API): every rank loads the whole
  model (``from_pretrained``), then ``fully_shard``; the checkpoint gathers the full model and optimizer
  state on rank 0 (``get_state_dict(full_state_dict=True, cpu_offload=True)``), which writes them;
- ``sharded`` (slimlm now): the model is built on the meta device, sharded, and each rank reads its own rows
  (:func:`slimlm.distill.sharded.materialize`); the checkpoint is written rank by rank
  (:func:`slimlm.distill.checkpoint.save_sharded_checkpoint`).

Per rank, in MiB: private memory (``RssAnon``: what the process holds; file pages it reads are page cache,
counted in RSS while mapped but reclaimable) before the load (torch and transformers imported), its peak
during the load (sampled every 5 ms) and after; the peak RSS of the load (``VmHWM``, file pages included);
and the rise of private memory during the checkpoint. One AdamW step runs before the
checkpoint, so the optimizer state exists (2 fp32 moments per weight).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _common import markdown_table, reset_peak, status_kib, write_json  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024.0


class AnonPeak:
    """The largest private memory (``RssAnon``) seen while the block runs, sampled every 5 ms by a thread
    (the kernel keeps no peak of it; ``VmHWM`` also counts mapped file pages, which are reclaimable)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = status_kib("RssAnon"), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, status_kib("RssAnon"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))
        self.peak_mib = self.peak / MIB


def worker(way: str, model_dir: Path, work: Path) -> None:
    import torch
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    import gc

    from slimlm.distill.sharded import materialize, meta_model
    from slimlm.loading import load_model

    base = status_kib("RssAnon") / MIB  # torch and transformers imported
    reset_peak()
    with AnonPeak() as load_peak:
        if way == "whole":
            model = load_model(model_dir, dtype=torch.float32)
        else:
            model = meta_model(model_dir, dtype=torch.float32)
        for layer in model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
        if way == "sharded":
            materialize(model, torch.device("cpu"), [(model, model_dir)])
        gc.collect()
    loaded = {"anon_after_load_mib": status_kib("RssAnon") / MIB, "load_anon_peak_mib": load_peak.peak_mib,
              "load_peak_rss_mib": status_kib("VmHWM") / MIB}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.arange(64).view(1, 64) + 3
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    before = status_kib("RssAnon") / MIB
    ckpt = work / f"ckpt-{way}"
    saving = AnonPeak().__enter__()
    if way == "whole":
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in msd.items()}, str(ckpt / "model.safetensors"))
            save_file({f"{fqn}.{k}": v for fqn, st in osd["state"].items() for k, v in st.items()},
                      str(ckpt / "optimizer.safetensors"))
        del msd, osd
        torch_dist.barrier()
    else:
        from slimlm.distill.checkpoint import save_sharded_checkpoint

        save_sharded_checkpoint(ckpt, model, opt, sched, {"step": 1}, [{"torch_cpu": torch.get_rng_state()}],
                                rank=rank, world=world, sync=torch_dist.barrier)
    saving.__exit__()
    row = {"way": way, "rank": rank, "base_anon_mib": base, **loaded, "anon_before_save_mib": before,
           "save_anon_peak_rise_mib": saving.peak_mib - before}
    (work / f"{way}-rank{rank}.json").write_text(json.dumps(row))
    torch_dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench/fsdp_memory")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench/fsdp_memory.json")
    ap.add_argument("--worker", nargs=3, metavar=("WAY", "MODEL", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return

    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimlm.testing import tiny_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # stored as released checkpoints are
    n_params = sum(p.numel() for p in model.parameters())
    from slimlm.models import save_model

    save_model(model, tiny_tokenizer(), model_dir)
    del model
    rows = []
    for way in ("whole", "sharded"):
        shutil.rmtree(args.work / f"ckpt-{way}", ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
               "--master_addr=127.0.0.1", "--master_port=29571", str(Path(__file__).resolve()),
               "--worker", way, str(model_dir), str(args.work)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows += [json.loads((args.work / f"{way}-rank{r}.json").read_text()) for r in range(args.ranks)]
    result = {"machine": platform.processor() or platform.machine(), "ranks": args.ranks, "params": n_params,
              "model_fp32_mib": n_params * 4 / 2**20, "rows": rows}
    print(markdown_table(("way", "rank", "private before load", "private peak during load", "private after load",
                          "peak RSS of the load", "private peak rise during the checkpoint"),
                         [(r["way"], r["rank"], f"{r['base_anon_mib']:.0f}", f"{r['load_anon_peak_mib']:.0f}",
                           f"{r['anon_after_load_mib']:.0f}", f"{r['load_peak_rss_mib']:.0f}",
                           f"{r['save_anon_peak_rise_mib']:.0f}") for r in rows]))
    print(f"model: {n_params / 1e6:.1f}M parameters, {result['model_fp32_mib']:.0f} MiB in fp32; {args.ranks} ranks")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

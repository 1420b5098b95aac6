"""Teacher-cache building: peak memory of the vocabulary-chunked top-k vs the full-vocabulary way, by vocab size.

    python benchmarks/teacher_cache_memory.py [--vocabs 49152,128256] [--hidden 576] [--layers 2]
                                              [--sequences 16] [--seq-len 512] [--batch-size 8] [--k 64]
                                              [--vocab-chunk 8192] [--row-block 4096] [--device cpu]
                                              [--dtype float32] [--threads N]
                                              [--out runs/bench/teacher_cache_memory.json]

The teacher is a random Llama-style model (tied embeddings, so its LM head is the [V, hidden] embedding)
at each vocabulary size: 49,152 is SmolLM2's, 128,256 a synthetic Llama-3-sized head. Every run sees the
same token sequences (ids below the smallest vocabulary), text-style: every token after the first is a
target, so a batch of 8 × 512 tokens has 4,088 target rows. For each vocabulary two methods build a cache
of those sequences:

    naive    the full-vocabulary way (slimlm ≤ 0.1, the anchor): per batch, logits [rows, V] in fp32,
             log_softmax, top-k, and the tail from a scattered copy — several [rows, V] fp32 tensors
    chunked  slimlm.distill.teacher.write_teacher_cache: vocabulary-chunked top-k with a running
             logsumexp; the largest temporary is [row_block, vocab_chunk] fp32 whatever V is

Each (vocab, method) runs in a fresh process (this script with --variant), so its peak is its own.
``peak`` is the process's peak RSS over its whole life (imports, the model — which itself grows with V —
and the build); ``Δpeak`` is the peak RSS while building minus the RSS just before (model and sequences
loaded; the high-water mark is reset through /proc/self/clear_refs), i.e. the memory the cache building
needs. With --device cuda, Δpeak is torch.cuda.max_memory_allocated during the build minus the memory
allocated before it. Both caches are read back and compared: the fraction of top-k ids equal to naive's
(near-ties may swap between the two float32 summation orders) and the largest |Δ log-prob| (stored in
fp16, whose step is 7.8e-3 at |log p| in [8, 16): one step is a rounding difference, not an error).
Target: chunked Δpeak independent of V beyond one chunk (the ratio 128k / 49k near 1), naive's growing
with V. A quick check (seconds): --sequences 4 --seq-len 128 --batch-size 2 --hidden 256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table, reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

METHODS = ("naive", "chunked")


# --------------------------------------------------------------------------- one variant (child process)


def naive_write(teacher, seqs, out_dir: Path, *, k: int, batch_size: int, device) -> None:
    """The full-vocabulary cache writer slimlm ≤ 0.1 used, kept here as the anchor (one shard, same format)."""
    import torch
    from safetensors.torch import save_file

    from slimlm.distill.data import collate
    from slimlm.distill.teacher import FORMAT_VERSION, teacher_hidden

    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0]
    ids_l, lp_l, tail_l, offsets = [], [], [], [0]
    with torch.no_grad():
        for b0 in range(0, len(seqs), batch_size):
            enc = collate(seqs[b0:b0 + batch_size], 0, device)
            labels = enc["labels"][:, 1:]
            h = teacher_hidden(teacher, enc)[:, :-1][labels != -100]
            logits = h @ head.weight[:vocab].T
            logp = torch.log_softmax(logits.float(), dim=-1)  # temperature 1
            top, idx = logp.topk(k, dim=-1)
            rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
            ids_l.append(idx.to(torch.int32).cpu())
            lp_l.append(top.to(torch.float16).cpu())
            tail_l.append(rest.float().cpu())
            for n in (labels != -100).sum(1).tolist():
                offsets.append(offsets[-1] + n)
    out_dir.mkdir(parents=True)
    save_file({"ids": torch.cat(ids_l), "logprobs": torch.cat(lp_l), "tail": torch.cat(tail_l),
               "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(out_dir / "shard-00000.safetensors"))
    index = {"format": FORMAT_VERSION, "k": k, "temperature": 1.0, "vocab": vocab, "sequences": len(seqs),
             "targets": offsets[-1], "shards": [{"file": "shard-00000.safetensors", "first_sequence": 0,
                                                 "sequences": len(seqs), "targets": offsets[-1]}]}
    (out_dir / "index.json").write_text(json.dumps(index))


def make_sequences(args):
    import torch

    from slimlm.distill.data import Seq

    g = torch.Generator().manual_seed(0)
    high = min(int(v) for v in args.vocabs.split(","))
    out = []
    for _ in range(args.sequences):
        ids = tuple(torch.randint(3, high, (args.seq_len,), generator=g).tolist())
        out.append(Seq(ids, (-100, *ids[1:]), 1))
    return out


def run_variant(name: str, args) -> dict:
    import torch

    from slimlm.distill.teacher import write_teacher_cache
    from slimlm.testing import tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    method, vocab = name.split(":")
    vocab = int(vocab)
    device = torch.device(args.device)
    heads = max(1, args.hidden // 64)
    teacher = tiny_model("llama", seed=0, vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 3 if heads % 3 == 0 else heads,
                         max_position_embeddings=max(1024, args.seq_len))
    teacher = teacher.to(device=device, dtype=getattr(torch, args.dtype)).requires_grad_(False)
    seqs = make_sequences(args)
    out_dir = Path(args.cache_dir)

    base_kib = status_kib("VmRSS")  # torch + model + sequences, before any building
    reset = reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if method == "naive":
        naive_write(teacher, seqs, out_dir, k=args.k, batch_size=args.batch_size, device=device)
    elif method == "chunked":
        write_teacher_cache(teacher, seqs, out_dir, k=args.k, batch_size=args.batch_size, vocab_chunk=args.vocab_chunk,
                            row_block=args.row_block)
    else:
        raise SystemExit(f"unknown method {method}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    build_kib = status_kib("VmHWM")
    life_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not reset:  # no /proc/self/clear_refs: only the whole-life peak is known
        build_kib = life_kib
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    res = {"variant": name, "method": method, "vocab": vocab, "seconds": round(seconds, 2),
           "pre_build_rss_mib": mib(base_kib), "peak_rss_mib": mib(max(life_kib, build_kib)),
           "delta_peak_mib": mib(build_kib - base_kib), "peak_reset_available": reset,
           "targets_per_batch": args.batch_size * (args.seq_len - 1)}
    if device.type == "cuda":
        res["delta_peak_mib"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
        res["delta_peak_rss_mib"] = mib(build_kib - base_kib)
    return res


# --------------------------------------------------------------------------- driver


def child(name: str, args, cache_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--cache-dir", str(cache_dir)]
    for key in ("vocabs", "hidden", "layers", "sequences", "seq_len", "batch_size", "k", "vocab_chunk",
                "row_block", "device", "dtype", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name}: failed ({tail})", flush=True)
        return {"variant": name, "method": name.split(":")[0], "vocab": int(name.split(":")[1]), "error": tail}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {name}: Δpeak {res['delta_peak_mib']} MiB, peak {res['peak_rss_mib']} MiB, {res['seconds']} s "
          f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    return res


def compare(chunked_dir: Path, naive_dir: Path, n: int) -> dict:
    """Read both caches back: fraction of top-k ids equal to naive's, largest |Δ log-prob| and |Δ tail|."""
    from slimlm.distill.teacher import TeacherCache

    a, b = TeacherCache(chunked_dir).rows(list(range(n))), TeacherCache(naive_dir).rows(list(range(n)))
    return {"ids_equal": round(float((a[0] == b[0]).float().mean()), 6),
            "max_abs_logprob_diff": float((a[1].float() - b[1].float()).abs().max()),
            "max_abs_tail_diff": float((a[2] - b[2]).abs().max())}


def table(results: list[dict]) -> str:
    head = ("vocab", "method", "[rows, V] fp32 MiB", "peak RSS MiB", "Δpeak MiB", "Δpeak/naive", "seconds",
            "ids = naive", "max |Δlogp|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["vocab"], r["method"], "", "error", r["error"][:40], "", "", "", ""))
            continue
        naive = next((x for x in results if x["vocab"] == r["vocab"] and x["method"] == "naive" and "error" not in x),
                     None)
        ratio = f"{r['delta_peak_mib'] / naive['delta_peak_mib']:.3f}x" if naive and naive["delta_peak_mib"] > 0 else ""
        same = r.get("vs_naive", {})
        rows.append((f"{r['vocab']:,}", r["method"], f"{r['targets_per_batch'] * r['vocab'] * 4 / 2**20:.0f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['delta_peak_mib']:.0f}", ratio, f"{r['seconds']:.1f}",
                     f"{same['ids_equal']:.4f}" if same else "", f"{same['max_abs_logprob_diff']:.1e}" if same else ""))
    return markdown_table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--hidden", type=int, default=576, help="teacher width (SmolLM2-135M's: 576)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab-chunk", type=int, default=8192)
    ap.add_argument("--row-block", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/teacher_cache_memory.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    import torch

    vocabs = [int(v) for v in args.vocabs.split(",")]
    methods = args.methods.split(",")
    started = time.time()
    print(f"{len(vocabs) * len(methods)} variants, each in a fresh process; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        for v in vocabs:
            dirs = {m: Path(tmp) / f"{m}-{v}" for m in methods}
            here = [child(f"{m}:{v}", args, dirs[m]) for m in methods]
            ok = {r["method"] for r in here if "error" not in r}
            if {"naive", "chunked"} <= ok:
                cmp = compare(dirs["chunked"], dirs["naive"], args.sequences)
                next(r for r in here if r["method"] == "chunked")["vs_naive"] = cmp
            results += here

    chunked = {r["vocab"]: r for r in results if r["method"] == "chunked" and "error" not in r}
    growth = None
    if len(vocabs) > 1 and min(vocabs) in chunked and max(vocabs) in chunked:
        growth = round(chunked[max(vocabs)]["delta_peak_mib"] / max(chunked[min(vocabs)]["delta_peak_mib"], 1e-9), 3)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "config": {k: getattr(args, k) for k in ("vocabs", "hidden", "layers", "sequences", "seq_len",
                                                       "batch_size", "k", "vocab_chunk", "row_block", "device",
                                                       "dtype", "threads")},
              "chunked_delta_peak_ratio_largest_to_smallest_vocab": growth,
              "loadavg_end": os.getloadavg(), "wall_s": round(time.time() - started, 1), "results": results}
    print()
    print(table(results))
    if growth is not None:
        print(f"\nchunked Δpeak at V = {max(vocabs):,} / at V = {min(vocabs):,}: {growth}x (target: near 1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()

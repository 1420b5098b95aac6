"""Where the time of the evaluation's ranking probe goes, per model: candidates/s, the arithmetic of one call and
the share of matmuls vs everything else (torch.profiler).

    python benchmarks/rank_profile.py --models runs/exp/movielens-ranking-multi-item/teacher-sft/model,\
runs/exp/movielens-ranking-20x-multi-item/redistill/model [--out runs/bench/rank_profile.json]

The call is the probe's (slimlm.evaluate.speed): one 192-token prefix run once, 100 suffixes of 16 tokens scored
on its KV cache (slimlm.evaluate.ranking_probe's inputs, scoring.score_shared_prefix, batch 100), on real
tokens (the project's README.md). Arithmetic: 2 FLOPs per multiply-add of the decoder's linear layers (in x out
of each, float or quantized) over every token run, plus attention (scores and weighted values) at each token's
context length, plus the 2-row label head. The models are loaded once into one process and timed in
alternation, ``--rounds`` rounds of the median of 3 calls each; the ratio to the reference is taken per round.
Each round also times two fixed machine probes that involve no model: a cache-resident fp32 matmul of a small
model's shape ([1600, 192] x [192, 384], GFLOP/s) and a 64 MiB copy (GB/s), to tell a slower machine from a
slower model. Profile shares: self CPU time over 3 calls.

A small model's figure moves by tens of percent between processes on a shared 2-core CPU (BENCHMARKS.md, "The
20x student at full budget"): ``--processes N`` runs the measurement in N fresh processes one after another
and writes each process's rows plus, per model, the median and range over the processes of their median
per-round ratio. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import median_of, ranking_probe_calls, write_json

CANDIDATES = 100


def call_flops(config, linear_params: int) -> float:
    """FLOPs of one probe call: the prefix once, then every suffix token over prefix + its own earlier tokens."""
    from slimlm.evaluate import PROBE_PREFIX, PROBE_SUFFIX

    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    tokens = PROBE_PREFIX + CANDIDATES * PROBE_SUFFIX
    linear = 2 * linear_params * tokens
    ctx = sum(range(1, PROBE_PREFIX + 1)) + CANDIDATES * sum(PROBE_PREFIX + i for i in range(1, PROBE_SUFFIX + 1))
    attention = 2 * 2 * hd * heads * layers * ctx
    return float(linear + attention + 2 * 2 * config.hidden_size * CANDIDATES)


def profile_shares(call) -> dict:
    with torch.profiler.profile() as prof:
        for _ in range(3):
            call()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    top = {k: round(v / total, 3) for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])[:8]}
    mm = sum(v for k, v in self_us.items() if k in ("aten::mm", "aten::addmm", "aten::_int_mm"))
    return {"matmul_share": round(mm / total, 3), "top_ops_share": top}


def machine_probes() -> dict:
    """GFLOP/s of a cache-resident fp32 matmul of a small model's shape and GB/s of a 64 MiB copy, medians of 5."""
    x, w = torch.randn(1600, 192), torch.randn(192, 384)
    src = torch.empty(16 * 1024 * 1024)
    dst = torch.empty_like(src)

    mm_s = median_of(lambda: [x @ w for _ in range(20)], 5)
    copy_s = median_of(lambda: dst.copy_(src), 5)
    return {"small_mm_gflop_per_s": round(20 * 2 * 1600 * 192 * 384 / mm_s / 1e9, 1),
            "copy_gb_per_s": round(2 * src.numel() * 4 / copy_s / 1e9, 2)}


def linear_params(model) -> int:
    """Multiply-adds per token of the decoder's linear layers: float weights and slimlm's quantized ones alike."""
    total = 0
    for module in model.get_decoder().modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated model directories; the first is the reference")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--processes", type=int, default=1, help="fresh processes to measure in, one after another")
    ap.add_argument("--out", default="runs/bench/rank_profile.json")
    args = ap.parse_args()
    if args.processes < 1 or (args.threads is not None and args.threads < 1):
        ap.error(f"--processes {args.processes}, --threads {args.threads}: need 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.processes > 1:
        return over_processes(args)
    write_json(args.out, measure(args.models.split(","), args.rounds))


def over_processes(args) -> None:
    """``measure`` in ``args.processes`` fresh interpreters in turn; their results and the spread between them."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"p{i}.json"
            print(f"== process {i + 1}/{args.processes}", flush=True)
            threads = ["--threads", str(args.threads)] if args.threads else []
            subprocess.run([sys.executable, __file__, "--models", args.models, "--rounds", str(args.rounds),
                            *threads, "--out", str(out)], check=True)
            runs.append({"process": i + 1, **json.loads(out.read_text())})
    summary = []
    for j, path in enumerate(args.models.split(",")):
        ratios = [r["rows"][j]["speedup_median"] for r in runs]
        cps = [r["rows"][j]["candidates_per_s"] for r in runs]
        summary.append({"model": path, "speedup_per_process": ratios,
                        "speedup_median": round(float(np.median(ratios)), 2),
                        "speedup_range": [min(ratios), max(ratios)], "candidates_per_s_per_process": cps,
                        "candidates_per_s_median": round(float(np.median(cps)), 1)})
        print(f"{path}: {np.median(ratios):.2f}x the reference, median of {len(runs)} processes "
              f"(range {min(ratios)}-{max(ratios)}); {np.median(cps):.1f} cand/s")
    write_json(args.out, {"processes": runs, "summary": summary})


def measure(paths: list[str], rounds: int) -> dict:
    """The probe's call for each model, timed in alternation over ``rounds`` rounds, then profiled."""
    models, calls = zip(*ranking_probe_calls(paths, CANDIDATES), strict=True)
    seconds = [[] for _ in paths]
    machine = []
    for r in range(rounds):
        for i, call in enumerate(calls):
            seconds[i].append(median_of(call))
        machine.append(machine_probes())
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{CANDIDATES / s[-1]:.1f}" for s in seconds) + " cand/s; "
              f"machine {machine[-1]}", flush=True)
    rows = []
    for path, model, call, secs in zip(paths, models, calls, seconds, strict=True):
        flops = call_flops(model.config, linear_params(model))
        sec = float(np.median(secs))
        rows.append({"model": path, "candidates_per_s_rounds": [round(CANDIDATES / s, 1) for s in secs],
                     "candidates_per_s": round(CANDIDATES / sec, 1),
                     "speedup_rounds": [round(ref / s, 2) for ref, s in zip(seconds[0], secs, strict=True)],
                     "gflop_per_call": round(flops / 1e9, 2), "gflop_per_s": round(flops / sec / 1e9, 1),
                     **profile_shares(call)})
    for r in rows:
        sp = r["speedup_rounds"]
        r["speedup_median"] = float(np.median(sp))
        r["arithmetic_ratio"] = round(rows[0]["gflop_per_call"] / r["gflop_per_call"], 1)
        print(f"{r['model']}: {r['candidates_per_s']} cand/s, {r['speedup_median']}x the reference (rounds "
              f"{min(sp)}-{max(sp)}), {r['gflop_per_call']} GFLOP/call (1/{r['arithmetic_ratio']}), "
              f"{r['gflop_per_s']} GFLOP/s, matmuls {r['matmul_share']:.0%}")
    return {"threads": torch.get_num_threads(), "rounds": rounds, "machine_probes": machine, "rows": rows,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    main()

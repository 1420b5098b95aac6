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
A small model's figure moves by tens of percent between processes on a shared 2-core CPU: run it in several
processes (BENCHMARKS.md, "The 20x student at full budget"). Profile shares: self CPU time over 3 calls.
Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import write_json

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


def timed(call) -> float:
    call()  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def profile_shares(call) -> dict:
    with torch.profiler.profile() as prof:
        for _ in range(3):
            call()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    top = {k: round(v / total, 3) for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])[:8]}
    mm = sum(v for k, v in self_us.items() if k in ("aten::mm", "aten::addmm", "aten::_int_mm"))
    return {"matmul_share": round(mm / total, 3), "top_ops_share": top}


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
    ap.add_argument("--out", default="runs/bench/rank_profile.json")
    args = ap.parse_args()

    from slimlm.evaluate import ranking_probe
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.runtime import scoring

    paths = args.models.split(",")
    text = open("README.md", encoding="utf-8").read()
    prefix, suffixes, labels = ranking_probe(load_tokenizer(paths[0])(text)["input_ids"], CANDIDATES)
    models = [load_model(p) for p in paths]
    calls = [lambda m=m: scoring.score_shared_prefix(m, prefix, suffixes, labels, batch_size=CANDIDATES)
             for m in models]
    seconds = [[] for _ in paths]
    for r in range(args.rounds):
        for i, call in enumerate(calls):
            seconds[i].append(timed(call))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{CANDIDATES / s[-1]:.1f}" for s in seconds) + " cand/s")
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
    write_json(args.out, {"threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()

"""Packed multi-item scoring vs the prefix-KV broadcast vs naive whole prompts: where they cross, and what
packing does for evaluation.

    python benchmarks/packed_scoring.py [--model teacher] [--ns 2,4,8,16,32,64,100] [--reps 3]
                                        [--eval-rows 400] [--out runs/bench/packed_scoring.json]

1. One request: one MovieLens user prefix (a real test prompt's prefix) and N candidate suffixes (real
   MovieLens candidate suffixes), scored three ways on a cold model (no prefix cache):
     packed     one forward of prefix + N candidates with the block mask (runtime.scoring, pack_max=N)
     broadcast  the prefix forward, then candidate batches of 16 on its KV (pack_max=0): on a CPU by the
                shared-prefix attention (slimlm.runtime.shared_prefix: the prefix KV read in place)
     copied     the same with the KV expanded into each batch's cache (the broadcast before the shared-prefix
                attention, and still the way on CUDA)
     naive      every prompt whole (score_full, batches of 16)
   candidates/s = N / median latency over --reps (the three alternate within each repetition).
   Then the same with the prefix's KV already cached (the same user scored again): the candidates packed
   into one row after the cached prefix (pack_max=N, the engine's way for N <= PACK_MAX_CANDIDATES) vs
   candidate batches (pack_max=0), shared-prefix attention and copied.
2. Evaluation: the first --eval-rows rows of the MovieLens test split (2 candidates per user) through
   slimlm.runtime.scoring.score with strategy packed vs broadcast (rows/s), as `slimlm eval` runs it.
The crossing point found here is slimlm.runtime.scoring.PACK_MAX_CANDIDATES.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from _common import ranking_model, write_json  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--ns", default="2,4,8,16,32,64,100")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=400)
    ap.add_argument("--out", default="runs/bench/packed_scoring.json")
    args = ap.parse_args()

    import torch

    from slimlm.runtime.scoring import label_probs_shared_prefix, score, score_full
    from slimlm.tasks import load_ranking_task
    from slimlm.tasks.ranking import tokenize_ranking

    tok, model, labels = ranking_model(args.model)
    test = tokenize_ranking(load_ranking_task("movielens-ranking", None, "test"), tok)
    train = tokenize_ranking(load_ranking_task("movielens-ranking", None, "train", limit=400), tok)
    prefix = test[0].prefix_ids
    suffixes = [t.suffix_ids for t in train]
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                 "threads": torch.get_num_threads(), "model": args.model, "prefix_tokens": len(prefix),
                 "mean_suffix_tokens": statistics.mean(len(s) for s in suffixes), "requests": {}}

    from slimlm.runtime import shared_prefix

    def copied(fn):
        """``fn`` with the prefix KV expanded into each candidate batch (no shared-prefix attention)."""
        def run():
            with shared_prefix.only_on():
                return fn()
        return run

    def clock(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    print(f"one request: prefix {len(prefix)} tokens, suffixes ~{out['mean_suffix_tokens']:.0f} tokens")
    print(f"{'N':>5} {'packed c/s':>11} {'broadcast c/s':>14} {'copied c/s':>11} {'naive c/s':>10} "
          f"{'packed/broadcast':>17}")
    for n in [int(x) for x in args.ns.split(",")]:
        sufs = suffixes[:n]
        ways = {"packed": lambda s=sufs, n=n: label_probs_shared_prefix(model, prefix, s, labels, pack_max=n),
                "broadcast": lambda s=sufs: label_probs_shared_prefix(model, prefix, s, labels, pack_max=0),
                "copied": copied(lambda s=sufs: label_probs_shared_prefix(model, prefix, s, labels, pack_max=0)),
                "naive": lambda s=sufs: score_full(model, [prefix + x for x in s], labels)}
        for fn in ways.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.reps):
            for k, fn in ways.items():
                times[k].append(clock(fn))
        res = {k: {"latency_s": statistics.median(v), "candidates_per_s": n / statistics.median(v)}
               for k, v in times.items()}
        out["requests"][n] = res
        print(f"{n:>5} {res['packed']['candidates_per_s']:>11.1f} {res['broadcast']['candidates_per_s']:>14.1f} "
              f"{res['copied']['candidates_per_s']:>11.1f} {res['naive']['candidates_per_s']:>10.1f} "
              f"{res['packed']['candidates_per_s'] / res['broadcast']['candidates_per_s']:>16.2f}x")
    # the same user again: its prefix KV is cached, only the candidates run, packed in one row or broadcast
    from slimlm.runtime.prefix_cache import PrefixCache

    cache = PrefixCache(1 << 30)
    label_probs_shared_prefix(model, prefix, suffixes[:1], labels, cache=cache)
    kv = cache.lookup(prefix).kv
    print(f"{'N':>5} {'hit: packed c/s':>16} {'hit: broadcast c/s':>19} {'hit: copied c/s':>16} {'packed/broadcast':>17}")
    for n in [int(x) for x in args.ns.split(",")]:
        sufs = suffixes[:n]
        ways = {"packed": lambda s=sufs, n=n: label_probs_shared_prefix(model, prefix, s, labels, past=kv, pack_max=n),
                "broadcast": lambda s=sufs: label_probs_shared_prefix(model, prefix, s, labels, past=kv, pack_max=0),
                "copied": copied(lambda s=sufs: label_probs_shared_prefix(model, prefix, s, labels, past=kv,
                                                                          pack_max=0))}
        for fn in ways.values():
            fn()
        times = {k: [] for k in ways}
        for _ in range(args.reps):
            for k, fn in ways.items():
                times[k].append(clock(fn))
        res = {k: {"latency_s": statistics.median(v), "candidates_per_s": n / statistics.median(v)}
               for k, v in times.items()}
        out["requests"][n]["cached_prefix"] = res
        print(f"{n:>5} {res['packed']['candidates_per_s']:>16.1f} {res['broadcast']['candidates_per_s']:>19.1f} "
              f"{res['copied']['candidates_per_s']:>16.1f} "
              f"{res['packed']['candidates_per_s'] / res['broadcast']['candidates_per_s']:>16.2f}x")
    rows = test[:args.eval_rows]
    ev = {}
    for _ in range(2):  # alternate twice, keep the faster of each (the second pass is warm)
        for strategy in ("packed", "broadcast"):
            t = clock(lambda s=strategy: score(model, rows, labels, strategy=s))
            ev[strategy] = min(ev.get(strategy, float("inf")), t)
    out["evaluation"] = {k: {"seconds": v, "rows_per_s": len(rows) / v} for k, v in ev.items()}
    out["evaluation"]["rows"] = len(rows)
    print(f"evaluation, {len(rows)} test rows (2 per user): packed {len(rows) / ev['packed']:.1f} rows/s, "
          f"broadcast {len(rows) / ev['broadcast']:.1f} rows/s ({ev['broadcast'] / ev['packed']:.2f}x)")
    write_json(args.out, out)


if __name__ == "__main__":
    main()

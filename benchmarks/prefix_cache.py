"""Prefix-cache benchmark: a repeated-user ranking workload through the HTTP server, cache off vs on.

    python benchmarks/prefix_cache.py [--quick] [--model teacher|student8|DIR] [--users 8] [--repeats 5]
                                      [--candidates 5,10,20] [--concurrency 2] [--trials 3] [--batch-size 16]
                                      [--prefix-cache-mb 512] [--threads 2] [--out runs/bench/prefix_cache.json]

Workload (MovieLens-100K test split, real prompts): --users users, each scored --repeats times, each time
with C new candidates (suffixes of other users' rows, never repeated); the requests go round-robin over
users (u1, u2, ..., u1, u2, ...), so the cache must hold every active user's prefix between their requests.
One request = one user prefix (~250 tokens) + C candidates (~45 tokens each) to /v1/score on a loopback
server, --concurrency requests in flight.

    off   ``slimlm serve --prefix-cache-mb 0``: today's engine (each request runs its prefix once, then the
          candidates against its KV)
    on    ``--prefix-cache-mb N``: a repeated user's prefix KV comes from the cache; only candidates run
    filed ``--prefix-cache-mb 0 --score-pack-max 0`` (with ``--filed``): the engine as issue 18 found it — no
          cache, and the prefix KV broadcast to a padded candidate batch instead of one packed row

Each trial runs every server over the same requests, the order rotating from trial to trial, each cache
starting empty. Reported per C: aggregate candidates/s (all candidates / wall), per-request latency
p50/p99, the cache's hit rate (hits / lookups, from /metrics) and the share of prefix tokens it supplied;
speed-up = median over trials of on / off candidates/s (and on / filed); max |score difference| between on and off (the
cache must not change a score beyond float rounding). The best possible hit rate is (repeats - 1) / repeats.

The saving per repeated request is the prefix's forward, so it shrinks as C grows: with P prefix and
S = C x 45 candidate tokens the prefill-bound ceiling is (P + S) / S per repeat. Target: >= 1.5x
candidates/s on the repeated-user load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def workload(tok, users: int, repeats: int, n_cand: int, seed: int = 0) -> list[dict]:
    """The requests in send order: round r of every user, then round r + 1."""
    from serve import ranking_requests

    per_user = ranking_requests(tok, users, n_cand * repeats, seed=seed)
    return [{"user": u, "round": r, "prefix": req["prefix"],
             "candidates": req["candidates"][r * n_cand:(r + 1) * n_cand], "prefix_tokens": len(req["prefix_ids"])}
            for r in range(repeats) for u, req in enumerate(per_user)]


def metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def run_pass(url: str, reqs: list[dict], concurrency: int, timeout: float) -> dict:
    """Send ``reqs`` in order with ``concurrency`` in flight; latencies, wall time and every score."""
    import httpx

    scores: list = [None] * len(reqs)
    latency: list = [None] * len(reqs)
    nxt, lock = iter(range(len(reqs))), threading.Lock()

    def worker():
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = client.post("/v1/score", json={"prefix": reqs[i]["prefix"], "candidates": reqs[i]["candidates"]})
                latency[i] = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")
                scores[i] = np.array(r.json()["scores"])[:, 0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    n = sum(len(r["candidates"]) for r in reqs)
    return {"wall_s": wall, "candidates": n, "candidates_per_s": n / wall, "latency": latency, "scores": scores}


def bench_c(model, tok, name: str, n_cand: int, args) -> dict:
    from slimlm.serve.app import ServeConfig, create_app, serve_in_thread

    reqs = workload(tok, args.users, args.repeats, n_cand)
    prefix_tokens = sum(r["prefix_tokens"] for r in reqs)
    log(f"[C={n_cand}] {len(reqs)} requests ({args.users} users x {args.repeats}), "
        f"{np.mean([r['prefix_tokens'] for r in reqs]):.0f} prefix tokens on average")
    common = dict(score_batch_size=args.batch_size, max_candidates=4096, max_prompt_tokens=8192)
    modes = ("off", "on", "filed") if args.filed else ("off", "on")
    trials = {m: [] for m in modes}
    max_diff = 0.0
    for trial in range(args.trials):
        order = modes[trial % len(modes):] + modes[:trial % len(modes)]
        got = {}
        for mode in order:
            mb = args.prefix_cache_mb if mode == "on" else 0
            cfg = ServeConfig(**common, prefix_cache_mb=mb, **({"score_pack_max": 0} if mode == "filed" else {}))
            app = create_app(name, cfg, model=model, tokenizer=tok)
            with serve_in_thread(app) as url:  # a fresh server: the cache starts empty every trial
                run_pass(url, [{**reqs[0], "prefix": "Warm-up.\n", "candidates": reqs[0]["candidates"][:2]}], 1,
                         args.timeout)
                before = metrics(url)
                res = run_pass(url, reqs, args.concurrency, args.timeout)
                after = metrics(url)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("slimlm_prefix_cache_")
                     and k.endswith("_total")}
            lookups = delta.get("slimlm_prefix_cache_hits_total", 0) + delta.get("slimlm_prefix_cache_misses_total", 0)
            row = {"candidates_per_s": res["candidates_per_s"], "wall_s": res["wall_s"],
                   "latency_s": {"p50": float(np.percentile(res["latency"], 50)),
                                 "p99": float(np.percentile(res["latency"], 99))}}
            if mode == "on":
                row |= {"hit_rate": delta.get("slimlm_prefix_cache_hits_total", 0) / lookups if lookups else 0.0,
                        "reused_prefix_share": delta.get("slimlm_prefix_cache_reused_tokens_total", 0) / prefix_tokens,
                        "evictions": delta.get("slimlm_prefix_cache_evictions_total", 0)}
            trials[mode].append(row)
            got[mode] = res["scores"]
            log(f"[C={n_cand}] trial {trial} {mode}: {json.dumps(row)}")
        max_diff = max(max_diff, *(float(np.abs(a - b).max()) for m in modes[1:]
                                   for a, b in zip(got[m], got["off"], strict=True)))

    def med(mode, key, sub=None):
        vals = [t[key] if sub is None else t[key][sub] for t in trials[mode]]
        return statistics.median(vals)

    out = {"candidates_per_request": n_cand, "requests": len(reqs), "trials": trials,
           "mean_prefix_tokens": prefix_tokens / len(reqs),
           "mean_candidate_tokens": float(np.mean([len(tok(c, add_special_tokens=False).input_ids)
                                                   for r in reqs for c in r["candidates"]])),
           "best_hit_rate": (args.repeats - 1) / args.repeats, "max_abs_score_diff_vs_off": max_diff}
    for mode in modes:
        out[mode] = {"candidates_per_s": med(mode, "candidates_per_s"), "p50_s": med(mode, "latency_s", "p50"),
                     "p99_s": med(mode, "latency_s", "p99")}
    out["on"] |= {"hit_rate": med("on", "hit_rate"), "reused_prefix_share": med("on", "reused_prefix_share")}
    out["speedup"] = statistics.median(a["candidates_per_s"] / b["candidates_per_s"]
                                       for a, b in zip(trials["on"], trials["off"], strict=True))
    if "filed" in modes:
        out["speedup_vs_filed"] = statistics.median(a["candidates_per_s"] / b["candidates_per_s"]
                                                    for a, b in zip(trials["on"], trials["filed"], strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--model", default="teacher", help="teacher, student8 (see benchmarks/serve.py) or a model dir")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--candidates", default="5,10,20", help="comma list: candidates per request")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prefix-cache-mb", type=float, default=512)
    ap.add_argument("--filed", action="store_true", help="a third server: no cache and no packing (the engine "
                    "issue 18 was filed against)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prefix_cache.json"))
    args = ap.parse_args()
    if args.quick:
        args.users, args.repeats, args.candidates, args.trials = 2, 3, "4", 1
    torch.set_num_threads(args.threads)
    import transformers
    from serve import load_variant

    from slimlm.io import atomic_write_json
    from slimlm.loading import load_model, load_tokenizer

    if args.model in ("teacher", "student8"):
        model, tok, _ = load_variant(args.model)
    else:
        model, tok = load_model(args.model), load_tokenizer(args.model)
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "threads": args.threads,
                          "cpu_count": os.cpu_count(), "device": str(next(model.parameters()).device)},
              "loadavg_start": list(os.getloadavg()), "args": vars(args) | {"out": str(args.out)}, "rows": []}
    for c in (int(x) for x in args.candidates.split(",")):
        result["rows"].append(bench_c(model, tok, args.model, c, args))
    result["loadavg_end"] = list(os.getloadavg())
    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    print(f"{'C':>4} {'off cand/s':>10} {'on cand/s':>10} {'speed-up':>8} {'hit rate':>8} {'prefix reused':>13} "
          f"{'off p50/p99 s':>14} {'on p50/p99 s':>14} {'max|dscore|':>11}")
    for r in result["rows"]:
        print(f"{r['candidates_per_request']:>4} {r['off']['candidates_per_s']:>10.2f} {r['on']['candidates_per_s']:>10.2f} "
              f"{r['speedup']:>7.2f}x {r['on']['hit_rate']:>8.2f} {r['on']['reused_prefix_share']:>13.2f} "
              f"{r['off']['p50_s']:>6.2f}/{r['off']['p99_s']:<7.2f} {r['on']['p50_s']:>6.2f}/{r['on']['p99_s']:<7.2f} "
              f"{r['max_abs_score_diff_vs_off']:>11.1e}")
        if "speedup_vs_filed" in r:
            print(f"     filed (no cache, broadcast) {r['filed']['candidates_per_s']:.2f} cand/s, p50/p99 "
                  f"{r['filed']['p50_s']:.2f}/{r['filed']['p99_s']:.2f} s; on / filed {r['speedup_vs_filed']:.2f}x")
    print(f"loadavg {result['loadavg_end']}")


if __name__ == "__main__":
    main()

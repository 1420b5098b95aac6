"""Serving benchmark: ranking with shared-prefix reuse vs naive transformers, and generation vs model.generate.

    python benchmarks/serve.py [--quick] [--models teacher,student8,int8] [--candidates 100] [--users 4]
                               [--reps 5] [--naive-reps 3] [--int8-naive-reps 2] [--batch-size 16] [--threads 2]
                               [--out runs/bench/serve.json]

Ranking (the paper's predictive use; MovieLens-100K test split, real prompts): one request = one user's
prefix (profile + 8 recent ratings, ~250 tokens) + C candidate suffixes (~45 tokens each) taken from other
rows of the split; the score is P(" Yes") over {" Yes", " No"} at the answer position.

    slimlm  runtime.scoring.label_probs_shared_prefix: the prefix runs once, its KV cache is broadcast to
            candidate batches of --batch-size, the LM head runs on the two label rows at the last position
    naive   transformers as commonly written: every candidate is a whole prompt (prefix + suffix),
            right-padded batches of 16, ``model(input_ids, attention_mask).logits`` (LM head at every
            position), softmax over the two label logits at each row's last real token

Each request is timed alone (p50 / p99 over --reps users; with so few samples p99 is close to the max);
candidates/s = C / median latency. Both paths' scores are compared (max |difference|). "Several
concurrent users": --users requests in flight at once through the HTTP server (/v1/score, loopback),
reported as aggregate candidates/s and per-request p50/p99.

Prefill efficiency: FLOPs of the engine's request = 2 x (decoder linear weights) x (real tokens run)
+ attention (4 x heads x head_dim x attended keys, per layer and query) + the label head; achieved
FLOP/s = FLOPs / median latency, as a fraction of this machine's fp32 matmul peak measured here (best of
torch.mm on 2048^2 and 4096^2 with --threads threads).

Generation: greedy, prompts from the same split (whole prompts, ~290 tokens), 64 new tokens, EOS
disabled so both produce exactly 64; tokens/s = batch x 64 / wall (prefill included), batch 1 and 8,
slimlm runtime.decoding.generate vs model.generate (same model, use_cache, do_sample=False). Plus batch 8 through
the server's continuous batching (8 concurrent /v1/completions requests).

The naive side always runs the fp32 model of the same architecture: for ``int8`` it is the fp32 teacher
(--int8-naive-reps requests interleaved with the INT8 ones), so the INT8 speed-up is against fp32 naive.

Models: ``teacher`` (fp32 SmolLM2-135M), ``student8`` (runs/bench/student8: 8 of the teacher's 30 layers,
created with ``slimlm init-student teacher --layers 8`` if missing), ``int8`` (the teacher quantized to
INT8 W8A8 with slimlm.quantize if that package is present; otherwise reported as pending). Targets:
slimlm >= 5x naive candidates/s in fp32, >= 10x with INT8 (vs the naive fp32 anchor); prefill >= 50% of
the fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

STUDENT_DIR = Path("runs/bench/student8")
NAIVE_BATCH = 16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine peak


def matmul_peak(threads: int) -> dict:
    torch.set_num_threads(threads)
    best = {}
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    return {"gflops_by_n": best, "gflops": max(best.values()), "threads": threads}


# --------------------------------------------------------------------------- workload


def ranking_requests(tok, n_users: int, n_cand: int, seed: int = 0) -> list[dict]:
    """Per user: prefix ids and ``n_cand`` candidate suffix ids drawn from other users' rows."""
    import random

    from slimlm.tasks.movielens import movielens_examples

    ex = movielens_examples("test")
    by_group: dict[str, list] = {}
    for e in ex:
        by_group.setdefault(e.group, []).append(e)
    groups = sorted(by_group)
    rng = random.Random(seed)
    users = rng.sample(groups, n_users)
    out = []
    for g in users:
        prefix = by_group[g][0].prefix
        others = [e for e in ex if e.group != g]
        cands = [e.suffix for e in rng.sample(others, n_cand)]
        out.append({"group": g, "prefix": prefix, "candidates": cands,
                    "prefix_ids": tok(prefix).input_ids,
                    "suffix_ids": tok(cands, add_special_tokens=False).input_ids})
    return out


# --------------------------------------------------------------------------- ranking


@torch.inference_mode()
def naive_scores(model, prompts: list[list[int]], label_ids, pad_id: int) -> np.ndarray:
    """Whole prompts, right-padded batches, full logits at every position (the common transformers way)."""
    out = []
    for i in range(0, len(prompts), NAIVE_BATCH):
        batch = prompts[i:i + NAIVE_BATCH]
        n = max(len(p) for p in batch)
        ids = torch.full((len(batch), n), pad_id)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, :len(p)] = torch.tensor(p)
            mask[r, :len(p)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(batch)), mask.sum(1) - 1][:, list(label_ids)]
        out.append(torch.softmax(last.double(), -1)[:, 0].numpy())
    return np.concatenate(out)


def request_flops(model, prefix_len: int, suffix_lens: list[int]) -> float:
    """FLOPs of one shared-prefix scoring request (real tokens only; padding not counted)."""
    from slimlm.models import arch_facts

    f = arch_facts(model.config)
    linear = 0
    for layer in model.get_decoder().layers:
        for m in layer.modules():
            if hasattr(m, "in_features") and hasattr(m, "out_features") and m is not layer:
                linear += m.in_features * m.out_features
    tokens = prefix_len + sum(suffix_lens)
    flops = 2.0 * linear * tokens
    # attention: QK^T and AV, 2 FLOPs per multiply-add, heads x head_dim per key
    per_key = 4.0 * f.num_heads * f.head_dim * f.num_layers
    keys = prefix_len * (prefix_len + 1) / 2  # causal prefix
    keys += sum(s * prefix_len + s * (s + 1) / 2 for s in suffix_lens)
    flops += per_key * keys
    flops += 2.0 * f.hidden_size * 2 * len(suffix_lens)  # the two label rows
    return flops


def pct(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(xs),
            "all": [round(float(x), 4) for x in xs]}


def bench_ranking(name: str, model, tok, reqs: list[dict], args, peak: dict, naive_model=None) -> dict:
    """Engine and naive requests alternate (engine, naive, engine, ...), so a change in the machine's
    load during the run affects both sides alike."""
    from slimlm.runtime.scoring import label_probs_shared_prefix
    from slimlm.tasks.ranking import label_token_ids

    labels = label_token_ids(tok)
    pad = tok.pad_token_id
    n_cand = len(reqs[0]["candidates"])
    naive_reps = (args.int8_naive_reps if name == "int8" else args.naive_reps) if naive_model is not None else 0
    log(f"[{name}] ranking: {args.reps} slimlm and {naive_reps} naive requests of 1 user x {n_cand} candidates")
    label_probs_shared_prefix(model, reqs[0]["prefix_ids"], reqs[0]["suffix_ids"][:4], labels)  # warm-up
    if naive_model is not None:
        naive_scores(naive_model, [reqs[0]["prefix_ids"] + s for s in reqs[0]["suffix_ids"][:2]], labels, pad)
    t_eng, s_eng, t_nv, s_nv = [], [], [], []
    for i in range(max(args.reps, naive_reps)):
        r = reqs[i % len(reqs)]
        if i < args.reps:
            t = time.perf_counter()
            s_eng.append(label_probs_shared_prefix(model, r["prefix_ids"], r["suffix_ids"], labels,
                                                   batch_size=args.batch_size, pad_id=pad)[:, 0])
            t_eng.append(time.perf_counter() - t)
        if i < naive_reps:
            t = time.perf_counter()
            s_nv.append(naive_scores(naive_model, [r["prefix_ids"] + s for s in r["suffix_ids"]], labels, pad))
            t_nv.append(time.perf_counter() - t)
        log(f"[{name}]   request {i}: slimlm {t_eng[-1] if i < args.reps else '-'} s, "
            f"naive {t_nv[-1] if i < naive_reps else '-'} s")
    row = {"model": name, "candidates_per_request": n_cand, "engine_batch_size": args.batch_size,
           "slimlm": {"latency_s": pct(t_eng), "candidates_per_s": n_cand / statistics.median(t_eng)}}
    flops = [request_flops(model, len(r["prefix_ids"]), [len(s) for s in r["suffix_ids"]])
             for r in [reqs[i % len(reqs)] for i in range(args.reps)]]
    achieved = statistics.median(f / t for f, t in zip(flops, t_eng, strict=True)) / 1e9
    row["slimlm"]["prefill_gflops"] = achieved
    row["slimlm"]["fraction_of_fp32_peak"] = achieved / peak["gflops"]
    row["slimlm"]["tokens_per_request"] = len(reqs[0]["prefix_ids"]) + sum(len(s) for s in reqs[0]["suffix_ids"])
    if naive_reps:
        row["naive"] = {"latency_s": pct(t_nv), "candidates_per_s": n_cand / statistics.median(t_nv),
                        "tokens_per_request": sum(len(reqs[0]["prefix_ids"]) + len(s) for s in reqs[0]["suffix_ids"])}
        row["speedup_vs_naive_fp32"] = row["slimlm"]["candidates_per_s"] / row["naive"]["candidates_per_s"]
        row["max_abs_score_diff_vs_naive"] = float(max(np.abs(a - b).max() for a, b in zip(s_eng, s_nv,
                                                                                               strict=False)))
    return row


def bench_concurrent_users(name: str, model, tok, reqs: list[dict], args) -> dict:
    """--users requests at once through the HTTP server's /v1/score (loopback)."""
    from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
    from slimlm.serve.bench import run_load

    app = create_app(name, ServeConfig(score_batch_size=args.batch_size, max_candidates=4096), model=model,
                     tokenizer=tok)
    payloads = [{"prefix": r["prefix"], "candidates": r["candidates"]} for r in reqs]
    n = args.users * max(1, args.concurrent_rounds)
    log(f"[{name}] ranking: {n} requests via HTTP, {args.users} concurrent")
    with serve_in_thread(app) as url:
        run_load(url, kind="score", requests=1, concurrency=1, payloads=payloads[:1], timeout=600)  # warm-up
        r = run_load(url, kind="score", requests=n, concurrency=args.users, duration=3600, payloads=payloads,
                     timeout=1800)
    return {"model": name, "users_concurrent": args.users, "requests": r["ok"], "errors": r["errors"],
            "candidates_per_s": r["candidates_per_s"], "latency_s": r["latency_s"], "wall_s": r["wall_s"]}


# --------------------------------------------------------------------------- generation


def bench_generation(name: str, model, tok, prompts: list[list[int]], args, hf_model=None) -> dict:
    from slimlm.runtime.decoding import generate

    pad = tok.pad_token_id
    out = {"model": name, "new_tokens": args.new_tokens, "rows": []}
    generate(model, [prompts[0][:8]], max_new_tokens=2, temperature=0, pad_id=pad)  # warm-up
    for batch in (1, 8):
        ps = prompts[:batch]
        t = time.perf_counter()
        ours = generate(model, ps, max_new_tokens=args.new_tokens, temperature=0, pad_id=pad)  # no EOS: full length
        t_ours = time.perf_counter() - t
        assert all(len(o) == args.new_tokens for o in ours)
        row = {"batch": batch, "slimlm_tokens_per_s": batch * args.new_tokens / t_ours, "slimlm_s": t_ours}
        if hf_model is not None:
            n = max(len(p) for p in ps)
            ids = torch.full((batch, n), pad)
            mask = torch.zeros((batch, n), dtype=torch.long)
            for i, p in enumerate(ps):  # left padding, as model.generate wants for decoder-only models
                ids[i, n - len(p):] = torch.tensor(p)
                mask[i, n - len(p):] = 1
            with torch.inference_mode():
                hf_model.generate(input_ids=ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2,
                                  do_sample=False, pad_token_id=pad)  # warm-up
                t = time.perf_counter()
                hf = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad,
                                       use_cache=True)
                t_hf = time.perf_counter() - t
            hf_new = hf[:, n:].tolist()
            row.update({"hf_generate_tokens_per_s": batch * args.new_tokens / t_hf, "hf_generate_s": t_hf,
                        "speedup_vs_hf": t_hf / t_ours,
                        "same_tokens_as_hf": sum(a == b for a, b in zip(ours, hf_new, strict=True))})
        out["rows"].append(row)
        log(f"[{name}] generation batch {batch}: {row}")
    return out


def bench_server_generation(name: str, model, tok, args) -> dict:
    from slimlm.serve.app import ServeConfig, create_app, serve_in_thread
    from slimlm.serve.bench import run_load

    app = create_app(name, ServeConfig(max_batch=8), model=model, tokenizer=tok)
    with serve_in_thread(app) as url:
        run_load(url, kind="completions", requests=1, concurrency=1, max_tokens=2)
        r = run_load(url, kind="completions", requests=16, concurrency=8, max_tokens=args.new_tokens, duration=3600,
                     timeout=1800)
    return {"model": name, "concurrency": 8, "requests": r["ok"], "errors": r["errors"],
            "tokens_per_s": r["tokens_per_s"], "latency_s": r["latency_s"]}


# --------------------------------------------------------------------------- models


def load_variant(name: str):
    """(model, tokenizer, note) for a variant name; model None with a note when it cannot be had."""
    from slimlm.loading import load_model, load_tokenizer

    tok = load_tokenizer("teacher")
    if name == "teacher":
        return load_model("teacher"), tok, None
    if name == "student8":
        if not (STUDENT_DIR / "config.json").is_file():
            log(f"creating {STUDENT_DIR} (slimlm init-student teacher --layers 8)")
            subprocess.run([sys.executable, "-m", "slimlm", "init-student", "teacher", "--layers", "8",
                            "--out", str(STUDENT_DIR)], check=True, stdout=subprocess.DEVNULL)
        return load_model(STUDENT_DIR), load_tokenizer(STUDENT_DIR), None
    if name == "int8":
        try:
            from slimlm.quantize.api import QuantConfig, quantize_model
        except ImportError as e:
            return None, tok, f"pending: slimlm.quantize not importable ({e})"
        try:
            m = load_model("teacher")
            report = quantize_model(m, QuantConfig(scheme="int8"))
            return m, tok, f"quantized in-process: {report.get('quantized_layers')} layers int8 W8A8 (dynamic per-token)"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            return None, tok, f"pending: quantization failed ({type(e).__name__}: {e})"
    raise SystemExit(f"unknown model variant {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--models", default="teacher,student8,int8")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--concurrent-rounds", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive-reps", type=int, default=3)
    ap.add_argument("--int8-naive-reps", type=int, default=2, help="naive fp32 anchor requests interleaved with int8")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: naive,http,generation")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve.json"))
    args = ap.parse_args()
    if args.quick:
        args.candidates, args.users, args.reps, args.naive_reps, args.new_tokens = 10, 2, 2, 1, 8
        args.int8_naive_reps = 1
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
        "cpu_count": os.cpu_count()}, "loadavg_start": list(os.getloadavg()), "args": vars(args) | {"out": str(args.out)}}
    import transformers

    result["machine"]["transformers"] = transformers.__version__
    log("measuring the fp32 matmul peak")
    peak = matmul_peak(args.threads)
    result["fp32_matmul_peak"] = peak
    log(f"peak {peak['gflops']:.1f} GFLOP/s")

    from slimlm.loading import load_tokenizer

    tok = load_tokenizer("teacher")
    reqs = ranking_requests(tok, max(args.reps, args.users), args.candidates)
    gen_prompts = [r["prefix_ids"] + r["suffix_ids"][0] for r in ranking_requests(tok, 8, 1, seed=1)]
    result["workload"] = {"prefix_tokens": [len(r["prefix_ids"]) for r in reqs],
                          "mean_suffix_tokens": float(np.mean([len(s) for r in reqs for s in r["suffix_ids"]])),
                          "generation_prompt_tokens": [len(p) for p in gen_prompts]}
    result["ranking"], result["concurrent_users"], result["generation"], result["server_generation"] = [], [], [], []
    result["notes"] = {}
    fp32_teacher = None
    for name in args.models.split(","):
        model, mtok, note = load_variant(name)
        if note:
            result["notes"][name] = note
            log(f"[{name}] {note}")
        if model is None:
            continue
        # the naive anchor is the fp32 model of the same architecture: INT8 runs against the fp32 teacher
        if name == "teacher":
            fp32_teacher = model
        naive_model = None if "naive" in skip else (model if name != "int8" else fp32_teacher)
        row = bench_ranking(name, model, mtok, reqs, args, peak, naive_model=naive_model)
        result["ranking"].append(row)
        log(f"[{name}] ranking: {json.dumps({k: v for k, v in row.items() if k != 'model'})[:600]}")
        if "http" not in skip:
            result["concurrent_users"].append(bench_concurrent_users(name, model, mtok, reqs[:args.users], args))
            log(f"[{name}] concurrent: {result['concurrent_users'][-1]}")
        if "generation" not in skip:
            result["generation"].append(bench_generation(name, model, mtok, gen_prompts, args, hf_model=model))
            if "http" not in skip:
                result["server_generation"].append(bench_server_generation(name, model, mtok, args))
                log(f"[{name}] server generation: {result['server_generation'][-1]}")
        del model
    del fp32_teacher
    result["loadavg_end"] = list(os.getloadavg())
    from slimlm.io import atomic_write_json

    atomic_write_json(args.out, result)
    log(f"wrote {args.out}")
    print(json.dumps({"ranking": [{k: r.get(k) for k in ("model", "speedup_vs_naive_fp32")} | {
        "slimlm_cand_s": r["slimlm"]["candidates_per_s"], "naive_cand_s": r.get("naive", {}).get("candidates_per_s"),
        "peak_fraction": r["slimlm"]["fraction_of_fp32_peak"]} for r in result["ranking"]],
        "loadavg": result["loadavg_end"]}, indent=1))


if __name__ == "__main__":
    main()

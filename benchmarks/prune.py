"""Structured pruning before re-distillation: OSSCAR vs OSSCAR-greedy vs activation vs magnitude, side by side.

    python benchmarks/prune.py [--quick] [--model DIR ...] [--levels mlp75,mlp50,kv2,layers20]
                               [--methods osscar,greedy,activation,magnitude] [--samples 128] [--seq-len 256]
                               [--ppl-blocks 16] [--auc-limit 300] [--sft-levels mlp50] [--redistill-steps 0]
                               [--out runs/bench/prune.json]

For every model (the zero-shot SmolLM2-135M teacher, plus the task-fine-tuned teacher at
runs/bench/quality/teacher-sft/model when it exists), level and method, `slimlm prune` runs in a fresh process
(its report gives the pruning wall time and peak RSS); then, in this process, each pruned model gets:

* perplexity on the first ``--ppl-blocks`` blocks of 512 tokens of the built-in held-out prose. Calibration on
  prose uses that text's *last* samples x seq_len tokens (slimlm.calib), checked disjoint here;
* ranking AUC on a MovieLens test subset (``--auc-limit`` rows, whole users, seeded) for the fine-tuned teacher
  (calibrated on train-split prompts); the zero-shot teacher ranks at chance, so its AUC is skipped unless
  ``--auc-zero-shot``;
* for the fine-tuned teacher, fidelity to the unpruned model's scores on the same rows: mean binary KL of P(pos)
  and the correlation of log-odds (paired, so far less noisy than AUC on a few hundred rows);
* non-embedding parameters and prefill latency (batch 16 x 128 tokens, last-position logits, median of 3).

Levels: mlp75 / mlp50 (MLP neurons kept), kv2 (one of three KV groups removed: 9 -> 6 query heads, 3 -> 2
KV heads), q6 (one query head of three removed from every KV group: 9 -> 6 query heads, KV heads kept),
layers20 (30 -> 20 decoder layers), hidden75 / hidden50 (residual-stream channels kept: 576 -> 432 / 288; the
embedding shrinks too; rows compare channels chosen by calibration energy, "activation", with channels chosen
from the weights that read them, "magnitude"). OSSCAR, its greedy and the two baselines are width methods;
at the depth level the rows compare the depth importance measures instead (cosine = 1 − cos(in, out),
loss = loss increase when skipped, evenly = evenly spaced layers as `slimlm init-student` picks them).
``--redistill-steps N`` re-distils the OSSCAR mlp50 model by KD from its teacher on the prose that follows
the perplexity blocks (never the evaluation tokens) and reports perplexity before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import run_logged  # benchmarks/ is on sys.path when run as a script

SFT_TEACHER = Path("runs/bench/quality/teacher-sft/model")
LEVELS = {
    "mlp75": ["--mlp-keep", "0.75"],
    "mlp50": ["--mlp-keep", "0.5"],
    "kv2": ["--heads-keep", "6", "--head-mode", "kv"],
    "q6": ["--heads-keep", "6", "--head-mode", "query"],
    "layers20": ["--layers-keep", "20"],
    "hidden75": ["--hidden-keep", "0.75"],
    "hidden50": ["--hidden-keep", "0.5"],
}
WIDTH_METHODS = ("osscar", "greedy", "activation", "magnitude")
DEPTH_METHODS = ("cosine", "loss", "evenly")
HIDDEN_METHODS = ("activation", "magnitude")  # channels by calibration energy vs by reader weights alone



@torch.inference_mode()
def prefill_latency(model, batch: int = 16, length: int = 128, reps: int = 3) -> float:
    ids = torch.randint(100, 40000, (batch, length), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fidelity(p, ref) -> dict:
    """How much of the unpruned model's ranking function survives, paired row by row (far less noisy than
    AUC against the labels on a few hundred rows): mean binary KL(unpruned || pruned) of P(pos), and the
    Pearson correlation of the two models' log-odds."""
    import numpy as np

    eps = 1e-7
    p, ref = np.clip(np.asarray(p, np.float64), eps, 1 - eps), np.clip(np.asarray(ref, np.float64), eps, 1 - eps)
    kl = ref * np.log(ref / p) + (1 - ref) * np.log((1 - ref) / (1 - p))
    corr = np.corrcoef(np.log(p / (1 - p)), np.log(ref / (1 - ref)))[0, 1]
    return {"score_kl": float(kl.mean()), "score_corr": float(corr)}


def evaluate(model_dir: str, blocks, auc_examples, tokenizer, ref_scores=None) -> dict:
    from slimlm.evaluate import evaluate_ranking, perplexity
    from slimlm.loading import load_model
    from slimlm.models import arch_facts, param_counts

    model = load_model(model_dir)
    row = {"params": param_counts(model), "arch": arch_facts(model.config).to_dict()}
    row["perplexity"] = perplexity(model, blocks)["perplexity"]
    if auc_examples:
        m, p = evaluate_ranking(model, tokenizer, auc_examples, batch_size=16)
        row["auc"], row["auc_ci95"], row["log_loss"] = m["auc"], m["auc_ci95"], m["log_loss"]
        row["scores"] = [round(float(x), 6) for x in p]
        if ref_scores is not None:
            row.update(fidelity(p, ref_scores))
    row["prefill_s"] = prefill_latency(model)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="model dir(s) (default: teacher, + the SFT teacher if present)")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--methods", default=",".join(WIDTH_METHODS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-blocks", type=int, default=16)
    ap.add_argument("--auc-limit", type=int, default=300)
    ap.add_argument("--auc-zero-shot", action="store_true")
    ap.add_argument("--sft-levels", default="mlp50", help="levels run on the fine-tuned teacher (AUC)")
    ap.add_argument("--redistill-steps", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: zero-shot teacher, mlp50 only, 8 calibration samples, 4 ppl blocks")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/prune"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prune.json"))
    args = ap.parse_args()
    if args.quick:
        args.levels, args.samples, args.ppl_blocks, args.auc_limit = "mlp50", 8, 4, 40

    from slimlm.loading import load_tokenizer, resolve_model
    from slimlm.tasks import load_ranking_task
    from slimlm.tasks.text import read_texts, text_blocks

    models = args.model or ["teacher"] + ([str(SFT_TEACHER)] if SFT_TEACHER.is_dir() and not args.quick else [])
    slim = [sys.executable, "-m", "slimlm"]
    log: list = []
    results: list[dict] = []
    tok = load_tokenizer(resolve_model("teacher"))
    blocks = text_blocks(tok, read_texts(None), 512, max_blocks=args.ppl_blocks)
    n_tokens = len(text_blocks(tok, read_texts(None), 10**9)[0])
    eval_end = sum(len(b) for b in blocks)
    calib_start = n_tokens - args.samples * args.seq_len
    assert calib_start >= eval_end, "calibration windows would overlap the perplexity blocks"
    print(f"perplexity: tokens [0, {eval_end}) of the prose; calibration: tokens [{calib_start}, {n_tokens})")

    for model in models:
        sft = model != "teacher"
        name = "teacher-sft" if sft else "teacher"
        calib = "movielens-ranking" if sft else "text"
        auc_ex = load_ranking_task("movielens-ranking", None, "test", args.auc_limit, 0) \
            if (sft or args.auc_zero_shot) else None
        mtok = load_tokenizer(resolve_model(model))
        base = evaluate(str(resolve_model(model)), blocks, auc_ex, mtok)
        ref_scores = base.get("scores")
        results.append({"model": name, "level": "none", "method": "unpruned", **base})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "scores"}))
        for level in (args.sft_levels if sft else args.levels).split(","):
            methods = DEPTH_METHODS if level.startswith("layers") else \
                HIDDEN_METHODS if level.startswith("hidden") else args.methods.split(",")
            for method in methods:
                out = args.work / name / level / method
                t0 = time.perf_counter()
                if (out / "config.json").is_file():  # a re-run (e.g. with other levels) reuses finished prunes
                    done = out / "prune_report.json"
                    report = json.loads(done.read_text()) if done.is_file() else {"wall_seconds": None,
                                                                                   "peak_rss_mib": None}
                elif method == "evenly":
                    run_logged([*slim, "init-student", model, "--layers", LEVELS[level][1], "--out", str(out)], log)
                    report = {"wall_seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": None}
                else:
                    extra = ["--method", "osscar", "--depth-metric", method] if method in DEPTH_METHODS else \
                        ["--method", method]
                    run_logged([*slim, "prune", model, "--out", str(out), *LEVELS[level], *extra, "--calib", calib,
                        "--samples", str(args.samples), "--seq-len", str(args.seq_len)], log)
                    report = json.loads((out / "prune_report.json").read_text())
                row = {"model": name, "level": level, "method": method, "calib": calib,
                       "prune_wall_s": report["wall_seconds"], "prune_peak_rss_mib": report["peak_rss_mib"],
                       "prune_seconds": report.get("seconds"),
                       "mlp_rel_error_mean": report.get("mlp_rel_error_mean"),
                       "attn_rel_error_mean": report.get("attn_rel_error_mean"),
                       **evaluate(str(out), blocks, auc_ex, mtok, ref_scores)}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("arch", "prune_seconds", "scores")}))
                write(args, results, log)
        if not sft and args.redistill_steps > 0 and "mlp50" in args.levels.split(","):
            # before the fine-tuned teacher's rows: the recovery figure matters more than more rows
            results.append(redistill(args, slim, tok, blocks, eval_end, log))
            write(args, results, log)
    write(args, results, log)
    print_table(results)
    print(f"results: {args.out}")


def redistill(args, slim, tok, blocks, eval_end: int, log: list) -> dict:
    """KD of the OSSCAR mlp50 zero-shot-teacher model from the teacher on the prose after the perplexity
    blocks (never on the evaluation tokens)."""
    from slimlm.tasks.text import read_texts, text_blocks

    pruned = args.work / "teacher" / "mlp50" / "osscar"
    stream = text_blocks(tok, read_texts(None), 10**9)[0]
    data = args.work / "redistill-text.txt"
    data.write_text(tok.decode(stream[eval_end:]))
    out = args.work / "teacher" / "mlp50" / "osscar-kd"
    run_logged([*slim, "distill", "mode=kd", f"student={pruned}", "teacher=teacher", f"out={out}", "task.name=text",
        f"task.data={data}", "task.max_length=256", "task.eval_limit=8", f"max_steps={args.redistill_steps}",
        "batch_size=8", "optim.lr=1e-4", "optim.warmup_steps=3", "eval_every=0", "tensorboard=false"], log)
    row = {"model": "teacher", "level": "mlp50", "method": f"osscar + KD {args.redistill_steps} steps",
           **evaluate(str(out / "model"), blocks, None, tok)}
    print(json.dumps(row))
    return row


def write(args, results, log) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
               "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "commands": log}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out)


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(results) -> None:
    print(f"{'model':12s} {'level':9s} {'method':22s} {'ppl':>8s} {'AUC':>7s} {'KL':>7s} {'corr':>6s} {'non-emb M':>9s} {'prefill s':>9s} "
          f"{'prune s':>8s} {'peak MiB':>8s} {'mlp err':>8s} {'attn err':>8s}")
    for r in results:
        auc = f"{r['auc']:.4f}" if "auc" in r else "-"
        print(f"{r['model']:12s} {r['level']:9s} {r['method']:22s} {r['perplexity']:8.2f} {auc:>7s} "
              f"{_fmt(r.get('score_kl'), '7.4f'):>7s} {_fmt(r.get('score_corr'), '6.3f'):>6s} "
              f"{r['params']['non_embedding'] / 1e6:9.2f} {r['prefill_s']:9.3f} {_fmt(r.get('prune_wall_s'), '8.1f'):>8s} "
              f"{_fmt(r.get('prune_peak_rss_mib'), '8.0f'):>8s} {_fmt(r.get('mlp_rel_error_mean'), '8.4f'):>8s} "
              f"{_fmt(r.get('attn_rel_error_mean'), '8.4f'):>8s}")


if __name__ == "__main__":
    main()

"""Does quantization really move ranking AUC, and how far? A paired diagnostic on one fine-tuned model.

    python benchmarks/quantize_auc.py [--model runs/bench/quality/teacher-sft/model] [--limit 200]
                                      [--calib movielens-ranking] [--variants int8,int8-smooth,...]
                                      [--out runs/bench/int8_auc.json]

Every variant is quantized in memory (no export, so every tensor left in float stays fp32) and scores the same
MovieLens test rows. For each variant against fp32: ΔAUC with a paired bootstrap 95% interval (1,000
resamples of the rows, both models scored on the same resample), the correlation of the two models'
P(pos) and their mean absolute difference. Variants: int8; int8 leaving down_proj in float (the layer with
the widest activations); int8 with SmoothQuant calibrated on ``--calib``; fp8 (dynamic); INT4 weight-only
(``int4-{rtn,gptq,gptq-ao,quantease,quantease-ao}-g{G}[-clip]``: round-to-nearest, GPTQ, QuantEase, ``-ao``
with activation order; group size G, calibrated on ``--calib``; ``-clip`` with the clipping search, which
the names without it turn off so that they keep their meaning now that it is the calibrated methods' default).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def variant_config(name: str):
    from slimlm.quantize.api import QuantConfig

    fixed = {"int8": QuantConfig(scheme="int8"),
             "int8-no-down": QuantConfig(scheme="int8", ignore=["lm_head", "re:.*down_proj$"]),
             "int8-smooth": QuantConfig(scheme="int8", smooth=True),
             "fp8": QuantConfig(scheme="fp8")}
    if name in fixed:
        return fixed[name]
    if name.startswith("int4-") and "-g" in name:
        clip = name.endswith("-clip")
        method, group = name[len("int4-"):].removesuffix("-clip").rsplit("-g", 1)
        act_order = method.endswith("-ao")  # gptq-ao, quantease-ao: columns by activation order
        method = method.removesuffix("-ao")
        return QuantConfig(scheme="int4", method=method, act_order=act_order, group_size=int(group), clip_search=clip)
    raise SystemExit(f"unknown variant {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/bench/quality/teacher-sft/model")
    ap.add_argument("--limit", type=int, default=200, help="MovieLens test rows (whole users, seeded)")
    ap.add_argument("--calib", default="movielens-ranking", help="SmoothQuant calibration data")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--variants", default="int8,int8-no-down,int8-smooth,fp8",
                    help="comma-separated; fp32 always runs (the reference)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/int8_auc.json"))
    args = ap.parse_args()

    from slimlm.calib import calibration_windows
    from slimlm.evaluate import evaluate_ranking, paired_auc_delta, roc_auc
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.quantize.api import quantize_model
    from slimlm.tasks import load_ranking_task

    torch.set_num_threads(2)
    tok = load_tokenizer(args.model)
    examples = load_ranking_task("movielens-ranking", None, "test", args.limit, 0)
    y = np.array([e.label for e in examples])
    calib = calibration_windows(tok, args.calib, args.calib_samples, 256)
    variants = {"fp32": None, **{name: variant_config(name) for name in args.variants.split(",")}}
    scores: dict[str, np.ndarray] = {}
    for name, cfg in variants.items():
        t = time.perf_counter()
        model = load_model(args.model)
        if cfg is not None:
            quantize_model(model, cfg, calib if cfg.needs_calibration else None)
        scores[name] = np.asarray(evaluate_ranking(model, tok, examples)[1])
        print(f"{name:14s} AUC {roc_auc(y, scores[name]):.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)

    base = scores["fp32"]
    rows = {}
    for name, p in scores.items():
        if name == "fp32":
            continue
        delta, lo, hi = paired_auc_delta(y, p, base, n=args.resamples, seed=0)
        rows[name] = {"auc": roc_auc(y, p), "delta_auc": delta, "delta_ci95": [lo, hi],
                      "score_corr": float(np.corrcoef(p, base)[0, 1]), "mean_abs_diff": float(np.abs(p - base).mean())}
        print(name, json.dumps(rows[name]), flush=True)
    summary = {"model": args.model, "limit": args.limit, "calib": args.calib, "fp32_auc": roc_auc(y, base),
               "fp32_score_std": float(base.std()), "fp32_score_range": [float(base.min()), float(base.max())],
               "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

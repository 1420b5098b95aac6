"""Candidates reading one prefix's KV in place (slimlm.runtime.shared_prefix) vs the KV copied into each batch.

    python benchmarks/shared_prefix.py [--model teacher] [--shapes 250x16,250x45,1000x16,1000x45]
                                       [--candidates 100] [--batch-size 16] [--reps 3]
                                       [--out runs/bench/shared_prefix_shapes.json]

For each PREFIXxCANDIDATE shape: a prefix of that many MovieLens prompt tokens and --candidates candidates of
that many tokens each (the next tokens of the same text), scored by ``label_probs_shared_prefix`` with
``pack_max=0`` (candidate batches of --batch-size after the prefix forward, as the engine scores more than
PACK_MAX_CANDIDATES candidates), the two ways alternating within each repetition: "in place" (the engine's
way on a CPU) and "copied" (``shared_prefix.only_on()``: the prefix KV expanded into each batch's cache,
the way before, and still the way on CUDA). Candidates/s = candidates / median seconds of the whole call
(prefix forward included). Scores of the two ways are compared too (max |Δ|).

--probe-models A,B: also the evaluate stage's speed probe (``slimlm.evaluate.speed``: a 192-token prefix, 100
candidates of 16 tokens in one batch) on each model, in place and copied alternating (--reps rounds): the
candidates/s every run report shows, and the ratio between models that the 20x target reads.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

from _common import ranking_model, write_json  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--shapes", default="250x16,250x45,1000x16,1000x45")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probe-models", default="", help="models for the evaluate stage's speed probe, comma-separated")
    ap.add_argument("--out", default="runs/bench/shared_prefix_shapes.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from slimlm.runtime import shared_prefix
    from slimlm.runtime.scoring import label_probs_shared_prefix
    from slimlm.tasks import load_ranking_task
    from slimlm.tasks.ranking import tokenize_ranking

    tok, model, labels = ranking_model(args.model)
    train = tokenize_ranking(load_ranking_task("movielens-ranking", None, "train", limit=400), tok)
    text = [t for ex in train for t in ex.input_ids]  # real prompt tokens, cut into prefix and candidates

    def score(prefix, candidates, in_place: bool):
        with contextlib.nullcontext() if in_place else shared_prefix.only_on():
            t = time.perf_counter()
            probs = label_probs_shared_prefix(model, prefix, candidates, labels, batch_size=args.batch_size,
                                              pack_max=0)
            return time.perf_counter() - t, probs

    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                 "threads": torch.get_num_threads(), "model": args.model, "candidates": args.candidates,
                 "batch_size": args.batch_size, "shapes": {}}
    print(f"{'prefix':>7} {'candidate':>10} {'in place c/s':>13} {'copied c/s':>11} {'in place / copied':>18}")
    with torch.inference_mode():
        for shape in [x for x in args.shapes.split(",") if x]:
            p, s = (int(x) for x in shape.split("x"))
            if p + s * args.candidates > len(text):
                raise SystemExit(f"shape {shape}: needs {p + s * args.candidates} tokens, the text has {len(text)}")
            prefix = text[:p]
            candidates = [text[p + s * i:p + s * (i + 1)] for i in range(args.candidates)]
            _, a = score(prefix, candidates, True)  # warm-up, and the scores of both ways
            _, b = score(prefix, candidates, False)
            times: dict[str, list[float]] = {"in_place": [], "copied": []}
            for _ in range(args.reps):
                times["in_place"].append(score(prefix, candidates, True)[0])
                times["copied"].append(score(prefix, candidates, False)[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {k: {"seconds": med[k], "candidates_per_s": args.candidates / med[k]} for k in med}
            row["speedup"] = med["copied"] / med["in_place"]
            row["max_abs_score_diff"] = float(np.abs(a - b).max())
            out["shapes"][shape] = row
            print(f"{p:>7} {s:>10} {row['in_place']['candidates_per_s']:>13.1f} "
                  f"{row['copied']['candidates_per_s']:>11.1f} {row['speedup']:>17.2f}x", flush=True)
    probes = [m for m in args.probe_models.split(",") if m]
    if probes:
        from slimlm.evaluate import speed
        from slimlm.loading import load_model

        models = {m: model if m == args.model else load_model(m) for m in probes}
        got: dict[str, dict[str, list[float]]] = {m: {"in_place": [], "copied": []} for m in probes}
        with torch.inference_mode():
            for _ in range(args.reps):
                for m, mod in models.items():
                    got[m]["in_place"].append(speed(mod, text)["candidates_per_s"])
                    with shared_prefix.only_on():
                        got[m]["copied"].append(speed(mod, text)["candidates_per_s"])
        out["probe"] = {m: {k: statistics.median(v) for k, v in ways.items()} | {"runs": ways} for m, ways in got.items()}
        for m, r in out["probe"].items():
            print(f"speed probe {m}: in place {r['in_place']:.1f} cand/s, copied {r['copied']:.1f} "
                  f"({r['in_place'] / r['copied']:.2f}x)", flush=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()

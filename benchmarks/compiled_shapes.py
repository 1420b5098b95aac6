"""The compiled decode step under a server's mix of shapes: one compile per shape against automatic dynamic shapes.

    python benchmarks/compiled_shapes.py [--model runs/demo/int8/model] [--threads 2]
                                         [--order static,dynamic] [--out runs/bench/compiled_shapes.json]

``DecodeBatch(compile=True)`` pads the running rows to a power of two and reads every column of its KV
buffers (a power of two that grows), so each row count and each buffer growth is a new shape. Two settings of
``torch.compile``, each in its own process with its own empty inductor cache (cold, as on a fresh machine):

    static    ``dynamic=False``: one compile per shape (slimlm before this benchmark; what a GPU still uses)
    dynamic   ``dynamic=None`` (automatic dynamic shapes): the first shape static, a dimension that changes
              made symbolic by the recompile (slimlm's CPU default now)

Workload, the same in both: batches of (rows, new tokens) = (1, 100), (2, 60), (4, 60), (1, 300) from 40-token
prompts — the shapes a server meets as requests come and go, with its buffers growing — then the steady state:
(1, 200) and (4, 100) three times, each timed. Recorded: graphs compiled (dynamo's ``unique_graphs``), whether torch
hit its recompile limit (after which it runs the step eagerly), wall seconds of the first pass, decode tok/s of
the steady batches (prefill excluded), and whether both settings gave the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST = ((1, 100), (2, 60), (4, 60), (1, 300))
STEADY = ((1, 200), (4, 100))


def child(model_dir: str, dynamic: bool, threads: int) -> dict:
    """One setting, in this process: the workload above; returns its measurements."""
    import logging

    import torch
    from torch._dynamo.utils import counters

    from slimlm.loading import load_model
    from slimlm.runtime import decoding

    torch.set_num_threads(threads)
    limit_hits = []

    class Hits(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                limit_hits.append(record.getMessage()[:200])

    logging.getLogger("torch._dynamo").addHandler(Hits())
    if not dynamic:
        decoding._compile_step = lambda fn, mode=None, dynamic=None: torch.compile(fn, dynamic=False, mode=mode)
    model = load_model(model_dir)

    def run(rows: int, n: int) -> tuple[list[list[int]], float]:
        batch = decoding.DecodeBatch(model, compile=True)
        gens = [decoding.Generation(list(range(100 + r, 140 + r)), decoding.SamplingParams(max_tokens=n, temperature=0))
                for r in range(rows)]
        batch.add(gens)
        t = time.perf_counter()
        while len(batch):
            batch.step()
        if not batch.compiled:
            raise RuntimeError("the compiled step fell back to eager")
        return [g.tokens for g in gens], time.perf_counter() - t

    t0 = time.perf_counter()
    tokens = [run(r, n)[0] for r, n in FIRST]
    first_s = time.perf_counter() - t0
    steady = {}
    for _ in range(3):
        for r, n in STEADY:
            toks, s = run(r, n)
            tokens.append(toks)
            steady.setdefault(f"b{r}", []).append(round(r * (n - 1) / s, 1))
    return {"graphs": counters["stats"]["unique_graphs"], "recompile_limit_hit": bool(limit_hits),
            "first_pass_s": round(first_s, 1), "steady_tok_s": steady, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/int8/model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", default="static,dynamic", help="the settings, in the order they run")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/compiled_shapes.json"))
    ap.add_argument("--child", choices=["static", "dynamic"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child == "dynamic", args.threads)))
        return

    from _common import write_json  # benchmarks/ is on sys.path when a script runs

    rows = {}
    for setting in args.order.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--model", args.model,
                                  "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"compiled_shapes.py: the {setting} run failed:\n{out.stderr[-3000:]}")
        rows[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        print(setting, {k: v for k, v in rows[setting].items() if k != "tokens"}, flush=True)
    same = rows["static"].pop("tokens") == rows["dynamic"].pop("tokens")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                          "cpus": os.cpu_count(), "threads": args.threads, "model": args.model,
                          "first_pass": [list(x) for x in FIRST], "steady": [list(x) for x in STEADY],
                          "same_tokens": same, "rows": rows})
    print("same tokens:", same, "->", args.out)


if __name__ == "__main__":
    main()

"""Foundation benchmark: teacher zero-shot quality, classic baselines, perplexity, load time and memory.

    python benchmarks/foundation.py [--limit N] [--out runs/bench/foundation.json]

Each measurement runs the user-facing CLI in a fresh process (so load time and peak RSS are those a user
sees) and the script collects their JSON results into one file. Summarised in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

LOAD_PROBE = """
import json, resource, time
t = time.perf_counter()
from slimlm.loading import load_model, load_tokenizer
m = load_model("teacher"); tok = load_tokenizer("teacher")
load = time.perf_counter() - t
import torch
with torch.inference_mode():
    m(torch.tensor([tok("Hello, world").input_ids]))
print(json.dumps({"load_seconds_incl_imports": round(load, 2),
                  "peak_rss_mib_after_one_forward": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="teacher eval on at most N test examples")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/foundation.json"))
    args = ap.parse_args()
    work = args.out.parent / "foundation"
    slimlm = [sys.executable, "-m", "slimlm"]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                     "python": platform.python_version()}
    import torch

    results["torch"] = torch.__version__
    results["threads"] = torch.get_num_threads()
    run([*slimlm, "fetch"])
    probe = subprocess.run([sys.executable, "-c", LOAD_PROBE], check=True, capture_output=True, text=True)
    results["teacher_load"] = json.loads(probe.stdout.strip().splitlines()[-1])
    for model in ("logistic", "gbdt"):
        f = work / f"baseline_{model}.json"
        run([*slimlm, "baseline", "movielens-ranking", "--model", model, "--out", str(f)])
        results[f"baseline_{model}"] = json.loads(f.read_text())
    f = work / "teacher_text.json"
    run([*slimlm, "eval", "teacher", "--task", "text", "--split", "all", "--out", str(f)])
    results["teacher_perplexity"] = json.loads(f.read_text())
    f = work / "teacher_ranking.json"
    cmd = [*slimlm, "eval", "teacher", "--task", "movielens-ranking", "--split", "test", "--out", str(f)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    run(cmd)
    results["teacher_ranking"] = json.loads(f.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("teacher_load",)}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

"""Whether a model's multi-threaded speed moves while each core alone holds steady: the evaluation's ranking probe
call timed, in turn, on one thread pinned to each core and on all of them, again and again for ``--seconds``.

    python benchmarks/thread_modes.py --model runs/exp/movielens-ranking-20x-multi-item/redistill/model \\
        [--seconds 120] [--out runs/bench/thread_modes.json]

On the project's 2-core VM the 20x student's 2-thread figure jumps between two levels (~650 and ~900 cand/s)
within one process while one thread on either core stays near 490 (BENCHMARKS.md, "The 20x student at full
budget"): what moves is how well the two cores work together, not either core. Each row: the time, cand/s on
one thread per core, cand/s on all threads (medians of 3 calls). Run on an otherwise idle machine; Linux only
(``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import median_of, ranking_probe_calls, write_json

CANDIDATES = 100


def cand_per_s(call) -> float:
    return round(CANDIDATES / median_of(call), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--out", default="runs/bench/thread_modes.json")
    args = ap.parse_args()

    [(_, call)] = ranking_probe_calls([args.model], CANDIDATES)
    cores, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    rows, end = [], time.monotonic() + args.seconds
    while time.monotonic() < end:
        torch.set_num_threads(1)
        row = {"time": time.strftime("%H:%M:%S", time.gmtime())}
        for core in cores:
            os.sched_setaffinity(0, {core})
            row[f"core{core}_1_thread"] = cand_per_s(call)
        os.sched_setaffinity(0, set(cores))
        torch.set_num_threads(threads)
        row[f"all_{threads}_threads"] = cand_per_s(call)
        rows.append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    together = [r[f"all_{threads}_threads"] for r in rows]
    alone = [v for r in rows for k, v in r.items() if k.startswith("core")]
    summary = {"model": args.model, "threads": threads, "cores": cores, "rows": len(rows),
               "one_thread_range": [min(alone), max(alone)], "all_threads_range": [min(together), max(together)]}
    print(summary)
    write_json(args.out, {**summary, "samples": rows})


if __name__ == "__main__":
    main()

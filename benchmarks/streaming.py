"""Streaming user data: peak memory and wall time of a short SFT + evaluation on a 10k / 100k / 1M-row file.

    python benchmarks/streaming.py [--rows 10000,100000,1000000] [--steps 4] [--batch-size 4]
                                   [--eval-limit 32] [--before DIR] [--before-rows 10000,100000]
                                   [--work runs/bench/streaming] [--out runs/bench/streaming.json]

A synthetic completion file (``{"prompt": ..., "response": ...}``, ~150 bytes a row, written a chunk at a
time) of each size is trained on with a tiny random Llama student and teacher (:mod:`slimlm.testing`):
``slimlm distill mode=sft`` for ``--steps`` steps of batch ``--batch-size``, then the stage's own final
evaluation over ``--eval-limit`` rows of the held-out split (the teacher->student KL and greedy exact match).
Each run is a fresh process (``python -m slimlm``); its peak RSS (``ru_maxrss`` of that child alone, from
``os.wait4``) and wall time are recorded.

slimlm keeps where the rows are, not the rows: 8 bytes a row of the file (int64 byte offsets; 1 more a row
while the split marks are read), so the index of a 1M-row file is ~8 MiB. Target: peak RSS flat in the
row count (within that index). Time still grows with the rows: every row is parsed and checked once per
split the run reads (training, held-out KL, exact-match set), before any model is loaded.

``--before DIR``: also run the same commands against another slimlm checkout (e.g. the commit before
streaming, ``git archive <commit> | tar -x -C DIR``), only at ``--before-rows`` (it reads and tokenizes the
whole file, which at 1M rows takes minutes and GiBs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import markdown_table, write_json  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("planets", "rivers", "prime numbers", "the moon", "bread", "volcanoes", "chess", "rainbows")


def write_rows(path: Path, n: int, chunk: int = 20_000) -> int:
    """A completion JSONL of ``n`` rows, written ``chunk`` rows at a time (memory: one chunk); its bytes."""
    import numpy as np

    rng = np.random.default_rng(n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            a, b, s = rng.integers(100, 1000, m), rng.integers(100, 1000, m), rng.integers(0, len(SUBJECTS), m)
            f.write("".join(
                json.dumps({"prompt": f"Row {start + i}: what is {a[i]} plus {b[i]}? Answer with the number, "
                                      f"then one line on {SUBJECTS[s[i]]}.",
                            "response": f"{a[i] + b[i]}. A line on {SUBJECTS[s[i]]}."}) + "\n"
                for i in range(m)))
    tmp.replace(path)
    return path.stat().st_size


def run_child(cmd: list[str], code: Path, log: Path) -> dict:
    """Run ``cmd`` with ``code`` first on PYTHONPATH; its own peak RSS (MiB) and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code)
        _, status, usage = os.wait4(p.pid, 0)  # this child's rusage alone (RUSAGE_CHILDREN is a running max)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    res = {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1), "rc": p.returncode}
    if p.returncode:
        res["error"] = (log.read_text().strip().splitlines() or ["?"])[-1][:200]
    return res


def run_one(n: int, data: Path, code: Path, label: str, args) -> dict:
    out = args.work / f"{label}-{n}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "slimlm", "distill", "mode=sft", f"student={args.work / 'student'}",
           f"teacher={args.work / 'teacher'}", "task.name=completion", f"task.data={data}",
           f"task.eval_limit={args.eval_limit}", f"max_steps={args.steps}", f"batch_size={args.batch_size}",
           "eval_every=0", "save_every=0", "tensorboard=false", "device=cpu", f"out={out}"]
    res = {"rows": n, "code": label, **run_child(cmd, code, args.work / f"{label}-{n}.log")}
    metrics = out / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        res["eval"] = {k: m[k] for k in ("eval_kl", "eval_exact_match") if k in m}
    res["cmd"] = " ".join(cmd[1:])
    print(f"  {label:>6} {n:>9,} rows: peak {res['peak_rss_mib']:,.0f} MiB, {res['seconds']:.1f} s"
          + (f"  ERROR {res['error']}" if "error" in res else ""), flush=True)
    return res


def table(results: list[dict], sizes: dict[int, int]) -> str:
    head = ("code", "rows", "file MB", "peak RSS MiB", "Δ vs fewest rows MiB", "wall s", "eval rows")
    rows = []
    for r in results:
        base = min((x for x in results if x["code"] == r["code"] and "error" not in x), key=lambda x: x["rows"],
                   default=None)
        if "error" in r:
            rows.append((r["code"], f"{r['rows']:,}", f"{sizes[r['rows']] / 1e6:.0f}", "error", r["error"][:40], "",
                         ""))
            continue
        rows.append((r["code"], f"{r['rows']:,}", f"{sizes[r['rows']] / 1e6:.1f}", f"{r['peak_rss_mib']:,.0f}",
                     f"{r['peak_rss_mib'] - base['peak_rss_mib']:+,.0f}", f"{r['seconds']:.1f}",
                     str(r.get("eval_limit", ""))))
    return markdown_table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=32)
    ap.add_argument("--before", type=Path, help="another slimlm checkout to run the same commands with")
    ap.add_argument("--before-rows", default="10000,100000")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/streaming"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/streaming.json"))
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from slimlm.testing import save_tiny_model

    started, load0 = time.time(), os.getloadavg()
    for role, seed in (("student", 2), ("teacher", 1)):
        if not (args.work / role / "config.json").exists():
            save_tiny_model("llama", args.work / role, seed=seed)
    plan = [(int(n), "after", ROOT) for n in args.rows.split(",")]
    if args.before:
        plan += [(int(n), "before", args.before.resolve()) for n in args.before_rows.split(",")]
    sizes, results = {}, []
    for n in sorted({n for n, _, _ in plan}):
        data = args.work / f"rows-{n}.jsonl"
        t0 = time.perf_counter()
        sizes[n] = data.stat().st_size if data.exists() else write_rows(data, n)
        print(f"{data.name}: {sizes[n] / 1e6:.1f} MB ({sizes[n] / n:.0f} bytes a row, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
        for m, label, code in plan:
            if m == n:
                results.append({**run_one(n, data, code, label, args), "eval_limit": args.eval_limit,
                                "file_bytes": sizes[n]})
    print(table(results, sizes))
    write_json(args.out, {
        "benchmark": "streaming", "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - started),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_average_start": load0, "load_average_end": os.getloadavg(),
        "argv": sys.argv[1:], "index_bytes_per_row": 8, "results": results})


if __name__ == "__main__":
    main()

"""INT8 W8A8 prefill against fp32 and torch's ``quantize_dynamic``, with the GEMM rates under it, in one process.

    python benchmarks/int8_prefill.py [--model teacher] [--int8 runs/bench/teacher-int8] [--reps 7]
                                      [--batch 16] [--seq-len 128] [--out runs/bench/int8_prefill.json]

``--int8`` is slimlm's INT8 export of ``--model`` (``slimlm quantize MODEL --scheme int8 --out DIR``), loaded as
slimlm serves it. Three models in one process, 2 threads: the fp32 model, the export, and ``quantize_dynamic``
(torch.ao, qint8, fbgemm) of every Linear but ``lm_head`` in memory. Each repetition times one decoder forward
of ``--batch`` x ``--seq-len`` random tokens (no KV cache) of each model in turn (so drift hits all alike);
medians. Also, same process: the matmul rates of one [M, 576] x [576, 1536] product with M = batch x seq-len
(fp32 ``mm`` vs ``torch._int_mm``), the peaks the prefill's products run against, and whether this CPU takes
``_int_mm`` as the fast path (:func:`slimlm.quantize.linear.int_mm_is_fast`). Target (issue 20): INT8 prefill
>= 2.5x fp32 and faster than ``quantize_dynamic``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import best_of, write_json  # benchmarks/ is on sys.path when a script runs
from torch import nn


def gemm_rates(m: int, k: int = 576, n: int = 1536) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    af, wf = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    t_int = best_of(lambda: torch._int_mm(a, w.t()))
    t_fp = best_of(lambda: af @ wf.t())
    ops = 2 * m * k * n
    return {"shape": [m, k, n], "int_mm_gops": round(ops / t_int / 1e9, 1), "fp32_gflops": round(ops / t_fp / 1e9, 1),
            "int_mm_over_fp32": round(t_fp / t_int, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--int8", default="runs/bench/teacher-int8", help="slimlm's INT8 export of --model")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/int8_prefill.json"))
    args = ap.parse_args()

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    from slimlm.loading import load_model
    from slimlm.quantize.linear import int_mm_is_fast

    torch.set_num_threads(2)
    models = {"fp32": load_model(args.model), "slimlm-int8": load_model(args.int8)}
    ao = load_model(args.model)
    keep = {n for n, m in ao.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["quantize_dynamic"] = quantize_dynamic(ao, {n: default_dynamic_qconfig for n in keep}, dtype=torch.qint8)
    batch = torch.randint(100, 40000, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    def prefill(m):
        with torch.inference_mode():
            m.get_decoder()(input_ids=batch, use_cache=False)

    for m in models.values():  # warm-up (allocator, weight packing)
        prefill(m)
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {v: [] for v in models}
    for rep in range(args.reps):
        for name, m in models.items():
            t = time.perf_counter()
            prefill(m)
            times[name].append(round(time.perf_counter() - t, 3))
        print(f"rep {rep}: " + "  ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    tokens = args.batch * args.seq_len
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = {n: {"median_s": round(med[n], 3), "tok_s": round(tokens / med[n], 1), "x_fp32": round(med["fp32"] / med[n], 2),
                "times_s": times[n]} for n in models}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "int_mm_is_fast": int_mm_is_fast(),
              "threads": torch.get_num_threads(), "model": args.model, "int8": args.int8,
              "shape": [args.batch, args.seq_len], "reps": args.reps, "rows": rows,
              "gemm": gemm_rates(tokens), "loadavg_before": load_before,
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    write_json(args.out, result)
    for n, r in rows.items():
        print(f"{n:17s} {r['tok_s']:8.1f} tok/s  {r['x_fp32']:.2f}x fp32  (median {r['median_s']} s)")
    g = result["gemm"]
    print(f"GEMM {g['shape']}: _int_mm {g['int_mm_gops']} GOPS, fp32 {g['fp32_gflops']} GFLOP/s "
          f"({g['int_mm_over_fp32']}x); int_mm_is_fast={result['int_mm_is_fast']}; {result['cpu_capability']}")


if __name__ == "__main__":
    main()

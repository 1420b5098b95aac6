"""Loss benchmark: chunked fused-linear KD loss vs full logits vs Liger-Kernel, forward + backward on CPU.

    python benchmarks/loss.py [--tokens 4096] [--vocab 49152] [--reps 3] [--chunks 64,64c,256,256c]
                              [--threads N] [--dtype float32|bfloat16] [--out runs/bench/loss.json]

For forward KL and JSD(β = 0.5), student hidden 384 and teacher hidden 576 (SmolLM2-135M's width) with
an LM head over the vocabulary, in --dtype (fp32 by default), it times loss + backward (median of --reps runs after one warm-up)
and measures memory, for:

    ours     slimlm.distill.chunked.fused_linear_kd_loss at each chunk size, eager and with the per-chunk
             closed-form maths compiled ("64c": torch.compile, what ``loss.compile: auto`` picks at this size)
    naive    logits = h Wᵀ for both models, log_softmax, the divergence, backward (the anchor)
    liger    liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (β = 0 is forward KL), compiled=True and
             False; optional: prints "liger-kernel not installed" and skips it when absent

Each variant runs in a fresh process (this script with --variant), so peak memory is its own:
``peak`` is the process's peak RSS over its whole life (imports, inputs, warm-up, compilation);
``Δpeak`` is the peak RSS during the timed runs minus the RSS once the inputs exist and before any loss
call (the high-water mark is reset through /proc/self/clear_refs after the warm-up), i.e. the memory
the loss needs, including whatever the warm-up left resident; ``Δfirst`` is the same for the warm-up
call alone (for compiled Liger it includes torch.compile).
Targets: ours ≤ 0.1× naive Δpeak; ours at least as fast as Liger at no more Δpeak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

DIVERGENCES = {"forward_kl": 0.0, "jsd": 0.5}  # name -> β for Liger's generalised JSD


# --------------------------------------------------------------------------- one variant (child process)


def naive_loss(h_s, w_s, h_t, w_t, divergence: str):
    """Full [N, V] logits; summed over tokens like ours."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax((h_s @ w_s.T).float(), dim=-1)  # the products in the inputs' dtype, the softmax in fp32
    with torch.no_grad():
        t = F.log_softmax((h_t @ w_t.T).float(), dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(s, t, reduction="sum", log_target=True)  # Σ p_T (t − s)
    beta = DIVERGENCES[divergence]
    m = torch.logaddexp(t + torch.log(torch.tensor(beta)), s + torch.log(torch.tensor(1 - beta)))
    return beta * F.kl_div(m, t, reduction="sum", log_target=True) + \
        (1 - beta) * F.kl_div(m, s, reduction="sum", log_target=True)


def run_variant(name: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    method, divergence, option = name.split(":")
    g = torch.Generator().manual_seed(0)
    n, v, hs, ht = args.tokens, args.vocab, args.student_hidden, args.teacher_hidden
    dt = getattr(torch, args.dtype)  # every input in it: what a bf16 model (FSDP2's bf16 parameters) hands the loss
    h_s = torch.randn(n, hs, generator=g).to(dt).requires_grad_(True)
    w_s = (torch.randn(v, hs, generator=g) / hs**0.5).to(dt).requires_grad_(True)
    h_t = torch.randn(n, ht, generator=g).to(dt)
    w_t = (torch.randn(v, ht, generator=g) / ht**0.5).to(dt)
    labels = torch.randint(0, v, (n,), generator=g)

    if method == "ours":  # option: the chunk size, "c" appended for the compiled per-chunk maths
        from slimlm.distill.chunked import compile_closed_form, fused_linear_kd_loss
        from slimlm.distill.losses import LossConfig

        cfg = LossConfig(divergence=divergence, beta=DIVERGENCES[divergence])
        chunk = int(option.rstrip("c"))
        closed = compile_closed_form(option.endswith("c"), chunk, v)

        def step():
            return fused_linear_kd_loss(h_s, w_s, labels, cfg, teacher_hidden=h_t, teacher_weight=w_t,
                                        chunk_size=chunk, closed_form=closed)
        to_sum = 1.0
    elif method == "naive":
        def step():
            return naive_loss(h_s, w_s, h_t, w_t, divergence)
        to_sum = 1.0
    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DIVERGENCES[divergence],
                                          compiled=option == "compiled", chunk_size=args.liger_chunk)

        def step():
            return loss_fn(h_s, w_s, h_t, w_t, labels)
        to_sum = float(n)  # Liger returns the mean over target tokens; all tokens are targets here
    else:
        raise SystemExit(f"unknown variant {name}")

    def once() -> tuple[float, float]:
        h_s.grad = w_s.grad = None
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        return time.perf_counter() - t0, float(loss) * to_sum

    base_kib = status_kib("VmRSS")  # torch + inputs, before any loss call
    reset = reset_peak()
    warm_s, loss_sum = once()
    first_kib = status_kib("VmHWM")
    reset = reset_peak() and reset
    times = [once()[0] for _ in range(args.reps)]
    grad_norm = float(torch.cat([h_s.grad.flatten(), w_s.grad.flatten()]).float().norm())
    timed_kib = status_kib("VmHWM")
    life_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not reset:  # no /proc/self/clear_refs: only the whole-life peak is known
        first_kib = timed_kib = life_kib
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"variant": name, "method": method, "divergence": divergence, "option": option,
            "warmup_s": round(warm_s, 3), "times_s": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3), "loss_sum": loss_sum, "grad_norm": grad_norm,
            "pre_loss_rss_mib": mib(base_kib), "peak_rss_mib": mib(max(life_kib, timed_kib)),
            "delta_peak_mib": mib(timed_kib - base_kib), "delta_peak_first_call_mib": mib(first_kib - base_kib),
            "peak_reset_available": reset}


# --------------------------------------------------------------------------- driver


def liger_status() -> str | None:
    """None when Liger's chunked losses import, else why not."""
    probe = "from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    if "No module named 'liger_kernel'" in r.stderr:
        return "liger-kernel not installed"
    return "liger-kernel does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]


def child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--student-hidden", str(args.student_hidden), "--teacher-hidden", str(args.teacher_hidden),
           "--reps", str(args.reps), "--liger-chunk", str(args.liger_chunk), "--threads", str(args.threads),
           "--dtype", args.dtype]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name}: failed ({tail})", flush=True)
        return {"variant": name, "error": tail}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {name}: median {res['median_s']} s, Δpeak {res['delta_peak_mib']} MiB "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def table(results: list[dict]) -> str:
    head = ("divergence", "variant", "median s", "runs s", "peak RSS MiB", "Δfirst MiB", "Δpeak MiB", "time/naive",
            "Δpeak/naive", "loss rel.diff vs naive")
    rows = []
    for div in DIVERGENCES:
        naive = next((r for r in results if r.get("method") == "naive" and r["divergence"] == div), None)
        for r in results:
            if r.get("divergence") != div:
                continue
            label = r["method"] if r["method"] == "naive" else f"{r['method']} {r['option']}"
            if "error" in r:
                rows.append((div, label, "error", r["error"][:40], "", "", "", "", "", ""))
                continue
            ratio_t = f"{r['median_s'] / naive['median_s']:.2f}x" if naive else ""
            ratio_m = f"{r['delta_peak_mib'] / naive['delta_peak_mib']:.3f}x" if naive else ""
            rel = f"{abs(r['loss_sum'] - naive['loss_sum']) / abs(naive['loss_sum']):.1e}" if naive else ""
            rows.append((div, label, f"{r['median_s']:.2f}", "/".join(f"{t:.2f}" for t in r["times_s"]),
                         f"{r['peak_rss_mib']:.0f}", f"{r['delta_peak_first_call_mib']:.0f}",
                         f"{r['delta_peak_mib']:.0f}", ratio_t, ratio_m, rel))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--student-hidden", type=int, default=384)
    ap.add_argument("--teacher-hidden", type=int, default=576)
    ap.add_argument("--reps", type=int, default=3, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--chunks", default="64,64c,256,256c",
                    help="chunk sizes for ours; a trailing c: the per-chunk maths compiled (loss.compile)")
    ap.add_argument("--liger-chunk", type=int, default=1024, help="Liger's chunk_size (its default: 1024)")
    ap.add_argument("--divergences", default=",".join(DIVERGENCES))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is steadier when another job shares the CPU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the hidden states' and LM heads' dtype (bfloat16: the products run in bf16 in every variant)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/loss.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    liger = liger_status()
    if liger:
        print(liger)
    variants = []
    for div in args.divergences.split(","):
        if not args.no_naive:
            variants.append(f"naive:{div}:-")
        variants += [f"ours:{div}:{c}" for c in args.chunks.split(",")]
        if not liger:
            variants += [f"liger:{div}:compiled", f"liger:{div}:eager"]
    started = time.time()
    print(f"{len(variants)} variants, each in a fresh process; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = [child(v, args) for v in variants]

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "config": {k: getattr(args, k) for k in ("tokens", "vocab", "student_hidden", "teacher_hidden",
                                                       "reps", "chunks", "liger_chunk")},
              "dtype": args.dtype, "liger": liger or "installed", "loadavg_end": os.getloadavg(),
              "wall_s": round(time.time() - started, 1), "results": results}
    try:
        import importlib.metadata as md

        report["liger_version"] = md.version("liger-kernel")
    except Exception:  # noqa: BLE001 - optional
        pass
    print()
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()

"""Decode speed against the memory-bandwidth limit: slimlm's one decode loop, eager and compiled, against
transformers' ``model.generate``, with the machine's memory bandwidth measured in the same process.

    python benchmarks/decode.py [--model DIR] [--batches 1,8] [--new-tokens 64] [--prompt-tokens 260]
                                [--reps 3] [--threads N] [--compile-batches 1] [--old-rev REV] [--dtype D]
                                [--out runs/bench/decode.json]

Variants, run in a rotating order in every repetition (one process, the same weights, greedy, --dtype; a
quantized export is loaded as slimlm loads it, on its runtime modules):

    hf        ``model.generate`` (do_sample=False, its own KV cache; the batch left-padded)
    fused     ``slimlm.runtime.decoding.DecodeBatch`` as it runs by default: the decode loop of the server,
              evaluation and on-policy distillation (preallocated KV written in place), its step the fused
              one of ``slimlm.runtime.fused_step`` where that applies (CPU: float32, and INT8 W8A8 where
              ``_int_mm`` is slow)
    unfused   the same with ``fused=False``: transformers' forward for the step
    compiled  ``compile=True`` (``torch.compile`` of the step: the fused one where it applies, with its
              weights in the ordinary layout, else transformers' forward), for the batch sizes in
              --compile-batches (compiling takes seconds to minutes on a 2-core CPU: its warm-up runs
              before the timings and is reported as ``compile_s``)
    old       (with --old-rev) the decode loop of ``slimlm/runtime/decoding.py`` as it was at git revision
              REV, loaded beside the current one: the before/after of a change to the loop

Decode only: decode tok/s = B x (new_tokens - 1) / the time from the first new token to the last (``hf``:
the times its streamer receives them; ours: the batch's steps after the prefill), so the prompts'
prefill is out of the figure (``end_to_end_tok_s`` keeps it in). No row stops early (no EOS), so every
variant does the same work; the tokens of every variant are compared with ``hf``'s and the result recorded.

Memory bandwidth, same process and threads: ``read`` = ``sum`` over a 512 MiB fp32 tensor (bytes read /
s), ``copy`` = ``copy_`` of it into another (bytes read + written / s); best of 5. A batch-1 decode step
reads every weight once (the KV of these few hundred positions is small beside 0.5 GB of weights), so
``bandwidth_fraction`` = weight bytes x batch-1 tok/s / read bandwidth: how close the loop is to the limit.

Medians over --reps. The machine may be shared: os.getloadavg() is recorded before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import best_of, write_json  # benchmarks/ is on sys.path when a script runs

from slimlm.runtime.decoding import COMPILE_FAILED

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH = ("The river town grew slowly through the century. Merchants built warehouses along the quay, the "
             "railway arrived in 1871, and the old ferry gave way to an iron bridge. Each spring the floods "
             "reached the lower streets, and each summer the market filled the square with grain, wool and "
             "timber from the hills. ")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bandwidth(numel: int = 128 << 20, reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` memory bandwidth in GB/s: read (a sum) and copy (read + write)."""
    x, y = torch.rand(numel), torch.empty(numel)
    nbytes = x.numel() * x.element_size()
    return {"read_gb_s": round(nbytes / best_of(x.sum, reps) / 1e9, 2),
            "copy_gb_s": round(2 * nbytes / best_of(lambda: y.copy_(x), reps) / 1e9, 2)}


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers (tied ones once; a quantized model's int8 / int4 codes and scales are
    buffers): what one batch-1 decode step reads."""
    seen, total = set(), 0
    for p in [*model.parameters(), *model.buffers()]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def prompts_for(tok, batch: int, longest: int) -> list[list[int]]:
    """``batch`` prompts of different lengths (``longest``, ``longest`` - 20, ...): the same text from
    different points on, so the rows are left-padded against each other in ``hf``."""
    ids = tok(PARAGRAPH * (longest // 40 + 4)).input_ids
    return [ids[7 * i: 7 * i + max(8, longest - 20 * i)] for i in range(batch)]


def old_decoding(rev: str):
    """slimlm/runtime/decoding.py as it was at git revision ``rev``, as a module (importing today's others)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:slimlm/runtime/decoding.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_decoding.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_decoding", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class Clock:
    """A ``generate`` streamer (transformers' BaseStreamer interface: put, end) that notes when each put
    arrives: the prompt first, then one token per row per step."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def runners(model, tok, old_rev: str | None) -> dict:
    """variant -> fn(prompts, new_tokens) -> (total seconds, decode seconds, tokens per row).

    Decode seconds run from the first new token to the last: N - 1 forwards of one token per row (``hf``:
    from its streamer's first token to its last; ours: the batch's steps after its prefill)."""
    from slimlm.runtime import decoding

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def hf(prompts, n):
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        clock = Clock()
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 pad_token_id=pad, streamer=clock)
        sync()
        total = time.perf_counter() - t
        return total, clock.times[-1] - clock.times[1], [row[width:].tolist() for row in out]

    def ours(mod, **kw):
        def run(prompts, n):
            gens = [mod.Generation(p, mod.SamplingParams(max_tokens=n, temperature=0)) for p in prompts]
            batch = mod.DecodeBatch(model, pad_id=pad, **kw)
            sync()
            t = time.perf_counter()
            batch.add(gens)
            sync()
            t_first = time.perf_counter()
            while len(batch):
                batch.step()
            sync()
            t_end = time.perf_counter()
            return t_end - t, t_end - t_first, [g.tokens for g in gens]
        return run

    out = {"hf": hf, "unfused": ours(decoding, fused=False), "fused": ours(decoding),
           "compiled": ours(decoding, compile=True)}
    if old_rev:
        out["old"] = ours(old_decoding(old_rev))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the teacher, fp32)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=260, help="the longest prompt (row i: 20 x i fewer)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile-batches", default="1", help="batch sizes to also run compiled ('' for none)")
    ap.add_argument("--old-rev", default=None, help="also run the decode loop of this git revision")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype (bfloat16: what `slimlm serve --dtype bfloat16` runs; the fused step "
                         "takes it where the CPU has bf16 dot products)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/decode.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from slimlm.assets import teacher_dir
    from slimlm.loading import load_model, load_tokenizer

    model_dir = Path(args.model) if args.model else teacher_dir()
    # slimlm's loader: a quantized export runs on slimlm's runtime modules, as the server runs it
    model = load_model(model_dir, device=args.device, dtype=getattr(torch, args.dtype)).eval()
    tok = load_tokenizer(model_dir)
    model.generation_config.eos_token_id = None  # every variant decodes exactly --new-tokens (same work)
    batches = [int(b) for b in args.batches.split(",") if b]
    compiled_batches = {int(b) for b in args.compile_batches.split(",") if b}
    result = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "threads": torch.get_num_threads(), "device": args.device, "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "args": vars(args) | {"out": str(args.out)},
              "model": str(model_dir), "weight_bytes": weight_bytes(model)}
    log(f"model {model_dir.name}: {result['weight_bytes'] / 1e6:.0f} MB of weights; threads {torch.get_num_threads()}")
    result["bandwidth"] = bandwidth()
    log(f"bandwidth: {result['bandwidth']}")

    run = runners(model, tok, args.old_rev)
    plan = {b: [v for v in run if v != "compiled" or b in compiled_batches] for b in batches}
    compile_s = {}
    for b in batches:
        if "compiled" in plan[b]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compile_s[b] = round(run["compiled"](prompts_for(tok, b, args.prompt_tokens), args.new_tokens)[1], 1)
            failed = [str(w.message) for w in caught if str(w.message).startswith(COMPILE_FAILED)]
            if failed:
                log(f"batch {b}: compiling failed, dropping the compiled variant: {failed[0]}")
                plan[b].remove("compiled")
                compile_s[b] = None
            log(f"batch {b}: compile warm-up {compile_s[b]} s")
    times: dict = {}
    tokens: dict = {}
    for rep in range(args.reps):
        for b in batches:
            ps = prompts_for(tok, b, args.prompt_tokens)
            variants = plan[b][rep % len(plan[b]):] + plan[b][:rep % len(plan[b])]  # rotate the order
            for v in variants:
                total, decode_s, out = run[v](ps, args.new_tokens)
                times.setdefault((b, v), []).append((total, decode_s))
                tokens[(b, v)] = out
                log(f"rep {rep} batch {b} {v}: {b * (args.new_tokens - 1) / decode_s:.2f} decode tok/s "
                    f"({decode_s:.2f} s decoding, {total:.2f} s with the prefill)")

    rows = []
    for b in batches:
        for v in plan[b]:
            tps = [b * (args.new_tokens - 1) / d for _, d in times[(b, v)]]
            rows.append({"batch": b, "variant": v, "decode_tok_s": round(statistics.median(tps), 2),
                         "decode_tok_s_runs": [round(x, 2) for x in tps],
                         "end_to_end_tok_s": round(statistics.median(b * args.new_tokens / t for t, _ in times[(b, v)]), 2),
                         "prompt_tokens": [len(p) for p in prompts_for(tok, b, args.prompt_tokens)],
                         "tokens_equal_hf": tokens[(b, v)] == tokens[(b, "hf")],
                         **({"compile_s": compile_s[b]} if v == "compiled" else {})})
    by = {(r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        r["vs_hf"] = round(r["decode_tok_s"] / by[(r["batch"], "hf")]["decode_tok_s"], 3)
        if r["batch"] == 1:
            r["bandwidth_fraction"] = round(result["weight_bytes"] * r["decode_tok_s"] / (result["bandwidth"]["read_gb_s"] * 1e9), 3)
    result["rows"] = rows
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)

    print(f"bandwidth read {result['bandwidth']['read_gb_s']} GB/s, copy {result['bandwidth']['copy_gb_s']} GB/s; "
          f"weights {result['weight_bytes'] / 1e6:.0f} MB; loadavg {result['loadavg_start']} -> {result['loadavg_end']}")
    print(f"{'batch':>5} {'variant':>9} {'decode tok/s':>12} {'vs hf':>6} {'of bandwidth':>12} {'same tokens':>11} {'compile s':>9}")
    for r in rows:
        frac = f"{100 * r['bandwidth_fraction']:.0f}%" if "bandwidth_fraction" in r else ""
        print(f"{r['batch']:>5} {r['variant']:>9} {r['decode_tok_s']:>12.2f} {r['vs_hf']:>5.2f}x {frac:>12} "
              f"{str(r['tokens_equal_hf']):>11} {r.get('compile_s') or '':>9}")


if __name__ == "__main__":
    main()

"""Quantization benchmark: quality, checkpoint size and CPU speed of FP8 / INT8 / INT4 vs fp32 and other int8 paths.

    python benchmarks/quantize.py [--quick] [--speed-only] [--models teacher,small,teacher-sft]
                                  [--variants V1,V2,...] [--quantease-iters N] [--out runs/bench/quantize.json]

Models: ``teacher`` (built-in SmolLM2-135M-Instruct, zero-shot), ``small`` (the 8-layer SFT student from
benchmarks/distill_quality.py at runs/bench/quality/student-sft/model if present, else an 8-layer
student made by ``slimlm init-student teacher --layers 8``), and ``teacher-sft`` (the task-fine-tuned
teacher at runs/bench/quality/teacher-sft/model, if present: the only teacher whose AUC is not chance).

Variants: slimlm's fp8 (dynamic / static activations), int8 W8A8 (plain / SmoothQuant / with the LM
head), int4 (RTN and GPTQ, groups of 128 and 32, GPTQ also with activation order; QuantEase from GPTQ and
from act-order GPTQ, groups of 128); and as comparison points torch.ao
``quantize_dynamic`` (qint8) and torchao's ``Int8DynamicActivationInt8WeightConfig`` and
``Int8WeightOnlyConfig``. slimlm variants are quantized, exported (compressed-tensors, bf16 for the
unquantized tensors) and reloaded with ``slimlm.loading.load_model``, so what is measured is what a
user serves. The comparison points quantize the same layers (every Linear but ``lm_head``) in memory.

Quality: perplexity on the first ``--ppl-blocks`` blocks of 512 tokens of the built-in held-out prose
(calibration uses its last tokens, never these), and, for fine-tuned models, ranking AUC
on a seeded subset of the MovieLens test split (deltas are paired: same examples).
Size: bytes of the safetensors file(s); the bf16 reference is the model's unique tensors in bf16.
Speed (torch.set_num_threads(2), one process, variants interleaved rep by rep, medians):
prefill tokens/s of the decoder on a batch of 16 x 128 tokens (no KV cache), and decode tokens/s of
``slimlm.runtime.decoding.generate`` (batch 1, KV cache, greedy): (n − 1) / (t(n new tokens) − t(1 new token)).
``int8-unshared`` (speed only) is the same int8 export with every layer quantizing its own input, so
the gain of sibling sharing (slimlm.quantize.linear.share_input_quantization) is measured interleaved.
The machine is shared: os.getloadavg() is recorded before and after; ``--speed-only`` re-runs only the
timing (re-using the exports of a previous run) and merges it into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.calib import calibration_windows  # noqa: E402
from slimlm.loading import load_model, load_tokenizer, resolve_model
from slimlm.models import param_counts  # noqa: E402
from slimlm.quantize.api import QuantConfig, quantize_model  # noqa: E402
from slimlm.quantize.export import export_quantized  # noqa: E402
from slimlm.quantize.linear import Int8Linear  # noqa: E402

WORK = Path("runs/bench/quantize")
SFT_TEACHER = Path("runs/bench/quality/teacher-sft/model")
SFT_STUDENT = Path("runs/bench/quality/student-sft/model")
STUDENT8 = Path("runs/bench/student8")

SLIMLM = {
    "fp8": dict(scheme="fp8"),
    "fp8-static": dict(scheme="fp8", static_activations=True),
    "int8": dict(scheme="int8"),
    "int8-smooth": dict(scheme="int8", smooth=True),
    "int8+head": dict(scheme="int8", ignore=[]),
    "int4-rtn-g128": dict(scheme="int4", method="rtn", group_size=128),
    "int4-gptq-g128": dict(scheme="int4", method="gptq", group_size=128),
    "int4-rtn-g32": dict(scheme="int4", method="rtn", group_size=32),
    "int4-gptq-g32": dict(scheme="int4", method="gptq", group_size=32),
    "int4-gptq-g128-act": dict(scheme="int4", method="gptq", group_size=128, act_order=True),
    "int4-gptq-g128-asym-act": dict(scheme="int4", method="gptq", group_size=128, symmetric=False, act_order=True),
    "int4-gptq-g32-act": dict(scheme="int4", method="gptq", group_size=32, act_order=True),
    # QuantEase: coordinate descent on GPTQ's layer objective, from GPTQ's solution (-act: act-order GPTQ's)
    "int4-quantease-g128": dict(scheme="int4", method="quantease", group_size=128),
    "int4-quantease-g128-act": dict(scheme="int4", method="quantease", group_size=128, act_order=True),
    "int4-quantease-g128-asym-act": dict(scheme="int4", method="quantease", group_size=128, symmetric=False,
                                         act_order=True),
    # with the clipping search (each group's range shrunk to the least energy-weighted rounding error), which
    # is the calibrated methods' default: the names without -clip turn it off below, so they keep their meaning
    "int4-gptq-g128-clip": dict(scheme="int4", method="gptq", group_size=128, clip_search=True),
    "int4-rtn-g128-clip": dict(scheme="int4", method="rtn", group_size=128, clip_search=True),
    "int4-gptq-g128-act-clip": dict(scheme="int4", method="gptq", group_size=128, act_order=True, clip_search=True),
    "int4-quantease-g128-asym-act-clip": dict(scheme="int4", method="quantease", group_size=128, symmetric=False,
                                              act_order=True, clip_search=True),
    "int4-quantease-g128-act-clip": dict(scheme="int4", method="quantease", group_size=128, act_order=True,
                                         clip_search=True),
}
for _name, _cfg in SLIMLM.items():
    if _cfg["scheme"] == "int4":
        _cfg.setdefault("clip_search", False)
BASELINES = ("ao-dynamic-qint8", "torchao-int8-dyn", "torchao-int8-wo")
# speed only: the int8 export with every layer quantizing its own input (the A/B for sibling sharing)
UNSHARED = "int8-unshared"
SPEED = ("fp32", "fp8", "int8", UNSHARED, "int8+head", "int4-gptq-g128", *BASELINES)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- models and variants


def model_paths(names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        if name == "teacher":
            out[name] = {"path": resolve_model("teacher"), "auc": False}
        elif name == "teacher-sft":
            if (SFT_TEACHER / "config.json").exists():
                out[name] = {"path": SFT_TEACHER, "auc": True}
            else:
                print(f"skip teacher-sft: {SFT_TEACHER} does not exist (yet)")
        elif name == "small":
            if (SFT_STUDENT / "config.json").exists():
                out[name] = {"path": SFT_STUDENT, "auc": True, "what": "8-layer SFT student (distill_quality)"}
            else:
                if not (STUDENT8 / "config.json").exists():
                    cmd = [sys.executable, "-m", "slimlm", "init-student", "teacher", "--layers", "8", "--out", str(STUDENT8)]
                    print("$", " ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True)
                out[name] = {"path": STUDENT8, "auc": False, "what": "8-layer student of the teacher (untrained)"}
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def baseline(name: str, path: Path) -> nn.Module:
    """The comparison points: same layers (every Linear but lm_head), quantized in memory."""
    import warnings

    model = load_model(path)
    keep = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    if name == "ao-dynamic-qint8":
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {n: default_dynamic_qconfig for n in keep}, dtype=torch.qint8)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    cfg = Int8DynamicActivationInt8WeightConfig() if name == "torchao-int8-dyn" else Int8WeightOnlyConfig()
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in keep)
    return model


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def bf16_bytes(model: nn.Module) -> int:
    """Size of the model's unique tensors saved as bf16 safetensors (computed in memory)."""
    from safetensors.torch import save

    seen, state = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.to(torch.bfloat16)
    return len(save(state))


def make_exports(mname: str, info: dict, args, results: dict, only: tuple[str, ...] | None = None) -> None:
    """Quantize + export each slimlm variant once (skipped when the export exists)."""
    tok = load_tokenizer(info["path"])
    calib = None
    for vname, fields in SLIMLM.items():
        if only is not None and vname not in only:
            continue
        out = WORK / mname / vname
        if (out / "config.json").exists() and not args.fresh:
            continue
        if fields.get("method") == "quantease" and args.quantease_iters:
            fields = {**fields, "quantease_iters": args.quantease_iters}
        if fields["scheme"] == "int4":  # as `slimlm quantize` does: the grid rounded to the export's scale dtype
            fields = {**fields, "scale_dtype": "bfloat16"}
        cfg = QuantConfig(**fields)
        if cfg.needs_calibration and calib is None:
            calib = calibration_windows(tok, "text", args.calib_samples, args.calib_len)
        model = load_model(info["path"])
        t0 = time.perf_counter()
        report = quantize_model(model, cfg, calib if cfg.needs_calibration else None,
                                progress=lambda s, d, t, v=vname: print(f"\r  {mname} {v}: {s} {d}/{t}", end="", flush=True))
        took = time.perf_counter() - t0
        print()
        report["calibration"] = f"text, {args.calib_samples} x {args.calib_len} tokens" if cfg.needs_calibration else None
        export_quantized(model, tok, out, report=report)
        results.setdefault("quantize_seconds", {}).setdefault(mname, {})[vname] = round(took, 1)
        if "quantease" in report:  # the layer objective after the sweeps / before (GPTQ's), over the layers
            qe = report["quantease"]
            sweeps = sorted(o["sweeps"] for o in qe["layers"].values())
            results.setdefault("quantease_objective", {}).setdefault(mname, {})[vname] = {
                "final_over_init": qe["final_over_init"], "max_sweeps": cfg.quantease_iters,
                "median_sweeps": sweeps[len(sweeps) // 2]}
            print(f"  {mname} {vname}: layer objective / GPTQ's {qe['final_over_init']}, "
                  f"median sweeps {sweeps[len(sweeps) // 2]}")
        del model


# --------------------------------------------------------------------------- quality


def quality(mname: str, info: dict, args, results: dict) -> None:
    from slimlm.evaluate import evaluate_ranking, perplexity
    from slimlm.tasks import load_ranking_task
    from slimlm.tasks.text import read_texts, text_blocks

    tok = load_tokenizer(info["path"])
    blocks = text_blocks(tok, read_texts(None), 512)[:args.ppl_blocks]
    examples = load_ranking_task("movielens-ranking", None, "test", args.auc_limit, 0) if info["auc"] else None
    rows = results.setdefault("quality", {}).setdefault(mname, {})
    ref = load_model(info["path"])
    rows["_reference"] = {"bf16_bytes": bf16_bytes(ref), "fp32_bytes": safetensors_bytes(info["path"]),
                          "params": param_counts(ref), "what": info.get("what", str(info["path"]))}
    del ref
    for vname in ("fp32", *SLIMLM, *BASELINES):
        if args.variants and vname not in args.variants:
            continue
        t0 = time.perf_counter()
        if vname == "fp32":
            model, size = load_model(info["path"]), safetensors_bytes(info["path"])
        elif vname in SLIMLM:
            model, size = load_model(WORK / mname / vname), safetensors_bytes(WORK / mname / vname)
        else:
            model, size = baseline(vname, info["path"]), None
        row = {"bytes": size, "perplexity": perplexity(model, blocks)["perplexity"]}
        if examples is not None:
            metrics, _ = evaluate_ranking(model, tok, examples)
            row.update(auc=metrics["auc"], auc_n=metrics["n"])
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        rows[vname] = row
        print(f"  {mname:12s} {vname:23s} ppl {row['perplexity']:9.3f}" +
              (f"  auc {row['auc']:.4f}" if "auc" in row else "") + (f"  {size / 1e6:8.1f} MB" if size else ""),
              flush=True)
        del model
        save(results, args.out)


# --------------------------------------------------------------------------- speed


def median_time(fn, reps: int) -> float:
    return statistics.median(_timed(fn) for _ in range(reps))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed(mname: str, info: dict, args, results: dict) -> None:
    from slimlm.runtime.decoding import generate

    torch.set_num_threads(2)
    models = {}
    for vname in SPEED:
        if vname == "fp32":
            models[vname] = load_model(info["path"])
        elif vname == UNSHARED:
            models[vname] = load_model(WORK / mname / "int8")
            for m in models[vname].modules():
                if isinstance(m, Int8Linear):
                    m.input_role = None
        elif vname in SLIMLM:
            path = WORK / mname / vname
            if not (path / "config.json").exists():
                make_exports(mname, info, args, results, only=(vname,))
            models[vname] = load_model(path)
        else:
            models[vname] = baseline(vname, info["path"])
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(100, 40000, (args.prefill_batch, args.prefill_len), generator=g)
    prompt = [torch.randint(100, 40000, (32,), generator=g).tolist()]

    def prefill(m):
        with torch.inference_mode():
            m.get_decoder()(input_ids=batch, use_cache=False)

    def decode(m, n):
        with torch.inference_mode():
            generate(m, prompt, max_new_tokens=n, temperature=0)

    for m in models.values():  # warm-up (allocator, oneDNN/fbgemm packing)
        prefill(m)
        decode(m, 2)
    times = {v: {"prefill": [], "decode_n": [], "decode_1": []} for v in models}
    load_before = loadavg()
    for _ in range(args.reps):  # interleaved, so that load drift hits every variant alike
        for v, m in models.items():
            times[v]["prefill"].append(_timed(lambda m=m: prefill(m)))
            times[v]["decode_n"].append(_timed(lambda m=m: decode(m, args.decode_tokens)))
            times[v]["decode_1"].append(_timed(lambda m=m: decode(m, 1)))
    rows = {}
    n_tok = args.prefill_batch * args.prefill_len
    for v, t in times.items():
        pre = statistics.median(t["prefill"])
        dec = statistics.median(t["decode_n"]) - statistics.median(t["decode_1"])
        rows[v] = {"prefill_tok_s": round(n_tok / pre, 1), "decode_tok_s": round((args.decode_tokens - 1) / dec, 2),
                   "prefill_s": [round(x, 3) for x in t["prefill"]], "decode_s": [round(x, 3) for x in t["decode_n"]]}
    for v, r in rows.items():
        r["prefill_x_fp32"] = round(r["prefill_tok_s"] / rows["fp32"]["prefill_tok_s"], 2)
        r["decode_x_fp32"] = round(r["decode_tok_s"] / rows["fp32"]["decode_tok_s"], 2)
        print(f"  {mname:12s} {v:23s} prefill {r['prefill_tok_s']:8.1f} tok/s ({r['prefill_x_fp32']:.2f}x)  "
              f"decode {r['decode_tok_s']:6.2f} tok/s ({r['decode_x_fp32']:.2f}x)", flush=True)
    results.setdefault("speed", {})[mname] = {
        "threads": torch.get_num_threads(), "reps": args.reps, "prefill_shape": [args.prefill_batch, args.prefill_len],
        "decode_new_tokens": args.decode_tokens, "loadavg_before": load_before, "loadavg_after": loadavg(),
        "rows": rows}
    save(results, args.out)


def save(results: dict, path: Path) -> None:
    from slimlm.io import atomic_write_json

    atomic_write_json(path, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="teacher,small,teacher-sft")
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, few blocks, 1 rep")
    ap.add_argument("--speed-only", action="store_true", help="only the timing; merged into --out")
    ap.add_argument("--fresh", action="store_true", help="re-quantize even when exports exist")
    ap.add_argument("--variants", default="", help="comma list: (re)measure only these quality rows (no speed; fp32 "
                    "if listed), keeping the others already in --out; use the same settings as the run that made them")
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--auc-limit", type=int, default=400)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--quantease-iters", type=int, default=None, help="QuantEase variants: most sweeps per layer "
                    "(default: QuantConfig's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-batch", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/quantize.json"))
    args = ap.parse_args()
    args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in args.variants if v not in ("fp32", *SLIMLM, *BASELINES)]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: fp32, {', '.join((*SLIMLM, *BASELINES))})")
    global WORK
    if args.quick:
        args.models = "small" if args.models == ap.get_default("models") else args.models
        args.ppl_blocks, args.auc_limit, args.calib_samples, args.calib_len = 4, 40, 8, 256
        args.reps, args.decode_tokens = 1, 8
        WORK = Path("runs/bench/quantize-quick")
        if args.out == ap.get_default("out"):
            args.out = Path("runs/bench/quantize-quick.json")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), torch=torch.__version__, command=" ".join(sys.argv),
                   loadavg_start=loadavg())
    models = model_paths(args.models.split(","))
    for mname, info in models.items():
        if not args.speed_only:
            make_exports(mname, info, args, results, only=args.variants or None)
            quality(mname, info, args, results)
        if mname != "teacher-sft" and not args.variants:  # teacher-sft: the teacher's architecture and speed
            speed(mname, info, args, results)
    results["loadavg_end"] = loadavg()
    save(results, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

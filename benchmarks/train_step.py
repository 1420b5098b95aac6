"""Training-step benchmark: one distillation step of slimlm's trainer vs TRL's GKDTrainer on CPU, fp32 or bf16.

    python benchmarks/train_step.py [--steps 5] [--warmup 2] [--batch-size 4] [--seq-len 256] [--threads N]
                                    [--chunk-size 256] [--variants ours,ours-gc,trl,...] [--out runs/bench/train_step.json]

Setting (the issue's spec): the built-in SmolLM2-135M-Instruct teacher -> a ~30M-parameter student (a
Llama like the teacher, narrower and shallower, randomly initialised, saved with the teacher's tokenizer
into a temporary directory so every variant starts from the same weights), sequences of --seq-len random
tokens, every position a target (labels = input_ids), forward KL(p_T || p_S) at temperature 1, AdamW
(lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay, constant lr), gradient clipping at 1.0, CPU, fp32 (the -bf16 rows: bf16 autocast).

    ours      slimlm.distill.trainer.DistillModule (live teacher, chunked fused-linear loss, no
              [tokens x vocab] logits, its per-chunk maths compiled as ``loss.compile: auto`` does),
              the step exactly as slimlm's train() loop does it: loss sum,
              normalise by the target count, backward, clip, AdamW step, zero_grad
    ours-gc   the same with student.gradient_checkpointing_enable() (as train() does for
              gradient_checkpointing: true)
    ours-int8t  ours with the teacher quantized to INT8 W8A8 (per-channel int8 weights, per-token int8
              activations; no SmoothQuant, which needs calibration data and changes nothing in the speed;
              the LM head stays fp32 as in slimlm's exports): what ``teacher: <an INT8 export>`` runs. Not
              matching settings (the teacher's signal is quantized), so a row of its own; its step-1 loss
              differs from the others by the quantization error
    ours-bf16 ours inside a CPU bf16 autocast region, the teacher held in bf16: what train() does where
              bf16 products are fast (mixed_precision: true on a CPU with AVX512_BF16 / AMX, or CUDA);
              compared with trl-bf16. Run it on a CPU without those and it is slower (bf16 emulated)
    trl-bf16  trl with bf16=True (TRL's default: accelerate's CPU bf16 autocast), the teacher held in bf16
              as for ours-bf16 (matching settings)
    trl       trl.experimental.gkd.GKDTrainer with lmbda=0 (never on-policy), beta=0 (TRL's generalized
              JSD at beta=0 is F.kl_div(student_logp, teacher_logp, log_target=True) = KL(p_T || p_S),
              the forward KL), seq_kd=False, temperature 1, gradient_checkpointing=False and bf16=False
              (TRL's defaults are True for both), optim adamw_torch, the same batches in the same order
              (sequential sampler); the anchor. Optional: prints why and skips it when trl is absent.

A step is timed from before the forward pass to after zero_grad (for TRL: the Trainer's on_step_begin ->
on_step_end callbacks, which bracket exactly training_step + clip + optimizer/scheduler step +
zero_grad; batch loading is outside for both). The first --warmup steps are dropped and the median of
the next --steps is reported; tokens/s = batch x seq-len input tokens / median step time.

Each variant runs in a fresh process (this script with --variant), so its memory is its own:
``peak`` is the process's peak RSS over its whole life (imports, both models, training); ``pre-step`` is
the RSS once models, optimizer and data exist, before the first step; ``Δpeak`` is the peak RSS during the
steps (warm-up included, so AdamW's state is counted) minus ``pre-step`` (high-water mark reset through
/proc/self/clear_refs). The step-1 loss (per-token forward KL, before any update) of ours and TRL must
agree: it checks that both compute the same thing on the same batch.

Target: ours >= 2x TRL's tokens/s at <= 0.5x TRL's peak memory. The table compares each -bf16 row with
trl-bf16 and every other row with trl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

VARIANTS = ("ours", "ours-gc", "ours-int8t", "ours-bf16", "trl", "trl-bf16")
LR, BETAS, EPS, MAX_GRAD_NORM = 5e-5, (0.9, 0.999), 1e-8, 1.0  # slimlm's OptimConfig defaults


# --------------------------------------------------------------------------- memory probes


def _mib(kib: float) -> float:
    return round(kib / 1024, 1)


# --------------------------------------------------------------------------- student


def build_student(out_dir: Path, args) -> dict:
    """A randomly initialised Llama shaped like the teacher but smaller, saved with the teacher's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.loading import load_tokenizer, resolve_model
    from slimlm.models import param_counts, save_model

    config = AutoConfig.from_pretrained(resolve_model("teacher"))
    config.hidden_size = args.student_hidden
    config.num_hidden_layers = args.student_layers
    config.num_attention_heads = args.student_heads
    config.num_key_value_heads = args.student_kv_heads
    config.head_dim = args.student_hidden // args.student_heads
    config.intermediate_size = args.student_intermediate
    config.tie_word_embeddings = True
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_model(model, load_tokenizer("teacher"), out_dir)
    return {"hidden": args.student_hidden, "layers": args.student_layers, "heads": args.student_heads,
            "kv_heads": args.student_kv_heads, "intermediate": args.student_intermediate, "tied": True,
            "params": param_counts(model)}


# --------------------------------------------------------------------------- one variant (child process)


def _setup(args):
    import torch

    from slimlm.distill.losses import check_vocab
    from slimlm.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.student_dir)
    teacher = load_model("teacher", dtype=torch.float32).requires_grad_(False)
    student = load_model(args.student_dir, dtype=torch.float32)
    vocab = check_vocab(student.get_output_embeddings().weight.shape[0],
                        teacher.get_output_embeddings().weight.shape[0], len(tok))
    for model in (teacher, student):  # fault in lazily mapped weights, so "pre-step" RSS holds both models
        for t in [*model.parameters(), *model.buffers()]:
            t.detach().sum()
    g = torch.Generator().manual_seed(args.seed)
    n = args.warmup + args.steps
    ids = torch.randint(0, vocab, (n, args.batch_size, args.seq_len), generator=g)
    return torch, tok, teacher, student, vocab, ids


def run_ours(args, gc: bool, int8_teacher: bool = False, bf16: bool = False) -> dict:
    from slimlm.distill.data import window_targets
    from slimlm.distill.losses import LossConfig, normalize
    from slimlm.distill.trainer import DistillModule

    torch, _, teacher, student, vocab, ids = _setup(args)
    extra = {}
    if int8_teacher:
        from slimlm.quantize.api import QuantConfig, quantize_model
        from slimlm.quantize.linear import int_mm_is_fast

        report = quantize_model(teacher, QuantConfig(scheme="int8"))
        extra = {"teacher_quantized_layers": report["quantized_layers"],
                 "int8_kernel": "_int_mm" if int_mm_is_fast() else "fp32 GEMM of the int8 values"}
    if bf16:  # the teacher held in bf16, as train() does where it autocasts (no per-step weight casts)
        teacher.to(torch.bfloat16)
    student.train()
    if gc:
        student.gradient_checkpointing_enable()
    from slimlm.distill.chunked import compile_closed_form

    module = DistillModule(student, teacher, LossConfig(divergence="forward_kl"), vocab, args.chunk_size,
                           compile_closed_form("auto", args.chunk_size, vocab))  # as train() does by default
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]

    pre_kib = status_kib("VmRSS")
    reset = reset_peak()
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        n_targets = window_targets([batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss_sum = module(batch["input_ids"], batch["attention_mask"], batch["labels"], mode="kd")
            normalize(loss_sum, n_targets).backward()
        losses.append(loss_sum.detach().item() / n_targets)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return _result(args, times, losses, pre_kib, reset, {"gradient_checkpointing": gc,
                                                         "chunk_size": args.chunk_size, "bf16_autocast": bf16,
                                                         **extra})


def run_trl(args, bf16: bool = False) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch, tok, teacher, student, _, ids = _setup(args)
    if bf16:
        teacher.to(torch.bfloat16)
    rows = ids.reshape(-1, args.seq_len).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * args.seq_len] * len(rows),
                                 "labels": rows})

    def collate(examples):
        return {k: torch.tensor([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")}

    state = {"times": [], "losses": [], "pre_kib": 0, "reset": False, "checks": {}}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, s, c, model=None, **kw):
            state["checks"] = {"student_dtype": str(next(model.parameters()).dtype),
                               "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}
            state["pre_kib"] = status_kib("VmRSS")
            state["reset"] = reset_peak()

        def on_step_begin(self, a, s, c, **kw):
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            state["times"].append(time.perf_counter() - state["t0"])

    class RecordingGKD(GKDTrainer):
        """GKDTrainer unchanged, except that it keeps each micro-batch's loss for the step-1 cross-check."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            state["losses"].append((out[0] if return_outputs else out).detach())
            return out

    out_dir = tempfile.mkdtemp(prefix="slimlm-bench-trl-")
    try:
        config = GKDConfig(
            output_dir=out_dir, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, disable_dropout=True,
            max_length=args.seq_len, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=True,
            train_sampling_strategy="sequential", dataloader_num_workers=0, save_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
            dataset_kwargs={"skip_prepare_dataset": True})
        trainer = RecordingGKD(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                               data_collator=collate, processing_class=tok, callbacks=[Timer()])
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    import trl

    extra = {"trl_version": trl.__version__, "lmbda": config.lmbda, "beta": config.beta,
             "temperature": config.temperature, "optim": str(config.optim), "bf16": config.bf16,
             **state["checks"]}
    return _result(args, state["times"], [float(x) for x in state["losses"]], state["pre_kib"], state["reset"],
                   extra)


def _result(args, times, losses, pre_kib, reset, extra) -> dict:
    timed_kib = status_kib("VmHWM")
    life_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed = times[args.warmup:]
    median = statistics.median(timed)
    tokens = args.batch_size * args.seq_len
    from slimlm.distill.trainer import tokens_per_second

    return {"variant": args.variant, "steps_run": len(times), "warmup_s": [round(t, 3) for t in times[:args.warmup]],
            "times_s": [round(t, 3) for t in timed], "median_s": round(median, 3),
            "tokens_per_step": tokens, "tokens_per_s": round(tokens_per_second(tokens, median), 1),
            "loss_step1": losses[0] if losses else None, "losses": [round(x, 5) for x in losses],
            "pre_step_rss_mib": _mib(pre_kib), "peak_rss_mib": _mib(max(life_kib, timed_kib)),
            "delta_peak_mib": _mib(timed_kib - pre_kib) if reset else None, "peak_reset_available": reset,
            "threads": __import__("torch").get_num_threads(), **extra}


# --------------------------------------------------------------------------- driver


def trl_status() -> str | None:
    """None when TRL's GKDTrainer imports, else why not."""
    probe = "from trl.experimental.gkd import GKDConfig, GKDTrainer"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    if r.returncode == 0:
        return None
    if "No module named 'trl'" in r.stderr:
        return "trl not installed (pip install trl to compare against TRL's GKDTrainer); skipping the trl variant"
    return "trl's GKDTrainer does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]


def child(name: str, args, student_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--student-dir", str(student_dir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--chunk-size", str(args.chunk_size),
           "--seed", str(args.seed)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name}: failed ({tail})", flush=True)
        print(r.stderr[-3000:], file=sys.stderr)
        return {"variant": name, "error": tail}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {name}: {res['tokens_per_s']} tokens/s (median step {res['median_s']} s), peak RSS "
          f"{res['peak_rss_mib']} MiB ({res['wall_s']} s)", flush=True)
    return res


def table(results: list[dict]) -> str:
    head = ("variant", "tokens/s", "median step s", "steps s", "peak RSS MiB", "pre-step RSS MiB", "Δpeak MiB",
            "tokens/s vs trl", "peak vs trl", "Δpeak vs trl", "step-1 loss")
    def anchor_of(variant: str) -> dict | None:  # bf16 rows against TRL in bf16, the rest against TRL in fp32
        name = "trl-bf16" if variant.endswith("-bf16") else "trl"
        return next((r for r in results if r["variant"] == name and "error" not in r), None)

    rows = []
    for r in results:
        anchor = anchor_of(r["variant"])
        if "error" in r:
            rows.append((r["variant"], "error", r["error"][:60], *[""] * 8))
            continue
        def ratio(k: str, r=r, anchor=anchor) -> str:
            return f"{r[k] / anchor[k]:.2f}x" if anchor and r.get(k) and anchor.get(k) else ""

        rows.append((r["variant"], f"{r['tokens_per_s']:.0f}", f"{r['median_s']:.2f}",
                     "/".join(f"{t:.2f}" for t in r["times_s"]), f"{r['peak_rss_mib']:.0f}",
                     f"{r['pre_step_rss_mib']:.0f}", "" if r["delta_peak_mib"] is None else f"{r['delta_peak_mib']:.0f}",
                     ratio("tokens_per_s"), ratio("peak_rss_mib"), ratio("delta_peak_mib"),
                     f"{r['loss_step1']:.5f}" if r.get("loss_step1") is not None else ""))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (AdamW state, allocator warm-up)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is steadier when another job shares the CPU")
    ap.add_argument("--chunk-size", type=int, default=256, help="ours: loss chunk (slimlm's default: 256)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--student-hidden", type=int, default=384)
    ap.add_argument("--student-layers", type=int, default=7)
    ap.add_argument("--student-heads", type=int, default=6)
    ap.add_argument("--student-kv-heads", type=int, default=2)
    ap.add_argument("--student-intermediate", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/train_step.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--student-dir", help=argparse.SUPPRESS)  # internal: the saved student
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.variant:
        bf16 = args.variant.endswith("-bf16")
        result = (run_trl(args, bf16) if args.variant.startswith("trl") else
                  run_ours(args, gc=args.variant == "ours-gc", int8_teacher=args.variant == "ours-int8t", bf16=bf16))
        print(json.dumps(result))
        return

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    trl = trl_status() if any(v.startswith("trl") for v in variants) else None
    if trl:
        print(trl)
        variants = [v for v in variants if not v.startswith("trl")]
    started = time.time()
    student_dir = Path(tempfile.mkdtemp(prefix="slimlm-bench-student-"))
    try:
        student = build_student(student_dir, args)
        p = student["params"]
        print(f"student: hidden {student['hidden']}, {student['layers']} layers, {student['heads']}/"
              f"{student['kv_heads']} heads, intermediate {student['intermediate']}, tied embeddings: "
              f"{p['total'] / 1e6:.2f}M parameters ({p['non_embedding'] / 1e6:.2f}M non-embedding)")
        print(f"{len(variants)} variants, each in a fresh process; batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.warmup} warm-up + {args.steps} timed steps; load average {os.getloadavg()[0]:.2f}", flush=True)
        results = [child(v, args, student_dir) for v in variants]
    finally:
        shutil.rmtree(student_dir, ignore_errors=True)

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import importlib.metadata as md

        versions["trl"] = md.version("trl")
        versions["datasets"] = md.version("datasets")
    except Exception:  # noqa: BLE001 - optional
        versions.setdefault("trl", None)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
              **versions, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "config": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                         "warmup": args.warmup, "chunk_size": args.chunk_size, "lr": LR, "betas": BETAS, "eps": EPS,
                         "max_grad_norm": MAX_GRAD_NORM, "divergence": "forward_kl", "temperature": 1.0,
                         "dtype": "float32", "device": "cpu", "seed": args.seed},
              "teacher": "SmolLM2-135M-Instruct (slimlm built-in)", "student": student,
              "trl_status": trl or "installed", "loadavg_end": os.getloadavg(),
              "wall_s": round(time.time() - started, 1), "results": results}
    print()
    print(table(results))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in report['loadavg_end'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()

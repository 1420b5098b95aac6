"""A short GPU benchmark for benchmarks/gpu_check.sh (minutes on one GPU; needs no download).

    python benchmarks/gpu_bench.py [--out runs/gpu_check/gpu_bench.json]

1. The chunked fused-linear forward-KL loss against the naive full-logits loss at a 128k vocabulary
   (Llama-3 size, 128,256), 4,096 target tokens, hidden 4,096, bf16 weights: forward + backward time
   (CUDA-synchronised, median of 5) and peak CUDA memory of each.
   Also the chunked loss with its per-chunk maths compiled (chunks of 1,024 and 256 rows), and Liger-Kernel's
   fused-linear JSD loss
   (β = 0: forward KL, compiled) when ``liger_kernel`` imports.
2. Prefill (16 x 128 tokens) and decode (batch 1, 32 greedy tokens) of a SmolLM2-135M-shaped model
   (random weights: speed depends on shapes only) in fp32, bf16, and slimlm's INT8 W8A8 and FP8 runtimes
   (slimlm.evaluate.speed, which synchronises CUDA around every timing).
3. Decode at the users' scale (--decode: SmolLM2-135M and Llama-3-8B shapes, bf16, random weights):
   transformers' ``generate`` against slimlm's decode loop (``DecodeBatch``) eager, compiled as it runs on a GPU
   (CUDA graphs: ``mode="reduce-overhead"``, cache buffers at fixed addresses) and compiled in inductor's
   default mode (``compiled_no_graphs``) and with CUDA graphs over automatic dynamic shapes (``compiled_dynamic``:
   one compile for every row count >= 2 and KV width, where ``compiled`` compiles each), batch 1 and 8 (--decode-*), 64 new tokens
   after a 256-token prompt; decode tok/s over the steps after the prefill, and the fraction of the
   measured HBM read bandwidth (a ``sum`` over 4 GiB) that batch 1 reaches (weight bytes x tok/s / bandwidth).
4. A KD training step at the users' scale (--kd-step: a Llama-3-8B-shaped bf16 teacher, a 1.2B Llama-3.2-1B-
   shaped student with fp32 master weights under bf16 autocast, 4 x 1,024 tokens, vocabulary 128,256):
   slimlm's ``DistillModule`` (chunked fused-linear forward KL) against the same step with full logits;
   step time (fwd + bwd + fused AdamW), tokens/s and peak CUDA memory.
5. Ranking at the users' scale (--sections scoring, not in the default run): a Llama-3-8B-shaped bf16 model, one
   2,048-token prefix and 100 candidates of 24 tokens in batches of 16 after it (``pack_max=0``), the
   candidates reading the prefix KV in place (slimlm.runtime.shared_prefix, forced on CUDA) against the KV
   copied into each batch (the CUDA default): candidates/s, peak memory, and the largest score difference.
Writes JSON after every section (a section that fails records its error and the rest go on).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


LLAMA3_8B = dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
LLAMA32_1B = dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  tie_word_embeddings=True)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)


def timed(fn, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def loss_bench(vocab: int = 128_256, tokens: int = 4096, hidden: int = 4096) -> dict:
    import torch.nn.functional as F

    from slimlm.distill.chunked import compile_closed_form, fused_linear_kd_loss
    from slimlm.distill.losses import LossConfig

    g = torch.Generator(device="cuda").manual_seed(0)
    w_s = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    w_t = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    h_s = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16().requires_grad_()
    h_t = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    cfg = LossConfig(divergence="forward_kl")

    def ours():
        fused_linear_kd_loss(h_s, w_s, labels, cfg, teacher_hidden=h_t, teacher_weight=w_t, chunk_size=1024).backward()

    compiled = compile_closed_form(True, 1024, vocab)

    def ours_compiled(chunk: int = 1024):
        def run():
            fused_linear_kd_loss(h_s, w_s, labels, cfg, teacher_hidden=h_t, teacher_weight=w_t, chunk_size=chunk,
                                 closed_form=compiled).backward()
        return run

    # chunk 1,024 as first measured; 256 is the trainer's default (loss.chunk_size), a quarter of the temporaries
    variants = {"chunked": ours, "chunked_compiled": ours_compiled(), "chunked_compiled_c256": ours_compiled(256)}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True,
                                           chunk_size=1024)

        def liger():
            (liger_fn(h_s, w_s, h_t, w_t, labels) * tokens).backward()  # Liger returns the mean per token
        variants["liger_compiled"] = liger
    except ImportError as e:
        print(f"liger-kernel: {e}")

    def naive():
        s = F.log_softmax((h_s @ w_s.T).float(), dim=-1)
        with torch.no_grad():
            t = F.log_softmax((h_t @ w_t.T).float(), dim=-1)
        F.kl_div(s, t, reduction="sum", log_target=True).backward()

    res = {}
    for name, fn in (*variants.items(), ("naive", naive)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            sec = timed(fn)
            res[name] = {"fwd_bwd_seconds": sec, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        except torch.OutOfMemoryError:
            res[name] = {"error": "out of memory"}
        except Exception as e:  # noqa: BLE001 - one variant's failure is a result, the others still run
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        w_s.grad = h_s.grad = None
    return {"vocab": vocab, "tokens": tokens, "hidden": hidden, **res}


def model_bench() -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimlm.evaluate import speed
    from slimlm.quantize.api import QuantConfig, quantize_model
    from slimlm.quantize.linear import fp8_matmul_supported

    cfg = LlamaConfig(**SMOLLM2_135M)
    tokens = torch.randint(100, 40000, (4096,)).tolist()
    out = {}
    for name in ("fp32", "bf16", "int8", "fp8"):
        if name == "fp8" and not fp8_matmul_supported(torch.device("cuda")):
            out[name] = {"skipped": "fp8 _scaled_mm needs compute capability >= 8.9"}
            continue
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        if name in ("int8", "fp8"):
            quantize_model(model, QuantConfig(scheme=name))
        model = model.to("cuda", dtype=torch.bfloat16 if name != "fp32" else torch.float32)
        try:
            with torch.inference_mode():
                out[name] = speed(model, tokens)
        except Exception as e:  # noqa: BLE001 - one scheme's failure is a result, the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print("models", name, out[name], flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def random_model(shape: dict, dtype: torch.dtype, device: str = "cuda"):
    """A Llama-architecture model of ``shape`` with random weights, built on ``device`` (seconds even at 8B on a
    GPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def hbm_read_gb_s() -> float:
    x = torch.rand(1 << 30, device="cuda")  # 4 GiB of fp32
    sec = min(timed(x.sum, reps=5) for _ in range(2))
    return x.numel() * 4 / sec / 1e9


DECODE_MODELS = {"smollm2-135m": SMOLLM2_135M, "llama3-8b": LLAMA3_8B}
DECODE_VARIANTS = ("hf", "eager", "compiled", "compiled_no_graphs", "compiled_dynamic")
# gpu_check.sh's time budget: the variants measured by default (--decode-variants names any of the above)
DEFAULT_DECODE_VARIANTS = ("hf", "eager", "compiled", "compiled_no_graphs")


def decode_bench(new_tokens: int = 64, prompt: int = 256, models: tuple[str, ...] = tuple(DECODE_MODELS),
                 variants: tuple[str, ...] = DEFAULT_DECODE_VARIANTS, batches: tuple[int, ...] = (1, 8)) -> dict:
    import torch._dynamo

    out = {"hbm_read_gb_s": round(hbm_read_gb_s(), 1), "new_tokens": new_tokens, "prompt_tokens": prompt}
    print("decode", out, flush=True)
    for name in models:
        out[name] = decode_model(random_model(DECODE_MODELS[name], torch.bfloat16).eval(), name,
                                 out["hbm_read_gb_s"], new_tokens, prompt, variants, batches)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return out


def decode_model(model, name: str, hbm_gb_s: float, new_tokens: int, prompt: int,
                 variants: tuple[str, ...] = DEFAULT_DECODE_VARIANTS, batches: tuple[int, ...] = (1, 8)) -> dict:
    """Decode tok/s of ``model`` for each variant at batch 1 and 8 (see the module's docstring)."""
    import torch._dynamo

    from slimlm.runtime import decoding

    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = {"weight_gb": round(wbytes / 1e9, 3)}
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device

    def prompts(b):
        high = min(40000, model.config.vocab_size)
        return [torch.randint(5, high, (max(4, prompt - 8 * i),), generator=g).tolist() for i in range(b)]

    def hf(ps, n):
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.inference_mode():  # prefill + 1 token, then prefill + n: the difference is n - 1 steps
            t1 = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                                              do_sample=False), reps=2)
            tn = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                              min_new_tokens=n, do_sample=False), reps=2)
        return (n - 1) * len(ps) / (tn - t1)

    def ours(**kw):
        def run(ps, n):
            times = []
            for _ in range(3):  # the first: warm-up (and compilation)
                gens = [decoding.Generation(p, decoding.SamplingParams(max_tokens=n, temperature=0)) for p in ps]
                batch = decoding.DecodeBatch(model, **kw)
                with torch.inference_mode():
                    batch.add(gens)
                    sync()
                    t = time.perf_counter()
                    while len(batch):
                        batch.step()
                    sync()
                times.append(time.perf_counter() - t)
                if kw.get("compile") and not batch.compiled:
                    raise RuntimeError("the compiled step fell back to eager")
            return (n - 1) * len(ps) / statistics.median(times[1:])
        return run

    def no_graphs(ps, n):
        torch._dynamo.reset()
        saved = decoding._compile_step
        decoding._compile_step = lambda f, mode=None, dynamic=None: torch.compile(f, dynamic=False)
        try:
            return ours(compile=True)(ps, n)
        finally:
            decoding._compile_step = saved

    def dynamic_graphs(ps, n):  # CUDA graphs over automatic dynamic shapes (what the CPU's compiled step uses)
        torch._dynamo.reset()
        decoding.CUDA_GRAPHS_DYNAMIC = True
        try:
            return ours(compile=True)(ps, n)
        finally:
            decoding.CUDA_GRAPHS_DYNAMIC = False

    fns = {"hf": hf, "eager": ours(), "compiled": ours(compile=True), "compiled_no_graphs": no_graphs,
           "compiled_dynamic": dynamic_graphs}
    for variant in variants:
        fn = fns[variant]
        for b in batches:
            key = f"{variant}_b{b}"
            t0 = time.perf_counter()
            try:
                tok_s = fn(prompts(b), new_tokens)
                rows[key] = {"tok_s": round(tok_s, 1), "wall_s": round(time.perf_counter() - t0, 1)}
                if b == 1:
                    rows[key]["bandwidth_fraction"] = round(wbytes * tok_s / 1e9 / hbm_gb_s, 3)
            except Exception as e:  # noqa: BLE001 - a variant's failure is a result
                rows[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(name, key, rows[key], flush=True)
    return rows


def kd_step_bench(batch: int = 4, seq: int = 1024, steps: int = 4, teacher_shape: dict = LLAMA3_8B,
                  student_shape: dict = LLAMA32_1B, device: str = "cuda") -> dict:
    import torch.nn.functional as F

    from slimlm.distill.chunked import compile_closed_form
    from slimlm.distill.losses import LossConfig
    from slimlm.distill.trainer import DistillModule

    teacher = random_model(teacher_shape, torch.bfloat16, device).eval().requires_grad_(False)
    student = random_model(student_shape, torch.float32, device).train()
    vocab = teacher_shape["vocab_size"]
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), device=device, generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt: the loss on the last three quarters
    targets = int((labels[:, 1:] != -100).sum())
    chunk = 1024
    module = DistillModule(student, teacher, LossConfig(), vocab, chunk, compile_closed_form("auto", chunk, vocab))

    def chunked():
        return module(ids, mask, labels, mode="kd")

    def full_logits():
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        keep = labels[:, 1:] != -100
        return F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), reduction="sum", log_target=True)

    out = {"teacher_params_b": round(sum(p.numel() for p in teacher.parameters()) / 1e9, 2),
           "student_params_b": round(sum(p.numel() for p in student.parameters()) / 1e9, 2),
           "batch": batch, "seq": seq, "target_tokens": targets, "chunk_size": chunk}
    for name, loss_fn in (("chunked", chunked), ("full_logits", full_logits)):
        out[name] = train_steps(student, loss_fn, targets, batch * seq, steps)
        print("kd_step", name, out[name], flush=True)
    return out


def train_steps(student, loss_fn, targets: int, tokens: int, steps: int) -> dict:
    """Median time of ``steps`` training steps (bf16 autocast, fused AdamW) after one warm-up."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast(next(student.parameters()).device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        (loss / targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / targets

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        first = step()
        sec = timed(step, reps=steps)
        return {"step_s": round(sec, 4), "tokens_s": round(tokens / sec), "first_loss": first,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - a variant's failure is a result
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def scoring_bench(prefix: int = 2048, candidates: int = 100, tokens: int = 24, batch: int = 16) -> dict:
    from slimlm.runtime import shared_prefix
    from slimlm.runtime.scoring import label_probs_shared_prefix

    model = random_model(LLAMA3_8B, torch.bfloat16).eval()
    ids = torch.randint(10, model.config.vocab_size, (prefix + candidates * tokens,)).tolist()
    pre, sufs = ids[:prefix], [ids[prefix + tokens * i:prefix + tokens * (i + 1)] for i in range(candidates)]
    out: dict = {"prefix_tokens": prefix, "candidates": candidates, "candidate_tokens": tokens, "batch": batch}
    scores = {}

    def call():
        return label_probs_shared_prefix(model, pre, sufs, (5, 6), batch_size=batch, pack_max=0)

    for way, where in (("copied", ()), ("in_place", ("cpu", "cuda")), ("copied_again", ())):
        with shared_prefix.only_on(*where), torch.inference_mode():
            scores[way] = call()
            torch.cuda.reset_peak_memory_stats()
            sec = timed(call, reps=3)
        out[way] = {"candidates_per_s": round(candidates / sec, 1),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print("scoring", way, out[way], flush=True)
    out["max_abs_score_diff"] = float(abs(scores["in_place"] - scores["copied"]).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    ap.add_argument("--sections", default="loss,models,kd_step,decode",
                    help="comma-separated: loss, models, decode, kd_step, scoring")
    ap.add_argument("--decode-models", default=",".join(DECODE_MODELS))
    ap.add_argument("--decode-variants", default=",".join(DEFAULT_DECODE_VARIANTS), help=", ".join(DECODE_VARIANTS))
    ap.add_argument("--decode-batches", default="1,8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA GPU available to torch")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    def ap_list(v: str) -> tuple[str, ...]:
        return tuple(x for x in v.split(",") if x)

    decode = functools.partial(decode_bench, models=ap_list(args.decode_models),
                               variants=ap_list(args.decode_variants),
                               batches=tuple(int(b) for b in ap_list(args.decode_batches)))
    sections = {"loss": loss_bench, "models": model_bench, "decode": decode, "kd_step": kd_step_bench,
                "scoring": scoring_bench}
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            result[name] = sections[name]()
        except Exception as e:  # noqa: BLE001 - the other sections still run; the error is the result
            result[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        result[name + "_wall_s"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(result[name], indent=1), flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

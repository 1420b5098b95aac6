"""A short GPU benchmark for benchmarks/gpu_check.sh (minutes on one GPU; needs no download).

    python benchmarks/gpu_bench.py [--out runs/gpu_check/gpu_bench.json]

1. The chunked fused-linear forward-KL loss against the naive full-logits loss at a 128k vocabulary
   (Llama-3 size, 128,256), 4,096 target tokens, hidden 4,096, bf16 weights: forward + backward time
   (CUDA-synchronised, median of 5) and peak CUDA memory of each.
2. Prefill (16 x 128 tokens) and decode (batch 1, 32 greedy tokens) of a SmolLM2-135M-shaped model
   (random weights: speed depends on shapes only) in fp32, bf16, and slimlm's INT8 W8A8 and FP8 runtimes
   (slimlm.evaluate.speed, which synchronises CUDA around every timing).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed(fn, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def loss_bench(vocab: int = 128_256, tokens: int = 4096, hidden: int = 4096) -> dict:
    import torch.nn.functional as F

    from slimlm.distill.chunked import fused_linear_kd_loss
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

    def naive():
        s = F.log_softmax((h_s @ w_s.T).float(), dim=-1)
        with torch.no_grad():
            t = F.log_softmax((h_t @ w_t.T).float(), dim=-1)
        F.kl_div(s, t, reduction="sum", log_target=True).backward()

    res = {}
    for name, fn in (("chunked", ours), ("naive", naive)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            sec = timed(fn)
            res[name] = {"fwd_bwd_seconds": sec, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        except torch.OutOfMemoryError:
            res[name] = {"error": "out of memory"}
        w_s.grad = h_s.grad = None
    return {"vocab": vocab, "tokens": tokens, "hidden": hidden, **res}


def model_bench() -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimlm.evaluate import speed
    from slimlm.quantize.api import QuantConfig, quantize_model
    from slimlm.quantize.linear import fp8_matmul_supported

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
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
        with torch.inference_mode():
            out[name] = speed(model, tokens)
        del model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA GPU available to torch")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "loss": loss_bench(), "models": model_bench()}
    print(json.dumps(result, indent=2))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

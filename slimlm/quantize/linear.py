"""Runtime modules that execute the quantization schemes: drop-in replacements for ``nn.Linear``.

Each takes ``x [..., in]`` and returns ``[..., out]`` in ``x``'s dtype, like ``nn.Linear``:

- :class:`Int8Linear` (W8A8): int8 weights [out, in] with per-output-channel scales; each call quantizes
  the activations per token (s_t = max|x_t| / 127) and runs a real int8 × int8 -> int32 matmul
  (``torch._int_mm``), then y = acc · s_t · s_w (+ b). On an AVX-512 CPU without AMX that matmul runs ~3.6× faster than fp32 (see slimlm.placement).
  Sibling layers that read the same input (q/k/v_proj, gate/up_proj) quantize it once: see
  :func:`share_input_quantization`.
- :class:`Fp8Linear` (W8A8 FP8): e4m3fn weights (1 byte each) with per-channel scales; activations
  quantized per token (dynamic) or with one calibrated per-tensor scale (static). On a CUDA GPU with
  compute capability >= 8.9 it runs ``torch._scaled_mm`` (a real fp8 matmul). Elsewhere (every CPU) it
  dequantizes on the fly: the activations are rounded to fp8 and back (same numbers the fp8 matmul
  would see), the weights are expanded to float32 each call, and an fp32 matmul runs. That saves
  storage and memory, not time: it is slower than plain fp32.
- :class:`Int4Linear` (W4A16): int4 codes packed 8 per int32 with per-group scales (and zero points
  when asymmetric); each call unpacks and dequantizes the weight and runs a float matmul. Storage
  and memory shrink ~8× vs fp32; compute does not get faster on CPU.

The quantized tensors are buffers (they never train). ``.weight`` is a read-only property that
returns the dequantized float32 weight, for code that reads it (e.g. the scoring engine's label
rows of the LM head); it costs a full dequantization per access. ``logical_numel`` is the number of
weights the layer stands for (in × out), used by :func:`slimlm.models.param_counts`.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import torch
from torch import nn

from slimlm.quantize.schemes import (
    FP8_DTYPE,
    dequantize_int4,
    fake_quantize_fp8,
    fp8_to_float32,
    pack_int4,
    quantize_fp8,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    unpack_int4,
)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int8_matmul(a: torch.Tensor, w: torch.Tensor, *, pad: bool | None = None) -> torch.Tensor:
    """int32 [M, N] = a [M, K] int8 @ w [N, K]ᵀ int8, exact.

    CUDA's ``_int_mm`` needs M > 16 and K, N multiples of 8: when ``pad`` (default: on CUDA), the
    operands are zero-padded to that and the result cropped (zeros add nothing to the sums). The CPU
    kernel takes any shape.
    """
    m, k = a.shape
    n = w.shape[0]
    if m == 0:
        return torch.zeros(0, n, dtype=torch.int32, device=a.device)
    if not a.is_cuda and not int_mm_is_fast():
        # the same integer products summed in fp32 (exact while |sum| < 2^24; beyond, the rounding of one fp32
        # accumulation, ~1e-7 relative): on CPUs without int8 dot-product instructions _int_mm is far slower
        return torch.mm(a.float(), w.float().t()).round_().to(torch.int32)
    if pad is None:
        pad = a.is_cuda
    if pad and (m <= 16 or k % 8 or n % 8):
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        return torch._int_mm(_pad_to(a, mp, kp), _pad_to(w, np_, kp).t())[:m, :n]
    return torch._int_mm(a, w.t())


@functools.cache
def int_mm_is_fast() -> bool:
    """Whether this CPU's ``torch._int_mm`` beats an fp32 GEMM of the same integers (``SLIMLM_INT8_KERNEL=
    int_mm|float`` forces a choice). An AVX-512 CPU with VNNI or AMX int8 dot products: yes, without timing
    (4.4-4.6x an fp32 GEMM on an AVX-512 VNNI EPYC, BENCHMARKS.md; a timing can flip when another job holds
    the cores). Elsewhere measured once per process on a [512, 512] x [512, 512] product: on AVX2-only CPUs
    torch falls back to a reference kernel ~20x slower than fp32, and the fp32 GEMM of the int8 values is the
    fast W8A8 path."""
    forced = os.environ.get("SLIMLM_INT8_KERNEL")
    if forced in ("int_mm", "float"):
        return forced == "int_mm"
    if _int8_dot_products():
        return True
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=g)
    af, wf = a.float(), w.float()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    return best(lambda: torch._int_mm(a, w.t())) < best(lambda: af @ wf.t())


def _int8_dot_products() -> bool:
    """An AVX-512 CPU with VNNI or AMX (torch's own CPU probes; False where this torch has none)."""
    from slimlm.placement import cpu_has

    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and cpu_has("_is_vnni_supported",
                                                                                   "_is_amx_tile_supported")


def fp8_matmul_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` runs fp8 on hardware: CUDA with compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantizedLinear(nn.Module):
    """Shared plumbing: shapes, bias, the dequantized ``.weight`` view, the logical size."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def logical_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, float32 [out, in] (computed on each access)."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def compressed_state(self) -> dict[str, torch.Tensor]:
        """This layer's tensors under their compressed-tensors names (no bias)."""
        raise NotImplementedError

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y.add_(self.bias.to(y.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _SharedInput(threading.local):
    """The activations the leader of a sibling group quantized, for its followers (one entry per thread)."""

    source: torch.Tensor | None = None
    version: int | None = None
    q: torch.Tensor | None = None
    s: torch.Tensor | None = None


_SHARED = _SharedInput()


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version  # inference tensors keep no version counter


class Int8Linear(QuantizedLinear):
    """W8A8 int8: per-channel symmetric int8 weights, dynamic per-token int8 activations, int32 accumulation."""

    scheme = "int8"
    # role in a group of layers fed the same tensor (set by share_input_quantization): "lead" quantizes and
    # keeps the result, "follow" reuses it, "last" reuses it and lets it go; None works alone
    input_role: str | None = None

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        out, inp = qweight.shape
        super().__init__(inp, out, bias)
        if qweight.dtype != torch.int8 or weight_scale.shape != (out, 1):
            raise ValueError("Int8Linear needs int8 weights [out, in] and float scales [out, 1]")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale

    def compressed_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.qweight, "weight_scale": self.weight_scale}

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        role, shared = self.input_role, _SHARED
        if role in ("follow", "last") and shared.source is x and shared.version == _version(x):
            q, s = shared.q, shared.s  # the very same tensor, unmodified since the leader quantized it
        else:
            x2 = x.reshape(-1, self.in_features)
            q, s = quantize_int8_per_token(x2 if x2.dtype == torch.float32 else x2.float())
        if role == "lead":
            shared.source, shared.version, shared.q, shared.s = x, _version(x), q, s
        elif role == "last":
            shared.source = shared.q = shared.s = None
        return q, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self._quantize_input(x)
        acc = int8_matmul(q, self.qweight)
        # convert first, then scale in place: a mixed int32 · float32 multiply is ~3x slower on CPU
        y = acc.to(torch.float32).mul_(s).mul_(self.weight_scale.view(1, -1))
        return self._finish(y, x)


# layers of a Llama-family block that read the same tensor: the attention input, the MLP input
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_input_quantization(model: nn.Module) -> int:
    """Let Int8Linear siblings that read the same input quantize it once; returns the layers that reuse.

    In the Llama-family blocks q/k/v_proj all take the normed hidden states and gate/up_proj the MLP input,
    so per-token quantizing that tensor once instead of three (two) times cuts the activation-quantization
    work of a decoder layer from 7 passes to 4. Exact by construction: a follower reuses the leader's
    result only for the very same tensor object, unmodified since (its version counter, where the tensor
    keeps one), and otherwise quantizes for itself."""
    n = 0
    for parent in model.modules():
        for names in SIBLINGS:
            group = [getattr(parent, a, None) for a in names]
            if all(isinstance(m, Int8Linear) for m in group):
                for i, m in enumerate(group):
                    m.input_role = "lead" if i == 0 else ("last" if i == len(group) - 1 else "follow")
                n += len(group) - 1
    return n


class Fp8Linear(QuantizedLinear):
    """W8A8 FP8 (e4m3fn): per-channel weight scales; per-token dynamic or per-tensor static activation scales.

    The weight bytes are kept as uint8 (the e4m3fn bit patterns) so that ``model.to(dtype)`` cannot
    silently cast them; :attr:`qweight_fp8` is a free view as ``torch.float8_e4m3fn``.
    """

    scheme = "fp8"

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        out, inp = qweight.shape
        super().__init__(inp, out, bias)
        if qweight.dtype != FP8_DTYPE or weight_scale.shape != (out, 1):
            raise ValueError("Fp8Linear needs float8_e4m3fn weights [out, in] and float scales [out, 1]")
        self.register_buffer("qweight", qweight.contiguous().view(torch.uint8))
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.float().reshape(1).contiguous())
        else:
            self.input_scale = None

    @property
    def qweight_fp8(self) -> torch.Tensor:
        return self.qweight.view(FP8_DTYPE)

    @property
    def static_activations(self) -> bool:
        return self.input_scale is not None

    def dequantized_weight(self) -> torch.Tensor:
        return fp8_to_float32(self.qweight_fp8).mul_(self.weight_scale)

    def compressed_state(self) -> dict[str, torch.Tensor]:
        state = {"weight": self.qweight_fp8, "weight_scale": self.weight_scale}
        if self.input_scale is not None:
            state["input_scale"] = self.input_scale
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if fp8_matmul_supported(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return self._finish(self._scaled_mm(x2), x)
        xf = x2.float()
        if self.input_scale is not None:
            xd = fake_quantize_fp8(xf, self.input_scale)
        else:
            _, s = quantize_fp8_per_token(xf)
            xd = fake_quantize_fp8(xf, s)
        y = torch.nn.functional.linear(xd, self.dequantized_weight())
        return self._finish(y, x)

    def _scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """Real fp8 GEMM (CUDA sm89+): row-wise scales, bf16 out. Tested where a GPU with fp8 runs the GPU tier
        (CI has none). ``_scaled_mm`` takes float32 scales only: a model moved to bf16 (``model.to(dtype)`` casts
        the scale buffers too) and bf16 activations give bf16 scales, cast back here."""
        if self.input_scale is not None:
            xq = quantize_fp8(x2, self.input_scale)
            sa = self.input_scale.float().expand(x2.shape[0], 1).contiguous()
        else:
            xq, sa = quantize_fp8_per_token(x2)
        return torch._scaled_mm(xq, self.qweight_fp8.t(), scale_a=sa.float(),
                                scale_b=self.weight_scale.float().view(1, -1), out_dtype=torch.bfloat16).float()


class Int4Linear(QuantizedLinear):
    """W4A16: int4 codes packed 8 per int32 [out, ceil(in/8)], scales [out, in/g] (+ int8 zero points if asymmetric)."""

    scheme = "int4"
    actorder: str | None = None  # "weight" when GPTQ visited the columns in activation order (static groups)

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None):
        out = weight_packed.shape[0]
        super().__init__(in_features, out, bias)
        if weight_packed.dtype != torch.int32 or weight_packed.shape[1] != -(-in_features // 8):
            raise ValueError(f"Int4Linear: packed weights must be int32 [{out}, {-(-in_features // 8)}]")
        if in_features % group_size or weight_scale.shape != (out, in_features // group_size):
            raise ValueError(f"Int4Linear: scales {tuple(weight_scale.shape)} do not fit "
                             f"[{out}, {in_features}] in groups of {group_size}")
        if weight_zero_point is not None and weight_zero_point.shape != weight_scale.shape:
            raise ValueError("Int4Linear: zero points must have the scales' shape")
        self.group_size = group_size
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        if weight_zero_point is not None:
            self.register_buffer("weight_zero_point", weight_zero_point.to(torch.int8).contiguous())
        else:
            self.weight_zero_point = None

    @classmethod
    def from_codes(cls, q: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
                   group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
        """From int4 codes (int8 [out, in] in [−8, 7]), packing them."""
        return cls(pack_int4(q), weight_scale, weight_zero_point, group_size, q.shape[1], bias)

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    def codes(self) -> torch.Tensor:
        """The int4 codes, int8 [out, in] in [−8, 7]."""
        return unpack_int4(self.weight_packed, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.weight_scale, self.weight_zero_point, self.group_size)

    def compressed_state(self) -> dict[str, torch.Tensor]:
        state = {"weight_packed": self.weight_packed, "weight_scale": self.weight_scale,
                 "weight_shape": torch.tensor([self.out_features, self.in_features], dtype=torch.int64)}
        if self.weight_zero_point is not None:
            # compressed-tensors packs asymmetric zero points along the output dim: [ceil(out/8), in/g]
            state["weight_zero_point"] = pack_int4(self.weight_zero_point, dim=0)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        y = torch.nn.functional.linear(x.reshape(-1, self.in_features).to(w.dtype), w)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, symmetric={self.symmetric}"


QUANTIZED_TYPES = (Int8Linear, Fp8Linear, Int4Linear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())

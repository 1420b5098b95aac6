"""Quantization math as pure tensor functions: scales, quantize / dequantize, int4 packing, smoothing.

Conventions (those of the compressed-tensors format, so that what we compute is what vLLM and
transformers read back):

- symmetric integer:   q = clamp(round(x / s), qmin, qmax),          x ≈ q · s
- asymmetric integer:  q = clamp(round(x / s) + z, qmin, qmax),      x ≈ (q − z) · s   (z an integer)
- float8 (e4m3fn):     q = fp8(clamp(x / s, −448, 448)),             x ≈ q · s
- ``round`` is round-half-to-even (``torch.round``), as in compressed-tensors.

Scales are float32. Weights are [out, in]; "per channel" means one scale per output row ([out, 1]);
"per token" one scale per row of a 2-D activation [tokens, in] ([tokens, 1]); "group g" one scale per
``g`` consecutive input columns of a row ([out, in / g]).

Nothing here knows about modules, hooks or files: :mod:`slimlm.quantize.linear` and
:mod:`slimlm.quantize.api` call these functions.
"""

from __future__ import annotations

import sys

import torch

INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# An all-zero row/group gets this absmax, so its scale is tiny but non-zero and its codes are 0.
_EPS = 1e-30


# --------------------------------------------------------------------------- scales


def absmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """max |x| along ``dim`` (kept as a size-1 dim). Two plain reductions: cheaper than abs().amax()."""
    return torch.maximum(x.amax(dim, keepdim=True), x.amin(dim, keepdim=True).neg())


def symmetric_scale(x: torch.Tensor, qmax: float, dim: int = -1) -> torch.Tensor:
    """s = max|x| / qmax along ``dim``, in float32 (an all-zero slice gets a tiny positive scale)."""
    return absmax(x, dim).float().clamp_min(_EPS) / qmax


# --------------------------------------------------------------------------- int8


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(x / s), −127, 127) as int8 (symmetric; −128 unused so that −q is representable)."""
    return torch.round(x.float() / scale).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [out, in] -> (q int8 [out, in], scale float32 [out, 1]) with s = max|w_row| / 127."""
    scale = symmetric_scale(w, INT8_QMAX)
    return quantize_int8(w, scale), scale


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [tokens, in] -> (q int8, scale float32 [tokens, 1]) with s = max|x_row| / 127.

    |x / s| <= 127 by construction, so no clamp is needed; this runs on every int8 matmul, so it is
    kept to two reductions, one division, one rounding and one cast."""
    scale = symmetric_scale(x, INT8_QMAX)
    return torch.div(x, scale).round_().to(torch.int8), scale


# --------------------------------------------------------------------------- fp8 (e4m3fn)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = e4m3fn(clamp(x / s, −448, 448)); the cast rounds to the nearest representable value."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [out, in] -> (q float8_e4m3fn [out, in], scale float32 [out, 1]) with s = max|w_row| / 448."""
    scale = symmetric_scale(w, FP8_MAX)
    return quantize_fp8(w, scale), scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [tokens, in] -> (q float8_e4m3fn, scale float32 [tokens, 1]), s = max|x_row| / 448."""
    scale = symmetric_scale(x, FP8_MAX)
    return quantize_fp8(x, scale), scale


def fp8_static_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor static activation scale [1] from a calibrated max |x|: s = amax / 448."""
    return (torch.as_tensor(amax, dtype=torch.float32).reshape(1).clamp_min(_EPS) / FP8_MAX)


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """Exact float8_e4m3fn -> float32, by bit arithmetic (the CPU cast is a slow scalar loop).

    The 7 exponent+mantissa bits are moved to the top of a float32 (exponent field at bit 23), which
    gives 2^(e−127)·(1 + m/8) for normal numbers and m·2^−129 for subnormals (e = 0); multiplying by
    2^120 rebiases to e4m3's 2^(e−7)·(1 + m/8) and m/8·2^−6. The sign bit moves to bit 31. (NaN,
    0x7f/0xff, would come out as ±480; quantize_fp8 never produces it.)
    """
    if q.device.type != "cpu":
        return q.float()
    b = q.view(torch.int8).to(torch.int32)  # sign-extended: bit 31 is the fp8 sign
    bits = ((b & 0x7F) << 20) | (b & -0x80000000)
    return bits.view(torch.float32).mul_(2.0 ** 120)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(x / s) · s in float32: what a real fp8 matmul sees of ``x``."""
    return fp8_to_float32(quantize_fp8(x, scale)).mul_(scale)


# --------------------------------------------------------------------------- int4 (groups)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_features}")


CLIP_RATIOS = tuple(1.0 - 0.01 * i for i in range(31))  # the ranges int4 clipping search tries: 100% .. 70%


def int4_group_params(w: torch.Tensor, group_size: int, symmetric: bool, *, importance: torch.Tensor | None = None,
                      clip_ratios: tuple[float, ...] | None = None,
                      scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) per group of ``group_size`` input columns: [out, in / g] each.

    symmetric:  s = max|w_g| / 7.5 (all 16 codes used: −absmax -> −7.5 -> −8, +absmax -> 7.5 -> 7,
                an error of half a step like any other value); no zero point.
    asymmetric: lo = min(min w_g, 0), hi = max(max w_g, 0) (so 0 is exact), s = (hi − lo) / 15,
                z = clamp(round(−8 − lo / s), −8, 7) as int8.

    ``clip_ratios``: clipping search — the range is shrunk by each ratio in turn (absmax · r; lo · r,
    hi · r) and each group keeps the ratio whose round-to-nearest error Σ_j importance_j (w_j − ŵ_j)² is
    least (``importance`` [in]: e.g. the calibration Hessian's diagonal, the energy of input j; default
    uniform). A ratio of 1 is the plain range, so with it in the list no group's error grows.
    ``scale_dtype``: the scales are rounded to this dtype's values (the dtype they are stored in) before
    the zero points and errors are computed, so codes are chosen for the scales that will be used.
    """
    out, n = w.shape
    check_group_size(n, group_size)
    wg = w.float().reshape(out, n // group_size, group_size)
    if symmetric:
        lo, hi = None, absmax(wg).squeeze(-1)
    else:
        lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
    best = None
    for r in clip_ratios or (1.0,):
        if symmetric:
            scale, zero = hi.float().clamp_min(_EPS) * r / ((INT4_QMAX - INT4_QMIN) / 2), None
        else:
            scale = ((hi - lo) * r / (INT4_QMAX - INT4_QMIN)).clamp_min(_EPS)
        if scale_dtype is not None:
            scale = scale.to(scale_dtype).float().clamp_min(_EPS)
        if not symmetric:
            zero = torch.round(INT4_QMIN - lo * r / scale).clamp_(INT4_QMIN, INT4_QMAX).to(torch.int8)
        if clip_ratios is None:
            return scale, zero
        err = (w.float() - dequantize_int4(quantize_int4(w, scale, zero, group_size), scale, zero, group_size)) ** 2
        if importance is not None:
            err = err * importance.float()
        err = err.reshape(out, n // group_size, group_size).sum(-1)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero is not None:
            best[2] = torch.where(better, zero, best[2])
    return best[1], best[2]


def quantize_int4(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """int8 codes in [−8, 7] of ``w`` [out, in] with group scales/zeros [out, in / g] (or per-column
    scales [out, k] for a slice of k columns that lies in one group: pass ``group_size = k``)."""
    out, n = w.shape
    wg = w.float().reshape(out, n // group_size, group_size)
    q = torch.round(wg / scale.unsqueeze(-1))
    if zero is not None:
        q += zero.unsqueeze(-1)
    return q.clamp_(INT4_QMIN, INT4_QMAX).to(torch.int8).reshape(out, n)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """(q − z) · s per group, float32 [out, in]."""
    out, n = q.shape
    qg = q.reshape(out, n // group_size, group_size).float()
    if zero is not None:
        qg = qg - zero.unsqueeze(-1)
    return (qg * scale.unsqueeze(-1)).reshape(out, n)


def rtn_int4(w: torch.Tensor, group_size: int, symmetric: bool, **params):
    """Round-to-nearest int4: (q [out, in] int8 in [−8, 7], scale [out, in/g], zero [out, in/g] | None);
    ``params``: :func:`int4_group_params`'s keywords (clipping search, scale dtype)."""
    scale, zero = int4_group_params(w, group_size, symmetric, **params)
    return quantize_int4(w, scale, zero, group_size), scale, zero


def pack_int4(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pack int4 codes (int8 in [−8, 7], 2-D) into int32 words along ``dim``: 8 codes per word.

    The compressed-tensors "pack-quantized" layout: each code is stored as the nibble q + 8, and
    element j of each run of 8 sits at bits 4·(j mod 8) of word j // 8 (so, little-endian, byte k of
    a word holds elements 2k (low nibble) and 2k+1 (high nibble)). A dim whose length is not a
    multiple of 8 is zero-padded (as nibble 0, i.e. code −8) and the word count is ceil(n / 8).
    """
    if sys.byteorder != "little":  # the byte view below assumes little-endian words
        raise NotImplementedError("int4 packing needs a little-endian host")
    if q.dim() != 2:
        raise ValueError("pack_int4 expects a 2-D tensor")
    if dim == 0:
        return pack_int4(q.t(), 1).t().contiguous()
    rows, n = q.shape
    u = (q.to(torch.int16) - INT4_QMIN).to(torch.uint8)
    pad = -n % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    pairs = u.reshape(rows, -1, 2)
    packed_bytes = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return packed_bytes.view(torch.int32)


def unpack_int4(packed: torch.Tensor, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [−8, 7], ``size`` long along ``dim``."""
    if sys.byteorder != "little":
        raise NotImplementedError("int4 unpacking needs a little-endian host")
    if dim == 0:
        return unpack_int4(packed.t().contiguous(), size, 1).t().contiguous()
    rows = packed.shape[0]
    b = packed.contiguous().view(torch.uint8)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(rows, -1)[:, :size]
    return nibbles.to(torch.int8) + INT4_QMIN


# --------------------------------------------------------------------------- SmoothQuant


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant per-input-channel factors s_j = max|X_j|^α / max|W_j|^(1−α)  [in].

    The layer computes (X diag(s)^−1)(diag(s) Wᵀ) = X Wᵀ exactly; dividing the activation outliers by s
    moves quantization difficulty from activations to weights. Channels that never fire (or whose
    weights are all zero) keep s = 1.
    """
    a = act_absmax.float()
    w = weight_absmax.float()
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp_(1e-5, 1e5)

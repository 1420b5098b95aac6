"""Runtime modules against naive references and against the fp32 layer they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.quantize import linear as L
from slimlm.quantize import schemes as S
from slimlm.quantize.api import QuantConfig, quantize_linear
from slimlm.quantize.linear import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    fp8_matmul_supported,
    int8_matmul,
    share_input_quantization,
)

SHAPES = [(16, 32, 24), (1, 576, 1536), (5, 33, 7), (0, 8, 8)]  # (tokens, in, out)


def fp32_layer(inp, out, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (3, 17, 9), (20, 64, 24), (2, 8, 16)])
def test_int8_matmul_exact_and_padded_path(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ref = (a.long() @ w.long().T).int()
    assert torch.equal(int8_matmul(a, w), ref)
    assert torch.equal(int8_matmul(a, w, pad=True), ref)  # the CUDA padding logic, exercised on CPU


@pytest.mark.parametrize("t,inp,out", SHAPES)
def test_int8_linear_matches_integer_reference(t, inp, out):
    lin = fp32_layer(inp, out)
    q = Int8Linear(*S.quantize_int8_per_channel(lin.weight.detach()), lin.bias)
    x = torch.randn(t, inp) * 2
    # naive reference: quantize each token row by hand, integer matmul in int64, rescale
    qx, sx = S.quantize_int8_per_channel(x) if t else (torch.zeros(0, inp, dtype=torch.int8), torch.zeros(0, 1))
    ref = (qx.long() @ q.qweight.long().T).double() * sx.double() * q.weight_scale.double().T + lin.bias.double()
    y = q(x)
    assert y.shape == (t, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    if t:
        assert rel_err(y, lin(x)) < 0.02  # vs the fp32 layer: ~1% for Gaussian inputs


QKV = ("q_proj", "k_proj", "v_proj")


def int8_siblings() -> nn.Module:
    parent = nn.Module()
    for i, name in enumerate(QKV):
        lin = fp32_layer(32, 24 if i == 0 else 8, seed=i)
        setattr(parent, name, Int8Linear(*S.quantize_int8_per_channel(lin.weight.detach()), lin.bias))
    return parent


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_siblings_quantize_their_shared_input_once_and_exactly(monkeypatch, mode):
    shared, alone = int8_siblings(), int8_siblings()
    assert share_input_quantization(shared) == 2 and share_input_quantization(nn.Module()) == 0
    assert [getattr(shared, n).input_role for n in QKV] == ["lead", "follow", "last"]
    calls = []
    real = L.quantize_int8_per_token
    monkeypatch.setattr(L, "quantize_int8_per_token", lambda x: calls.append(x.shape) or real(x))
    with mode():
        x = torch.randn(2, 5, 32)
        got = [getattr(shared, n)(x) for n in QKV]
        assert len(calls) == 1  # the leader quantized; k and v reused it
        want = [getattr(alone, n)(x) for n in QKV]
        assert len(calls) == 4 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        y = x.clone()  # equal values, another tensor: never served the leader's result
        shared.q_proj(x)
        calls.clear()
        assert torch.equal(shared.k_proj(y), alone.k_proj(y)) and len(calls) == 2
    x = torch.randn(5, 32)
    shared.q_proj(x)
    x.mul_(3)  # changed in place after the leader ran: the version counter says so
    assert torch.equal(shared.k_proj(x), alone.k_proj(x))
    assert L._SHARED.source is x
    shared.v_proj(x)
    assert L._SHARED.source is None  # the last sibling lets the activations go


def test_int8_linear_3d_input_no_bias_and_weight_view():
    lin = fp32_layer(64, 40, bias=False)
    q = Int8Linear(*S.quantize_int8_per_channel(lin.weight.detach()))
    x = torch.randn(2, 7, 64)
    y = q(x)
    assert y.shape == (2, 7, 40)
    torch.testing.assert_close(y, q(x.reshape(14, 64)).reshape(2, 7, 40))
    assert q.weight.dtype == torch.float32 and q.weight.shape == (40, 64)
    assert rel_err(q.weight, lin.weight) < 0.01
    assert q.logical_numel == 64 * 40 and not list(q.parameters())  # weights are buffers, no bias


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("t,inp,out", SHAPES[:3])
def test_fp8_linear_matches_reference(t, inp, out, static):
    lin = fp32_layer(inp, out)
    x = torch.randn(t, inp) * 2
    in_scale = S.fp8_static_scale(x.abs().max()) if static else None
    q = Fp8Linear(*S.quantize_fp8_per_channel(lin.weight.detach()), lin.bias, input_scale=in_scale)
    assert q.qweight_fp8.dtype == torch.float8_e4m3fn and q.qweight.element_size() == 1
    sx = in_scale if static else x.abs().amax(1, keepdim=True) / 448
    xd = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx.double()
    wd = q.qweight_fp8.double() * q.weight_scale.double()
    ref = xd @ wd.T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert rel_err(q(x), lin(x)) < 0.06


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("t,inp,out,g", [(16, 64, 24, 32), (1, 576, 100, 64), (3, 256, 9, 128)])
def test_int4_linear_matches_reference(t, inp, out, g, symmetric):
    lin = fp32_layer(inp, out)
    qc, s, z = S.rtn_int4(lin.weight.detach(), g, symmetric)
    q = Int4Linear.from_codes(qc, s, z, g, lin.bias)
    assert q.weight_packed.dtype == torch.int32 and q.weight_packed.shape == (out, inp // 8)
    assert torch.equal(q.codes(), qc)
    x = torch.randn(t, inp)
    ref = x.double() @ S.dequantize_int4(qc, s, z, g).double().T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert rel_err(q(x), lin(x)) < 0.15
    state = q.compressed_state()
    assert state["weight_shape"].tolist() == [out, inp]
    if not symmetric:
        assert state["weight_zero_point"].shape == (-(-out // 8), inp // g)


def test_quantize_linear_dispatch():
    lin = fp32_layer(64, 16)
    assert isinstance(quantize_linear(lin, QuantConfig(scheme="int8")), Int8Linear)
    assert isinstance(quantize_linear(lin, QuantConfig(scheme="fp8")), Fp8Linear)
    m = quantize_linear(lin, QuantConfig(scheme="int4", group_size=32))
    assert isinstance(m, Int4Linear) and m.group_size == 32


def test_constructor_validation():
    with pytest.raises(ValueError):
        Int8Linear(torch.zeros(4, 8), torch.ones(4, 1))
    with pytest.raises(ValueError):
        Int4Linear(torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1), None, 32, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_matmul_supported(torch.device("cuda"))),
                    reason="needs a CUDA GPU with compute capability >= 8.9 (fp8 _scaled_mm)")
@pytest.mark.parametrize("static", [False, True])
def test_fp8_scaled_mm_path_matches_fallback_on_gpu(static):
    lin = fp32_layer(256, 128).cuda()
    x = torch.randn(32, 256, device="cuda")
    in_scale = S.fp8_static_scale(x.abs().max()) if static else None
    q = Fp8Linear(*S.quantize_fp8_per_channel(lin.weight.detach()), lin.bias, input_scale=in_scale).cuda()
    y = q(x)
    xd = S.fake_quantize_fp8(x, in_scale if static else x.abs().amax(1, keepdim=True) / 448)
    ref = nn.functional.linear(xd, q.dequantized_weight(), q.bias)
    assert rel_err(y, ref) < 1e-2  # bf16 output rounding


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_matmul_supported(torch.device("cuda"))),
                    reason="needs a CUDA GPU with compute capability >= 8.9 (fp8 _scaled_mm)")
@pytest.mark.parametrize("static", [False, True])
def test_fp8_scaled_mm_in_a_bf16_model(static):
    """``.to(torch.bfloat16)`` casts the scale buffers to bf16 and the activations come in bf16 [B, T, in]; the
    fp8 GEMM (float32 scales only) still runs and matches the fp32 layer (first seen failing on an H200)."""
    lin = fp32_layer(256, 128).cuda()
    x = torch.randn(4, 8, 256, device="cuda")
    in_scale = S.fp8_static_scale(x.abs().max()) if static else None
    q = Fp8Linear(*S.quantize_fp8_per_channel(lin.weight.detach()), lin.bias, input_scale=in_scale).cuda()
    y = q.to(torch.bfloat16)(x.bfloat16())
    assert y.shape == (4, 8, 128) and y.dtype == torch.bfloat16
    assert rel_err(y.float(), lin(x)) < 5e-2  # fp8 e4m3 weights and activations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_linear_on_gpu_pads_small_batches():
    lin = fp32_layer(72, 40).cuda()
    q = Int8Linear(*S.quantize_int8_per_channel(lin.weight.detach()), lin.bias).cuda()
    x = torch.randn(3, 72, device="cuda")
    y = q(x)  # 3 rows: below _int_mm's minimum, so padded on the GPU
    qx, sx = S.quantize_int8_per_channel(x.cpu())
    ref = (qx.long() @ q.qweight.cpu().long().T).double() * sx.double() * q.weight_scale.cpu().double().T \
        + lin.bias.cpu().double()
    assert y.shape == (3, 40)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_int8_matmul_float_path_equals_int_mm(monkeypatch):
    """CPUs without int8 dot products take the fp32 GEMM of the int8 values: the same int32 sums (exact
    while |sum| < 2^24, which K = 1000 at full-range int8 keeps: 127² x 1000 = 1.6e7)."""
    from slimlm.quantize import linear as L

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (37, 1000), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (24, 1000), dtype=torch.int8, generator=g)
    ref = torch._int_mm(a, w.t())
    for forced in (True, False):
        monkeypatch.setattr(L, "int_mm_is_fast", lambda forced=forced: forced)
        got = L.int8_matmul(a, w)
        assert got.dtype == torch.int32 and torch.equal(got, ref)


@pytest.mark.parametrize("vnni,capability,timed", [(True, "AVX512", False), (False, "AVX512", True),
                                                   (True, "AVX2", True)])
def test_the_int8_kernel_choice_reads_the_cpu_before_timing(monkeypatch, vnni, capability, timed):
    """An AVX-512 CPU with VNNI (or AMX) takes _int_mm without timing it (a timing can flip when another job
    holds the cores); other CPUs time it against the fp32 GEMM once per process."""
    from slimlm.quantize import linear as L

    calls = []
    int_mm = torch._int_mm
    monkeypatch.delenv("SLIMLM_INT8_KERNEL", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or int_mm(*a))
    L.int_mm_is_fast.cache_clear()
    try:
        fast = L.int_mm_is_fast()
    finally:
        L.int_mm_is_fast.cache_clear()
    assert bool(calls) == timed
    assert fast or timed  # without timing, the answer is "fast"

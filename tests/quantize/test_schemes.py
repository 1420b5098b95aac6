"""Quantization math against naive references: scales, round-trip bounds, extreme values, int4 packing."""

from __future__ import annotations

import pytest
import torch

from slimlm.quantize import schemes as S

SHAPES = [(4, 16), (7, 33), (1, 5), (64, 96)]


def naive_int8_per_row(w):
    """Loop-by-row reference: s = max|row| / 127, q = clamp(round(w / s))."""
    qs, ss = [], []
    for row in w.double():
        s = max(float(row.abs().max()), 1e-30) / 127
        qs.append(torch.clamp(torch.round(row / s), -127, 127))
        ss.append(s)
    return torch.stack(qs).to(torch.int8), torch.tensor(ss, dtype=torch.float64).reshape(-1, 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_per_channel_matches_naive_and_bounds_error(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 10
    q, s = S.quantize_int8_per_channel(w)
    qn, sn = naive_int8_per_row(w)
    assert q.dtype == torch.int8 and s.shape == (shape[0], 1) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), sn, rtol=1e-6, atol=0)
    assert (q.int() - qn.int()).abs().max() <= 1  # float vs double division may flip an exact .5 tie
    assert ((q.float() * s - w).abs() <= s / 2 * (1 + 1e-5)).all()  # round-trip error <= half a step
    assert q.abs().max() == 127  # the absmax of each row maps to ±127


def test_per_token_equals_per_channel_on_rows():
    x = torch.randn(9, 40) * 3
    q1, s1 = S.quantize_int8_per_token(x)
    q2, s2 = S.quantize_int8_per_channel(x)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


def test_int8_extreme_rows():
    w = torch.tensor([[0.0, 0.0, 0.0], [1e30, -1e30, 1.0], [1e-30, -2e-30, 0.0], [-5.0, 0.0, 5.0]])
    q, s = S.quantize_int8_per_channel(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8))  # zero row stays exactly zero
    assert q[1].tolist() == [127, -127, 0]
    assert q[3].tolist() == [-127, 0, 127]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_per_channel_scale_and_relative_error(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]
    q, s = S.quantize_fp8_per_channel(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (shape[0], 1)
    torch.testing.assert_close(s, w.abs().amax(1, keepdim=True) / 448)
    deq = q.float() * s
    # the row's absmax lands on 448 exactly
    torch.testing.assert_close(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range (>= 2^-6 · s)
    normal = (w / s).abs() >= 2 ** -6
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max() <= 2 ** -4 + 1e-6
    # below it (subnormals) the absolute error is at most half the subnormal step 2^-9 · s
    assert ((deq - w).abs()[~normal] <= (2 ** -10 * s).expand_as(w)[~normal] * (1 + 1e-5)).all()


def test_fp8_extreme_values():
    w = torch.tensor([[448.0 * 1e6, -3.0, 1e-3], [0.0, 0.0, 0.0], [-1e-20, 5e-21, 0.0], [1e38, -1e38, 1.0]])
    q, s = S.quantize_fp8_per_channel(w)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all() and (s > 0).all()
    assert q.float()[0, 0] == 448 and q.float()[3].tolist()[:2] == [448, -448]
    assert torch.equal(q.float()[1], torch.zeros(3))
    torch.testing.assert_close((q.float() * s)[2, 0], torch.tensor(-1e-20), rtol=1e-6, atol=0)


def test_fp8_to_float32_is_exact_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    fast, ref = S.fp8_to_float32(codes), codes.float()
    finite = ~torch.isnan(ref)
    assert torch.equal(fast[finite], ref[finite])
    assert finite.sum() == 254  # only 0x7f and 0xff are NaN


def test_fp8_static_and_fake_quantize():
    x = torch.randn(5, 8) * 4
    s = S.fp8_static_scale(x.abs().max())
    assert s.shape == (1,)
    fq = S.fake_quantize_fp8(x, s)
    torch.testing.assert_close(fq, S.quantize_fp8(x, s).float() * s)
    assert ((fq - x).abs() <= x.abs() * 2 ** -4 + 2 ** -10 * s).all()


def naive_int4_params(w, g, symmetric):
    out, n = w.shape
    scales, zeros = torch.empty(out, n // g), torch.empty(out, n // g, dtype=torch.int8)
    for r in range(out):
        for j in range(n // g):
            grp = w[r, j * g:(j + 1) * g].double()
            if symmetric:
                    scales[r, j] = max(float(grp.abs().max()), 1e-30) / 7.5
            else:
                lo, hi = min(float(grp.min()), 0.0), max(float(grp.max()), 0.0)
                sc = max((hi - lo) / 15, 1e-30)
                scales[r, j] = sc
                zeros[r, j] = int(min(max(round(-8 - lo / sc), -8), 7))
    return scales, (None if symmetric else zeros)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,g", [((4, 64), 32), ((3, 96), 32), ((5, 256), 128), ((2, 24), 8)])
def test_int4_params_quantize_roundtrip(shape, g, symmetric):
    torch.manual_seed(2)
    w = torch.randn(shape) + (0 if symmetric else 0.7)
    scale, zero = S.int4_group_params(w, g, symmetric)
    sn, zn = naive_int4_params(w, g, symmetric)
    torch.testing.assert_close(scale, sn, rtol=1e-6, atol=0)
    if not symmetric:
        assert (zero.int() - zn.int()).abs().max() <= 1 and zero.dtype == torch.int8
    q = S.quantize_int4(w, scale, zero, g)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    deq = S.dequantize_int4(q, scale, zero, g)
    step = scale.repeat_interleave(g, 1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()  # every value within half a step
    if not symmetric:  # zero is exactly representable
        z = torch.zeros(shape)
        assert torch.equal(S.dequantize_int4(S.quantize_int4(z, scale, zero, g), scale, zero, g), z)


def test_int4_rejects_group_not_dividing():
    with pytest.raises(ValueError, match="does not divide"):
        S.int4_group_params(torch.randn(2, 576), 128, True)


@pytest.mark.parametrize("shape", [(3, 8), (5, 17), (2, 1), (16, 576), (9, 40)])
def test_pack_int4_roundtrip_and_matches_compressed_tensors(shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    torch.manual_seed(3)
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    p = S.pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (shape[0], -(-shape[1] // 8))
    assert torch.equal(S.unpack_int4(p, shape[1]), q)
    assert torch.equal(p, pack_to_int32(q, 4))  # the package's own packer is the oracle for the layout
    assert torch.equal(unpack_from_int32(p, 4, torch.Size(shape)), q)
    p0 = S.pack_int4(q, dim=0)
    assert p0.shape == (-(-shape[0] // 8), shape[1])
    assert torch.equal(S.unpack_int4(p0, shape[0], dim=0), q)
    assert torch.equal(p0, pack_to_int32(q, 4, packed_dim=0))


def test_pack_int4_bit_layout():
    q = torch.tensor([[-8, -7, 0, 7, -8, -8, -8, 1]], dtype=torch.int8)
    nibbles = [0, 1, 8, 15, 0, 0, 0, 9]  # q + 8, element j at bits 4j
    want = sum(v << (4 * j) for j, v in enumerate(nibbles))
    want = want - (1 << 32) if want >= 1 << 31 else want
    assert S.pack_int4(q).item() == want


def test_smoothing_scales_formula_and_output_preserved():
    torch.manual_seed(4)
    x = torch.randn(32, 12) * torch.tensor([50.0] + [1.0] * 11)  # one outlier channel
    w = torch.randn(6, 12)
    act, wmax = x.abs().amax(0), w.abs().amax(0)
    s = S.smoothing_scales(act, wmax, 0.5)
    torch.testing.assert_close(s, (act.sqrt() / wmax.sqrt()))
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-5, atol=1e-4)
    assert (x / s).abs().amax(0).max() < x.abs().amax(0).max() / 3  # the outlier is tamed
    dead = S.smoothing_scales(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert dead.tolist() == [1.0, 1.0]

"""GPTQ against its oracles: identity Hessian == round-to-nearest; lower output error on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from slimlm.quantize.gptq import gptq_int4, output_error
from slimlm.quantize.schemes import dequantize_int4, rtn_int4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,g,block", [((5, 64), 32, 128), ((8, 96), 32, 64), ((3, 256), 128, 128),
                                           ((7, 40), 8, 16)])
def test_identity_hessian_equals_rtn_exactly(shape, g, block, symmetric):
    torch.manual_seed(0)
    w = torch.randn(shape) + (0 if symmetric else 0.3)
    q, s, z = gptq_int4(w, torch.eye(shape[1]), group_size=g, symmetric=symmetric, block_size=block)
    qr, sr, zr = rtn_int4(w, g, symmetric)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert (z is None and zr is None) or torch.equal(z, zr)


def correlated_layer(n=512, d=128, out=48, seed=1):
    """Inputs with strongly correlated channels (a low-rank mix plus noise) and a random layer."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 16, generator=g)
    x = z @ torch.randn(16, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return x, torch.randn(out, d, generator=g)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g", [32, 128])
def test_gptq_beats_rtn_on_correlated_layer(g, symmetric):
    x, w = correlated_layer()
    h = x.T @ x / x.shape[0]
    q, s, z = gptq_int4(w, h, group_size=g, symmetric=symmetric)
    qr, sr, zr = rtn_int4(w, g, symmetric)
    err_gptq = output_error(x, w, dequantize_int4(q, s, z, g))
    err_rtn = output_error(x, w, dequantize_int4(qr, sr, zr, g))
    assert q.min() >= -8 and q.max() <= 7
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_dead_input_columns_are_harmless():
    x, w = correlated_layer(d=64)
    x[:, 5] = 0  # a channel that never fires: H has a zero row/column
    h = x.T @ x / x.shape[0]
    q, s, z = gptq_int4(w, h, group_size=32)
    assert torch.isfinite(s).all()
    deq = dequantize_int4(q, s, z, 32)
    assert output_error(x, w, deq) < output_error(x, w, dequantize_int4(*rtn_int4(w, 32, True), 32))


def test_shape_errors():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_int4(torch.randn(4, 48), torch.eye(48), group_size=32)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_int4(torch.randn(4, 64), torch.eye(32), group_size=32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_with_a_diagonal_hessian_equals_rtn(symmetric):
    """No off-diagonal curvature: nothing propagates, whatever the visiting order (which is non-trivial here),
    and static groups take their parameters from the original weights, i.e. round-to-nearest."""
    torch.manual_seed(0)
    w = torch.randn(6, 96) + (0 if symmetric else 0.3)
    h = torch.diag(torch.rand(96) + 0.1)
    q, s, z = gptq_int4(w, h, group_size=32, symmetric=symmetric, act_order=True)
    qr, sr, zr = rtn_int4(w, 32, symmetric)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert (z is None and zr is None) or torch.equal(z, zr)


def outlier_layer(n=512, d=128, out=48, seed=2):
    """Correlated inputs where a few channels carry most of the energy (as in LLM activations)."""
    x, w = correlated_layer(n, d, out, seed)
    x[:, torch.arange(3, d, 16)] *= 20.0
    return x, w


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_beats_rtn_and_plain_gptq_with_outlier_channels(symmetric):
    x, w = outlier_layer()
    h = x.T @ x / x.shape[0]
    errs = {}
    for name, kw in {"plain": {}, "act": {"act_order": True}}.items():
        q, s, z = gptq_int4(w, h, group_size=32, symmetric=symmetric, **kw)
        assert q.min() >= -8 and q.max() <= 7
        errs[name] = output_error(x, w, dequantize_int4(q, s, z, 32))
    errs["rtn"] = output_error(x, w, dequantize_int4(*rtn_int4(w, 32, symmetric), 32))
    assert errs["act"] < 0.7 * errs["rtn"], errs
    assert errs["act"] < 0.6 * errs["plain"], errs


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_picks_each_group_s_least_weighted_error_by_brute_force(symmetric):
    """Oracle: every group's error under the searched grid is the least over the ratios, each tried alone."""
    from slimlm.quantize.schemes import CLIP_RATIOS, int4_group_params, quantize_int4

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=g) * torch.rand(64, generator=g) + (0 if symmetric else 0.2)
    energy = torch.rand(64, generator=g) + 0.1

    def group_err(scale, zero):
        d = w - dequantize_int4(quantize_int4(w, scale, zero, 16), scale, zero, 16)
        return (d ** 2 * energy).reshape(6, 4, 16).sum(-1)

    s, z = int4_group_params(w, 16, symmetric, importance=energy, clip_ratios=CLIP_RATIOS)
    each = torch.stack([group_err(*int4_group_params(w, 16, symmetric, importance=energy, clip_ratios=(r,)))
                        for r in CLIP_RATIOS])
    torch.testing.assert_close(group_err(s, z), each.min(0).values)
    plain = group_err(*int4_group_params(w, 16, symmetric))
    assert torch.equal(plain, each[0])  # ratio 1 is the plain range
    assert (group_err(s, z) < plain).sum() >= 4  # clipping pays in some groups of random weights


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_grid_options_with_an_identity_hessian_equal_rtn_on_the_same_grid(symmetric):
    """With H = I no error propagates: GPTQ (plain and act-order) with the clipping search and bf16-rounded
    scales equals round-to-nearest on the grid those options choose; the scales are bf16 values."""
    torch.manual_seed(0)
    w = torch.randn(5, 64) + (0 if symmetric else 0.3)
    grid = dict(clip_ratios=(1.0, 0.9, 0.8), scale_dtype=torch.bfloat16)
    want = rtn_int4(w, 32, symmetric, importance=torch.ones(64), **grid)
    for act_order in (False, True):
        got = gptq_int4(w, torch.eye(64), group_size=32, symmetric=symmetric, act_order=act_order, **grid)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(want[1], want[1].to(torch.bfloat16).float())

"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective, over the quantization grid.

For one linear layer with weights W [out, in] and the calibration Hessian H = XᵀX / n [in, in] (the one
GPTQ uses, prepared the same way: inputs that never fired get H_jj = 1, then H ← H + λ·mean(diag H)·I),
QuantEase minimises

    f(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)          (= ‖X (Ŵ − W)ᵀ‖² / n, plus the damping term)

over Ŵ on a fixed grid: Ŵ[r, j] = (q − z)·s with q an integer in [qmin, qmax] and (s, z) the scale and
zero of row r's group of column j. With D = Ŵ − W, f = Σ_r D_r H D_rᵀ separates over the rows, and as a
function of one column Ŵ_j (all rows at once, the other columns fixed) it is H_jj ‖Ŵ_j − w̃_j‖² + const,

    w̃_j = W_j − Σ_{k≠j} D_k H_kj / H_jj      (the unconstrained minimiser),

so the exact coordinate minimiser over the grid is round-to-nearest of w̃_j on column j's grid
(clamping to [qmin, qmax] picks the nearest end point): Ŵ_j ← quant(w̃_j). Every update lowers f or
leaves it unchanged, so f never increases across sweeps (tested), and a sweep that changes nothing is a
fixed point.

Implementation. The coupling term is kept as the residual product R = D (H − diag H) [out, in], so that
w̃_j = W_j − R_j / H_jj (exactly W_j when H is diagonal: no rounding can creep in where nothing couples).
R is computed fresh at the start of each sweep (one matmul; the sweep's objective
f = Σ D ∘ (R + D diag H) comes with it, and drift cannot accumulate across sweeps) and kept current
inside the sweep: a change δ of column j adds δ H_j (H_jj zeroed), a rank-1 update. As in GPTQ, that
update is lazy: immediately for the columns of the current block of ``block_size``, and for the columns
after the block in one matrix product when the block ends (the columns before it are not read again
until the next sweep recomputes R). The work runs on transposed weights [in, out], so that a column of
W is a contiguous row, in the working ``dtype`` (float32; float64 for checks), on the device of ``w``.
One sweep costs about 1.5·out·in² multiply-adds in matmuls plus ``in`` column steps of O(out·block).

Choices. The grid (group scales and zero points) is kept from the initialisation — GPTQ's by default,
whose group parameters come from its error-compensated weights — and never re-fitted: with a fixed
grid each step is an exact coordinate minimisation, f is monotone, and the export is the same
pack-quantized format as GPTQ's. The sweeps stop after ``iters``, or as soon as one lowers f by less
than ``tol`` (relative); the codes of the lowest f seen are returned, so the result is never worse
than the initialisation on f (tested). With H diagonal (e.g. H = I) the off-diagonal sum is exactly 0,
w̃_j = W_j and the result is round-to-nearest on the initial grid (tested, exactly).

Grids: int4 in groups (:func:`quantease_int4`, q in [−8, 7], symmetric or with zero points) and the
int8 per-output-channel grid of the W8A8 scheme (:func:`quantease_int8`, q in [−127, 127], one group
of ``in`` columns). Pure tensor math: the caller collects H (see :mod:`slimlm.quantize.calibrate`).
"""

from __future__ import annotations

import torch

from slimlm.quantize.gptq import gptq_int4
from slimlm.quantize.schemes import (
    INT4_QMAX,
    INT4_QMIN,
    INT8_QMAX,
    check_group_size,
    quantize_int8_per_channel,
    rtn_int4,
)


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Hessian GPTQ works with, in ``dtype``: dead inputs (H_jj = 0) get H_jj = 1, then + λ·mean(diag H)·I.

    Symmetrised exactly ((H + Hᵀ) / 2: a float XᵀX can differ from its transpose in the last bit), since f
    only sees the symmetric part and the sweeps read H by rows."""
    h = hessian.to(dtype)
    h = (h + h.T) / 2
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.mean().clamp_min(1e-12))
    return h


def layer_objective(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """f = tr((Ŵ − W) H (Ŵ − W)ᵀ) in float64 (W, Ŵ [out, in]; H [in, in] as given: pass
    :func:`prepare_hessian`'s output for the damped objective that QuantEase and GPTQ minimise)."""
    d = w_hat.double() - w.double()
    return float(((d @ hessian.double()) * d).sum())


def quantease_refine(w: torch.Tensor, hessian: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None, *, group_size: int, qmin: int, qmax: int, damp: float = 0.01,
                     iters: int = 25, tol: float = 1e-4, block_size: int = 128,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[float]]:
    """Cyclic coordinate descent from the codes ``q`` on their fixed grid (see the module docstring).

    ``w`` [out, in]; ``hessian`` [in, in] (undamped, as collected); ``q`` int8 codes [out, in] in
    [qmin, qmax]; ``scale`` [out, in/g] and ``zero`` [out, in/g] | None, Ŵ = (q − z)·s per group of
    ``group_size`` columns (``group_size = in`` with scale [out, 1] is a per-channel grid).

    Returns (codes int8 [out, in] with the lowest objective seen, [f after 0, 1, 2, ... sweeps]); f is
    evaluated in float64 from the working-precision residual.
    """
    out, n = w.shape
    check_group_size(n, group_size)
    if hessian.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {n}")
    if q.shape != (out, n) or scale.shape != (out, n // group_size):
        raise ValueError(f"codes {tuple(q.shape)} / scales {tuple(scale.shape)} do not fit [{out}, {n}] in groups "
                         f"of {group_size}")
    h = prepare_hessian(hessian, damp, dtype)
    diag = h.diagonal().clone()
    h.diagonal().zero_()  # H − diag(H): R below holds only the coupling between columns
    inv_diag = (1 / diag).tolist()
    wt = w.to(dtype).T.contiguous()  # [in, out]: row j is column j of W
    st = scale.to(dtype).T.contiguous()  # [groups, out]
    zt = None if zero is None else zero.to(dtype).T.contiguous()
    qt = q.T.contiguous()
    wh = qt.to(dtype).reshape(n // group_size, group_size, out)  # Ŵᵀ
    if zt is not None:
        wh = wh - zt[:, None]
    wh = (wh * st[:, None]).reshape(n, out)

    def residual() -> tuple[torch.Tensor, float]:
        """(Rᵀ = (H − diag H) Dᵀ [in, out], f = Σ D ∘ (R + D diag H) in float64)."""
        dt = wh - wt
        rt = h @ dt
        return rt, float((dt.double() * (rt + diag[:, None] * dt).double()).sum())

    rt, f = residual()
    history = [f]
    best_q, best_f = qt.clone(), f
    for _ in range(iters):
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            rb, hb = rt[b0:b1], h[b0:b1, b0:b1]  # views: updates land in rt
            before = wh[b0:b1].clone()
            qb = torch.empty(b1 - b0, out, dtype=dtype, device=w.device)
            for i in range(b1 - b0):
                j = b0 + i
                g = j // group_size
                # w̃_j = W_j − R_j / H_jj, R_j = Σ_{k≠j} D_k H_kj (exactly 0 when H is diagonal, so w̃_j = W_j)
                c = torch.sub(wt[j], rb[i], alpha=inv_diag[j])
                c.div_(st[g]).round_()  # the arithmetic of schemes.quantize_int4 / dequantize_int4, on one column
                if zt is not None:
                    c.add_(zt[g])
                c.clamp_(qmin, qmax)
                qb[i] = c
                if zt is not None:
                    c.sub_(zt[g])
                c.mul_(st[g])
                rb.addr_(hb[i], c - wh[j])  # R += H_j ⊗ δ_j within the block (H_jj is 0 here)
                wh[j] = c
            qt[b0:b1] = qb.to(torch.int8)
            if b1 < n:  # the block's changes reach the later columns in one product
                rt[b1:].addmm_(h[b1:, b0:b1], wh[b0:b1] - before)
        rt, f = residual()
        history.append(f)
        if f > best_f:  # only float rounding can do this (exact steps never raise f): keep the best codes
            break
        improved = best_f - f
        best_q, best_f = qt.clone(), f
        if improved <= tol * history[-2]:
            break
    return best_q.T.contiguous(), history


def quantease_int4(w: torch.Tensor, hessian: torch.Tensor, *, group_size: int, symmetric: bool = True,
                   damp: float = 0.01, iters: int = 25, tol: float = 1e-4, init="gptq", act_order: bool = False,
                   block_size: int = 128, **grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int4 group quantization of ``w`` [out, in] by QuantEase, in :func:`slimlm.quantize.gptq.gptq_int4`'s
    conventions: (q int8 [out, in] in [−8, 7], scale float32 [out, in/g], zero int8 [out, in/g] | None).

    ``init``: ``"gptq"`` (default; with ``act_order``, GPTQ's activation order with static groups),
    ``"rtn"`` (round-to-nearest), or a (q, scale, zero) tuple. The grid is the initialisation's; ``grid``:
    how it is chosen (:func:`slimlm.quantize.schemes.int4_group_params`' clip_ratios and scale_dtype).
    """
    if isinstance(init, tuple):
        q, scale, zero = init
    elif init == "gptq":
        q, scale, zero = gptq_int4(w, hessian, group_size=group_size, symmetric=symmetric, damp=damp,
                                   block_size=block_size, act_order=act_order, **grid)
    elif init == "rtn":
        q, scale, zero = rtn_int4(w, group_size, symmetric, **grid)
    else:
        raise ValueError(f"init must be 'gptq', 'rtn' or a (q, scale, zero) tuple, not {init!r}")
    q, _ = quantease_refine(w, hessian, q, scale, zero, group_size=group_size, qmin=INT4_QMIN, qmax=INT4_QMAX,
                            damp=damp, iters=iters, tol=tol, block_size=block_size)
    return q, scale, zero


def quantease_int8(w: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, iters: int = 25, tol: float = 1e-4,
                   block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per-output-channel weights by QuantEase from round-to-nearest, on RTN's grid (s = max|w_row| / 127,
    q in [−127, 127]): (q int8 [out, in], scale float32 [out, 1]), as
    :func:`slimlm.quantize.schemes.quantize_int8_per_channel`."""
    q, scale = quantize_int8_per_channel(w)
    q, _ = quantease_refine(w, hessian, q, scale, None, group_size=w.shape[1], qmin=-INT8_QMAX, qmax=INT8_QMAX,
                            damp=damp, iters=iters, tol=tol, block_size=block_size)
    return q, scale


"""GPTQ (Frantar et al., 2022): int4 group quantization that compensates each column's rounding error.

For one linear layer with weights W [out, in] and calibration inputs X [n, in], GPTQ minimises the
layer-output error ‖X (Ŵ − W)ᵀ‖² over the int4 grid, column by column, with the Hessian
H = XᵀX / n [in, in]:

    H ← H + λ·mean(diag H)·I                      (damping, λ = ``damp``)
    U = chol(H⁻¹)ᵀ  (upper)                       so that U[i, i:] is row i of the inverse-Hessian factor
    for column i (in order):
        q_i  = quant(w_i)                          (the group's scale/zero are fixed when the group starts,
                                                     from the *updated* weights of that group)
        e_i  = (w_i − deq(q_i)) / U[i, i]
        w_j −= e_i · U[i, j]   for j > i           (the error is absorbed by the columns not yet quantized)

Updates are applied lazily: inside a block of ``block_size`` columns immediately, to the columns after
the block in one matrix product when the block ends. With H = I the factor U is diagonal, no error
is ever propagated and the result equals round-to-nearest exactly (tested).

``act_order=True`` visits the columns in order of decreasing Hessian diagonal (the inputs with the most
energy first, while the most columns are still free to absorb their error), with *static groups*: every
group's scale/zero are fixed up front from the original weights, so the groups stay contiguous in the
original column order and the export needs no ``g_idx`` (compressed-tensors' ``actorder: weight``).

Pure tensor math: the caller collects H (see :mod:`slimlm.quantize.calibrate`).
"""

from __future__ import annotations

import torch

from slimlm.quantize.schemes import INT4_QMAX, INT4_QMIN, check_group_size, int4_group_params


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹ [in, in] (UᵀU = H⁻¹), in H's dtype."""
    h = hessian.clone()
    h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, *, group_size: int, symmetric: bool = True,
              damp: float = 0.01, block_size: int = 128, act_order: bool = False,
              clip_ratios: tuple[float, ...] | None = None,
              scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``w`` [out, in] to int4 groups with GPTQ error compensation.

    Returns (q int8 [out, in] in [−8, 7], scale float32 [out, in/g], zero int8 [out, in/g] | None), in
    the conventions of :func:`slimlm.quantize.schemes.int4_group_params`, whose clipping search
    (``clip_ratios``, each group's error weighted by the Hessian diagonal) and ``scale_dtype`` choose each
    group's grid when it is fixed.

    Columns whose Hessian diagonal is zero (inputs that were always 0 in calibration) cannot affect
    the output: their weights are quantized as they are, with no error propagated from or to them.
    """
    out, n = w.shape
    check_group_size(n, group_size)
    if hessian.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {n}")
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    n_groups = n // group_size
    energy = h.diagonal().clone()
    grid = dict(clip_ratios=clip_ratios, scale_dtype=scale_dtype)
    if act_order:  # static groups: parameters from the original weights, columns visited by energy
        scale, zero = int4_group_params(w.float(), group_size, symmetric, importance=energy, **grid)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
    else:  # parameters of a group from its weights as updated when the sweep reaches it
        scale = torch.empty(out, n_groups, dtype=torch.float32, device=w.device)
        zero = None if symmetric else torch.empty(out, n_groups, dtype=torch.int8, device=w.device)
        perm = torch.arange(n, device=w.device)
        # groups must not straddle blocks, so that a group's parameters come from fully updated weights
        block_size = max(group_size, block_size - block_size % group_size)
    u = inverse_hessian_factor(h, damp)
    # the sweep runs on Wᵀ [in, out] (rows in visiting order), so that a column of W is a contiguous row
    wt = w.float().T[perm].contiguous()
    qt = torch.empty(n, out, dtype=torch.int8, device=w.device)
    order = perm.tolist()
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        blk = wt[b0:b1]  # rows b0..b1 of Wᵀ (a view: updates land in wt)
        err = torch.empty_like(blk)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = order[b0 + i]
            g = col // group_size
            if not act_order and col % group_size == 0:  # a new group, from the current (updated) weights
                s, z = int4_group_params(blk[i:i + group_size].T, group_size, symmetric,
                                         importance=energy[col:col + group_size], **grid)
                scale[:, g:g + 1] = s
                if zero is not None:
                    zero[:, g:g + 1] = z
            s_col = scale[:, g]
            z_col = None if zero is None else zero[:, g].float()
            # the same arithmetic as schemes.quantize_int4 / dequantize_int4, on one column
            wc = blk[i]
            qc = torch.round(wc / s_col)
            if z_col is not None:
                qc += z_col
            qc.clamp_(INT4_QMIN, INT4_QMAX)
            qt[col] = qc.to(torch.int8)
            deq = (qc - z_col if z_col is not None else qc) * s_col
            e = (wc - deq).div_(ub[i, i])
            blk[i + 1:].addr_(ub[i, i + 1:], e, alpha=-1)
            err[i] = e
        wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)
    q = qt.T.contiguous()
    return q, scale, zero


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖X (Ŵ − W)ᵀ‖_F: the layer-output error GPTQ minimises (X [n, in], W, Ŵ [out, in])."""
    return float(torch.linalg.matrix_norm(x.double() @ (w_hat.double() - w.double()).T))

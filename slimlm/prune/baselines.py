"""Baseline group importances for structured pruning (pure tensor functions), same interface as OSSCAR.

A group is ``m`` contiguous input columns of ``W [out, n]`` (``down_proj``: m = 1 per neuron; ``o_proj``:
m = head_dim per head, or a KV group's heads). Baselines score groups, keep the top ``keep`` (with the
same per-partition counts as OSSCAR when partitions are given) and keep the kept weights unchanged
(no refit: that is what distinguishes them from OSSCAR and its greedy variant).

* ``magnitude``: ``‖W[:, group]‖_F``, the weights that read the group.
* ``activation`` (Minitron-style): ``‖X[:, group]‖_F`` over the calibration tokens, i.e. the L2 norm of
  the neuron's activation / of the head's attention output, ``sqrt(Σ_{c∈group} H_cc)``.

Residual-stream channels (hidden-size pruning) are scored by :func:`channel_scores`: the energy a channel
carries into the linear maps that read it, summed over every residual-stream norm.

One baseline does refit: :func:`fmchisel_greedy`, the greedy OSSCAR of the paper team's FMCHISEL library
(OBS-style removal of one group at a time with the inverse Gram matrix, then a least-squares refit), written
here from the algorithm's description to compare slimlm's solver with on the same objective
(:mod:`slimlm.prune.osscar`).
"""

from __future__ import annotations

import time

import torch

from slimlm.prune import osscar


def magnitude_scores(W: torch.Tensor, m: int) -> torch.Tensor:
    """[n/m] Frobenius norms of the column groups of ``W [out, n]``."""
    out, n = W.shape
    return W.to(torch.float64).reshape(out, n // m, m).pow(2).sum((0, 2)).sqrt()


def activation_scores(h_diag: torch.Tensor, m: int) -> torch.Tensor:
    """[n/m] L2 norms of the groups' calibration activations from ``diag(H) [n]`` (sums of squares)."""
    return h_diag.to(torch.float64).reshape(-1, m).sum(1).clamp_min(0).sqrt()


def channel_scores(energy: list[torch.Tensor], readers: list[list[torch.Tensor]]) -> torch.Tensor:
    """[d] importance of residual-stream channels: Σ_norms E[y_c²] · Σ_readers ‖W[:, c]‖², with ``energy[k]``
    the mean squared output of norm k per channel ([d], from calibration; ones without data) and
    ``readers[k]`` the weights [out, d] reading norm k's output — the output energy channel c would feed
    into those maps if the channels were uncorrelated (the diagonal of the layer objective, as in the
    Wanda / Minitron activation scores)."""
    score = torch.zeros_like(energy[0], dtype=torch.float64)
    for e, ws in zip(energy, readers, strict=True):
        col = sum(w.detach().to(torch.float64).pow(2).sum(0).cpu() for w in ws)
        score += e.to(torch.float64).cpu() * col
    return score


def top_groups(scores: torch.Tensor, keep: int, part: torch.Tensor | None = None) -> list[int]:
    """Ascending indices of the ``keep`` highest-scoring groups; with ``part``, the same number in every
    partition (the highest within each). Ties go to the lower index."""
    n = scores.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} groups")
    # stable descending sort: equal scores keep index order
    order = sorted(range(n), key=lambda g: (-float(scores[g]), g))
    if part is None:
        return sorted(order[:keep])
    parts = torch.unique(part).tolist()
    if keep % len(parts):
        raise ValueError(f"cannot keep {keep} groups evenly over {len(parts)} partitions")
    per = keep // len(parts)
    kept: list[int] = []
    for p in parts:
        members = [g for g in order if int(part[g]) == p]
        if len(members) < per:
            raise ValueError(f"partition {p} has only {len(members)} groups")
        kept += members[:per]
    return sorted(kept)


def fmchisel_greedy(H: torch.Tensor, W: torch.Tensor, m: int, keep: int, *, damping: float = 0.01,
                    part: torch.Tensor | None = None, block: int = 64, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float64) -> osscar.SolveResult:
    """OBS greedy backward elimination, one group at a time, then the exact refit (FMCHISEL's greedy OSSCAR).

    Same objective as :func:`slimlm.prune.osscar.solve` (G = H + λI, λ = damping · mean diag H). Start from
    Q = G⁻¹ and R = W (the refit of the full support); ``ng − keep`` times remove the kept group g with the
    smallest cost ``½ tr(R_g Q_gg⁻¹ R_gᵀ)`` (with ``part``: among partitions that still have groups to lose)
    and downdate ``Q -= Q_·g Q_gg⁻¹ Q_g·``, ``R -= R_g Q_gg⁻¹ Q_g·``; finally refit the kept weights by
    least squares. slimlm's greedy with ``steps = ng − keep`` makes the same choices (tested).

    The downdates are applied lazily: with ``L_g Lᵀ_g = Q_gg`` each removal is a rank-m term ``v vᵀ`` /
    ``p vᵀ`` (v = Q_·g L_g⁻ᵀ [n, m], p = R_g L_g⁻ᵀ [out, m]); the terms of up to ``block`` removals are kept as
    factors V, P (Q_t = Q − V Vᵀ, R_t = R − P Vᵀ) and applied by two matrix products per block. Between them a
    choice only needs every group's Q_gg and R_gᵀR_g, updated from ``pᵀ R_t`` [m, n] — O(out·n·m) per removal
    instead of the O(n²·m) of an explicit downdate. Returns an :class:`~slimlm.prune.osscar.SolveResult`
    (``objective_greedy``: the objective summed from the removal costs)."""
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else H.device
    G, _ = osscar.damped(H, damping, device=dev)
    W64 = W.to(device=dev, dtype=torch.float64)
    ng = osscar._check(G, W64, m, keep, part)
    if keep == ng:
        return osscar.SolveResult(list(range(ng)), W64.clone(), 0.0, 0.0, 0, [0.0])
    n, out = G.shape[0], W.shape[0]
    Q = osscar.spd_inverse(G if dtype == torch.float64 else G.to(dtype))
    R = W64.to(dtype, copy=True)
    kept = torch.ones(ng, dtype=torch.bool, device=dev)
    groups_of = None if part is None else part.to(dev)
    quota = None if part is None else osscar._quota_left(torch.ones(ng, dtype=torch.bool), part.cpu(), keep).to(dev)
    idx = torch.arange(n, device=dev).reshape(ng, m)
    tiny = torch.finfo(dtype).tiny
    f = 0.0
    to_remove = ng - keep
    while to_remove > 0:
        t_blk = min(block, to_remove)
        V = Q.new_zeros(n, t_blk * m)
        P = Q.new_zeros(out, t_blk * m)
        if m == 1:
            Qd = Q.diagonal().clone()  # [n]: Q_gg
            RR = osscar._col_dots(R)  # [n]: ‖R_g‖²
        else:
            Qd = Q[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # [ng, m, m]
            Rb = R.reshape(out, ng, m).permute(1, 2, 0)  # [ng, m, out]
            RR = Rb @ Rb.mT  # [ng, m, m]: R_gᵀ R_g
        removed = []
        for j in range(t_blk):
            if m == 1:
                cost = 0.5 * RR / Qd.clamp_min(tiny)
            else:
                L, info = torch.linalg.cholesky_ex(0.5 * (Qd + Qd.mT))
                cost = 0.5 * torch.cholesky_solve(RR, L).diagonal(dim1=-2, dim2=-1).sum(-1)
                cost = cost.masked_fill(info > 0, float("inf"))
            cost = cost.masked_fill(~kept, float("inf"))
            if quota is not None:
                cost = cost.masked_fill(quota[groups_of] <= 0, float("inf"))
            g = int(torch.argmin(cost))
            f += float(cost[g])
            cols = idx[g]
            Vj, Pj = V[:, :j * m], P[:, :j * m]
            u = Q[:, cols] - Vj @ Vj[cols].T  # [n, m]: column block g of Q_t
            rho = R[:, cols] - Pj @ Vj[cols].T  # [out, m]: R_t's columns of g
            Lg = torch.linalg.cholesky(0.5 * (u[cols] + u[cols].T))
            v = torch.linalg.solve_triangular(Lg, u.T, upper=False).T  # u L_g⁻ᵀ
            p = torch.linalg.solve_triangular(Lg, rho.T, upper=False).T
            V[:, j * m:(j + 1) * m] = v
            P[:, j * m:(j + 1) * m] = p
            pR = p.T @ R - (p.T @ Pj) @ Vj.T  # [m, n]: pᵀ R_t
            if m == 1:
                v1, pr = v[:, 0], pR[0]
                Qd -= v1 * v1
                RR += v1 * (v1 * float(p[:, 0] @ p[:, 0]) - 2.0 * pr)
            else:
                vb = v.reshape(ng, m, m)  # v_g: rows of group g
                X = pR.reshape(m, ng, m).permute(1, 0, 2)  # [ng, m(p), m(g)]: pᵀ R_g
                Qd -= vb @ vb.mT
                RR += vb @ (p.T @ p) @ vb.mT - X.mT @ vb.mT - vb @ X
            kept[g] = False
            if quota is not None:
                quota[groups_of[g]] -= 1
            removed.append(g)
        Q.addmm_(V, V.T, alpha=-1.0)
        R.addmm_(P, V.T, alpha=-1.0)
        gone = idx[torch.tensor(removed, device=dev)].reshape(-1)
        Q.index_fill_(0, gone, 0.0).index_fill_(1, gone, 0.0)  # zero in exact arithmetic
        R.index_fill_(1, gone, 0.0)
        to_remove -= t_blk
    del Q, R, V, P
    t_refit = time.perf_counter()
    kept_idx = torch.nonzero(kept).reshape(-1)
    weight, f_exact = osscar.refit_and_objective(G, W64, kept_idx, m)
    seconds = {"greedy": t_refit - t_start, "refit": time.perf_counter() - t_refit}
    return osscar.SolveResult(kept_idx.tolist(), weight, f_exact, f, 0, [f_exact], seconds)

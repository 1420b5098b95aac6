"""OSSCAR: one-shot structured pruning of a linear layer's input groups (pure tensor maths, no HF).

Problem (Meng et al., ICML 2024). A linear layer computes ``y = x Wᵀ`` with ``W [out, n]``; its calibration
inputs ``X [N, n]`` give the Gram matrix ``H = XᵀX [n, n]``. The ``n`` input columns are cut into ``n / m``
contiguous groups of ``m`` columns (an MLP neuron: m = 1 column of ``down_proj``; an attention head:
m = head_dim columns of ``o_proj``; a KV group: queries_per_kv · head_dim columns). Keep ``k`` groups::

    minimise  f(Ŵ) = ½‖XŴᵀ − XWᵀ‖²_F + (λ/2)‖Ŵ − W‖²_F = ½ tr((Ŵ − W) G (Ŵ − W)ᵀ),   G = H + λI,
    subject to Ŵ[:, c] = 0 for every column c of a removed group.

For a kept column set ``K`` (removed set ``S``) the minimiser in closed form is, with ``C = W G``::

    Ŵ_K = C_K G_KK⁻¹ = W_K + W_S G_SK G_KK⁻¹        (the λ-damped normal equations)
    f(K) = ½ tr(W_S (G_SS − G_SK G_KK⁻¹ G_KS) W_Sᵀ)

The solver keeps, for the current support, ``Q`` = G_KK⁻¹ embedded in an [n, n] matrix (zero outside K) and
the refit weights ``R = C Q`` (zero outside K). Then, exactly (the OBS identities):

* removing a set ``S ⊂ K`` costs ``½ tr(R_S (Q_SS)⁻¹ R_Sᵀ)`` and updates ``R -= R_S Q_SS⁻¹ Q_S·``,
  ``Q -= Q_·S Q_SS⁻¹ Q_S·`` (a rank-|S| downdate);
* adding a set ``T`` outside ``K`` gains ``½ tr(U_T Σ_T⁻¹ U_Tᵀ)`` with ``U = C − R G`` (the gradient; zero on
  K) and the Schur complement ``Σ_T = G_TT − G_T· Q G_·T``; with ``Z = Q G`` and ``Ṽ = Z_·T − E_T``:
  ``Q += Ṽ Σ_T⁻¹ Ṽᵀ``, ``R -= U_T Σ_T⁻¹ Ṽᵀ`` (a rank-|T| update).

Algorithm: greedy backward elimination (remove the cheapest groups a batch at a time, costs exact for
each group alone, the batch's cost exact jointly), then local search: swap t kept groups for t removed
ones whenever the exact objective drops (all 1-for-1 swaps among the best candidates are scored exactly
in one vectorised pass; larger swaps are proposed from the cheapest removals / largest gains), and
finally an exact least-squares refit of the kept weights by a Cholesky solve. Everything in float64.

Optional *partitions* constrain the support: group ``g`` belongs to partition ``part[g]`` and every
partition keeps the same number of groups (used to keep the same number of query heads per KV group).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- closed forms


def damped(H: Tensor, damping: float) -> tuple[Tensor, float]:
    """``G = H + λI`` in float64 with ``λ = damping · mean(diag H)`` (relative, so it is scale-free).

    A tiny absolute floor keeps ``G`` positive definite when ``H`` is all zeros (a dead layer)."""
    H = H.to(torch.float64)
    lam = float(damping) * float(H.diagonal().mean())
    if lam <= 0.0:
        lam = 1e-12 * max(float(H.diagonal().abs().max()), 1.0) if damping > 0 else 0.0
    return H + lam * torch.eye(H.shape[0], dtype=torch.float64, device=H.device), lam


def group_columns(groups: Tensor | list[int], m: int) -> Tensor:
    """Column indices of the (contiguous, size-``m``) groups ``groups``, in that order."""
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1, 1)
    return (g * m + torch.arange(m, dtype=torch.long)).reshape(-1)


def refit(G: Tensor, W: Tensor, kept: Tensor | list[int], m: int = 1) -> Tensor:
    """Exact least-squares weights of the kept groups: ``Ŵ_K = (W G)_K G_KK⁻¹``; returns [out, |K|·m].

    Columns come in the order of ``kept``. ``G`` must be positive definite on K (damping makes it so)."""
    G = G.to(torch.float64)
    W = W.to(torch.float64)
    cols = group_columns(kept, m)
    C_K = W @ G[:, cols]  # [out, |K|]
    G_KK = G[cols][:, cols]
    L, info = torch.linalg.cholesky_ex(G_KK)
    if int(info) == 0:
        return torch.cholesky_solve(C_K.T, L).T  # G_KK symmetric: solve G_KK Ŵ_Kᵀ = C_Kᵀ
    # singular (no damping, dead inputs): the minimum-norm least-squares solution
    return torch.linalg.lstsq(G_KK, C_K.T, driver="gelsd").solution.T


def objective(G: Tensor, W: Tensor, kept: Tensor | list[int], m: int = 1, weight: Tensor | None = None) -> float:
    """``f = ½ tr(D G Dᵀ)``, ``D = Ŵ − W``, where Ŵ is ``weight`` on the kept columns (default: the exact
    refit) and zero on every other column."""
    G = G.to(torch.float64)
    W = W.to(torch.float64)
    cols = group_columns(kept, m)
    D = -W.clone()
    D[:, cols] += refit(G, W, kept, m) if weight is None else weight.to(torch.float64)
    return 0.5 * float(((D @ G) * D).sum())


def relative_error(H: Tensor, W: Tensor, kept: Tensor | list[int], m: int, weight: Tensor) -> float:
    """``‖X(Ŵ − W)ᵀ‖² / ‖XWᵀ‖²`` from the undamped Gram ``H`` (the reconstruction error of the layer)."""
    H = H.to(torch.float64)
    W = W.to(torch.float64)
    D = -W.clone()
    D[:, group_columns(kept, m)] += weight.to(torch.float64)
    den = float(((W @ H) * W).sum())
    return float(((D @ H) * D).sum()) / den if den > 0 else 0.0


# --------------------------------------------------------------------------- the solver state


def _spd_inverse(A: Tensor) -> Tensor:
    A = 0.5 * (A + A.T)
    try:  # cholesky_solve against I: torch's cholesky_inverse is ~50x slower on CPU at n = 1536
        L = torch.linalg.cholesky(A)
        return torch.cholesky_solve(torch.eye(A.shape[0], dtype=A.dtype, device=A.device), L)
    except torch.linalg.LinAlgError:  # numerically semi-definite: fall back to a symmetric pseudo-inverse
        return torch.linalg.pinv(A, hermitian=True)


class SupportState:
    """Support ``K`` with Q = G_KK⁻¹ (embedded), R = refit weights, and (for local search) Z = Q G, U = C − R G."""

    def __init__(self, G: Tensor, W: Tensor, m: int, kept: Tensor, *, with_aux: bool) -> None:
        self.G, self.W, self.m = G, W, m
        self.C = W @ G
        self.kept = kept.clone()  # [n_groups] bool
        self.with_aux = with_aux
        self.rebuild()

    def cols(self, mask: Tensor) -> Tensor:
        return group_columns(torch.nonzero(mask).reshape(-1), self.m)

    def rebuild(self) -> None:
        """Recompute everything from the support alone (removes accumulated rounding)."""
        n = self.G.shape[0]
        K = self.cols(self.kept)
        self.Q = torch.zeros(n, n, dtype=torch.float64, device=self.G.device)
        self.Q[K.reshape(-1, 1), K] = _spd_inverse(self.G[K][:, K])
        self.R = torch.zeros_like(self.W)
        if self.kept.all():
            self.R.copy_(self.W)  # nothing pruned: the optimum is W itself, exactly
        else:
            self.R[:, K] = self.C[:, K] @ self.Q[K][:, K]
        if self.with_aux:
            self.Z = self.Q[:, K] @ self.G[K, :]
            self.U = self.C - self.R @ self.G
            self.U[:, K] = 0.0  # zero in exact arithmetic (optimality on K)

    def removal_costs(self) -> Tensor:
        """Exact objective increase of removing each kept group alone; +inf for removed groups."""
        m, ng = self.m, self.kept.numel()
        if m == 1:
            d = self.Q.diagonal().clamp_min(1e-300)
            cost = 0.5 * (self.R * self.R).sum(0) / d
        else:
            idx = torch.arange(ng * m).reshape(ng, m)
            Qb = self.Q[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # [ng, m, m] diagonal blocks
            Qb[~self.kept] = torch.eye(m, dtype=Qb.dtype)  # placeholder for removed groups
            Rb = self.R[:, idx].permute(1, 2, 0)  # [ng, m, out]
            L, info = torch.linalg.cholesky_ex(0.5 * (Qb + Qb.transpose(-1, -2)))
            sol = torch.cholesky_solve(Rb, L)
            cost = 0.5 * (Rb * sol).sum((1, 2))
            cost[info > 0] = float("inf")
        return cost.masked_fill(~self.kept, float("inf"))

    def remove(self, groups: Tensor) -> float:
        """Remove kept ``groups`` jointly (rank-|S| downdate); returns the exact objective increase."""
        S = group_columns(groups, self.m)
        Qs = self.Q.index_select(1, S)
        M = _spd_inverse(Qs[S])
        RS = self.R.index_select(1, S)
        RSM = RS @ M
        cost = 0.5 * float((RSM * RS).sum())
        QsM = Qs @ M
        if self.with_aux:
            ZS = self.Z.index_select(0, S)
            self.Z.addmm_(QsM, ZS, alpha=-1.0)
            self.U.addmm_(RSM, ZS)
        # in-place addmm_/index_fill_: the [n, n] updates are memory-bound, so avoid temporaries
        self.R.addmm_(RSM, Qs.T, alpha=-1.0)
        self.Q.addmm_(QsM, Qs.T, alpha=-1.0)
        self.Q.index_fill_(0, S, 0.0).index_fill_(1, S, 0.0)
        self.R.index_fill_(1, S, 0.0)
        self.kept[torch.as_tensor(groups, dtype=torch.long)] = False
        return cost

    def add(self, groups: Tensor) -> float:
        """Add removed ``groups`` back jointly (rank-|T| update); returns the exact objective decrease."""
        T = group_columns(groups, self.m)
        Vt = self.Z.index_select(1, T)  # V = Q G_·T (a copy)
        Sigma = self.G[T][:, T] - self.G.index_select(0, T) @ Vt
        Sinv = _spd_inverse(Sigma)
        UT = self.U.index_select(1, T)
        gain = 0.5 * float(((UT @ Sinv) * UT).sum())
        Vt[T, :] -= torch.eye(len(T), dtype=Vt.dtype, device=Vt.device)  # Ṽ = V − E_T
        VS = Vt @ Sinv
        VtG = Vt.T @ self.G  # Ṽᵀ G
        US = UT @ Sinv
        self.Q.addmm_(VS, Vt.T)
        self.Z.addmm_(VS, VtG)
        self.R.addmm_(US, Vt.T, alpha=-1.0)
        self.U.addmm_(US, VtG)
        self.U.index_fill_(1, T, 0.0)
        self.kept[torch.as_tensor(groups, dtype=torch.long)] = True
        return gain

    def swap_delta(self, out_groups: Tensor, in_groups: Tensor) -> float:
        """Exact objective change of removing ``out_groups`` and adding ``in_groups`` (no state change)."""
        S = group_columns(out_groups, self.m)
        T = group_columns(in_groups, self.m)
        Qs = self.Q[:, S]
        M = _spd_inverse(Qs[S])
        RS = self.R[:, S]
        cost = 0.5 * float(((RS @ M) * RS).sum())
        ZST = self.Z[S][:, T]
        ZT = self.Z[:, T] - Qs @ (M @ ZST)  # Z after the removal, columns T
        UT = self.U[:, T] + RS @ (M @ ZST)
        Sigma = self.G[T][:, T] - self.G[T, :] @ ZT
        gain = 0.5 * float(((UT @ _spd_inverse(Sigma)) * UT).sum())
        return cost - gain

    def add_gains(self) -> Tensor:
        """Exact objective decrease of adding each removed group alone; -inf for kept groups."""
        m, ng = self.m, self.kept.numel()
        P = torch.nonzero(~self.kept).reshape(-1)
        gains = torch.full((ng,), float("-inf"), dtype=torch.float64)
        if len(P) == 0:
            return gains
        if m == 1:  # batched 1x1 solves are slow in torch; divide instead
            sig = self.G.diagonal()[P] - (self.G[:, P] * self.Z[:, P]).sum(0)
            gains[P] = 0.5 * (self.U[:, P] ** 2).sum(0) / sig.clamp_min(1e-300)
            return gains
        Pc = group_columns(P, m).reshape(len(P), m)
        Sig = self.G[Pc.unsqueeze(-1), Pc.unsqueeze(-2)] - torch.einsum(
            "pin,pnj->pij", self.G[Pc, :], self.Z[:, Pc].permute(1, 0, 2))
        Ub = self.U[:, Pc].permute(1, 2, 0)  # [np, m, out]
        sol = torch.linalg.solve(0.5 * (Sig + Sig.transpose(-1, -2)), Ub)
        gains[P] = 0.5 * (Ub * sol).sum((1, 2))
        return gains


# --------------------------------------------------------------------------- greedy + local search


@dataclass
class SolveResult:
    kept: list[int]  # kept group indices, ascending
    weight: Tensor  # [out, len(kept)·m] refit weights of the kept columns (float64), in ``kept`` order
    objective: float  # exact f at the end
    objective_greedy: float  # exact f after the greedy phase (before local search)
    swaps: int = 0  # accepted local-search swaps
    history: list[float] = field(default_factory=list)  # f after greedy, then after each accepted swap


def _check(G: Tensor, W: Tensor, m: int, keep: int, part: Tensor | None) -> int:
    n = G.shape[0]
    if G.shape != (n, n) or W.shape[1] != n:
        raise ValueError(f"shapes do not match: G {tuple(G.shape)}, W {tuple(W.shape)}")
    if m < 1 or n % m:
        raise ValueError(f"{n} columns do not split into groups of {m}")
    ng = n // m
    if not 1 <= keep <= ng:
        raise ValueError(f"cannot keep {keep} of {ng} groups")
    if part is not None:
        if part.numel() != ng:
            raise ValueError("partition must label every group")
        sizes = torch.bincount(part)
        sizes = sizes[sizes > 0]
        if keep % len(sizes) or (sizes < keep // len(sizes)).any():
            raise ValueError(f"cannot keep {keep} groups evenly over {len(sizes)} partitions")
    return ng


def _quota_left(kept: Tensor, part: Tensor | None, keep: int) -> Tensor | None:
    """Per-partition number of groups still to remove (None: no partitions)."""
    if part is None:
        return None
    n_parts = int(part.max()) + 1
    per = keep // len(torch.unique(part))
    counts = torch.bincount(part[kept], minlength=n_parts)
    return counts - per


def greedy(G: Tensor, W: Tensor, m: int, keep: int, *, steps: int = 64, part: Tensor | None = None,
           with_aux: bool = False) -> tuple[SupportState, float]:
    """Backward elimination: ``ng − keep`` removals spread over about ``steps`` batched steps.

    Each step scores every kept group by its exact removal cost alone, removes the cheapest batch
    (respecting partition quotas) with one block downdate, and adds the batch's exact joint cost."""
    ng = _check(G, W, m, keep, part)
    state = SupportState(G, W, m, torch.ones(ng, dtype=torch.bool), with_aux=with_aux)
    to_remove = ng - keep
    batch = max(1, -(-to_remove // max(steps, 1)))
    f = 0.0
    while to_remove > 0:
        cost = state.removal_costs()
        order = torch.argsort(cost)
        r = min(batch, to_remove)
        quota = _quota_left(state.kept, part, keep)
        chosen: list[int] = []
        for g in order.tolist():
            if not state.kept[g]:
                break
            if quota is not None:
                if quota[part[g]] <= 0:
                    continue
                quota[part[g]] -= 1
            chosen.append(g)
            if len(chosen) == r:
                break
        f += state.remove(torch.tensor(chosen))
        to_remove -= len(chosen)
    return state, f


def _pair_deltas_m1(state: SupportState, Kc: Tensor, Pc: Tensor) -> Tensor:
    """Exact Δf of every 1-for-1 swap (remove g ∈ Kc, add p ∈ Pc) for single-column groups: [|Kc|, |Pc|].

    After removing g (q = Q_gg, r = R_·g, a = Z_gp): Σ'_p = Σ_p + a²/q and U'_p = U_p + (a/q) r, so
    Δ = ½‖r‖²/q − ½‖U'_p‖²/Σ'_p, with ‖U'_p‖² expanded so that one [|Kc|, |Pc|] product suffices."""
    G, Z, R, U = state.G, state.Z, state.R, state.U
    q = state.Q.diagonal()[Kc].clamp_min(1e-300)[:, None]
    rn2 = (R[:, Kc] ** 2).sum(0)[:, None]
    Up = U[:, Pc]
    un2 = (Up ** 2).sum(0)[None, :]
    sig = (G.diagonal()[Pc] - (G[:, Pc] * Z[:, Pc]).sum(0))[None, :]
    a = Z[Kc][:, Pc]
    cross = R[:, Kc].T @ Up
    rho = a / q
    num = un2 + 2.0 * rho * cross + rho * rho * rn2
    den = (sig + a * a / q).clamp_min(1e-300)
    return 0.5 * rn2 / q - 0.5 * num / den


def _pair_deltas_general(state: SupportState, Kg: Tensor, Pg: Tensor) -> Tensor:
    """Exact Δf of every 1-for-1 group swap for groups of m columns (loop over removals, batched over adds)."""
    m, G, Z, R, U, Q = state.m, state.G, state.Z, state.R, state.U, state.Q
    Pcols = group_columns(Pg, m).reshape(len(Pg), m)
    Sig = G[Pcols.unsqueeze(-1), Pcols.unsqueeze(-2)] - torch.einsum(
        "pin,pnj->pij", G[Pcols, :], Z[:, Pcols].permute(1, 0, 2))  # [np, m, m]
    Up = U[:, Pcols].permute(1, 0, 2)  # [np, out, m]
    out = torch.empty(len(Kg), len(Pg), dtype=torch.float64)
    for i, g in enumerate(Kg.tolist()):
        gc = group_columns([g], m)
        Mg = _spd_inverse(Q[gc][:, gc])
        rg = R[:, gc]
        cost = 0.5 * float(((rg @ Mg) * rg).sum())
        A = Z[gc][:, Pcols].permute(1, 0, 2)  # [np, m, m]: A_p = Z[g cols, p cols]
        Sp = Sig + A.transpose(-1, -2) @ Mg @ A
        Upp = Up + (rg @ Mg) @ A  # [np, out, m]
        sol = torch.linalg.solve(0.5 * (Sp + Sp.transpose(-1, -2)), Upp.transpose(-1, -2))
        out[i] = cost - 0.5 * (Upp.transpose(-1, -2) * sol).sum((1, 2))
    return out


def local_search(state: SupportState, f: float, *, part: Tensor | None = None, max_iters: int = 100,
                 max_swap: int = 2, candidates: int = 256, refresh: int = 32, rtol: float = 1e-9,
                 force_general: bool = False) -> tuple[float, list[float], int]:
    """Swap kept and removed groups while the exact objective drops; returns (f, history, swaps).

    Each iteration scores all 1-for-1 swaps among the ``candidates`` cheapest removals x best additions
    (exactly) and applies the best if it lowers f by more than ``rtol·f``; otherwise it tries t-for-t
    swaps (t = 2..max_swap) of the t cheapest removals for the t best additions (within one partition
    when there are partitions). Stops when nothing improves or after ``max_iters`` accepted swaps."""
    history = [f]
    swaps = 0
    m = state.m
    fast = m == 1 and not force_general
    while swaps < max_iters:
        if swaps and swaps % refresh == 0:
            state.rebuild()
        cost = state.removal_costs()
        gain = state.add_gains()
        K = torch.nonzero(state.kept).reshape(-1)
        P = torch.nonzero(~state.kept).reshape(-1)
        if len(K) == 0 or len(P) == 0:
            break
        Kc = K[torch.argsort(cost[K])[:candidates]]
        Pc = P[torch.argsort(gain[P], descending=True)[:candidates]]
        if fast:
            delta = _pair_deltas_m1(state, Kc, Pc)
        else:
            delta = _pair_deltas_general(state, Kc, Pc)
        if part is not None:
            delta = delta.masked_fill(part[Kc][:, None] != part[Pc][None, :], float("inf"))
        tol = rtol * max(abs(f), 1e-300)
        best = int(torch.argmin(delta))
        i, j = divmod(best, delta.shape[1])
        if float(delta[i, j]) < -tol:
            g, p = Kc[i:i + 1], Pc[j:j + 1]
            f += state.remove(g) - state.add(p)
            swaps += 1
            history.append(f)
            continue
        accepted = False
        parts = [None] if part is None else torch.unique(part).tolist()
        for t, pid in itertools.product(range(2, max_swap + 1), parts):
            Kp = K if pid is None else K[part[K] == pid]
            Pp = P if pid is None else P[part[P] == pid]
            if len(Kp) < t or len(Pp) < t:
                continue
            outs = Kp[torch.argsort(cost[Kp])[:t]]
            ins = Pp[torch.argsort(gain[Pp], descending=True)[:t]]
            if state.swap_delta(outs, ins) < -tol:
                f += state.remove(outs) - state.add(ins)
                swaps += 1
                history.append(f)
                accepted = True
                break
        if not accepted:
            break
    return f, history, swaps


def solve(H: Tensor, W: Tensor, m: int, keep: int, *, damping: float = 0.01, local: bool = True,
          steps: int = 64, part: Tensor | None = None, max_iters: int = 100, max_swap: int = 2,
          candidates: int = 256) -> SolveResult:
    """OSSCAR on one layer: keep ``keep`` of the ``n/m`` input groups of ``W [out, n]`` given ``H [n, n]``.

    ``local=False`` is the greedy baseline (no local search). The kept weights are the exact refit.
    With nothing to prune the weights come back unchanged (bit for bit)."""
    G, _ = damped(H, damping)
    W64 = W.to(torch.float64)
    ng = _check(G, W64, m, keep, part)
    if keep == ng:
        return SolveResult(list(range(ng)), W64.clone(), 0.0, 0.0, 0, [0.0])
    state, f = greedy(G, W64, m, keep, steps=steps, part=part, with_aux=local)
    kept = torch.nonzero(state.kept).reshape(-1)
    f_greedy = objective(G, W64, kept, m)
    history, swaps = [f_greedy], 0
    if local:
        state.rebuild()
        _, history, swaps = local_search(state, f_greedy, part=part, max_iters=max_iters, max_swap=max_swap,
                                         candidates=candidates)
        kept = torch.nonzero(state.kept).reshape(-1)
    weight = refit(G, W64, kept, m)
    return SolveResult(kept.tolist(), weight, objective(G, W64, kept, m, weight), f_greedy, swaps, history)

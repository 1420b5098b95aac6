"""OSSCAR: one-shot structured pruning of a linear layer's input groups (pure tensor maths, no HF).

Problem (Meng et al., ICML 2024). A linear layer computes ``y = x Wᵀ`` with ``W [out, n]``; its calibration
inputs ``X [N, n]`` give the Gram matrix ``H = XᵀX [n, n]``. The ``n`` input columns are cut into ``n / m``
contiguous groups of ``m`` columns (an MLP neuron: m = 1 column of ``down_proj``; an attention head:
m = head_dim columns of ``o_proj``; a KV group: queries_per_kv · head_dim columns). Keep ``k`` groups::

    minimise  f(Ŵ) = ½‖XŴᵀ − XWᵀ‖²_F + (λ/2)‖Ŵ − W‖²_F = ½ tr((Ŵ − W) G (Ŵ − W)ᵀ),   G = H + λI,
    subject to Ŵ[:, c] = 0 for every column c of a removed group.

For a kept column set ``K`` (removed set ``S``) the minimiser in closed form is, with ``C = W G``::

    Ŵ_K = C_K G_KK⁻¹ = W_K + W_S G_SK G_KK⁻¹        (the λ-damped normal equations)
    f(K) = ½ tr(W_S (G_SS − G_SK G_KK⁻¹ G_KS) W_Sᵀ) = ½ ⟨W_S, U_S⟩,   U = C − Ŵ G  (the gradient; U_K = 0)

Incremental state (the OBS identities). With ``Q`` = G_KK⁻¹ and ``R`` = the refit weights of the support:

* removing a set ``S ⊂ K`` costs ``½ tr(R_S (Q_SS)⁻¹ R_Sᵀ)`` and updates ``R -= R_S Q_SS⁻¹ Q_S·``,
  ``Q -= Q_·S Q_SS⁻¹ Q_S·`` (a rank-|S| downdate);
* adding a set ``T`` outside ``K`` gains ``½ tr(U_T Σ_T⁻¹ U_Tᵀ)`` with the Schur complement
  ``Σ_T = G_TT − G_TK Z_KT``, ``Z = Q G_K·``; it updates Q, R, Z and U by rank-|T| terms (:class:`SwapState`).

Algorithm.

1. Greedy backward elimination (:func:`greedy`, :class:`SupportState`): ``Q = G⁻¹`` (one in-place Cholesky
   inverse), ``R = W``; then about ``steps`` times: score every kept group by its exact removal cost alone,
   remove the cheapest batch (respecting partition quotas) with one block downdate. Only Q and R are kept:
   the local search's Z and U are built once afterwards from the greedy's Q and R (2k²(n−k) + 2·out·k(n−k)
   flops). This module once built them at the start (2n³ + 2·out·n²), kept them up to date through the
   greedy (2n²(n−k) + 2·out·n(n−k)) and then threw them away for a rebuild from a re-inverted G_KK
   (≈ 2k³ + 2n²k + 2·out·n²): ~15x the flops for an 8B down_proj at 50%.
2. Local search (:func:`local_search`, :class:`SwapState`, compact K×K / K×P arrays): swap t kept groups for
   t removed ones whenever the exact objective drops (all 1-for-1 swaps among the best candidates are scored
   exactly in one vectorised pass; larger swaps are proposed from the cheapest removals / largest gains).
3. An exact least-squares refit of the kept weights by a Cholesky solve, and the exact objective, in float64
   (:func:`refit_and_objective`).

The module is long because the two incremental states (the greedy's embedded one, the local search's
compact one) share one set of identities and the closed forms that test them; kept together, a change to
one is read next to the other.

Optional *partitions* constrain the support: group ``g`` belongs to partition ``part[g]`` and every
partition keeps the same number of groups (used to keep the same number of query heads per KV group).

Device and precision. :func:`solve` runs on ``device`` (the prune stage passes its calibration device;
default: where H is). G and the final refit and objective are always float64 (the refit is k³/3 flops,
and it keeps the returned weights exact). The search state (Q, R, Z, U) is float64 by default;
``dtype=torch.float32`` halves it and runs ~2x faster on a CPU. Measured:

* SmolLM2-135M's down_proj Grams (n = 1536, 64 x 256 tokens of the built-in text, layers 0/10/20/29;
  κ(G) = 4e3–6e4 at damping 0.01, up to 1.4e6 below 1e-4): float32 chose exactly the float64 supports for
  greedy at every damping from 1e-2 to 1e-7, and osscar's local search differed by at most one near-tie
  swap (objective ±6e-4). A float32 refit would have cost at most 1e-6 of the objective there.
* Fewer calibration tokens than inputs (rank-deficient H, as for an 8B down_proj calibrated on < 14336
  tokens; tests/prune/test_osscar.py::test_float32_state_needs_a_well_conditioned_gram and a 768-token,
  n = 1024 synthetic MLP): float32's removal costs err by ≈ κ(G)·1e-9 relative, float64's by < 1e-10; at
  κ(G) = 1e5–1e6 osscar's objective came out up to 7% worse in float32 (once 0.2% better), at 1e7–1e8
  12–54% worse.

So float32 is allowed for a well-conditioned G (κ(G) ≲ 1e4: many more tokens than inputs and damping ≥ 0.01)
and float64 is required otherwise; it is the default. (On A100/H100/H200 the fp64 tensor-core peak equals
the fp32 one, so the default costs little there.)

Memory per layer (n inputs, ``out`` outputs, k kept columns, b = bytes of the search dtype, 8 for float64)::

    caller           8 n²                                 H (float64, from calibration)
    problem          8 n² + 8·out·n                       G = H + λI and W in float64
    greedy           b n² + b·out·n                       Q = G⁻¹ (Cholesky and inverse in place: no
                                                          workspace) and R; when b ≠ 8 also the search
                                                          copies b n² + b·out·n of G and W
    hand-over        b (k² + out·k) − b·out·n             R_K gathered and R freed, then Q_KK gathered
                                                          while Q still exists; then Q is freed and C = W G
                                                          (b·out·n) formed
    local search     b (k² + k(n−k) + out·n) + 8k(n−k)    Q_KK, Z_KP, R_K, U_P (and C); G_KP while Z is built
    refit            8 (k² + k(n−k) + out·n + out·k)      G_KK (factored in place), G_KS, Ŵ_K, U_S, C_K
                     + 8·out·n                            (and C = W G if the search was not float64)

    peak (b = 8) = 8 n² + 16 n² + 8·out·n + max(8·out·n, 8 k² + 8·out·k)      (the first 8 n² is H)

For Llama-3.1-8B's ``down_proj`` (n = 14336, out = 4096, k = 7168): 1.64 + 3.29 + 0.47 + 0.64 = 6.0 GB
(5.6 GiB) with H; its ``o_proj`` (n = 4096, k = 3072): 0.7 GB.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
F64 = torch.float64


# --------------------------------------------------------------------------- closed forms


def damped(H: Tensor, damping: float, *, device: torch.device | str | None = None) -> tuple[Tensor, float]:
    """``G = H + λI`` in float64 (on ``device``, default H's) with ``λ = damping · mean(diag H)`` (relative,
    so it is scale-free). A tiny absolute floor keeps ``G`` positive definite when ``H`` is all zeros (a dead
    layer). Always a new tensor: H is left alone."""
    G = H.to(device=device if device is not None else H.device, dtype=F64, copy=True)
    lam = float(damping) * float(G.diagonal().mean())
    if lam <= 0.0:
        lam = 1e-12 * max(float(G.diagonal().abs().max()), 1.0) if damping > 0 else 0.0
    G.diagonal().add_(lam)
    return G, lam


def group_columns(groups: Tensor | list[int], m: int, device: torch.device | str | None = None) -> Tensor:
    """Column indices of the (contiguous, size-``m``) groups ``groups``, in that order."""
    g = torch.as_tensor(groups, dtype=torch.long, device=device).reshape(-1, 1)
    return (g * m + torch.arange(m, dtype=torch.long, device=g.device)).reshape(-1)


def _cols(groups, m: int, like: Tensor) -> Tensor:
    return group_columns(groups, m, device=like.device)


def refit(G: Tensor, W: Tensor, kept: Tensor | list[int], m: int = 1) -> Tensor:
    """Exact least-squares weights of the kept groups: ``Ŵ_K = (W G)_K G_KK⁻¹``; returns [out, |K|·m].

    Columns come in the order of ``kept``. ``G`` must be positive definite on K (damping makes it so)."""
    G = G.to(F64)
    W = W.to(device=G.device, dtype=F64)
    cols = _cols(kept, m, G)
    return _solve_kk(G, cols, W @ G[:, cols])


def _cholesky_inplace(A: Tensor) -> Tensor | None:
    """Cholesky factor of symmetric ``A`` in A's storage: returns the column-major view whose lower
    triangle is L (LAPACK's layout, so no n×n workspace is allocated), or None if A is not numerically
    positive definite (A is then garbage: torch also clears the other triangle)."""
    At = A.mT
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(At, out=(At, info))
    return At if int(info) == 0 else None


def _solve_kk(G: Tensor, K: Tensor, C_K: Tensor) -> Tensor:
    """``C_K G_KK⁻¹`` (G symmetric, K column indices): Cholesky, else the minimum-norm least squares."""
    L = _cholesky_inplace(G[K[:, None], K])
    if L is not None:
        return torch.cholesky_solve(C_K.T, L).T  # G_KK symmetric: solve G_KK Ŵ_Kᵀ = C_Kᵀ
    # singular (no damping, dead inputs): the minimum-norm least-squares solution
    driver = "gelsd" if G.device.type == "cpu" else None
    return torch.linalg.lstsq(G[K[:, None], K], C_K.T, driver=driver).solution.T


def objective(G: Tensor, W: Tensor, kept: Tensor | list[int], m: int = 1, weight: Tensor | None = None) -> float:
    """``f = ½ tr(D G Dᵀ)``, ``D = Ŵ − W``, where Ŵ is ``weight`` on the kept columns (default: the exact
    refit) and zero on every other column."""
    G = G.to(F64)
    W = W.to(device=G.device, dtype=F64)
    cols = _cols(kept, m, G)
    D = -W.clone()
    D[:, cols] += refit(G, W, kept, m) if weight is None else weight.to(device=G.device, dtype=F64)
    return 0.5 * float(((D @ G) * D).sum())


def refit_and_objective(G: Tensor, W: Tensor, kept: Tensor | list[int], m: int = 1,
                        C: Tensor | None = None) -> tuple[Tensor, float]:
    """The exact refit ``Ŵ_K`` [out, |K|·m] (columns in ``kept`` order) and its objective, in float64.

    Uses the optimality of the refit (the gradient ``U = C − Ŵ G`` vanishes on K): ``f = ½⟨W_S, U_S⟩`` with
    ``U_S = C_S − Ŵ_K G_KS`` — 2·out·k·(n−k) flops after ``C = W G`` (pass it when known) instead of the
    2·out·n² of ``½ tr(D G Dᵀ)``, and a sum without cancellation."""
    G = G.to(F64)
    W = W.to(device=G.device, dtype=F64)
    n = G.shape[0]
    K = _cols(kept, m, G)
    drop = torch.ones(n, dtype=torch.bool, device=G.device)
    drop[K] = False
    S = torch.nonzero(drop).reshape(-1)
    C = W @ G if C is None else C.to(device=G.device, dtype=F64)
    weight = _solve_kk(G, K, C[:, K])
    if len(S) == 0:
        return weight, 0.0
    U_S = C[:, S]
    U_S.addmm_(weight, G[K[:, None], S], alpha=-1.0)
    return weight, 0.5 * float((W[:, S] * U_S).sum())


def relative_error(H: Tensor, W: Tensor, kept: Tensor | list[int], m: int, weight: Tensor) -> float:
    """``‖X(Ŵ − W)ᵀ‖² / ‖XWᵀ‖²`` from the undamped Gram ``H`` (the reconstruction error of the layer)."""
    H = H.to(F64)
    W = W.to(device=H.device, dtype=F64)
    D = -W.clone()
    D[:, _cols(kept, m, H)] += weight.to(device=H.device, dtype=F64)
    den = float(((W @ H) * W).sum())
    return float(((D @ H) * D).sum()) / den if den > 0 else 0.0


def spd_inverse(A: Tensor, *, overwrite: bool = False) -> Tensor:
    """Inverse of a symmetric positive definite ``A`` by Cholesky, in A's storage when ``overwrite`` (else in
    one copy): the factor and the inverse are formed in place on a column-major view (LAPACK's layout), so
    no n×n workspace is allocated. A numerically semi-definite A falls back to a symmetric pseudo-inverse
    (with ``overwrite`` A is lost by then: LinAlgError)."""
    X = A if overwrite else A.clone()
    L = _cholesky_inplace(X)
    if L is not None:
        torch.cholesky_inverse(L, out=L)  # writes the full symmetric inverse into X's storage
        return X
    if overwrite:
        raise torch.linalg.LinAlgError("matrix is not positive definite")
    return torch.linalg.pinv(0.5 * (A + A.mT), hermitian=True)


def _block_inverse(G: Tensor, K: Tensor) -> Tensor:
    """``G_KK⁻¹`` formed in the gathered block (a pseudo-inverse if G_KK is singular)."""
    try:
        return spd_inverse(G[K[:, None], K], overwrite=True)
    except torch.linalg.LinAlgError:
        return spd_inverse(G[K[:, None], K])


def _small_inverse(A: Tensor) -> Tensor:
    """Inverse of a small symmetric (semi-)definite block, robust to rounding."""
    A = 0.5 * (A + A.mT)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    return torch.linalg.pinv(A, hermitian=True)


def _tiny(t: Tensor) -> float:
    """Clamp for pivots that vanish only in degenerate problems (the dtype's smallest normal number)."""
    return torch.finfo(t.dtype).tiny


def _col_dots(A: Tensor, B: Tensor | None = None, rows: int = 256) -> Tensor:
    """``(A * B).sum(0)`` (B = A: squared column norms) accumulated over blocks of rows: no [out, n]
    temporary, and ~10x faster on CPU than ``vector_norm(A, dim=0)``, which strides across rows."""
    B = A if B is None else B
    acc = torch.zeros(A.shape[1], dtype=A.dtype, device=A.device)
    for i in range(0, A.shape[0], rows):
        acc += (A[i:i + rows] * B[i:i + rows]).sum(0)
    return acc


# --------------------------------------------------------------------------- greedy: the embedded state


class SupportState:
    """Support ``K`` (a bool mask over groups) with ``Q`` = G_KK⁻¹ embedded in [n, n] (zero outside K) and
    ``R`` = the refit weights [out, n] (zero outside K), in G's dtype and device."""

    def __init__(self, G: Tensor, W: Tensor, m: int, kept: Tensor | None = None) -> None:
        self.G, self.W, self.m = G, W, m
        ng = G.shape[0] // m
        self.kept = torch.ones(ng, dtype=torch.bool) if kept is None else kept.detach().cpu().clone()
        if self.kept.all():  # the usual start: no products needed, the optimum is W itself
            self.Q = spd_inverse(G)
            self.R = W.clone()
        else:
            self.rebuild()

    def cols(self, mask: Tensor) -> Tensor:
        return _cols(torch.nonzero(mask).reshape(-1), self.m, self.G)

    def rebuild(self) -> None:
        """Recompute Q and R from the support alone (the reference for the incremental updates)."""
        n = self.G.shape[0]
        K = self.cols(self.kept)
        self.Q = torch.zeros(n, n, dtype=self.G.dtype, device=self.G.device)
        QKK = _block_inverse(self.G, K)
        self.Q[K[:, None], K] = QKK
        self.R = torch.zeros_like(self.W)
        self.R[:, K] = (self.W @ self.G[:, K]) @ QKK

    def removal_costs(self) -> Tensor:
        """Exact objective increase of removing each kept group alone; +inf for removed groups (on the CPU)."""
        m, ng = self.m, self.kept.numel()
        kept = self.kept.to(self.G.device)
        if m == 1:
            cost = 0.5 * _col_dots(self.R) / self.Q.diagonal().clamp_min(_tiny(self.G))
        else:
            idx = torch.arange(ng * m, device=self.G.device).reshape(ng, m)
            Qb = self.Q[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # [ng, m, m] diagonal blocks
            Qb[~kept] = torch.eye(m, dtype=Qb.dtype, device=Qb.device)  # placeholder for removed groups
            Rb = self.R[:, idx].permute(1, 2, 0)  # [ng, m, out]
            L, info = torch.linalg.cholesky_ex(0.5 * (Qb + Qb.mT))
            cost = 0.5 * (Rb * torch.cholesky_solve(Rb, L)).sum((1, 2))
            cost[info > 0] = float("inf")
        return cost.masked_fill(~kept, float("inf")).to(device="cpu", dtype=F64)

    def remove(self, groups: Tensor | list[int]) -> float:
        """Remove kept ``groups`` jointly (rank-|S| downdate); returns the exact objective increase."""
        S = _cols(groups, self.m, self.G)
        Qs = self.Q.index_select(1, S)
        M = _small_inverse(Qs[S])
        RS = self.R.index_select(1, S)
        RSM = RS @ M
        cost = 0.5 * float((RSM * RS).sum())
        # in-place addmm_/index_fill_: the [n, n] updates are memory-bound, so avoid temporaries
        self.R.addmm_(RSM, Qs.T, alpha=-1.0)
        self.Q.addmm_(Qs @ M, Qs.T, alpha=-1.0)
        self.Q.index_fill_(0, S, 0.0).index_fill_(1, S, 0.0)
        self.R.index_fill_(1, S, 0.0)
        self.kept[torch.as_tensor(groups, dtype=torch.long).cpu()] = False
        return cost


# --------------------------------------------------------------------------- local search: the compact state


class SwapState:
    """A support of fixed size for swapping, stored compactly in *slot* order.

    ``kg [nk]`` / ``pg [np]``: the kept / removed group in each slot; K / P their columns (kc = nk·m and
    pc = np·m, slot i owning compact columns i·m … i·m + m − 1). In G's dtype and device:

        Q [kc, kc] = G_KK⁻¹      R [out, kc] = C_K G_KK⁻¹ (the refit)      Z [kc, pc] = G_KK⁻¹ G_KP
        U [out, pc] = C_P − R G_KP (the gradient)     S [np] or [np, m, m]: Σ_p = G_pp − G_pK Z_·p

    The objective is ``½⟨W_P, U⟩``. A t-for-t swap puts the incoming groups in the outgoing ones' K slots
    and the outgoing ones in the incoming ones' P slots, so every array keeps its shape. Compared with the
    embedded [n, n] form this holds k² + k(n−k) numbers instead of 2n² and a swap touches 4× less memory
    at 50% pruning."""

    def __init__(self, G: Tensor, W: Tensor, C: Tensor, m: int, kept: Tensor, *, Q: Tensor | None = None,
                 R: Tensor | None = None) -> None:
        self.G, self.W, self.C, self.m = G, W, C, m
        kept = kept.detach().cpu()
        dev = G.device
        self.kg = torch.nonzero(kept).reshape(-1).to(dev)
        self.pg = torch.nonzero(~kept).reshape(-1).to(dev)
        self._build(Q, R)

    @classmethod
    def from_support(cls, st: SupportState, C: Tensor | None = None) -> SwapState:
        """Hand the greedy's state over without re-inverting anything. Its embedded Q and R are released as
        soon as their K blocks are out, and only then is ``C = W G`` formed (when not given), so the greedy
        never holds C."""
        K = st.cols(st.kept)
        R = st.R[:, K]
        st.R = None
        Q = st.Q[K[:, None], K]
        st.Q = None
        return cls(st.G, st.W, st.W @ st.G if C is None else C, st.m, st.kept, Q=Q, R=R)

    def _build(self, Q: Tensor | None, R: Tensor | None) -> None:
        G, m = self.G, self.m
        K, P = self.kcols(), self.pcols()
        if Q is None:
            Q = _block_inverse(G, K)
            R = self.C[:, K] @ Q  # Q symmetric
        self.Q, self.R = Q, R
        GKP = G[K[:, None], P]
        self.Z = Q @ GKP
        self.U = self.C[:, P]
        self.U.addmm_(R, GKP, alpha=-1.0)
        n_p = len(self.pg)
        if m == 1:
            self.S = G.diagonal()[P] - _col_dots(GKP, self.Z)
        else:
            Pb = P.reshape(n_p, m)
            kc = len(K)
            self.S = G[Pb.unsqueeze(-1), Pb.unsqueeze(-2)] - torch.einsum(
                "kpi,kpj->pij", GKP.reshape(kc, n_p, m), self.Z.reshape(kc, n_p, m))

    def rebuild(self) -> None:
        """Recompute every array from the support alone (removes accumulated rounding)."""
        self.Q = self.R = self.Z = self.U = self.S = None
        self._build(None, None)

    def kcols(self) -> Tensor:
        return _cols(self.kg, self.m, self.G)

    def pcols(self) -> Tensor:
        return _cols(self.pg, self.m, self.G)

    def kept(self) -> Tensor:
        """The support as a bool mask over groups (CPU)."""
        mask = torch.zeros(len(self.kg) + len(self.pg), dtype=torch.bool)
        mask[self.kg.cpu()] = True
        return mask

    def objective(self) -> float:
        """``f = ½⟨W_P, U⟩`` from the state (exact in exact arithmetic)."""
        return 0.5 * float((self.W[:, self.pcols()].to(F64) * self.U.to(F64)).sum())

    def removal_costs(self) -> Tensor:
        """[nk] exact objective increase of removing each kept slot's group alone."""
        m = self.m
        if m == 1:
            return 0.5 * _col_dots(self.R) / self.Q.diagonal().clamp_min(_tiny(self.G))
        nk = len(self.kg)
        idx = torch.arange(nk * m, device=self.G.device).reshape(nk, m)
        Qb = self.Q[idx.unsqueeze(-1), idx.unsqueeze(-2)]
        Rb = self.R.reshape(-1, nk, m).permute(1, 2, 0)  # [nk, m, out]
        L, info = torch.linalg.cholesky_ex(0.5 * (Qb + Qb.mT))
        cost = 0.5 * (Rb * torch.cholesky_solve(Rb, L)).sum((1, 2))
        return cost.masked_fill(info > 0, float("inf"))

    def add_gains(self) -> Tensor:
        """[np] exact objective decrease of adding each removed slot's group alone."""
        m = self.m
        if m == 1:
            return 0.5 * _col_dots(self.U) / self.S.clamp_min(_tiny(self.G))
        n_p = len(self.pg)
        Ub = self.U.reshape(-1, n_p, m).permute(1, 2, 0)  # [np, m, out]
        sol = torch.linalg.solve(0.5 * (self.S + self.S.mT), Ub)
        return 0.5 * (Ub * sol).sum((1, 2))

    def pair_deltas(self, ki: Tensor, pj: Tensor, *, force_general: bool = False) -> Tensor:
        """Exact Δf of every 1-for-1 swap (K slot ki[i] out, P slot pj[j] in): [len(ki), len(pj)].

        Removing g first changes, for each removed p (A = Z_gp, M = Q_gg⁻¹): ``Σ'_p = Σ_p + Aᵀ M A`` and
        ``U'_p = U_p + R_g M A``; then Δ = ½ tr(R_g M R_gᵀ) − ½ tr(U'_p Σ'_p⁻¹ U'_pᵀ). For single columns the
        second term is expanded so that one [|ki|, |pj|] product suffices."""
        if self.m == 1 and not force_general:
            q = self.Q.diagonal()[ki].clamp_min(_tiny(self.G))[:, None]
            r = self.R[:, ki]
            rn2 = _col_dots(r)[:, None]
            Up = self.U[:, pj]
            a = self.Z[ki[:, None], pj]
            rho = a / q
            num = _col_dots(Up)[None, :] + 2.0 * rho * (r.T @ Up) + rho * rho * rn2
            den = (self.S[pj][None, :] + a * a / q).clamp_min(_tiny(self.G))
            return 0.5 * rn2 / q - 0.5 * num / den
        m = self.m
        pcols = _cols(pj, m, self.G)
        Sig = self.S[pj] if m > 1 else self.S[pj].reshape(-1, 1, 1)  # [np', m, m]
        Up = self.U[:, pcols].reshape(-1, len(pj), m).permute(1, 0, 2)  # [np', out, m]
        out = torch.empty(len(ki), len(pj), dtype=self.G.dtype, device=self.G.device)
        for i, slot in enumerate(ki.tolist()):
            a = _cols([slot], m, self.G)
            Mg = _small_inverse(self.Q[a[:, None], a])
            rg = self.R[:, a]
            cost = 0.5 * (rg @ Mg * rg).sum()
            A = self.Z[a[:, None], pcols].reshape(m, len(pj), m).permute(1, 0, 2)  # [np', m, m]
            Sp = Sig + A.mT @ Mg @ A
            Upp = Up + (rg @ Mg) @ A  # [np', out, m]
            sol = torch.linalg.solve(0.5 * (Sp + Sp.mT), Upp.mT)
            out[i] = cost - 0.5 * (Upp.mT * sol).sum((1, 2))
        return out

    def swap(self, ki: Tensor, pj: Tensor, *, apply: bool = True) -> float:
        """Exact Δf of moving the groups in K slots ``ki`` out and those in P slots ``pj`` in (t-for-t);
        applied to the state when ``apply`` (rank-t·m updates), else only computed (O((kc + out)·t·m) work).

        With a / b the compact columns of ki / pj, S / T their column sets, M = Q_aa⁻¹:
        after the removal ``Z'_b = Z_b − Q_a M Z_ab``, ``U'_b = U_b + R_a M Z_ab``; the incoming Schur
        complement is ``Σ_T = G_TT − G_TK Z'_b``, and Δf = ½ tr(R_a M R_aᵀ) − ½ tr(U'_b Σ_T⁻¹ U'_bᵀ)."""
        m, G = self.m, self.G
        a, b = _cols(ki, m, G), _cols(pj, m, G)
        K, P = self.kcols(), self.pcols()
        Qa = self.Q.index_select(1, a)  # [kc, s]
        M = _small_inverse(Qa[a])
        Ra = self.R.index_select(1, a)
        RaM = Ra @ M
        cost = 0.5 * float((RaM * Ra).sum())
        QaM = Qa @ M  # rows a: the identity
        Zab = self.Z[a[:, None], b]
        Zb = self.Z.index_select(1, b).addmm_(QaM, Zab, alpha=-1.0)  # Z after the removal, incoming columns
        Zb[a] = 0.0
        Ub = self.U.index_select(1, b).addmm_(RaM, Zab)
        T = P[b]
        GTK = G[T[:, None], K]  # [s, kc]
        Sinv = _small_inverse(G[T[:, None], T] - GTK @ Zb)
        UbS = Ub @ Sinv
        delta = cost - 0.5 * float((UbS * Ub).sum())
        if not apply:
            return delta
        # 1. remove the outgoing columns S (rank-s downdates); they take the incoming groups' P slots b
        Za = self.Z.index_select(0, a)  # [s, pc]
        self.Q.addmm_(QaM, Qa.T, alpha=-1.0)
        self.R.addmm_(RaM, Qa.T, alpha=-1.0)
        self.Z.addmm_(QaM, Za, alpha=-1.0)
        self.U.addmm_(RaM, Za)
        self._schur_update(Za, M, 1.0)
        self.Z[:, b] = -QaM  # Z'_{K'S} = −Q_{K'S} M
        self.U[:, b] = RaM  # U'_S = R_S M
        t = len(pj)
        Mb = M.reshape(t, m, t, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [t, m, m] diagonal blocks
        self.S[pj] = Mb if m > 1 else Mb.reshape(t)  # Σ'_S = (Q_SS)⁻¹ = M
        self.Z[a] = 0.0
        self.Q[a] = 0.0
        self.Q[:, a] = 0.0
        self.R[:, a] = 0.0
        outgoing, incoming = self.kg[ki].clone(), self.pg[pj].clone()
        self.pg[pj] = outgoing
        # 2. add the incoming columns T into the K slots a: Ṽ = [Z'_b; −I], Y = (ṼᵀG)_P = G_TK Z' − G_TP
        Y = GTK @ self.Z
        Y -= G[T[:, None], self.pcols()]
        SY = Sinv @ Y
        ZbS = Zb @ Sinv
        self.Z.addmm_(Zb, SY)
        self.Z[a] = -SY
        self.U.addmm_(UbS, Y)
        self._schur_update(Y, Sinv, -1.0)
        self.Q.addmm_(ZbS, Zb.T)
        self.Q[:, a] = -ZbS
        self.Q[a] = -ZbS.T
        self.Q[a[:, None], a] = Sinv
        self.R.addmm_(UbS, Zb.T, alpha=-1.0)
        self.R[:, a] = UbS
        self.kg[ki] = incoming
        return delta

    def _schur_update(self, A: Tensor, M: Tensor, sign: float) -> None:
        """``Σ_p += sign · A_pᵀ M A_p`` for every removed slot p (A [s, pc], M [s, s])."""
        MA = M @ A
        if self.m == 1:
            self.S += sign * (A * MA).sum(0)
        else:
            n_p = len(self.pg)
            self.S += sign * torch.einsum("spi,spj->pij", A.reshape(-1, n_p, self.m), MA.reshape(-1, n_p, self.m))


# --------------------------------------------------------------------------- greedy + local search


@dataclass
class SolveResult:
    kept: list[int]  # kept group indices, ascending
    weight: Tensor  # [out, len(kept)·m] refit weights of the kept columns (float64, on the solver's device)
    objective: float  # exact f at the end
    objective_greedy: float  # f after the greedy phase (before local search)
    swaps: int = 0  # accepted local-search swaps
    history: list[float] = field(default_factory=list)  # f after greedy, then after each accepted swap
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


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


def greedy(G: Tensor, W: Tensor, m: int, keep: int, *, steps: int = 64,
           part: Tensor | None = None) -> tuple[SupportState, float]:
    """Backward elimination: ``ng − keep`` removals spread over about ``steps`` batched steps.

    Each step scores every kept group by its exact removal cost alone, removes the cheapest batch
    (respecting partition quotas) with one block downdate, and adds the batch's exact joint cost."""
    ng = _check(G, W, m, keep, part)
    part = None if part is None else part.cpu()
    state = SupportState(G, W, m)
    to_remove = ng - keep
    batch = max(1, -(-to_remove // max(steps, 1)))
    f = 0.0
    while to_remove > 0:
        order = torch.argsort(state.removal_costs())
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
        f += state.remove(chosen)
        to_remove -= len(chosen)
    return state, f


def local_search(state: SwapState, f: float, *, part: Tensor | None = None, max_iters: int = 100,
                 max_swap: int = 2, candidates: int = 256, refresh: int = 0, rtol: float = 1e-9,
                 force_general: bool = False) -> tuple[float, list[float], int]:
    """Swap kept and removed groups while the exact objective drops; returns (f, history, swaps).

    Each iteration scores all 1-for-1 swaps among the ``candidates`` cheapest removals x best additions
    (exactly) and applies the best if it lowers f by more than ``rtol·f``; otherwise it tries t-for-t
    swaps (t = 2..max_swap) of the t cheapest removals for the t best additions (within one partition
    when there are partitions). Stops when nothing improves or after ``max_iters`` accepted swaps.
    ``refresh`` > 0 rebuilds the state from the support every that many swaps (not needed in float64:
    the drift after 100 swaps is ~1e-12 relative)."""
    history = [f]
    swaps = 0
    part = None if part is None else part.to(state.G.device)
    while swaps < max_iters:
        if refresh and swaps and swaps % refresh == 0:
            state.rebuild()
        if len(state.kg) == 0 or len(state.pg) == 0:
            break
        cost = state.removal_costs()
        gain = state.add_gains()
        ki = torch.argsort(cost)[:candidates]
        pj = torch.argsort(gain, descending=True)[:candidates]
        delta = state.pair_deltas(ki, pj, force_general=force_general)
        if part is not None:
            delta = delta.masked_fill(part[state.kg[ki]][:, None] != part[state.pg[pj]][None, :], float("inf"))
        tol = rtol * max(abs(f), 1e-300)
        best = int(torch.argmin(delta))
        i, j = divmod(best, delta.shape[1])
        if float(delta[i, j]) < -tol:
            f += state.swap(ki[i:i + 1], pj[j:j + 1])
            swaps += 1
            history.append(f)
            continue
        accepted = False
        parts = [None] if part is None else torch.unique(part).tolist()
        for t, pid in itertools.product(range(2, max_swap + 1), parts):
            Ks = torch.arange(len(state.kg), device=cost.device)
            Ps = torch.arange(len(state.pg), device=cost.device)
            if pid is not None:
                Ks, Ps = Ks[part[state.kg] == pid], Ps[part[state.pg] == pid]
            if len(Ks) < t or len(Ps) < t:
                continue
            outs = Ks[torch.argsort(cost[Ks])[:t]]
            ins = Ps[torch.argsort(gain[Ps], descending=True)[:t]]
            if state.swap(outs, ins, apply=False) < -tol:
                f += state.swap(outs, ins)
                swaps += 1
                history.append(f)
                accepted = True
                break
        if not accepted:
            break
    return f, history, swaps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve(H: Tensor, W: Tensor, m: int, keep: int, *, damping: float = 0.01, local: bool = True,
          steps: int = 64, part: Tensor | None = None, max_iters: int = 100, max_swap: int = 2,
          candidates: int = 256, refresh: int = 0, device: torch.device | str | None = None,
          dtype: torch.dtype = F64) -> SolveResult:
    """OSSCAR on one layer: keep ``keep`` of the ``n/m`` input groups of ``W [out, n]`` given ``H [n, n]``.

    ``local=False`` is the greedy baseline (no local search). Runs on ``device`` (default: H's) with the
    search state in ``dtype`` (float64 unless you know G is well conditioned: see the module docstring);
    the kept weights are the exact float64 refit. With nothing to prune the weights come back unchanged
    (bit for bit)."""
    dev = torch.device(device) if device is not None else H.device
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    G, _ = damped(H, damping, device=dev)
    W64 = W.to(device=dev, dtype=F64)
    ng = _check(G, W64, m, keep, part)
    if keep == ng:
        return SolveResult(list(range(ng)), W64.clone(), 0.0, 0.0, 0, [0.0])
    Gs, Ws = (G, W64) if dtype == F64 else (G.to(dtype), W64.to(dtype))
    _sync(dev)
    seconds["setup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, f = greedy(Gs, Ws, m, keep, steps=steps, part=part)
    kept = state.kept
    _sync(dev)
    seconds["greedy"] = time.perf_counter() - t0
    f_greedy, history, swaps, C = None, [], 0, None
    if local:
        t0 = time.perf_counter()
        ls = SwapState.from_support(state)  # C = W G is formed there, after the greedy's Q is freed
        del state
        if dtype == F64:
            C = ls.C
        f_greedy = ls.objective()
        _, history, swaps = local_search(ls, f_greedy, part=part, max_iters=max_iters, max_swap=max_swap,
                                         candidates=candidates, refresh=refresh)
        kept = ls.kept()
        del ls
        _sync(dev)
        seconds["local_search"] = time.perf_counter() - t0
    else:
        del state
    t0 = time.perf_counter()
    kept_idx = torch.nonzero(kept).reshape(-1)
    weight, f = refit_and_objective(G, W64, kept_idx, m, C=C)
    _sync(dev)
    seconds["refit"] = time.perf_counter() - t0
    if f_greedy is None:
        f_greedy, history = f, [f]
    return SolveResult(kept_idx.tolist(), weight, f, f_greedy, swaps, history, seconds)
